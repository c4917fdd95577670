"""The ledger a team would build instead: PostgreSQL behind a lean aiohttp + asyncpg server.

It answers the same requests as raftledger's ``POST /v1/transactions`` (the shorthand transfer:
``id``, ``debit_account_id``, ``credit_account_id``, ``amount``, ``currency``) and
``POST /v1/transactions/batch`` (``{"transactions": [...]}``) with bodies of the same shape, so one
load generator drives both. ``POST /v1/accounts`` takes ``{"accounts": [...]}`` for the setup.

The schema is the plain one: accounts with balance columns, a per-account ``seq`` and hash head;
transactions; entries. One transfer is one database transaction (one function call, one round
trip): lock both account rows with ``SELECT ... FOR UPDATE`` in id order (no deadlocks), check the
debit limit (``debits_must_not_exceed_credits``), extend both accounts' SHA-256 chains with the byte
layout of ``statemachine/hashing.py``, update balances, seq and head, insert the transaction and its
two entries, commit. The transaction id is the idempotency key: a retry with the same payload gets
the first outcome (a rejection included) with ``Idempotent-Replayed: true``, another payload 409
``idempotency_key_reused``. Two requests racing with one new id: the second hits the primary key,
rolls back and is retried once, and then replays the first.

A batch is **one** database transaction (one commit, one WAL flush, as a raftledger batch is one
Raft entry): it locks every account it names in id order first, then applies its items in order,
each on its own (a rejected item does not undo the others).

    python -m raftledger.bench.pg_ledger --dsn postgresql://postgres@127.0.0.1:5432/ledger --port 8090

Several processes may serve one port (``SO_REUSEPORT``); ``install_schema`` creates the tables.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
from aiohttp import web

pool_size_default = 8
attempts_max = 3  # a lost race on a new id, a deadlock or a serialization failure is retried
amount_max = 2**63 - 1
batch_items_max = 8190
RETRYABLE = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError,
             asyncpg.SerializationError)
ID_RE = re.compile(r"[A-Za-z0-9._:{}\-]{1,128}")
CURRENCY_RE = re.compile(r"[A-Z0-9]{3,12}")
JSON = "application/json"
REPLAYED = {"Idempotent-Replayed": "true"}
POOL: web.AppKey[asyncpg.Pool] = web.AppKey("pool", asyncpg.Pool)

SCHEMA = r"""
CREATE TABLE accounts (
    id text PRIMARY KEY,
    currency text NOT NULL,
    normal text NOT NULL DEFAULT 'debit' CHECK (normal IN ('debit', 'credit')),
    debits_must_not_exceed_credits boolean NOT NULL DEFAULT false,
    debits_posted bigint NOT NULL DEFAULT 0,
    credits_posted bigint NOT NULL DEFAULT 0,
    seq bigint NOT NULL DEFAULT 0,
    head bytea NOT NULL,
    created_ns bigint NOT NULL
);
CREATE TABLE transactions (
    id text PRIMARY KEY,
    debit_account_id text NOT NULL,
    credit_account_id text NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    code text NOT NULL,          -- '' posted, else the rejection code (kept: a retry gets it again)
    detail_account text,         -- the account a rejection names
    created_ns bigint NOT NULL
);
CREATE TABLE entries (
    account_id text NOT NULL REFERENCES accounts (id),
    seq bigint NOT NULL,
    transaction_id text NOT NULL REFERENCES transactions (id),
    direction text NOT NULL,
    amount bigint NOT NULL,
    currency text NOT NULL,
    balance_after bigint NOT NULL,
    hash bytea NOT NULL,
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX entries_by_transaction ON entries (transaction_id);

CREATE TYPE transfer_outcome AS (
    result_code text, replayed boolean, ts bigint, detail_account text,
    debit_seq bigint, debit_hash bytea, credit_seq bigint, credit_hash bytea);

-- str(x) of statemachine/hashing.py: u16 length, then the UTF-8 bytes.
CREATE FUNCTION str16(s text) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT substring(int4send(octet_length(convert_to(s, 'UTF8'))) FROM 3) || convert_to(s, 'UTF8')
$$;

-- hash_n = SHA-256(hash_{n-1} + entry_bytes), entry_bytes as in statemachine/hashing.py
-- (status 1 = posted, released 0).
CREATE FUNCTION entry_hash(prev bytea, account text, seq bigint, txid text, direction int,
                           amount bigint, currency text, balance_after bigint, ts bigint)
RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT sha256(prev || str16(account) || int8send(seq) || str16(txid)
                  || substring(int4send(direction) FROM 4) || int8send(amount) || str16(currency)
                  || '\x01'::bytea
                  || CASE WHEN balance_after < 0 THEN '\xffffffffffffffff'::bytea
                          ELSE '\x0000000000000000'::bytea END
                  || int8send(balance_after) || int8send(ts) || int8send(0::bigint))
$$;

CREATE FUNCTION now_ns() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT (extract(epoch FROM now()) * 1000000000)::bigint
$$;

-- One transfer; the caller holds the row locks of both accounts.
CREATE FUNCTION post_transfer(p_id text, p_debit text, p_credit text, p_amount bigint,
                              p_currency text, p_now bigint)
RETURNS transfer_outcome LANGUAGE plpgsql AS $$
DECLARE
    r transfer_outcome;
    t transactions%ROWTYPE;
    d accounts%ROWTYPE;
    c accounts%ROWTYPE;
    d_balance bigint;
    c_balance bigint;
BEGIN
    SELECT * INTO t FROM transactions WHERE id = p_id;
    IF FOUND THEN
        IF (t.debit_account_id, t.credit_account_id, t.amount, t.currency)
                IS DISTINCT FROM (p_debit, p_credit, p_amount, p_currency) THEN
            r.result_code := 'idempotency_key_reused';
            r.replayed := false;
            RETURN r;
        END IF;
        r.result_code := t.code; r.replayed := true; r.ts := t.created_ns;
        r.detail_account := t.detail_account;
        SELECT e.seq, e.hash INTO r.debit_seq, r.debit_hash
            FROM entries e WHERE e.transaction_id = p_id AND e.direction = 'debit';
        SELECT e.seq, e.hash INTO r.credit_seq, r.credit_hash
            FROM entries e WHERE e.transaction_id = p_id AND e.direction = 'credit';
        RETURN r;
    END IF;
    r.result_code := ''; r.replayed := false; r.ts := p_now;
    SELECT * INTO d FROM accounts WHERE id = p_debit;
    SELECT * INTO c FROM accounts WHERE id = p_credit;
    IF p_debit = p_credit THEN
        r.result_code := 'accounts_must_be_different'; r.detail_account := p_debit;
    ELSIF d.id IS NULL OR c.id IS NULL THEN
        r.result_code := 'account_not_found';
        r.detail_account := CASE WHEN d.id IS NULL THEN p_debit ELSE p_credit END;
    ELSIF d.currency <> p_currency OR c.currency <> p_currency THEN
        r.result_code := 'currency_mismatch';
        r.detail_account := CASE WHEN d.currency <> p_currency THEN p_debit ELSE p_credit END;
    ELSIF d.debits_must_not_exceed_credits AND d.debits_posted + p_amount > d.credits_posted THEN
        r.result_code := 'exceeds_credits'; r.detail_account := p_debit;
    END IF;
    INSERT INTO transactions VALUES (p_id, p_debit, p_credit, p_amount, p_currency,
                                     r.result_code, r.detail_account, p_now);
    IF r.result_code <> '' THEN
        RETURN r;
    END IF;
    r.debit_seq := d.seq + 1;
    r.credit_seq := c.seq + 1;
    d_balance := CASE d.normal WHEN 'debit' THEN d.debits_posted + p_amount - d.credits_posted
                               ELSE d.credits_posted - d.debits_posted - p_amount END;
    c_balance := CASE c.normal WHEN 'debit' THEN c.debits_posted - c.credits_posted - p_amount
                               ELSE c.credits_posted + p_amount - c.debits_posted END;
    r.debit_hash := entry_hash(d.head, p_debit, r.debit_seq, p_id, 0, p_amount, p_currency,
                               d_balance, p_now);
    r.credit_hash := entry_hash(c.head, p_credit, r.credit_seq, p_id, 1, p_amount, p_currency,
                                c_balance, p_now);
    UPDATE accounts SET debits_posted = debits_posted + p_amount, seq = r.debit_seq,
                        head = r.debit_hash WHERE id = p_debit;
    UPDATE accounts SET credits_posted = credits_posted + p_amount, seq = r.credit_seq,
                        head = r.credit_hash WHERE id = p_credit;
    INSERT INTO entries VALUES
        (p_debit, r.debit_seq, p_id, 'debit', p_amount, p_currency, d_balance, r.debit_hash),
        (p_credit, r.credit_seq, p_id, 'credit', p_amount, p_currency, c_balance, r.credit_hash);
    RETURN r;
END
$$;

-- POST /v1/transactions: one database transaction.
CREATE FUNCTION transfer(p_id text, p_debit text, p_credit text, p_amount bigint, p_currency text)
RETURNS transfer_outcome LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts WHERE id IN (p_debit, p_credit) ORDER BY id FOR UPDATE;
    RETURN post_transfer(p_id, p_debit, p_credit, p_amount, p_currency, now_ns());
END
$$;

-- POST /v1/transactions/batch: one database transaction; every account locked first, in id order.
CREATE FUNCTION transfer_batch(p_ids text[], p_debits text[], p_credits text[], p_amounts bigint[],
                               p_currencies text[])
RETURNS SETOF transfer_outcome LANGUAGE plpgsql AS $$
DECLARE
    ts bigint := now_ns();
    r transfer_outcome;
BEGIN
    PERFORM 1 FROM accounts WHERE id = ANY (p_debits || p_credits) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_ids) LOOP
        r := post_transfer(p_ids[i], p_debits[i], p_credits[i], p_amounts[i], p_currencies[i], ts);
        RETURN NEXT r;
    END LOOP;
