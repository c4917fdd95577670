from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LedgerStore]:
    s = LedgerStore(str(tmp_path / "shard.lmdb"), shard=0, map_size=2**30)
    yield s
    s.close()


@pytest.fixture
def ledger(store: LedgerStore) -> Harness:
    return Harness(store)
