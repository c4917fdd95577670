"""A replica's fingerprint history: what ``raftledger verify`` compares replicas by, at one index."""

from __future__ import annotations

from raftledger.node.fingerprints import FingerprintHistory


def test_fingerprint_at_an_index_is_the_one_after_the_last_entry_at_or_below_it():
    history = FingerprintHistory((10, "a"))
    history.record((12, "b"))  # 11 was a PySyncObj no-op: it never reached the store
    history.record((12, "b"))  # an entry the store skipped changes nothing
    history.record((13, "c"))
    assert history.at(10) == (10, "a")
    assert history.at(11) == (10, "a")
    assert history.at(12) == (12, "b")
    assert history.at(13) == (13, "c")
    assert history.at(14) is None  # not applied yet
    assert history.at(9) is None  # from before this history


def test_fingerprint_history_forgets_the_oldest_and_restarts_after_a_snapshot_install():
    history = FingerprintHistory((1, "x"), kept_max=3)
    for index in range(2, 6):
        history.record((index, str(index)))
    assert history.at(2) is None and history.at(3) == (3, "3") and history.at(5) == (5, "5")
    history.reset((50, "installed"))
    assert history.at(5) is None  # what came before the install is no longer consecutive
    assert history.at(50) == (50, "installed")
