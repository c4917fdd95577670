"""Reading a request body within bounds: size (413) and time (408), then strict decoding."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from raftledger.client.errors import LedgerError

from ..settings import HttpSettings
from . import parse
from .context import context_of

body_chunk_bytes = 64 * 1024


def too_large(bytes_max: int) -> LedgerError:
    return LedgerError("body_too_large", details={"bytes_max": bytes_max})


async def read_raw(request: web.Request, http: HttpSettings | None = None,
                   bytes_max: int | None = None) -> bytes:
    """The body, refused as soon as it passes ``bytes_max`` (default: the public ``body_bytes_max``;
    a streamed body is not buffered whole first), when it takes longer than ``body_read_timeout_s``,
    or as ``malformed_body`` when it cannot be decoded."""
    limits = http or context_of(request).settings.http
    try:
        return await _read_raw(request, limits, limits.body_bytes_max if bytes_max is None else bytes_max)
    except web.RequestPayloadError as exc:
        raise _undecodable(exc) from exc


def _undecodable(exc: web.RequestPayloadError) -> LedgerError:
    """A body aiohttp could not decode: a Content-Encoding that does not decode, broken chunked
    framing (the edge then closes the connection: see middleware.settle_broken_body)."""
    cause = exc.__cause__ or exc
    reason = getattr(cause, "message", None) or str(cause)
    return LedgerError("malformed_body", details={"reason": str(reason).strip()[:200]})


async def _read_raw(request: web.Request, limits: HttpSettings, bytes_max: int) -> bytes:
    length = request.content_length
    if length is not None and length > bytes_max:
        raise too_large(bytes_max)
    if request.content.is_eof():  # all of it arrived with the headers: nothing left to wait for
        raw = request.content.read_nowait()
        if len(raw) > bytes_max:
            raise too_large(bytes_max)
        return raw
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            return await _read_bounded(request, bytes_max)
    except TimeoutError:
        raise LedgerError("request_timeout",
                       details={"timeout_s": limits.body_read_timeout_s}) from None


async def _read_bounded(request: web.Request, bytes_max: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(body_chunk_bytes):
        size += len(chunk)
        if size > bytes_max:
            raise too_large(bytes_max)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, *, empty: Any = None) -> Any:
    """The decoded body (JSON or msgpack by Content-Type); ``empty`` stands for no body."""
    return parse.decode_body(await read_raw(request), request.headers.get("Content-Type"),
                             empty=empty)
