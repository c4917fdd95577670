"""The OpenAPI 3.1 description served at ``GET /openapi.json``; a test keeps it in step with the routes.

The routes are written by hand from API.md (not generated from the route table), so the test that
compares the two can fail when a route is added without being described. Request bodies are not:
their schemas and examples are rendered from the tables the parser reads them with (``bodies.py``).
"""

from __future__ import annotations

from typing import Any

from raftledger.client.errors import STATUS

from .bodies import BODIES, ID_PATTERN, NODE_ID, TOKEN_REQUEST

API_VERSION = "1.0.0"



def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str, where: str = "query", schema: dict[str, Any] | None = None,
           description: str = "") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path",
            "schema": schema or {"type": "string"}, "description": description}


PATH_ID = _param("id", "path", {"type": "string", "pattern": ID_PATTERN})
SHARD = _param("shard", "path", {"type": "integer", "minimum": 0})
IDEMPOTENCY = _param("Idempotency-Key", "header", {"type": "string", "pattern": ID_PATTERN},
                     "the id of the new transaction; equal to the body id when both are sent")
CONSISTENCY = [
    _param("consistency", schema={"enum": ["local", "linearizable"], "default": "local"}),
    _param("min_token", description="X-Ledger-Token of a write: wait until it is applied here"),
    _param("max_staleness_ms", schema={"type": "integer", "minimum": 0},
           description="refuse (503 stale_replica) if the leader was not heard from within it"),
]
ENTRIES_QUERY = [_param(n, schema={"type": "integer", "minimum": 0})
                 for n in ("after_seq", "before_seq", "from", "to")] + [
    _param("limit", schema={"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
    _param("order", schema={"enum": ["asc", "desc"], "default": "asc"}),
]
SHARD_PARAM = _param("shard", "path", {"type": "integer", "minimum": 0})
NODE_PARAM = _param("node", "path", NODE_ID)
FORCE = _param("force", schema={"type": "boolean", "default": False},
               description="go ahead although the shard's healthy replicas would not be a majority")
BALANCE_QUERY = [_param("at_seq", schema={"type": "integer", "minimum": 0}),
                 _param("at", schema={"type": "integer", "minimum": 0},
                        description="nanoseconds since the epoch")]


FEED_SHARD = _param("shard", schema={"type": "integer", "minimum": 0},
                    description="the shard whose feed to read (optional in a cluster of one shard)")
FEED_AFTER = _param("after", schema={"type": "integer", "minimum": 0, "default": 0},
                    description="the events after this offset (a consumer's offset, or next_after)")
FEED_QUERY = [_param("shard", schema={"type": "integer", "minimum": -1},
                     description="the shard whose feed to read (optional in a cluster of one shard); "
                                 "-1: the audit trail of administrative changes (admin, auditor)"),
              FEED_AFTER,
              _param("limit", schema={"type": "integer", "minimum": 1, "default": 100},
                     description="at most [feed] page_events_max"),
              _param("wait_ms", schema={"type": "integer", "minimum": 0, "default": 0},
                     description="when no event is there yet, wait this long for one (a long-poll; at "
                                 "most [feed] wait_ms_max)")]
LAST_EVENT_ID = _param("Last-Event-ID", "header", {"type": "string", "pattern": "^([0-9]+:)?[0-9]+$"},
                       "resume after this event id (<shard>:<offset>); it takes precedence over after")
DLQ_QUERY = [_param("shard", schema={"type": "integer", "minimum": 0}),
             _param("sink", schema={"enum": ["webhook", "nats"]})]
CONSUMER_NAME = _param("name", "path", {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"})


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}, "application/msgpack": {"schema": schema}}


def _responses(ok: int, schema: dict[str, Any], *errors: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(ok): {"description": "success", "content": _json(schema)}}
    for status in errors:
        out[str(status)] = {"description": "error (see the code)", "content": _json(_ref("Error"))}
    return out


def _op(summary: str, tag: str, ok: int = 200, schema: dict[str, Any] | None = None,
        errors: tuple[int, ...] = (400, 503), params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, body_required: bool = True) -> dict[str, Any]:
    """One operation; one that takes a body also answers 415 to a body that is not JSON or msgpack."""
    if body is not None:
        errors = tuple(sorted({*errors, 415}))
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "parameters": params or [],
                          "responses": _responses(ok, schema or {"type": "object"}, *errors)}
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": _json(body)}
    return op


def _create_accounts() -> dict[str, Any]:
    """One account (201; 200 when an identical one exists), or the list form ``{"accounts": [...]}``,
    which answers 200 with one result per account, as a batch does."""
    op = _op("Create an account, or several with {accounts: [...]}", "accounts", 201,
             _ref("Account"), WRITE_ERRORS,
             body={"oneOf": [_ref("NewAccount"), _ref("NewAccounts")]})
    op["responses"]["200"] = {
        "description": "an identical account existed (Idempotent-Replayed: true), or the results "
                       "of the list form, in request order",
        "content": _json({"oneOf": [_ref("Account"), _ref("BatchResults")]})}
    return op


WRITE_ERRORS = (400, 409, 413, 422, 503)
READ_ERRORS = (400, 404, 503)

TX_CREATE = _op("Create a transaction (or a shorthand transfer)", "transactions", 201,
                _ref("Transaction"), WRITE_ERRORS, [IDEMPOTENCY],
                {"oneOf": [_ref("NewTransaction"), _ref("Transfer")]})
BALANCE = _op("An account's balance, now or at a point in time", "accounts", 200, _ref("Balance"),
              READ_ERRORS + (422,), [PATH_ID, *BALANCE_QUERY, *CONSISTENCY])
ENTRIES = _op("An account's statement, one page", "accounts", 200, _ref("Statement"), READ_ERRORS,
              [PATH_ID, *ENTRIES_QUERY, *CONSISTENCY])


def _on_tx(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    """post / void / reverse: the body (an id, a partial amount) is optional."""
    return _op(summary, "transactions", 201, _ref("Transaction"), WRITE_ERRORS,
               [PATH_ID, IDEMPOTENCY], body, body_required=False)


_TOKEN_FIELDS: dict[str, Any] = TOKEN_REQUEST.schema()["properties"]  # as answered: null where unset

PATHS: dict[str, dict[str, Any]] = {
    "/v1/accounts": {"post": _create_accounts()},
    "/v1/accounts/{id}": {"get": _op("An account", "accounts", 200, _ref("Account"), READ_ERRORS,
                                     [PATH_ID, *CONSISTENCY])},
    "/v1/accounts/{id}/balance": {"get": BALANCE},
    "/v1/accounts/{id}/entries": {"get": ENTRIES},
    "/v1/transactions": {"post": TX_CREATE},
    "/v1/transactions/batch": {"post": _op(
        "Several transactions, independent or atomic (all or none)", "transactions", 200,
        _ref("BatchResults"), (400, 413, 422, 503), body=_ref("NewBatch"))},
    "/v1/transactions/{id}": {"get": _op("A transaction, or its stored rejection", "transactions",
                                         200, _ref("Transaction"), READ_ERRORS,
                                         [PATH_ID, *CONSISTENCY])},
    "/v1/transactions/{id}/post": {"post": _on_tx(
        "Post a pending transaction, fully or partially", _ref("PostPending"))},
    "/v1/transactions/{id}/void": {"post": _on_tx("Void a pending transaction", _ref("FollowUp"))},
    "/v1/transactions/{id}/reverse": {"post": _on_tx(
        "Reverse a posted transaction with a mirrored one", _ref("FollowUp"))},
    "/transacoes": {"post": dict(TX_CREATE, summary="Alias of POST /v1/transactions")},
    "/contas/{id}/saldo": {"get": dict(BALANCE, summary="Alias of the balance route")},
    "/contas/{id}/extrato": {"get": dict(ENTRIES, summary="Alias of the entries route")},
    "/v1/feed": {"get": _op("One page of a shard's change feed, in offset order (long-poll with wait_ms)",
                            "feed", 200, _ref("FeedPage"), (400, 410, 503), [*FEED_QUERY, *CONSISTENCY])},
    "/v1/feed/stream": {"get": {
        **_op("A shard's change feed as Server-Sent Events (id, event type, JSON data; a comment while "
              "idle)", "feed", 200, None, (400, 410, 503), [FEED_SHARD, FEED_AFTER, LAST_EVENT_ID,
                                                            *CONSISTENCY]),
        "responses": {"200": {"description": "text/event-stream: one event per Event, in offset order",
                              "content": {"text/event-stream": {}}},
                      **{str(s): {"description": "error (see the code)", "content": _json(_ref("Error"))}
                         for s in (400, 410, 503)}}}},
    "/v1/feed/consumers/{name}/offsets": {"put": _op(
        "Commit a durable consumer's offsets, per shard (replicated); they hold back retention",
        "feed", 200, _ref("ConsumerCommit"), (400, 422, 503), [CONSUMER_NAME],
        {"type": "object", "required": ["offsets"], "additionalProperties": False, "properties": {
            "offsets": {"type": "object", "minProperties": 1,
                        "additionalProperties": {"type": "integer", "minimum": 0},
                        "description": "shard (as a string) -> the last offset processed"}},
         "example": {"offsets": {"0": 17, "1": 4}}})},
    "/v1/feed/consumers/{name}": {
        "get": _op("A durable consumer's offset and lag on each shard", "feed", 200, _ref("Consumer"),
                   READ_ERRORS, [CONSUMER_NAME, _param("shard", schema={"type": "integer", "minimum": 0}),
                                 *CONSISTENCY]),
        "delete": _op("Forget a durable consumer on every shard (it no longer holds back retention)",
                      "feed", 200, _ref("ConsumerCommit"), (400, 503), [CONSUMER_NAME])},
    "/v1/feed/dlq": {"get": _op(
        "The exporters' dead-lettered batches (events kept until re-driven)", "feed", 200,
        _ref("DeadLetters"), (400, 503), DLQ_QUERY)},
    "/v1/feed/dlq/redrive": {"post": _op(
        "Send every dead-lettered batch again, once each; the delivered ones leave the store", "feed",
        200, {"type": "object", "properties": {"redriven": {"type": "array", "items": _ref("DeadLetter")},
                                               "failed": {"type": "array", "items": _ref("DeadLetter")}}},
        (400, 503), DLQ_QUERY)},
    "/v1/cluster": {"get": _op("The map's epoch, nodes and slot ranges; every shard's replicas: role, "
                               "term, commit and applied index, lag, last contact; changes in "
                               "progress", "operations", 200, _ref("ClusterStatus"), errors=(503,))},
    "/v1/tokens": {
        "post": _op("Create an API token (admin); its secret is in this answer only", "security", 201,
                    _ref("NewToken"), (400, 503), body=_ref("TokenRequest")),
        "get": _op("Every API token, without secrets (admin)", "security", 200, {
            "type": "object", "properties": {"tokens": {"type": "array", "items": _ref("Token")}}})},
    "/v1/tokens/{token}": {"delete": _op(
        "Revoke a token (admin): refused on every node within about 2 s", "security", 200, _ref("Token"),
        (404, 503), [_param("token", "path", {"type": "string", "maxLength": 64})])},
    "/v1/cluster/nodes": {"post": _op(
        "Register a node (201; 200 when registered with the same addresses)", "membership", 201,
        _ref("Node"), (400, 409, 503), body=_ref("NewNode"))},
    "/v1/cluster/nodes/{node}": {"delete": _op(
        "Mark a node removed (refused while it hosts replicas or a metadata group member)",
        "membership", 200, _ref("Node"), (400, 404, 409, 503), [NODE_PARAM])},
    "/v1/cluster/meta/move": {"post": _op(
        "Move a member of the metadata group (the cluster map) off a node: to the node named, else to "
        "an up node with a metadata address that hosts none (409 no_free_meta_host when there is "
        "none, unless shrink: true); 200 once done, 202 with progress while the new member catches "
        "up (send it again); 409 quorum_at_risk unless force=true", "membership", 200,
        _ref("MetaMoveResult"), (400, 404, 409, 503), [FORCE], body=_ref("MetaMove"))},
    "/v1/shards/{shard}/replicas": {"post": _op(
        "Add a replica: 200 once it caught up and votes, 202 with progress when the request's time "
        "ran out first (send it again); refused with 409 quorum_at_risk unless force=true",
        "membership", 200, _ref("ReplicaChange"), (400, 404, 409, 503), [SHARD_PARAM, FORCE],
        body=_ref("NewReplica"))},
    "/v1/shards/{shard}/replicas/{node}": {"delete": _op(
        "Remove a replica (its leadership moves first); refused with 409 quorum_at_risk when the "
        "remaining healthy replicas could not form a majority, unless force=true", "membership", 200,
        _ref("ReplicaChange"), (400, 404, 409, 503), [SHARD_PARAM, NODE_PARAM, FORCE])},
    "/v1/cluster/map": {"get": _op("The cluster map this node routes by: nodes, shards, slot ranges",
                                   "operations", 200, _ref("ClusterMap"), errors=(503,))},
    "/healthz": {"get": _op("The process is alive", "operations", errors=())},
    "/readyz": {"get": _op("This node has a cluster map, every hosted shard a leader, and this "
                           "replica is caught up", "operations", errors=(503,))},
    "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["operations"],
                         "responses": {"200": {"description": "text exposition format",
                                               "content": {"text/plain": {}}}}}},
    "/openapi.json": {"get": _op("This document", "operations", errors=())},
    "/v1/admin/verify": {"get": _op(
        "This node's replicas, each audited: hash chains, balances from entries, per-currency totals, "
        "open cross-shard legs older than grace_s, fingerprint", "admin", 200, _ref("VerifyReport"),
        (400,), [_param("grace_s", schema={"type": "integer", "minimum": 0, "default": 60})])},
    "/v1/admin/shards/{shard}/fingerprint": {"get": _op(
        "This replica's fingerprint right after the last entry at or below index (waits, bounded, "
        "until applied; 409 fingerprint_not_kept when too far back)", "admin", 200,
        _ref("Fingerprint"), (400, 404, 409, 503),
        [SHARD, _param("index", schema={"type": "integer", "minimum": 0}),
         _param("wait_s", schema={"type": "integer", "minimum": 0, "maximum": 30, "default": 10})])},
    "/v1/admin/shards/{shard}/totals": {"get": _op(
        "Per-currency sums over every account of this node's replica", "admin", 200,
        {"type": "object"}, (404,), [SHARD])},
    "/v1/admin/shards/{shard}/cut": {"get": _op(
        "This replica's cross-shard state in one read, for a cut of the cluster: per-currency totals, "
        "every open leg and open decision, and the legs, cross-shard decisions and aborts since "
        "since_ns; with accounts (comma-separated ids of this shard), their balances read in the same "
        "transaction, after the consistency asked for", "admin", 200, {"type": "object"}, (400, 404, 503),
        [SHARD, _param("since_ns", schema={"type": "integer", "minimum": 0, "default": 0}),
         _param("accounts", schema={"type": "string"}), *CONSISTENCY])},
    "/v1/admin/shards/{shard}/backup": {"get": {
        "summary": "A consistent copy of this replica's LMDB store, streamed; X-Ledger-Applied-Index "
                   "and X-Ledger-Fingerprint name the point it was taken at", "tags": ["admin"],
        "parameters": [SHARD], "responses": {
            "200": {"description": "the store", "content": {"application/octet-stream": {}}},
            "404": {"description": "no replica of the shard here", "content": _json(_ref("Error"))}}}},
    "/v1/admin/cluster/map": {"get": {
        "summary": "The whole cluster map (msgpack), its epoch in X-Ledger-Map-Epoch", "tags": ["admin"],
        "parameters": [], "responses": {
            "200": {"description": "the map", "content": {"application/octet-stream": {}}},
            "503": {"description": "no map yet", "content": _json(_ref("Error"))}}}},
}

