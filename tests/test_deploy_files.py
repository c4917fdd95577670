"""The Dockerfile and docker-compose.yml cannot run here (no Docker engine); keep them consistent."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from raftledger.node import config

ROOT = Path(__file__).resolve().parent.parent


def test_every_compose_node_config_validates_and_names_itself() -> None:
    files = sorted((ROOT / "cluster" / "compose").glob("*.toml"))
    assert [f.stem for f in files] == ["n0", "n1", "n2"]
    for f in files:
        loaded = config.load(str(f))
        assert loaded.node_id == f.stem
        assert {n.id for n in loaded.cluster.nodes} == {"n0", "n1", "n2"}
        assert [n.meta for n in loaded.cluster.nodes] == ["n0:9100", "n1:9100", "n2:9100"]
        assert loaded.secret_file == "/run/secrets/cluster_secret"


def test_compose_mounts_each_node_config_and_the_dockerfile_copies_every_package() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    for node in ("n0", "n1", "n2"):
        assert f"./cluster/compose/{node}.toml:/etc/raftledger/node.toml" in compose
    assert "file: ./cluster/compose/cluster.secret" in compose and "secrets: [cluster_secret]" in compose
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\w+)/ ", dockerfile, re.MULTILINE))
    assert "9100" in re.findall(r"^EXPOSE (.*)$", dockerfile, re.MULTILINE)[0].split()
    assert {folder for folder in packages.values()} <= copied
