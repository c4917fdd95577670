"""The one error tree of raftledger: what the server raises and answers, and what the client raises.

Every error has a stable snake_case ``code`` (the wire contract: a code never changes meaning), the
HTTP ``status`` that code is answered with, a human ``message``, ``details`` (field paths, the
leader's id, limits...) and ``retryable``. On the wire every error, on every port, has one shape::

    {"error": {"code": "exceeds_credits", "message": "...", "details": {...}}}

with ``Retry-After`` on retryable ones. The tree separates "you sent something that will be refused
again" from "the cluster could not do it now"::

    LedgerError
    ├── Rejected                 4xx: the same request gets the same answer
    │   ├── InvalidRequest       400  malformed input, an invalid field (invalid_amount, unknown_field...)
    │   ├── Unauthorized         401  missing or unknown credentials
    │   ├── Forbidden            403  a role or scope that does not allow it
    │   ├── NotFound             404  not_found, transaction_not_found
    │   ├── MethodNotAllowed     405
    │   ├── RequestTimeout       408  the body did not arrive in time
    │   ├── Conflict             409  idempotency_key_reused, exists_with_different_fields,
    │   │                             quorum_at_risk, change_in_progress (membership)...
    │   ├── Gone                 410  the feed no longer holds the events asked for
    │   │   └── FeedCompacted         feed_compacted (``shard``, ``earliest_offset``)
    │   ├── PayloadTooLarge      413
    │   ├── UnsupportedMediaType 415
    │   ├── WrongShard           421  a command reached a shard that does not own its accounts' slots
    │   ├── RuleViolation        422  a ledger rule refused it (exceeds_credits, account_not_found...)
    │   └── RateLimited          429  retryable, after retry_after_s
    ├── Unavailable              503  retryable, after retry_after_s
    │   ├── NotLeader                 no leader reachable for the shard (``leader``: a hint, if known)
    │   ├── Overloaded                queues are full
    │   ├── StaleReplica              this replica cannot meet the read's consistency in time
    │   └── OutcomeUnknown            a write may or may not have applied: retry it with the same id
    └── InternalError            500  a bug (never for bad input); logged by the node

``LedgerError(code, ...)`` builds the class its code belongs to, so ``LedgerError("exceeds_credits")``
is a ``RuleViolation``; ``except Rejected as e: e.code == "exceeds_credits"`` works on either side.
"""

from __future__ import annotations

import math
from typing import Any

from raftledger.statemachine.codes import MESSAGES as RESULT_MESSAGES
from raftledger.statemachine.codes import ResultCode

RETRY_AFTER_DEFAULT_S = 1.0

# Every code a client can see, and its status. Ledger result codes (statemachine/codes.py) keep their
# names; a test checks that each of them appears here.
STATUS: dict[str, int] = {
    "ok": 201,
    "invalid_command": 400,
    "invalid_amount": 400,
    "invalid_id": 400,
    "invalid_currency": 400,
    "flags_conflict": 400,
    "invalid_timeout": 400,
    "invalid_metadata": 400,
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
    "transaction_not_found": 404,
    "node_not_found": 404,
    "tree_size_unavailable": 404,
    "not_a_replica": 404,
    "not_a_meta_member": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "idempotency_key_reused": 409,
    "exists_with_different_fields": 409,
    "quorum_at_risk": 409,
    "change_in_progress": 409,
    "last_replica": 409,
    "node_exists": 409,
    "node_removed": 409,
    "node_not_up": 409,
    "node_cannot_host": 409,
    "node_hosts_replicas": 409,
    "node_hosts_meta": 409,
    "no_free_meta_host": 409,
    "already_a_meta_member": 409,
    "address_in_use": 409,
    "map_change_refused": 409,
    "fingerprint_not_kept": 409,
    "feed_compacted": 410,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "wrong_shard": 421,
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
    "linked_event_failed": 422,
    "transaction_not_pending": 422,
    "transaction_not_posted": 422,
    "partial_amount_not_allowed": 422,
    "accounts_must_be_different": 422,
    "transaction_aborted": 422,
    "history_not_enabled": 422,
    "feed_offset_out_of_range": 422,
    "rate_limited": 429,
    "internal_error": 500,
    "unavailable": 503,
    "overloaded": 503,
    "not_leader": 503,
    "outcome_unknown": 503,
    "timeout": 503,
    "stale_replica": 503,
    "root_mismatch": 409,
}


