"""Where the client and the CLI find the cluster and its credential."""

from __future__ import annotations

import json

import pytest
from raftledger.client.discovery import DiscoveryError, discover


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("RAFTLEDGER_ENDPOINTS", raising=False)
    monkeypatch.delenv("RAFTLEDGER_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./data here unless a test writes one


def write_cluster_file(directory, **extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    nodes = [{"id": "n0", "http": "http://127.0.0.1:9000"}, {"id": "n1", "http": "http://127.0.0.1:9001/"}]
    (directory / "cluster.json").write_text(json.dumps({"nodes": nodes, **extra}))


def test_given_urls_win_over_the_environment_and_the_file(monkeypatch, tmp_path) -> None:
    write_cluster_file(tmp_path / "data", admin_token="from-file")
    monkeypatch.setenv("RAFTLEDGER_ENDPOINTS", "http://a:1")
    found = discover(["http://b:2/", "http://b:2"], None, None)
    assert found.endpoints == ("http://b:2",) and found.token == "from-file"


def test_the_environment_wins_over_the_file(monkeypatch, tmp_path) -> None:
    write_cluster_file(tmp_path / "data")
    monkeypatch.setenv("RAFTLEDGER_ENDPOINTS", " http://a:1 , http://a:2,")
    monkeypatch.setenv("RAFTLEDGER_TOKEN", "from-env")
    found = discover()
    assert found.endpoints == ("http://a:1", "http://a:2") and found.token == "from-env"


def test_the_cluster_file_of_the_data_dir_names_every_node(tmp_path) -> None:
    write_cluster_file(tmp_path / "elsewhere")
    found = discover(data_dir=str(tmp_path / "elsewhere"), token="given")
    assert found.endpoints == ("http://127.0.0.1:9000", "http://127.0.0.1:9001")
    assert found.token == "given" and found.data_dir == str(tmp_path / "elsewhere")


def test_without_anything_to_go_on_the_error_says_what_to_give() -> None:
    with pytest.raises(DiscoveryError, match="--endpoint"):
        discover()


def test_a_named_data_dir_without_its_file_is_an_error(tmp_path) -> None:
    with pytest.raises(DiscoveryError, match="no such file"):
        discover(data_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_damaged_cluster_file_is_an_error(tmp_path, content) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cluster.json").write_text(content)
    with pytest.raises(DiscoveryError, match="cluster.json"):
        discover()


def test_an_endpoint_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(DiscoveryError, match="http"):
        discover(["127.0.0.1:8080"])
