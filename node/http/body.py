"""Reading a request body within bounds: size (413) and time (408), then strict decoding."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .. import parse
from ..errors import ApiError
from .context import context_of


async def read_raw(request: web.Request) -> bytes:
    limits = context_of(request).limits
    length = request.content_length
    if length is not None and length > limits.body_bytes_max:
        raise ApiError("body_too_large", details={"bytes_max": limits.body_bytes_max})
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError("body_too_large", details={"bytes_max": limits.body_bytes_max}) from None
    except TimeoutError:
        raise ApiError("request_timeout",
                       details={"timeout_s": limits.body_read_timeout_s}) from None


async def read_json(request: web.Request, *, empty: Any = None) -> Any:
    """The decoded body (JSON or msgpack by Content-Type); ``empty`` stands for no body."""
    return parse.decode_body(await read_raw(request), request.headers.get("Content-Type"),
                             empty=empty)
