"""Build hook: compiles the state machine's apply path to C with mypyc.

Apply speed bounds the throughput of every shard, and the apply path is strictly typed Python that
mypyc compiles as it is. Compiling needs a C compiler and Python.h; without them the install fails
rather than quietly running the slow build. ``RAFTLEDGER_PURE_PYTHON=1`` installs the same modules
uncompiled.

The sources live in ``statemachine/`` but their module names are ``raftledger.statemachine.*``, so
they are staged under ``build/mypyc-src/raftledger/statemachine/`` for mypy to name them right.
Everything else in the project metadata lives in pyproject.toml.
"""

import os
import shutil

from setuptools import setup

# The modules on the apply path, compiled together so calls between them are native C calls.
# store.py (queries, one call per Raft entry), audit.py and testing.py stay interpreted.
COMPILED = ("codes", "commands", "records", "codec", "validate", "hashing", "slots", "layout", "merkle",
            "ledger")


def compiled_extensions() -> list:
    if os.environ.get("RAFTLEDGER_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    root = os.path.join("build", "mypyc-src")
    package = os.path.join(root, "raftledger", "statemachine")
    shutil.rmtree(package, ignore_errors=True)  # nothing left over from an earlier module list
    os.makedirs(package)
    for name in ("__init__", *COMPILED):
        shutil.copyfile(os.path.join("statemachine", f"{name}.py"), os.path.join(package, f"{name}.py"))
    os.environ["MYPYPATH"] = os.path.abspath(root)
    paths = [os.path.join(package, f"{name}.py") for name in COMPILED]
    return mypycify(["--explicit-package-bases", *paths], opt_level="3",
                    group_name="raftledger.statemachine._compiled")


setup(ext_modules=compiled_extensions())