END
$$;
"""

TRANSFER_SQL = "SELECT * FROM transfer($1, $2, $3, $4, $5)"
BATCH_SQL = "SELECT * FROM transfer_batch($1, $2, $3, $4, $5)"
ACCOUNTS_SQL = """
INSERT INTO accounts (id, currency, normal, debits_must_not_exceed_credits, head, created_ns)
SELECT a.id, a.currency, a.normal, a.limited,
       sha256('raftledger/account/v1\\000'::bytea || convert_to(a.id, 'UTF8')), now_ns()
FROM unnest($1::text[], $2::text[], $3::text[], $4::boolean[]) AS a(id, currency, normal, limited)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
MESSAGES = {
    "account_not_found": "no such account",
    "accounts_must_be_different": "an account may not be both debited and credited",
    "currency_mismatch": "the transaction's currency differs from the account's",
    "exceeds_credits": "debits would exceed credits on an account that forbids it",
    "idempotency_key_reused": "this id was used for another transaction",
    "overflow": "a balance would leave the range of a bigint",
}
STATUS = {"idempotency_key_reused": 409}


async def install_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()


# -- requests ---------------------------------------------------------------------------------------
class Invalid(Exception):
    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class Transfer:
    __slots__ = ("id", "debit", "credit", "amount", "currency")

    def __init__(self, id: str, debit: str, credit: str, amount: int,  # noqa: A002 (the API's name)
                 currency: str) -> None:
        self.id, self.debit, self.credit = id, debit, credit
        self.amount, self.currency = amount, currency


