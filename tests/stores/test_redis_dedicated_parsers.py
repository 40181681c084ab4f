"""The store's batch connection reads replies through hiredis directly where the client's
parser is hiredis, and through redis-py's own ``read_response`` where it is not (a client
made with another ``parser_class``, or redis-py without hiredis): both read the same replies,
errors included."""

from __future__ import annotations

from typing import Any

import pytest
from redis import exceptions as rx
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
from redis.asyncio import Redis

from oncely.stores._redis_dedicated import Dedicated
from tests.stores._redis_support import REDIS_URL

pytestmark = pytest.mark.anyio


def _command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(out)


@pytest.mark.parametrize("parser", [_AsyncHiredisParser, _AsyncRESP2Parser])
async def test_replies_and_errors_read_alike_with_either_parser(parser: Any, unique: str) -> None:
    client = Redis.from_url(REDIS_URL, parser_class=parser)
    link = Dedicated(client)
    try:
        await link.connect()
        key = f"dedicated-{unique}".encode()
        assert await link.send(_command(b"SET", key, b"v", b"PX", b"60000")) in (b"OK", "OK")
        assert await link.send(_command(b"GET", key)) == b"v"
        with pytest.raises(rx.ResponseError):
            await link.send(_command(b"EVALSHA", b"0" * 40, b"0"))  # NOSCRIPT
        # The connection is in step after the error reply: the next exchange reads its own.
        assert await link.send(_command(b"DEL", key)) == 1
    finally:
        await link.aclose()
        await client.aclose()