INT = {"type": "integer"}
HEX = {"type": "string", "pattern": "^[0-9a-f]*$"}

SCHEMAS: dict[str, Any] = {
    **{name: body.schema() for name, body in BODIES.items()},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message", "details"], "properties": {
            "code": {"enum": sorted(c for c in STATUS if c != "ok")},
            "message": {"type": "string"}, "details": {"type": "object"}}}}},
    "Account": {"type": "object", "properties": {
        **{k: INT for k in ("debits_posted", "credits_posted", "debits_pending", "credits_pending",
                            "balance", "available", "seq", "shard", "timestamp")},
        "id": {"type": "string"}, "currency": {"type": "string"}, "normal": {"type": "string"},
        "flags": {"type": "array"}, "metadata": {"type": "object"}, "head": {"type": "string"}}},
    "Balance": {"type": "object", "properties": {
        **{k: INT for k in ("balance", "available", "debits_posted", "credits_posted",
                            "debits_pending", "credits_pending", "seq", "timestamp")},
        "account_id": {"type": "string"}, "currency": {"type": "string"}}},
    "Statement": {"type": "object", "properties": {
        "entries": {"type": "array", "items": {"type": "object"}},
        "next": {"type": ["integer", "null"]}}},
    "Transaction": {"type": "object", "properties": {
        "id": {"type": "string"},
        "status": {"enum": ["pending", "posted", "voided", "expired", "rejected"]},
        "entries": {"type": "array", "items": {"type": "object"}}, "timestamp": INT,
        "pending_id": {"type": ["string", "null"]}, "reverses": {"type": ["string", "null"]},
        "reversed_by": {"type": ["string", "null"]},
        "shards": {"type": "array", "items": INT,
                   "description": "the shards of its accounts (its legs, when cross_shard)"},
        "cross_shard": {"type": "boolean",
                        "description": "committed by two-phase commit across shards (docs/design.md)"}}},
    "ClusterMap": {"type": "object", "required": ["epoch", "slots", "nodes", "shards"], "properties": {
        "epoch": INT, "slots": INT,
        "nodes": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "url": {"type": "string"},
            "state": {"enum": ["up", "draining", "removed"]}}}},
        "shards": {"type": "array", "items": {"type": "object", "properties": {
            "id": INT, "replicas": {"type": "array", "items": {"type": "string"}}, "epoch": INT,
            "change": {"type": "object", "description": "a membership change in progress (only "
                       "while one is)", "properties": {"op": {"enum": ["add", "remove"]},
                                                      "node": {"type": "string"}}},
            "slot_ranges": {"type": "array", "items": {
                "type": "array", "items": INT, "minItems": 2, "maxItems": 2}}}}}}},
    "Node": {"type": "object", "properties": {
        "id": {"type": "string"}, "url": {"type": "string"}, "internal": {"type": "string"},
        "state": {"enum": ["up", "draining", "removed"]}, "epoch": INT,
        "raft": {"type": "object", "additionalProperties": {"type": "string"}},
        "meta": {"type": ["string", "null"]}}},
    "MetaMoveResult": {"type": "object", "properties": {
        "from": {"type": "string"}, "to": {"type": ["string", "null"]},
        "state": {"enum": ["done", "catching_up"]}, "members": {"type": "array", "items": {"type": "string"}},
        "epoch": INT, "applied_index": INT, "target_index": INT, "leader": {"type": ["string", "null"]}}},
    "ReplicaChange": {"type": "object", "properties": {
        "shard": INT, "node": {"type": "string"}, "state": {"enum": ["done", "catching_up"]},
        "replicas": {"type": "array", "items": {"type": "string"}}, "epoch": INT,
        "applied_index": INT, "target_index": INT, "leader": {"type": ["string", "null"]},
        "fingerprint": {"type": ["object", "null"]}}},
    "ClusterStatus": {"type": "object", "properties": {
        "node": {"type": "string"}, "epoch": INT, "slots": INT,
        "nodes": {"type": "array", "items": {"type": "object"}},
        "meta": {"type": "object", "description": "the metadata group: its members and the "
                 "membership change in progress", "properties": {
                     "members": {"type": "array", "items": {"type": "string"}},
                     "change": {"type": ["object", "null"]}}},
        "shards": {"type": "array", "items": {"type": "object", "properties": {
            "id": INT, "leader": {"type": ["string", "null"]}, "epoch": INT,
            "commit_index": {"type": ["integer", "null"]},
            "slot_ranges": {"type": "array", "items": {"type": "array", "items": INT}},
            "change": {"type": ["object", "null"]},
            "replicas": {"type": "array", "items": {"type": "object", "properties": {
                "node": {"type": "string"}, "reachable": {"type": "boolean"},
                "role": {"enum": ["leader", "follower"]}, "term": INT, "commit_index": INT,
                "applied_index": INT, "lag": INT,
                "last_contact_ms": {"type": ["number", "null"]}}}}}}}}},
    "VerifyReport": {"type": "object", "properties": {
        "node": {"type": "string"}, "map_epoch": INT, "replicas": {"type": "array", "items": {
            "type": "object", "properties": {
                **{k: INT for k in ("shard", "applied_index", "accounts", "entries", "transactions",
                                    "problems_count")},
                "node": {"type": "string"}, "role": {"type": "string"}, "fingerprint": {"type": "string"},
                "currencies": {"type": "object"}, "open_legs": {"type": "array"},
                "problems": {"type": "array", "items": {"type": "string"}}}}}}},
    "Fingerprint": {"type": "object", "properties": {
        "shard": INT, "node": {"type": "string"}, "asked": INT, "index": INT,
        "fingerprint": {"type": "string"}}},
    "Event": {"type": "object", "required": ["id", "shard", "offset", "type", "timestamp", "data"],
              "properties": {
                  "id": {"type": "string", "description": "<shard>:<offset>, unique: de-duplicate by it"},
                  "shard": INT, "offset": INT, "timestamp": INT,
                  "type": {"enum": ["account.created", "transaction.posted", "transaction.pending",
                                    "transaction.voided", "transaction.expired", "transaction.reversed"]},
                  "data": {"type": "object", "description": "the account, or the transaction (this "
                           "shard's entries; cross_shard and shards say whether other shards hold the "
                           "rest) with balances: each of its accounts' Balance right after the event"}}},
    "FeedPage": {"type": "object", "required": ["shard", "events", "next_after"], "properties": {
        "shard": INT, "events": {"type": "array", "items": _ref("Event")},
        "next_after": {"type": "integer", "description": "the after of the next request"},
        "first_offset": {"type": "integer", "description": "the first offset still held"},
        "last_offset": {"type": "integer", "description": "the last offset written (as applied here)"}}},
    "Consumer": {"type": "object", "properties": {
        "name": {"type": "string"}, "lag": INT,
        "shards": {"type": "object", "additionalProperties": {"type": "object", "properties": {
            "shard": INT, "offset": {"type": ["integer", "null"]},
            "updated_at": {"type": ["integer", "null"]}, "first_offset": INT, "last_offset": INT,
            "lag": {"type": ["integer", "null"]}}}}}},
    "DeadLetter": {"type": "object", "properties": {
        "sink": {"type": "string"}, "shard": INT, "first": INT, "last": INT, "events": INT,
        "since": INT, "error": {"type": "string", "description": "why a re-drive failed"}}},
    "DeadLetters": {"type": "object", "properties": {"dead_letters": {"type": "array",
                                                                      "items": _ref("DeadLetter")}}},
    "ConsumerCommit": {"type": "object", "properties": {
        "name": {"type": "string"}, "offsets": {"type": "object"},
        "shards": {"type": "object", "description": "shard -> {applied, ...} as each shard answered"}}},
    "PublicKeys": {"type": "object", "properties": {"keys": {"type": "array", "items": {
        "type": "object", "properties": {
            "node": {"type": "string"}, "key_id": HEX, "algorithm": {"const": "ed25519"},
            "public_key": HEX, "valid_from": INT, "retired_at": {"type": ["integer", "null"]}}}}}},
    "TreeHead": {"type": "object", "properties": {
        "shard": INT, "tree_size": INT, "root": HEX, "timestamp": INT,
        "signatures": {"type": "array", "items": {"type": "object", "properties": {
            "node": {"type": "string"}, "key_id": HEX, "signature": HEX}}}},
        "description": "each signature is Ed25519 over the ASCII of "
                       "raftledger.tree-head.v1\\n{shard}\\n{tree_size}\\n{root}\\n{timestamp}"},
    "InclusionProof": {"type": "object", "properties": {
        "shard": INT, "leaf_index": INT, "tree_size": INT, "leaf": HEX,
        "audit_path": {"type": "array", "items": HEX}, "root": HEX}},
    "ConsistencyProof": {"type": "object", "properties": {
        "shard": INT, "first": INT, "second": INT, "proof": {"type": "array", "items": HEX}}},
    "Chain": {"type": "object", "properties": {
        "account_id": {"type": "string"}, "genesis": HEX, "next": {"type": ["integer", "null"]},
        "entries": {"type": "array", "items": {
            "type": "object",
            "description": "a statement entry plus bytes: what SHA-256(prev_hash || bytes) = hash covers"}}}},
    "BatchResults": {"type": "object", "properties": {"results": {"type": "array", "items": {
        "type": "object", "properties": {"index": INT, "id": {"type": "string"}, "status": INT,
                                         "transaction": _ref("Transaction"),
                                         "account": _ref("Account"),
                                         "error": {"type": "object"}}}}}},
}

