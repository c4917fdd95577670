"""Where this node dials its peers: a table from a peer's address to the address to connect to.

Empty in production. The chaos harness (``raftledger.cluster.chaos``) starts nodes with
``RAFTLEDGER_DIAL_FILE`` naming a JSON object ``{"127.0.0.1:9001": "127.0.0.1:41234", ...}``, so that
each of this node's links (Raft, metadata Raft, internal) runs through a proxy of its own that can cut,
drop or delay it. Peers still know each other by their real addresses: only the connect is redirected.
"""

from __future__ import annotations

import json
import os

DIAL_FILE_ENV = "RAFTLEDGER_DIAL_FILE"


def _load() -> dict[str, str]:
    path = os.environ.get(DIAL_FILE_ENV)
    if not path:
        return {}
    with open(path) as f:
        table = json.load(f)
    return {str(k): str(v) for k, v in table.items()}


_table = _load()


def dial_address(address: str) -> str:
    """The "host:port" to connect to for the peer listening at ``address``."""
    return _table.get(address, address)


def dial_url(url: str) -> str:
    """``url`` ("http://host:port...") with its host:port redirected as ``dial_address`` says."""
    if not _table or not url.startswith("http://"):
        return url
    netloc, sep, rest = url[len("http://"):].partition("/")
    return "http://" + dial_address(netloc) + sep + rest
