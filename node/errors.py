"""Errors at the HTTP edge: the messages of stable codes, and the error body.

Every error a client can see has a stable snake_case ``code``. Ledger result codes
(``raftledger.statemachine.codes.ResultCode``) keep their names; the edge adds its own codes for
input it refuses before the ledger sees it (``malformed_json``, ``unknown_field``, ...) and for
conditions of the cluster (``overloaded``, ``stale_replica``). ``STATUS`` alone decides a status:

- 400 the request is malformed or a field is invalid (``invalid_*``, ``missing_id``, ...)
- 404 the URL names something that does not exist
- 409 an id was used before with different content
- 413 the body is too large · 415 unsupported media type
- 421 a node-to-node request reached a shard that does not own its accounts
- 422 a business rule rejected the command (``exceeds_credits``, ``account_not_found``, ...)
- 503 the cluster cannot do it now (retryable, with ``Retry-After``)

The classes and the code → status table are the one error tree of ``raftledger.client.errors``,
shared with the client library; ``ApiError`` is its base under the name the edge has always used.
"""

from __future__ import annotations

from typing import Any

from raftledger.client.errors import STATUS, LedgerError, message_for, retry_after_header
from raftledger.statemachine.codes import ResultCode

__all__ = ["STATUS", "ApiError", "LedgerError", "error_body", "from_unavailable", "message_for",
           "retry_after_header", "status_of"]


# The one error tree (client/errors.py): the server raises what clients catch.
ApiError = LedgerError


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def status_of(code: ResultCode | str) -> int:
    name = code.name if isinstance(code, ResultCode) else code
    return STATUS[name]


def from_unavailable(exc: Exception) -> LedgerError:
    """What a retryable failure of a shard answers (it already is one of the tree's errors)."""
    if isinstance(exc, LedgerError):
        return exc
    return LedgerError("unavailable", str(exc) or None)
