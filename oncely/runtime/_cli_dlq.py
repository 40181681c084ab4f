"""``oncely dlq list|show|replay|purge``: inspect and act on a topic's dead letters.

Output is for people on a TTY (an aligned table, progress on stderr) and for programs
otherwise (one JSON object per line, no progress). The JSON keys are stable: ``id``,
``topic``, ``reason``, ``attempt``, ``first_error``, ``last_error``, ``failed_at``,
``age_s``, ``body``, ``body_encoding`` (``utf-8`` or ``base64``) and ``headers``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from oncely.brokers.base import ALL, DeadLetter, DeadLetterAdmin
from oncely.brokers.registry import broker_from_url
from oncely.errors import ConfigError, NotSupported
from oncely.runtime._cli_help import (
    DLQ_EPILOG,
    DLQ_HELP,
    DLQ_LIST_EPILOG,
    DLQ_LIST_HELP,
    DLQ_PURGE_EPILOG,
    DLQ_PURGE_HELP,
    DLQ_REPLAY_EPILOG,
    DLQ_REPLAY_HELP,
    DLQ_SHOW_EPILOG,
    DLQ_SHOW_HELP,
)
from oncely.runtime._cli_outbox import parse_duration

if TYPE_CHECKING:
    from oncely.brokers.base import Broker
    from oncely.runtime.config import Settings

__all__ = ["add_dlq_parser", "letter_json", "parse_rate", "table"]

EXIT_USAGE = 2
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*s)?\s*$")


def add_dlq_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """Add ``dlq list|show|replay|purge`` to the ``oncely`` command's subcommands."""
    text = argparse.RawDescriptionHelpFormatter
    dlq = sub.add_parser(
        "dlq",
        help="list, show, replay or purge dead letters",
        description=DLQ_HELP,
        epilog=DLQ_EPILOG,
        formatter_class=text,
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str) -> argparse.ArgumentParser:
        parser = dlq_sub.add_parser(
            name,
            parents=[common],
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=text,
        )
        parser.add_argument("topic")
        return parser

    formats = ["auto", "json", "table"]
    lst = command("list", "list a topic's dead letters", DLQ_LIST_HELP, DLQ_LIST_EPILOG)
    lst.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (>= 1)")
    lst.add_argument(
        "--format", choices=formats, default="auto", help="auto: a table on a TTY, else JSON"
    )
    lst.set_defaults(func=_cmd_list)

    show = command("show", "show a dead letter's body and headers", DLQ_SHOW_HELP, DLQ_SHOW_EPILOG)
    show.add_argument("id")
    show.add_argument(
        "--format", choices=formats, default="auto", help="auto: text on a TTY, else JSON"
    )
    show.set_defaults(func=_cmd_show)

    rep = command("replay", "move dead letters back", DLQ_REPLAY_HELP, DLQ_REPLAY_EPILOG)
    which = rep.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="this message (repeatable)"
    )
    which.add_argument("--all", action="store_true", help="every dead letter of the topic")
    rep.add_argument("--rate", metavar="N/s", help="at most N messages a second (e.g. 50/s)")
    rep.set_defaults(func=_cmd_replay)

    purge = command("purge", "delete old dead letters", DLQ_PURGE_HELP, DLQ_PURGE_EPILOG)
    age = purge.add_mutually_exclusive_group(required=True)
    age.add_argument("--older-than", metavar="AGE", help="e.g. 30s, 15m, 12h, 7d")
    age.add_argument("--all", action="store_true", help="every dead letter (needs --yes)")
    purge.add_argument("--yes", action="store_true", help="confirm a purge with --all")
    purge.set_defaults(func=_cmd_purge)


def echo(*values: object, **kwargs: Any) -> None:
    """``print``: this module is the CLI's, and its output is the point."""
    print(*values, **kwargs)  # noqa: T201


def parse_rate(text: str) -> float:
    """``50``, ``50/s`` or ``0.5/s`` as messages a second.

    Raises:
        ConfigError: anything else, or not > 0.
    """
    match = _RATE.match(text)
    rate = float(match.group(1)) if match else 0.0
    if rate <= 0:
        raise ConfigError(f"--rate expects messages a second > 0, like 50/s; got {text!r}")
    return rate


def _admin(settings: Settings) -> Broker:
    broker = broker_from_url(settings.broker)
    if not isinstance(broker, DeadLetterAdmin):
        raise NotSupported(f"{type(broker).__name__} has no dead-letter admin (DeadLetterAdmin)")
    return broker


async def _require_dlq(broker: Broker, topic: str) -> None:
    """Refuse a topic the broker does not have: the admin calls would create its queues, and
    an operator's typo must not create topology."""
    if await broker.has_dead_letter_queue(topic) is False:
        raise ConfigError(f"no such topic/dead-letter queue: {topic!r}")


