"""API tokens: what a bearer token is, how it is stored in the cluster map, and who it lets in.

A token is ``rlt_`` followed by 43 characters of ``secrets.token_urlsafe(32)`` (256 bits). Only its
SHA-256 is kept, in the ``tokens`` section of the replicated cluster map (``cluster.map``: one
``PutValue`` per token, keyed by its public id ``tok_<16 hex>``; removing the value revokes it). A
plain hash (no salt, no slow KDF) is enough because the secret is random and long: there is nothing
to guess, and checking a request costs one hash and one dict lookup.

A record (``TokenRecord.to_wire``) holds the hash, a name, the role, the ``account_patterns`` (shell
globs; empty: every account), ``expires_at`` (ns, or None), ``rate_per_s`` (None: the node's
default) and ``created_at``. The map's public views never include the section (``ClusterMap.to_json``).

Roles grant permissions (``ROLE_PERMISSIONS``): ``admin`` everything; ``writer`` writes and reads;
``reader`` reads (the feed included); ``auditor`` reads and the integrity routes (``audit``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import translate
from typing import Any

SECTION = "tokens"
TOKEN_PREFIX = "rlt_"
ID_PREFIX = "tok_"
ROLE_ADMIN = "admin"
ROLE_WRITER = "writer"
ROLE_READER = "reader"
ROLE_AUDITOR = "auditor"
ROLES = (ROLE_ADMIN, ROLE_WRITER, ROLE_READER, ROLE_AUDITOR)
READ = "read"
WRITE = "write"
AUDIT = "audit"
ADMIN = "admin"
ROLE_PERMISSIONS: Mapping[str, frozenset[str]] = {
    ROLE_ADMIN: frozenset({READ, WRITE, AUDIT, ADMIN}),
    ROLE_WRITER: frozenset({READ, WRITE}),
    ROLE_READER: frozenset({READ}),
    ROLE_AUDITOR: frozenset({READ, AUDIT}),
}
name_chars_max = 64
patterns_max = 32
pattern_chars_max = 128
token_chars_max = 256  # a longer Authorization value is not a token of ours (never hashed)


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(8)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    hash: str
    name: str
    role: str
    account_patterns: tuple[str, ...] = ()
    expires_at: int | None = None
    rate_per_s: float | None = None
    created_at: int = 0

    def to_wire(self) -> dict[str, Any]:
        """What the map stores (the id is the key)."""
        return {"hash": self.hash, "name": self.name, "role": self.role,
                "account_patterns": list(self.account_patterns), "expires_at": self.expires_at,
                "rate_per_s": self.rate_per_s, "created_at": self.created_at}

    def public(self) -> dict[str, Any]:
        """``GET /v1/tokens``: everything but the hash."""
        out = self.to_wire()
        del out["hash"]
        return {"id": self.id, **out}

    @classmethod
    def from_wire(cls, token_id: str, raw: Mapping[str, Any]) -> TokenRecord:
        rate = raw.get("rate_per_s")
        expires = raw.get("expires_at")
        return cls(token_id, str(raw["hash"]), str(raw.get("name", "")), str(raw["role"]),
                   tuple(str(p) for p in raw.get("account_patterns") or ()),
                   None if expires is None else int(expires), None if rate is None else float(rate),
                   int(raw.get("created_at", 0)))

    def expired(self, now_ns: int) -> bool:
        return self.expires_at is not None and now_ns >= self.expires_at


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: its token's record, its permissions and its account scope."""

    token: TokenRecord
    permissions: frozenset[str]
    scope: re.Pattern[str] | None  # None: every account

    @classmethod
    def of(cls, token: TokenRecord) -> Caller:
        scope = None
        if token.account_patterns:
            scope = re.compile("|".join(f"(?:{translate(p)})" for p in token.account_patterns))
        return cls(token, ROLE_PERMISSIONS.get(token.role, frozenset()), scope)

    def may(self, permission: str) -> bool:
        return permission in self.permissions

    def sees(self, account_id: str) -> bool:
        return self.scope is None or self.scope.match(account_id) is not None

    def outside(self, account_ids: Any) -> list[str]:
        """The accounts among ``account_ids`` this caller may not touch (sorted, distinct)."""
        if self.scope is None:
            return []
        return sorted({a for a in account_ids if not self.sees(a)})


class TokenIndex:
    """The tokens of one map, by hash: what every request is checked against."""

    def __init__(self, section: Mapping[str, Any] | None) -> None:
        self.by_hash: dict[str, Caller] = {}
        self.records: list[TokenRecord] = []
        for token_id, raw in sorted((section or {}).items()):
            try:
                record = TokenRecord.from_wire(token_id, raw)
            except (KeyError, TypeError, ValueError):
                continue  # a malformed record lets nobody in
            self.records.append(record)
            self.by_hash[record.hash] = Caller.of(record)

    def caller(self, secret: str) -> Caller | None:
        if len(secret) > token_chars_max:
            return None
        return self.by_hash.get(hash_secret(secret))


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """What ``POST /v1/tokens`` asks for (its body is read by ``node/http/bodies.py``)."""

    name: str
    role: str
    account_patterns: tuple[str, ...] = ()
    expires_at: int | None = None
    rate_per_s: float | None = None


def new_record(request: TokenRequest, now_ns: int) -> tuple[TokenRecord, str]:
    """A new token: its record and its secret (shown once)."""
    secret = new_secret()
    record = TokenRecord(new_id(), hash_secret(secret), request.name, request.role,
                         request.account_patterns, request.expires_at, request.rate_per_s, now_ns)
    return record, secret
