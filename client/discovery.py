"""Where a cluster is and which credential to present: one answer for the client, the CLI and tools.

Endpoints: the URLs given, else ``RAFTLEDGER_ENDPOINTS`` (comma-separated), else the nodes of
``<data_dir>/cluster.json`` (``./data`` by default), the file ``raftledger up`` writes. The token: the
one given, else ``RAFTLEDGER_TOKEN``, else the file's ``admin_token`` when it has one; none means
requests carry no ``Authorization`` header. The CA that ``https://`` nodes are verified against: the
one given, else ``RAFTLEDGER_CA_FILE``, else the file's ``ca_file`` (``raftledger up --tls``); none
means the system's CAs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ENDPOINTS_ENV = "RAFTLEDGER_ENDPOINTS"
TOKEN_ENV = "RAFTLEDGER_TOKEN"
CA_FILE_ENV = "RAFTLEDGER_CA_FILE"
DEFAULT_DATA_DIR = "./data"
CLUSTER_FILE = "cluster.json"


class DiscoveryError(ValueError):
    """No cluster could be found from what was given, the environment or the data directory."""


@dataclass(frozen=True, slots=True)
class Target:
    endpoints: tuple[str, ...]
    token: str | None
    data_dir: str | None  # the directory whose cluster.json was read, when one was
    ca_file: str | None = None  # the CA https:// nodes are verified against (None: the system's)


def discover(endpoints: Sequence[str] | None = None, token: str | None = None,
             data_dir: str | None = None, ca_file: str | None = None) -> Target:
    urls = [u.strip().rstrip("/") for u in endpoints or () if u.strip()]
    from_env = [u.strip().rstrip("/") for u in os.environ.get(ENDPOINTS_ENV, "").split(",") if u.strip()]
    plan = _read_cluster_file(data_dir or DEFAULT_DATA_DIR, required=data_dir is not None and not urls)
    if not urls:
        urls = from_env
    if not urls and plan is not None:
        urls = [str(n["http"]).rstrip("/") for n in plan.get("nodes", []) if n.get("http")]
    if not urls:
        raise DiscoveryError(
            f"no cluster endpoints: give --endpoint URL, set {ENDPOINTS_ENV}, or run where "
            f"{os.path.join(data_dir or DEFAULT_DATA_DIR, CLUSTER_FILE)} exists")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise DiscoveryError(f"endpoint {url!r}: expected an http:// or https:// URL")
    found = token or os.environ.get(TOKEN_ENV) or (plan or {}).get("admin_token") or None
    trusted = ca_file or os.environ.get(CA_FILE_ENV) or (plan or {}).get("ca_file") or None
    return Target(tuple(dict.fromkeys(urls)), found,
                  os.path.abspath(data_dir or DEFAULT_DATA_DIR) if plan is not None else None,
                  None if trusted is None else str(trusted))


def _read_cluster_file(data_dir: str, required: bool) -> dict[str, Any] | None:
    path = os.path.join(data_dir, CLUSTER_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        if required:
            raise DiscoveryError(f"{path}: no such file (is --data-dir the one `raftledger up` used?)"
                                 ) from None
        return None
    except (OSError, ValueError) as exc:
        raise DiscoveryError(f"{path}: unreadable: {exc}") from None
    if not isinstance(raw, dict):
        raise DiscoveryError(f"{path}: not a cluster file")
    return raw
