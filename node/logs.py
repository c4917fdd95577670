"""Structured JSON logs, one object per line, carrying the request id of the request being served.

The request id comes from the client's ``X-Request-Id`` (when it looks sane) or is made up, is echoed
in the response, travels with forwarded writes, and is attached to every log line through a
context variable, so one request can be followed across nodes.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import re
import sys
import uuid
from typing import Any

request_id_length_max = 128
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                            default=None)

RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


_process_prefix = uuid.uuid4().hex[:12]
_request_counter = itertools.count(1)


def new_request_id(incoming: str | None) -> str:
    """Keep a client's id when it is short and plain; otherwise make one up.

    Made-up ids are a per-process random prefix plus a counter: unique without a call to the
    kernel's random source per request (which showed up in profiles under load).
    """
    if incoming and REQUEST_ID_RE.fullmatch(incoming):
        return incoming
    return f"{_process_prefix}{next(_request_counter):012x}"


class JsonFormatter(logging.Formatter):
    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node_id:
            out["node"] = self.node_id
        request_id = request_id_var.get()
        if request_id:
            out["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(node_id: str | None = None, level: int | str = logging.INFO) -> None:
    """Send the root logger's output to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
