"""The layers keep to their boundaries: PySyncObj is reached from one module, pinned to one version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "cluster", "client", "bench", "statemachine")
PYSYNCOBJ_PRIVATE = re.compile(r"_(SyncObj|TcpConnection|TcpServer|FileJournal|ResizableFile)__")


def sources() -> list[Path]:
    return [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]


def test_only_the_boundary_module_imports_pysyncobj_or_touches_its_internals():
    outside = []
    for path in sources():
        if path == ROOT / "node" / "raft.py":
            continue
        text = path.read_text()
        if re.search(r"^\s*(from|import) pysyncobj", text, re.MULTILINE) or PYSYNCOBJ_PRIVATE.search(text):
            outside.append(str(path.relative_to(ROOT)))
    assert outside == []


def test_the_boundary_refuses_another_pysyncobj_version():
    code = ("import pysyncobj.version as v; v.VERSION = '0.3.18'\n"
            "import raftledger.node.raft")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "written for PySyncObj 0.3.17" in out.stderr


def test_pysyncobj_is_pinned_to_the_version_the_boundary_was_written_for():
    from raftledger.node.raft import PYSYNCOBJ_VERSION

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"pysyncobj=={PYSYNCOBJ_VERSION}"' in pyproject
