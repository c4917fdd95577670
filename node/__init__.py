"""raftledger.node."""