MESSAGES: dict[str, str] = {
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
    "node_not_found": "no such node in the cluster map",
    "tree_size_unavailable": "this replica's transaction tree does not (yet) have that size",
    "root_mismatch": "this replica's transaction tree has another root at that size",
    "not_a_replica": "the node hosts no replica of the shard",
    "quorum_at_risk": "the shard's remaining healthy replicas could not form a majority",
    "change_in_progress": "another membership change of the shard is in progress",
    "last_replica": "the shard's last replica cannot be removed",
    "node_exists": "a node with this id is registered with other addresses",
    "node_removed": "the node was removed; its id is never used again",
    "node_not_up": "the node is not up",
    "node_cannot_host": "the node has no Raft address for the shard",
    "node_hosts_replicas": "the node still hosts replicas",
    "node_hosts_meta": "the node hosts a member of the metadata group",
    "not_a_meta_member": "the node hosts no member of the metadata group",
    "no_free_meta_host": "no up node outside the metadata group can take the member: add a node first",
    "already_a_meta_member": "the node hosts a member of the metadata group already",
    "address_in_use": "another node uses this address",
    "map_change_refused": "the cluster map refused the change",
    "history_not_enabled": "point-in-time balances need the account flag 'history'",
    "fingerprint_not_kept": "this replica no longer remembers its fingerprint at that index",
    "feed_compacted": "the feed no longer holds these events; start again from the earliest offset held",
    "rate_limited": "too many requests",
    "internal_error": "the node failed to serve the request; it was logged",
    "unavailable": "the shard is unavailable; retry",
    "overloaded": "the node is overloaded; retry later",
    "not_leader": "no leader is reachable for the shard; retry",
    "outcome_unknown": "the outcome is unknown; retry with the same id",
    "stale_replica": "this replica cannot satisfy the requested consistency in time",
    "timeout": "the request did not finish in time; retry with the same id",
}


