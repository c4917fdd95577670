"""The fingerprints a replica went through lately, so that replicas are compared at one index.

Replicas of a shard apply the same log at different speeds: while writes go on, no two of them are at
the same applied index when asked. Each replica therefore remembers its last ``fingerprints_kept_max``
fingerprints (store applied index, shard chain), recorded on the apply thread after every entry, and
answers "your fingerprint at index N" from them once it has applied N (``raftledger verify``).
"""

from __future__ import annotations

import bisect
import threading
from collections import deque

Fingerprint = tuple[int, str]  # (store applied index, shard chain hash in hex)

fingerprints_kept_max = 4096


class FingerprintHistory:
    """Consecutive fingerprints of one store: every entry applied since the last ``reset``."""

    def __init__(self, current: Fingerprint, kept_max: int = fingerprints_kept_max) -> None:
        self._lock = threading.Lock()
        self._kept: deque[Fingerprint] = deque([current], maxlen=kept_max)

    def record(self, current: Fingerprint) -> None:
        """After an entry was applied (apply thread); an entry the store skipped changes nothing."""
        with self._lock:
            if current[0] > self._kept[-1][0]:
                self._kept.append(current)

    def reset(self, current: Fingerprint) -> None:
        """The store was replaced (a snapshot installed): what came before is no longer consecutive."""
        with self._lock:
            self._kept.clear()
            self._kept.append(current)

    def at(self, index: int) -> Fingerprint | None:
        """The fingerprint after the last store entry at or below ``index``; None when this replica
        has not applied ``index`` yet or no longer remembers that far back."""
        with self._lock:
            kept = list(self._kept)
        if index > kept[-1][0] or index < kept[0][0]:
            return None
        position = bisect.bisect_right([fp[0] for fp in kept], index) - 1
        return kept[position]