def _text(body: dict, key: str, pattern: re.Pattern[str], code: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise Invalid(code, f"{key} is missing or malformed", field=key)
    return value


def _amount(value: Any) -> int:
    if isinstance(value, str) and value.isdigit() and value.isascii():
        value = int(value)
    if type(value) is not int or not 0 < value <= amount_max:
        raise Invalid("invalid_amount", "amount must be an integer in 1..2**63-1", field="amount")
    return value


def parse_transfer(body: Any, header_id: str | None = None) -> Transfer:
    """The shorthand transfer; the id comes from the body or the Idempotency-Key header."""
    if not isinstance(body, dict):
        raise Invalid("invalid_body", "a transfer is a JSON object")
    if header_id is not None:
        body = {"id": header_id, **body}
        if body["id"] != header_id:
            raise Invalid("idempotency_key_mismatch", "the header and the body name other ids")
    if "id" not in body:
        raise Invalid("missing_id", "a transfer needs an id")
    return Transfer(_text(body, "id", ID_RE, "invalid_id"),
                    _text(body, "debit_account_id", ID_RE, "invalid_id"),
                    _text(body, "credit_account_id", ID_RE, "invalid_id"),
                    _amount(body.get("amount")),
                    _text(body, "currency", CURRENCY_RE, "invalid_currency"))


def parse_batch(body: Any) -> list[Transfer]:
    items = body.get("transactions") if isinstance(body, dict) else None
    if not isinstance(items, list) or not 0 < len(items) <= batch_items_max:
        raise Invalid("invalid_batch", f"transactions must be a list of 1..{batch_items_max}")
    transfers = []
    for i, item in enumerate(items):
        try:
            transfers.append(parse_transfer(item))
        except Invalid as exc:
            exc.details["index"] = i
            raise
    return transfers


async def read_body(request: web.Request) -> Any:
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise Invalid("invalid_json", "the body is not JSON") from None


# -- responses --------------------------------------------------------------------------------------
def transaction_json(t: Transfer, row: asyncpg.Record) -> dict[str, Any]:
    """The shape of raftledger's transaction object."""
    return {"id": t.id, "status": "posted", "entries": [
        {"account_id": t.debit, "direction": "debit", "amount": t.amount, "currency": t.currency,
         "seq": row["debit_seq"], "hash": row["debit_hash"].hex()},
        {"account_id": t.credit, "direction": "credit", "amount": t.amount, "currency": t.currency,
         "seq": row["credit_seq"], "hash": row["credit_hash"].hex()}],
        "code": "", "metadata": {}, "timestamp": row["ts"], "pending": False, "timeout_seconds": 0,
        "expires_at": None, "pending_id": None, "reverses": None, "reversed_by": None,
        "resolved_by": None, "shards": [0]}


def error_json(code: str, message: str, details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def outcome(t: Transfer, row: asyncpg.Record) -> tuple[int, dict[str, Any]]:
    code = row["result_code"]
    if code == "":
        return 201, transaction_json(t, row)
    details = {"id": t.id} | ({"account_id": row["detail_account"]} if row["detail_account"] else {})
    return STATUS.get(code, 422), error_json(code, MESSAGES.get(code, code), details)


def respond(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON, headers=headers)


async def with_retries(call: Callable[[], Awaitable[Any]]) -> Any:
    for attempt in range(attempts_max):
        try:
            return await call()
        except RETRYABLE:
            if attempt == attempts_max - 1:
                raise
    raise AssertionError("unreachable")


# -- handlers ---------------------------------------------------------------------------------------
async def create_transaction(request: web.Request) -> web.Response:
    t = parse_transfer(await read_body(request), request.headers.get("Idempotency-Key"))
    pool = request.app[POOL]
    row = await with_retries(lambda: pool.fetchrow(TRANSFER_SQL, t.id, t.debit, t.credit,
                                                   t.amount, t.currency))
    status, body = outcome(t, row)
    return respond(status, body, REPLAYED if row["replayed"] else None)


async def create_batch(request: web.Request) -> web.Response:
    transfers = parse_batch(await read_body(request))
    pool = request.app[POOL]
    columns = ([t.id for t in transfers], [t.debit for t in transfers],
               [t.credit for t in transfers], [t.amount for t in transfers],
               [t.currency for t in transfers])
    rows = await with_retries(lambda: pool.fetch(BATCH_SQL, *columns))
    results = []
    for i, (t, row) in enumerate(zip(transfers, rows, strict=True)):
        status, body = outcome(t, row)
        item: dict[str, Any] = {"index": i, "id": t.id, "status": status}
        if row["replayed"]:
            item["replayed"] = True
        item.update({"transaction": body} if status == 201 else body)
        results.append(item)
    return respond(200, {"results": results})


async def create_accounts(request: web.Request) -> web.Response:
    body = await read_body(request)
    accounts = body.get("accounts") if isinstance(body, dict) else None
    if not isinstance(accounts, list) or not 0 < len(accounts) <= batch_items_max:
        raise Invalid("invalid_batch", f"accounts must be a list of 1..{batch_items_max}")
    if not all(isinstance(a, dict) and a.get("normal", "debit") in ("debit", "credit")
               for a in accounts):
        raise Invalid("invalid_account", "an account is an object; normal is debit or credit")
    ids = [_text(a, "id", ID_RE, "invalid_id") for a in accounts]
    columns = (ids, [_text(a, "currency", CURRENCY_RE, "invalid_currency") for a in accounts],
               [a.get("normal", "debit") for a in accounts],
               ["debits_must_not_exceed_credits" in a.get("flags", ()) for a in accounts])
    created = {r["id"] for r in await request.app[POOL].fetch(ACCOUNTS_SQL, *columns)}
    return respond(200, {"results": [{"index": i, "id": a, "status": 201 if a in created else 200}
                                     for i, a in enumerate(ids)]})


async def healthz(request: web.Request) -> web.Response:
    return respond(200, {"status": "ok", "pid": os.getpid()})


@web.middleware
async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    try:
        return await handler(request)
    except Invalid as exc:
        return respond(400, error_json(exc.code, exc.message, exc.details))
    except asyncpg.NumericValueOutOfRangeError:
        return respond(422, error_json("overflow", MESSAGES["overflow"], {}))


def make_app(dsn: str, pool_size: int) -> web.Application:
    app = web.Application(middlewares=[errors], client_max_size=16 * 1024 * 1024)

    async def pool_ctx(app: web.Application) -> Any:
        # Connections live through the whole run (asyncpg replaces one after 50,000 queries by default):
        # a backend that exits mid-run takes its CPU time out of the sum that compare.py measures.
        app[POOL] = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size,
                                              max_queries=2**62, max_inactive_connection_lifetime=0)
        yield
        await app[POOL].close()

    app.cleanup_ctx.append(pool_ctx)
    app.add_routes([web.post("/v1/transactions", create_transaction),
                    web.post("/v1/transactions/batch", create_batch),
                    web.post("/v1/accounts", create_accounts),
                    web.get("/healthz", healthz)])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=pool_size_default,
                        help="connections to PostgreSQL held by this process")
    args = parser.parse_args(argv)
    import uvloop

    web.run_app(make_app(args.dsn, args.pool_size), host=args.host, port=args.port,
                reuse_port=True, print=None, access_log=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