def _body(body: bytes) -> tuple[str, str]:
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def letter_json(letter: DeadLetter, now: float) -> dict[str, Any]:
    """A dead letter as the JSON object ``list`` and ``show`` print (stable keys)."""
    body, encoding = _body(letter.body)
    return {
        "id": letter.id,
        "topic": letter.topic,
        "reason": letter.reason,
        "attempt": letter.attempt,
        "first_error": letter.first_error,
        "last_error": letter.last_error,
        "failed_at": letter.failed_at,
        "age_s": round(max(now - letter.failed_at, 0.0), 3),
        "body": body,
        "body_encoding": encoding,
        "headers": dict(letter.headers),
    }


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _clip(text: str | None, width: int) -> str:
    text = "-" if text is None else " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(letters: list[DeadLetter], now: float) -> str:
    """The aligned table ``list`` prints on a TTY."""
    rows = [("ID", "ATTEMPT", "AGE", "LAST ERROR (REASON)", "FIRST ERROR")]
    rows += [
        (
            letter.id,
            str(letter.attempt),
            _age(max(now - letter.failed_at, 0.0)),
            _clip(letter.reason, 60),
            _clip(letter.first_error, 40),
        )
        for letter in letters
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _tty(stream: TextIO, fmt: str = "auto") -> bool:
    return fmt == "table" or (fmt == "auto" and stream.isatty())


async def _cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    broker = _admin(settings)
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        await _require_dlq(broker, args.topic)
        letters = await broker.dead_letters(args.topic, limit=args.limit)
    now = time.time()
    if _tty(sys.stdout, args.format):
        echo(table(letters, now))
    else:
        for letter in letters:
            echo(json.dumps(letter_json(letter, now)))
    echo(f"{len(letters)} dead letter(s) in {args.topic!r}", file=sys.stderr)
    return 0


async def _cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    broker = _admin(settings)
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        await _require_dlq(broker, args.topic)
        letter = await broker.get(args.topic, args.id)
    if letter is None:
        echo(f"oncely: error: no dead letter {args.id!r} in {args.topic!r}", file=sys.stderr)
        return EXIT_USAGE
    data = letter_json(letter, time.time())
    if not _tty(sys.stdout, args.format):
        echo(json.dumps(data))
        return 0
    for key in ("id", "topic", "reason", "attempt", "first_error", "last_error", "failed_at"):
        echo(f"{key + ':':13} {data[key]}")
    echo(f"{'age:':13} {_age(data['age_s'])}")
    echo("headers:")
    for name, value in sorted(letter.headers.items()):
        echo(f"  {name}: {value}")
    if data["body_encoding"] == "base64":
        echo("body (not UTF-8; base64):")
    else:
        echo("body (UTF-8):")
    echo(data["body"])
    return 0


class _Progress:
    """A one-line counter on stderr when it is a TTY; nothing otherwise."""

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.on = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.on:
            echo(f"\r{self.verb} {done}/{total}", end="", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.on:
            echo(file=sys.stderr)


async def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    rate = None if args.rate is None else parse_rate(args.rate)
    broker = _admin(settings)
    progress = _Progress("replayed")
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        await _require_dlq(broker, args.topic)
        if args.all:
            ids = [letter.id for letter in await broker.dead_letters(args.topic, limit=ALL)]
        else:
            ids = list(dict.fromkeys(args.ids))
        try:
            moved = await broker.replay_paced(args.topic, ids, rate=rate, progress=progress)
        finally:
            progress.end()
    echo(f"replayed {moved} message(s) to {args.topic!r}")
    if not args.all and moved < len(ids):
        # replay() counts what moved; the rest of the ids named nothing in the DLQ.
        echo(
            f"oncely: error: {len(ids) - moved} of the {len(ids)} ids given are not dead "
            f"letters of {args.topic!r} (misspelt, or already replayed)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return 0


async def _cmd_purge(args: argparse.Namespace, settings: Settings) -> int:
    if args.all and not args.yes:
        raise ConfigError("purge --all deletes every dead letter of the topic; add --yes")
    older_than = None
    if args.older_than is not None:
        try:
            older_than = parse_duration(args.older_than)
        except ConfigError:
            older_than = None
        if older_than is None:
            raise ConfigError(
                f"--older-than expects an age like 30s, 15m, 12h or 7d, got {args.older_than!r}"
            )
    broker = _admin(settings)
    async with broker:
        assert isinstance(broker, DeadLetterAdmin)
        await _require_dlq(broker, args.topic)
        # One broker call, which cannot report counts as it goes: on a TTY the time it has
        # taken so far shows it is still working.
        ticker = _Ticker(f"purging dead letters of {args.topic!r}…")
        try:
            purged = await broker.purge(args.topic, older_than=older_than)
        finally:
            await ticker.stop()
    echo(f"purged {purged} dead letter(s) of {args.topic!r}")
    return 0


class _Ticker:
    """``text`` and the seconds elapsed, redrawn every second on stderr when it is a TTY;
    nothing otherwise."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.task = asyncio.ensure_future(self._run()) if sys.stderr.isatty() else None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            echo(f"\r{self.text} {loop.time() - start:.0f}s", end="", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            echo(file=sys.stderr)
