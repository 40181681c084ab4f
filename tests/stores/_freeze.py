"""A TCP proxy that can go silent: a server that froze, or a partition that drops packets,
as opposed to one that closes its connections (``FaultProxy.cut``)."""

from __future__ import annotations

import asyncio

from tests.stores._outbox_support import FaultProxy, pg_behind_proxy


class FreezingProxy(FaultProxy):
    """``FaultProxy`` that can also ``freeze()``: connections stay open, but whatever either
    side sends from then on is swallowed, and new connections are accepted and never
    answered. After ``thaw()`` new connections work; those that lost bytes stay silent."""

    frozen = False

    def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.frozen:
            await super()._client(reader, writer)
            return
        self._writers.add(writer)
        while await reader.read(65536):
            pass  # accepted, never answered

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        lost = False
        try:
            while data := await src.read(65536):
                lost = lost or self.frozen
                if lost or self.cut_off:
                    continue
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.transport.abort()
            self._writers.discard(dst)


async def pg_behind_freezing_proxy() -> tuple[FreezingProxy, str]:
    """A started proxy in front of the shared PostgreSQL, and the URL that goes through it."""
    return await pg_behind_proxy(FreezingProxy)
