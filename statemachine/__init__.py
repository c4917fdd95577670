"""raftledger.statemachine."""
