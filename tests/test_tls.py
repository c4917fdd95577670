"""TLS end to end: ``raftledger up --tls`` runs a cluster whose public and internal listeners speak
TLS with certificates of a local CA; the client, the CLI and the nodes themselves trust that CA from
cluster.json, and nothing else gets in."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import stat
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from raftledger.client import Client, LedgerError, RetryPolicy
from raftledger.cluster import launcher
from raftledger.cluster.testing import LocalCluster, UpProcess
from raftledger.node import tls
from raftledger.node.config import ConfigError
from raftledger.node.settings import NodeSettings, TlsSettings
from raftledger.node.testing import consecutive_free_ports

pytestmark = pytest.mark.slow

up_timeout_s = 120.0


def cli(data_dir: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raftledger.cluster.cli", *args, "--data-dir", data_dir],
                          capture_output=True, text=True, timeout=up_timeout_s,
                          env={**os.environ, **(env or {})})


def test_up_tls_serves_client_cli_and_nodes_over_tls_and_refuses_the_rest(tmp_path):
    data_dir = str(tmp_path / "data")
    up = UpProcess("--nodes", "3", "--shards", "2", "--data-dir", data_dir, "--durability", "none",
                   "--port-base", str(consecutive_free_ports(3)), "--tls")
    try:
        up.wait_for("cluster is up")  # the demo ran through the client over TLS
        with open(os.path.join(data_dir, "cluster.json")) as f:
            plan = json.load(f)
        ca_file = plan["ca_file"]
        urls = [n["http"] for n in plan["nodes"]]
        assert all(u.startswith("https://") for u in urls)
        tls_dir = os.path.join(data_dir, launcher.TLS_DIR)
        for name in ("ca.key", "n0.key", "n1.key", "n2.key"):
            assert stat.S_IMODE(os.stat(os.path.join(tls_dir, name)).st_mode) == 0o600, name

        # The client finds the endpoints, the token and the CA in cluster.json.
        with Client(data_dir=data_dir) as ledger:
            ledger.create_account(id="tls-a", currency="USD")
            ledger.create_account(id="tls-b", currency="USD")
            ledger.transfer("tls-a", "tls-b", 25, "USD", id="tls-t1")
            assert ledger.balance("tls-b", consistency="linearizable").credits_posted == 25

        # An admin command of the CLI, over TLS, trusting the CA from cluster.json.
        listed = cli(data_dir, "token", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert any(t["role"] == "admin" for t in json.loads(listed.stdout)["tokens"])
        shown = cli(data_dir, "cluster", "status", "--json")
        assert shown.returncode == 0, shown.stderr

        # Plain HTTP to a TLS port gets no answer.
        plain = urls[0].replace("https://", "http://")
        with pytest.raises(OSError):
            launcher.http_request("GET", plain + "/healthz", token=plan["admin_token"])

        # A client that does not trust the CA is refused at the handshake.
        strict = RetryPolicy(deadline_s=3.0, attempt_timeout_s=2.0)
        with Client(urls, plan["admin_token"], policy=strict) as untrusting, \
                pytest.raises(LedgerError) as refused:
            untrusting.request("GET", "/v1/cluster")
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value) or refused.value.code == "unavailable"
        without_ca = cli(data_dir, "token", "list", "--json", env={"RAFTLEDGER_CA_FILE": os.devnull})
        assert without_ca.returncode != 0

        # The same CA passed explicitly works (RAFTLEDGER_CA_FILE, the client's ca_file=).
        with Client(urls, plan["admin_token"], ca_file=ca_file) as explicit:
            assert explicit.request("GET", "/v1/cluster")["nodes"]
    finally:
        assert up.stop() == 0


def test_public_api_can_require_client_certificates_of_its_ca(tmp_path):
    ca = tls.LocalCA(str(tmp_path / "clients"))
    ca.ensure()
    client_cert, client_key = ca.issue("operator")
    settings = NodeSettings(tls=TlsSettings(client_ca_file=ca.cert_file))
    with LocalCluster(tmp_path / "c", nodes=1, shards=1, settings=settings, use_tls=True,
                      credentials=True) as cluster:
        url = urlsplit(cluster.urls["n0"])

        def healthz(with_cert: bool) -> int:
            context = ssl.create_default_context(cafile=cluster.plan.ca_file)
            if with_cert:
                context.load_cert_chain(client_cert, client_key)
            conn = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=10)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status
            finally:
                conn.close()

        assert healthz(with_cert=True) == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            healthz(with_cert=False)
        # the nodes' own calls over the internal listener still work (the status polls)
        assert cluster.status("n0")["map_epoch"] > 0


def test_a_node_whose_tls_files_are_unusable_says_so_instead_of_a_traceback(tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"\[tls\]"):
        tls.server_context(TlsSettings(cert_file=str(bad), key_file=str(bad)), internal=False)
    with pytest.raises(ConfigError, match="missing.pem"):
        tls.client_context(TlsSettings(cert_file=str(bad), key_file=str(bad),
                                       ca_file=str(tmp_path / "missing.pem")))
