"""raftledger.bench."""