def message_for(code: str) -> str:
    """The human text of a code (what the server sends when it has nothing more precise)."""
    if code in ResultCode.__members__:
        return str(RESULT_MESSAGES[ResultCode[code]])
    return MESSAGES.get(code, code)


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client never retries too early."""
    return str(max(1, math.ceil(seconds)))


class LedgerError(Exception):
    """Base of every raftledger error. ``LedgerError(code)`` builds the subclass of that code."""

    status = 500
    retryable = False

    def __new__(cls, code: str = "internal_error", *args: Any, **kwargs: Any) -> LedgerError:
        if cls is LedgerError:
            cls = class_of(code)
        return super().__new__(cls)

    def __init__(self, code: str = "internal_error", message: str | None = None, *,
                 details: dict[str, Any] | None = None, retry_after_s: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = message or message_for(code)
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = details or {}
        self.status = STATUS.get(code, type(self).status)
        if retry_after_s is None and self.retryable:
            retry_after_s = RETRY_AFTER_DEFAULT_S
        self.retry_after_s = retry_after_s
        self.extra_headers: dict[str, str] = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return self.extra_headers
        return {**self.extra_headers, "Retry-After": retry_after_header(self.retry_after_s)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, details={self.details!r})"


class Rejected(LedgerError):
    """4xx: the request is refused; sent again unchanged, it gets the same answer."""

    status = 400


class InvalidRequest(Rejected):
    status = 400


class Unauthorized(Rejected):
    status = 401


class Forbidden(Rejected):
    status = 403


class NotFound(Rejected):
    status = 404


class MethodNotAllowed(Rejected):
    status = 405


class RequestTimeout(Rejected):
    status = 408


class Conflict(Rejected):
    status = 409


class Gone(Rejected):
    status = 410


class FeedCompacted(Gone):
    """410 ``feed_compacted``: events a reader asked for were dropped by retention. The shard's
    feed now starts at ``earliest_offset``; what came before it cannot be read again."""

    @property
    def shard(self) -> int | None:
        shard = self.details.get("shard")
        return shard if isinstance(shard, int) else None

    @property
    def earliest_offset(self) -> int | None:
        earliest = self.details.get("earliest_offset")
        return earliest if isinstance(earliest, int) else None


class PayloadTooLarge(Rejected):
    status = 413


class UnsupportedMediaType(Rejected):
    status = 415


class WrongShard(Rejected):
    status = 421


class RuleViolation(Rejected):
    """A ledger rule refused the command (its code is a ``ResultCode`` name)."""

    status = 422


class RateLimited(Rejected):
    status = 429
    retryable = True


class Unavailable(LedgerError):
    """503: the cluster cannot do it now; the same request may succeed after ``retry_after_s``."""

    status = 503
    retryable = True

    def __init__(self, code: str = "unavailable", message: str | None = None, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)


class NotLeader(Unavailable):
    """No leader was reachable for the shard; ``leader`` names the leading node when known."""

    def __init__(self, code: str = "not_leader", message: str | None = None, *,
                 leader: str | None = None, **kwargs: Any) -> None:
        details = dict(kwargs.pop("details", None) or {})
        if leader is not None:
            details["leader"] = leader
        super().__init__(code, message, details=details, **kwargs)

    @property
    def leader(self) -> str | None:
        leader = self.details.get("leader")
        return leader if isinstance(leader, str) else None


class Overloaded(Unavailable):
    def __init__(self, code: str = "overloaded", message: str | None = None, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)


class StaleReplica(Unavailable):
    def __init__(self, code: str = "stale_replica", message: str | None = None, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)


class OutcomeUnknown(Unavailable):
    """The write may or may not have been applied; retrying it with the same id is safe."""

    def __init__(self, code: str = "outcome_unknown", message: str | None = None, **kwargs: Any) -> None:
        super().__init__(code, message, **kwargs)


class InternalError(LedgerError):
    status = 500


_BY_STATUS: dict[int, type[LedgerError]] = {
    400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 405: MethodNotAllowed,
    408: RequestTimeout, 409: Conflict, 410: Gone, 413: PayloadTooLarge, 415: UnsupportedMediaType,
    421: WrongShard, 422: RuleViolation, 429: RateLimited, 503: Unavailable, 500: InternalError,
}
_BY_CODE: dict[str, type[LedgerError]] = {
    "not_leader": NotLeader, "overloaded": Overloaded, "stale_replica": StaleReplica,
    "outcome_unknown": OutcomeUnknown, "timeout": OutcomeUnknown, "feed_compacted": FeedCompacted,
}


# What an answer without an error body (a proxy's, say) is taken for.
_STATUS_CODE = {400: "invalid_field", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "request_timeout", 413: "body_too_large",
                415: "unsupported_media_type", 429: "rate_limited", 500: "internal_error"}


def class_of(code: str, status: int | None = None) -> type[LedgerError]:
    """The class of a code; an unknown code (a newer server's) by its status."""
    if code in _BY_CODE:
        return _BY_CODE[code]
    known = STATUS.get(code)
    if known is not None:
        return _BY_STATUS[known]
    if status is not None:
        if status in _BY_STATUS:
            return _BY_STATUS[status]
        return Rejected if 400 <= status < 500 else Unavailable if status >= 502 else InternalError
    return InternalError


def from_wire(status: int | None, body: Any, retry_after: str | float | None = None) -> LedgerError:
    """The error an answer carries (``{"error": {...}}``); ``status`` is None for an item of a batch
    (its code decides). A retry hint comes from ``Retry-After`` or ``details.retry_after_s``."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):  # not from a node
        error = {"code": _STATUS_CODE.get(status or 500, "unavailable" if (status or 500) > 500
                                          else "invalid_field" if (status or 500) < 500
                                          else "internal_error"),
                 "message": f"HTTP {status} without an error body"}
    code = error["code"]
    raw_details = error.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    retry = _seconds(retry_after if retry_after is not None else details.get("retry_after_s"))
    cls = class_of(code, status)
    exc = cls.__new__(cls, code)
    LedgerError.__init__(exc, code, str(error.get("message") or message_for(code)), details=details,
                         retry_after_s=retry)
    if status is not None:
        exc.status = status
    return exc


def _seconds(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
