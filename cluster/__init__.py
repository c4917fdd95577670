"""raftledger.cluster."""
