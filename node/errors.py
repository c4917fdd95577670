"""Errors at the HTTP edge: one table from stable code to HTTP status, and the error body.

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

``ApiError`` carries a code to the renderer; ``Unavailable`` from the shard service becomes a 503.
"""

from __future__ import annotations

import math
from typing import Any

from raftledger.statemachine.codes import MESSAGES, ResultCode

retry_after_default_s = 1.0

STATUS: dict[str, int] = {
    # Ledger result codes (every ResultCode member appears; a test checks it).
    "ok": 201,
    "invalid_command": 400,
    "account_not_found": 422,
    "account_closed": 422,
    "currency_mismatch": 422,
    "unbalanced": 422,
    "exceeds_credits": 422,
    "exceeds_debits": 422,
    "overflow": 422,
    "pending_not_found": 422,
    "pending_already_posted": 422,
    "pending_already_voided": 422,
    "pending_expired": 422,
    "amount_exceeds_pending": 422,
    "already_reversed": 422,
    "too_many_entries": 422,
    "too_few_entries": 422,
    "idempotency_key_reused": 409,
    "exists_with_different_fields": 409,
    "linked_event_failed": 422,
    "invalid_amount": 400,
    "invalid_id": 400,
    "invalid_currency": 400,
    "flags_conflict": 400,
    "transaction_not_pending": 422,
    "transaction_not_posted": 422,
    "partial_amount_not_allowed": 422,
    "transaction_not_found": 404,
    "invalid_timeout": 400,
    "invalid_metadata": 400,
    "accounts_must_be_different": 422,
    # Edge codes: refused before the ledger sees the request.
    "malformed_json": 400,
    "malformed_body": 400,
    "duplicate_field": 400,
    "too_deep": 400,
    "unknown_field": 400,
    "missing_field": 400,
    "invalid_field": 400,
    "invalid_flag": 400,
    "invalid_query": 400,
    "invalid_token": 400,
    "missing_id": 400,
    "id_mismatch": 400,
    "too_many_commands": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "wrong_shard": 421,
    "cross_shard_not_supported": 422,
    "history_not_enabled": 422,
    "rate_limited": 429,
    "internal_error": 500,
    # The cluster cannot do it now: retry later (Retry-After).
    "unavailable": 503,
    "overloaded": 503,
    "not_leader": 503,
    "outcome_unknown": 503,
    "stale_replica": 503,
    "timeout": 503,
}

EDGE_MESSAGES: dict[str, str] = {
    "malformed_json": "the body is not valid JSON",
    "malformed_body": "the body could not be decoded",
    "duplicate_field": "a JSON object repeats a field",
    "too_deep": "the body nests too deeply",
    "unknown_field": "the body has fields this route does not know",
    "missing_field": "a required field is missing",
    "invalid_field": "a field has the wrong type or value",
    "invalid_flag": "unknown account flag",
    "invalid_query": "a query parameter is invalid",
    "invalid_token": "min_token must look like <shard>:<index>[,<shard>:<index>...]",
    "missing_id": "send the id in the body or in the Idempotency-Key header",
    "id_mismatch": "the Idempotency-Key header and the body id differ",
    "too_many_commands": "too many commands in one request",
    "unauthorized": "credentials are missing or invalid",
    "forbidden": "not allowed",
    "not_found": "not found",
    "method_not_allowed": "method not allowed on this route",
    "request_timeout": "the request body did not arrive in time",
    "body_too_large": "the body is too large",
    "unsupported_media_type": "send application/json or application/msgpack",
    "wrong_shard": "the command names an account that lives on another shard",
    "cross_shard_not_supported": "the accounts of this transaction live on different shards",
    "history_not_enabled": "point-in-time balances need the account flag 'history'",
    "rate_limited": "too many requests",
    "internal_error": "the node failed to serve the request; it was logged",
    "unavailable": "the shard is unavailable; retry",
    "overloaded": "the node is overloaded; retry later",
    "not_leader": "no leader is reachable for the shard; retry",
    "outcome_unknown": "the outcome is unknown; retry with the same id",
    "stale_replica": "this replica cannot satisfy the requested consistency in time",
    "timeout": "the request did not finish in time; retry with the same id",
}

RETRYABLE_STATUSES = frozenset({503})


class ApiError(Exception):
    """An error response with a stable code; the status comes from ``STATUS``."""

    def __init__(self, code: str, message: str | None = None, *,
                 details: dict[str, Any] | None = None, retry_after_s: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.extra_headers = headers or {}
        self.code = code
        self.message = message or message_for(code)
        self.details = details or {}
        self.status = STATUS[code]
        if retry_after_s is None and self.status in RETRYABLE_STATUSES:
            retry_after_s = retry_after_default_s
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return self.extra_headers
        return {**self.extra_headers, "Retry-After": retry_after_header(self.retry_after_s)}


def message_for(code: str) -> str:
    if code in ResultCode.__members__:
        return str(MESSAGES[ResultCode[code]])
    return EDGE_MESSAGES.get(code, code)


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def status_of(code: ResultCode | str) -> int:
    name = code.name if isinstance(code, ResultCode) else code
    return STATUS[name]


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client never retries too early."""
    return str(max(1, math.ceil(seconds)))


def from_unavailable(exc: Exception) -> ApiError:
    """A retryable failure of the shard service (``node.service.Unavailable`` and subclasses)."""
    code = getattr(exc, "code", "unavailable")
    if code not in STATUS or STATUS[code] != 503:
        code = "unavailable"
    details: dict[str, Any] = {}
    leader = getattr(exc, "leader", None)
    if leader:
        details["leader"] = leader
    return ApiError(code, str(exc) or None, details=details,
                    retry_after_s=getattr(exc, "retry_after_s", retry_after_default_s))
