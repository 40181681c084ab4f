"""Opening ``AmqpBroker``'s robust connection and publish channel so that a connect that fails,
or that its caller gives up (cancelled, timed out), leaks nothing."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aio_pika
from aio_pika.connection import make_url

from oncely.brokers._amqp_topology import map_errors
from oncely.errors import ConnectionLost

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

__all__ = ["opened"]

Opened = tuple["AbstractRobustConnection", "AbstractRobustChannel"]


async def opened(url: str, within: float, leftovers: set[asyncio.Task[None]]) -> Opened:
    """Open a robust connection to ``url`` and its publish channel (confirms on), within
    ``within`` seconds; the robust connection's reconnects get as long each.

    The opening runs on a task of its own, which a cancelled caller does not cancel: aio-pika
    leaks a connection cancelled between its handshake and its first use (the reader, writer
    and heartbeat tasks and the socket run on, with no object left to close them by), and
    ``RobustConnection.close`` cancels its connecting task in the same place. A caller that
    gives up leaves the opening to finish (at most ``within`` seconds more) and then closes
    it, on a task kept in ``leftovers``.

    Raises:
        ConnectionLost: the broker could not be reached, or did not answer in time.
        ConfigError: the credentials or vhost were refused.
    """
    opening = asyncio.ensure_future(_open(url, within))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        closer = asyncio.ensure_future(_close_when_open(opening, within))
        leftovers.add(closer)
        closer.add_done_callback(leftovers.discard)
        raise


async def _open(url: str, within: float) -> Opened:
    # Not aio_pika.connect_robust, which keeps the connection to itself until it is made.
    driver_url = make_url(url)
    conn = aio_pika.RobustConnection(driver_url)
    try:
        try:
            # The whole opening is bounded, the channel's too; connect(timeout=) bounds each
            # of the robust connection's later reconnects as well, which would otherwise hang
            # on a silent host just the same.
            async with asyncio.timeout(within):
                with map_errors("connect"):
                    await conn.connect(timeout=within)
                    pub = conn.channel(publisher_confirms=True, on_return_raises=True)
                    await pub.initialize()
        except (TimeoutError, ConnectionLost) as exc:
            if isinstance(exc, TimeoutError) or isinstance(exc.__cause__, TimeoutError):
                where = f"{driver_url.host}:{driver_url.port}"
                raise ConnectionLost(
                    f"no AMQP answer from {where} within {within:g} s (the URL's timeout=)"
                ) from exc
            raise
    except BaseException:
        # Also for a failure of the channel: the caller, whose connect failed, has nothing
        # it knows to close, and a robust connection left open would reconnect for ever.
        with contextlib.suppress(Exception):
            await conn.close()
        raise
    return conn, pub


async def _close_when_open(opening: asyncio.Future[Opened], within: float) -> None:
    try:
        async with asyncio.timeout(within):
            conn, _ = await opening
    except Exception:  # it failed, or timed out and was cancelled: it closed what it made
        return
    with contextlib.suppress(Exception):
        await conn.close()