SCHEMAS.update({
    "Token": {"type": "object", "properties": {"id": {"type": "string"}, **_TOKEN_FIELDS,
                                               "created_at": INT}},
    "NewToken": {"type": "object", "properties": {"id": {"type": "string"}, **_TOKEN_FIELDS,
                                                  "created_at": INT, "token": {"type": "string"}}},
})
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def _secured(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every operation but the open ones takes the bearer token and may answer 401, 403 and 429."""
    out: dict[str, dict[str, Any]] = {}
    for path, operations in paths.items():
        out[path] = {}
        for method, op in operations.items():
            if path in OPEN_PATHS:
                out[path][method] = {**op, "security": []}
                continue
            extra = {str(s): {"description": "error (see the code)", "content": _json(_ref("Error"))}
                     for s in (401, 403, 429)}
            out[path][method] = {**op, "responses": {**op["responses"], **extra}}
    return out


HEADERS_DOC = ("Every write answers X-Ledger-Token: <shard>:<index>[,...], and as routing hints "
               "X-Ledger-Map-Epoch (the map the node routed by) and X-Ledger-Leader: "
               "<shard>=<node>[,...] (the leaders it knows). Every read answers "
               "X-Ledger-Node, X-Ledger-Applied-Index and X-Ledger-Staleness-Ms (-1: no leader "
               "heard from). Errors: {error: {code, message, details}}; 503s carry Retry-After.")


TREE_SIZE = _param("tree_size", schema={"type": "integer", "minimum": 0},
                   description="a size the tree had (default: the latest signed head)")
INTEGRITY_PATHS: dict[str, Any] = {
    "/v1/keys": {"get": _op("Every node's Ed25519 public keys, retired ones included", "integrity", 200,
                            _ref("PublicKeys"), (400,))},
    "/v1/shards/{shard}/tree-head": {"get": _op(
        "The shard's Merkle tree head, signed by a majority of its replicas", "integrity", 200,
        _ref("TreeHead"), (400, 404, 503), [SHARD_PARAM, TREE_SIZE])},
    "/v1/transactions/{id}/proof": {"get": _op(
        "RFC 9162 inclusion proof of the transaction's record in its shard's tree", "integrity", 200,
        _ref("InclusionProof"), (400, 404, 503), [PATH_ID, TREE_SIZE])},
    "/v1/shards/{shard}/leaves/{index}/proof": {"get": _op(
        "RFC 9162 inclusion proof of a leaf by its index (for sampling)", "integrity", 200,
        _ref("InclusionProof"), (400, 404, 503),
        [SHARD_PARAM, _param("index", "path", {"type": "integer", "minimum": 0}), TREE_SIZE])},
    "/v1/shards/{shard}/consistency": {"get": _op(
        "RFC 9162 consistency proof between two sizes of the shard's tree", "integrity", 200,
        _ref("ConsistencyProof"), (400, 404, 503),
        [SHARD_PARAM, *[_param(n, schema={"type": "integer", "minimum": 0}) for n in ("first", "second")]])},
    "/v1/accounts/{id}/chain": {"get": _op(
        "The account's hash chain: entries with hash, prev_hash and the bytes each hash covers",
        "integrity", 200, _ref("Chain"), (400, 404, 503),
        [PATH_ID, _param("after_seq", schema={"type": "integer", "minimum": 0}),
         _param("limit", schema={"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
         *CONSISTENCY])},
}
PATHS.update(INTEGRITY_PATHS)


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "raftledger HTTP API", "version": API_VERSION,
                 "description": HEADERS_DOC},
        "paths": _secured(PATHS),
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API token (POST /v1/tokens); not needed on clusters "
                                      "run without credentials"}}},
        "security": [{"bearer": []}],
    }
