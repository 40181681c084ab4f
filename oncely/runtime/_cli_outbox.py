"""oncely outbox relay: publish an outbox's committed rows to a broker until signalled.

SIGTERM or SIGINT finishes the batch in flight (up to --grace seconds) and exits 0; a
second signal stops at once (the batch is released and its published rows go out again later,
with the same ids). A signal while the relay is still connecting gives up and exits 0. Bad
input exits 2; a database or broker that cannot be reached at start
exits 1. Once running, outages only pause the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from oncely.errors import ConfigError
from oncely.stores.outbox import DEFAULT_TABLE, OutboxRelay

if TYPE_CHECKING:
    from oncely.runtime.config import Settings

__all__ = ["add_outbox_parser", "parse_duration", "refuse_in_process_broker"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def refuse_in_process_broker(url: str, command: str) -> None:
    """Refuse a ``memory://`` broker for a command that publishes from its own process.

    Its hub lives and dies with that process, where nothing consumes: every message would be
    reported published (an outbox row marked sent) and then lost with the process.

    Raises:
        ConfigError: ``url`` is a ``memory://`` URL.
    """
    if urlsplit(url).scheme.lower() == "memory":
        raise ConfigError(
            f"'{command}' cannot publish to {url!r}: a memory:// hub lives inside one process, "
            "so its messages would be lost when the command exits; give the workers' broker "
            "URL (--broker or ONCELY_BROKER)"
        )


def parse_duration(text: str) -> float | None:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` or plain seconds; ``forever`` is ``None``.

    Raises:
        ConfigError: anything else.
    """
    if text.strip().lower() in ("forever", "none", "never"):
        return None
    match = _DURATION.match(text)
    if match is None:
        raise ConfigError(
            f"bad duration {text!r}: use a number with an optional unit s, m, h, d or w "
            "(e.g. 7d), or 'forever'"
        )
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def add_outbox_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``outbox relay`` to the ``oncely`` command's subcommands."""
    outbox = sub.add_parser("outbox", help="transactional outbox: run the relay")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True)
    relay = outbox_sub.add_parser(
        "relay",
        parents=[common],
        help="publish committed outbox rows to the broker",
        description=__doc__,
    )
    relay.add_argument(
        "--db", required=True, help="the outbox's database: postgresql://... or sqlite:///..."
    )
    relay.add_argument("--table", default=DEFAULT_TABLE, help="outbox table (default: %(default)s)")
    relay.add_argument("--batch", type=int, default=100, help="rows per claim (default: 100)")
    relay.add_argument(
        "--retention",
        default="7d",
        help="delete sent rows after this long: 30s, 15m, 12h, 7d, or forever (default: 7d)",
    )
    relay.add_argument(
        "--poll",
        type=float,
        default=1.0,
        help="seconds between looks without a notification (default: %(default)s)",
    )
    relay.add_argument(
        "--publish-timeout",
        type=float,
        default=30.0,
        help="seconds one publish may take (default: %(default)s)",
    )
    relay.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds to finish the batch at shutdown (default: %(default)s)",
    )
    relay.set_defaults(func=_cmd_outbox_relay)


async def _cmd_outbox_relay(args: argparse.Namespace, settings: Settings) -> int:
    refuse_in_process_broker(settings.broker, "oncely outbox relay")
    relay = OutboxRelay(
        args.db,
        settings.broker,
        batch=args.batch,
        poll=args.poll,
        retention=parse_duration(args.retention),
        publish_timeout=args.publish_timeout,
        table=args.table,
    )
    loop = asyncio.get_running_loop()
    stops: list[asyncio.Future[None]] = []
    starting = asyncio.ensure_future(relay.start())
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        signalled = True
        if not starting.done():
            # Stopped while connecting (a database that does not answer yet): give the start
            # up; it closes what it opened.
            starting.cancel()
            return
        # The first signal drains the batch in flight; a second one stops at once.
        grace = args.grace if not stops else 0.0
        logging.getLogger("oncely").info("signal received, stopping the relay (grace=%s)", grace)
        stops.append(asyncio.ensure_future(relay.stop(grace)))

    # Before start(), which may wait up to a connect timeout: a signal meanwhile must not
    # kill the process with the default action.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        try:
            await starting
        except asyncio.CancelledError:
            if signalled and starting.cancelled():
                return 0
            raise
        await relay.wait_stopped()
        await asyncio.gather(*stops)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0
