"""raftledger.client."""
