from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from raftledger import statemachine
from raftledger.statemachine import store as store_module
from raftledger.statemachine.store import LedgerStore
from raftledger.statemachine.testing import Harness, interpreted


def pytest_sessionstart(session: pytest.Session) -> None:
    """An editable install compiles statemachine/ once: refuse to test a build older than its source."""
    package = Path(statemachine.__file__).parent
    for built in package.glob("*.so"):
        source = package / (built.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > built.stat().st_mtime:
            pytest.exit(f"{source} changed after it was compiled: run `pip install -e .` again, "
                        "or remove statemachine/*.so to test the plain Python modules", returncode=2)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LedgerStore]:
    s = LedgerStore(str(tmp_path / "shard.lmdb"), shard=0, map_size=2**30)
    yield s
    s.close()


@pytest.fixture
def ledger(store: LedgerStore) -> Harness:
    return Harness(store)


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """An interpreted ledger.py the store applies through; patch it to plant a bug."""
    module = interpreted("ledger")
    monkeypatch.setattr(store_module, "Applier", module.Applier)
    return module
