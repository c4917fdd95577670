"""The installed state machine is the mypyc build, unless the install asked for plain Python."""

import os

import pytest
from raftledger import statemachine


@pytest.mark.skipif(os.environ.get("RAFTLEDGER_PURE_PYTHON") == "1", reason="plain Python install")
def test_apply_path_is_compiled() -> None:
    from raftledger.statemachine import codec, layout, ledger

    assert statemachine.COMPILED
    for module in (codec, ledger, layout):
        assert not module.__file__.endswith(".py"), module.__file__
