"""Structured logs: JSON lines for machines, readable lines for people, and the message each
line is about.

The runtime sets ``MESSAGE`` once per delivery (``Runner.run``); the formatters read it only
when a line is actually logged, so a message nobody logs about costs a two-item list and one
``ContextVar.set`` (a few hundred nanoseconds; the list is emptied after, not reset). A line
logged while a delivery runs (by oncely, by the handler, by a library the handler calls, by a
thread it started with ``asyncio.to_thread``) carries ``handler``, ``topic``, ``message_id``,
``key`` and ``attempt``.

Payloads are never logged unless asked for (``payloads=True``; the CLI's ``--log-payloads``):
oncely's own log lines name messages by id, and the formatters add a ``payload`` field only
when asked.

Nothing here runs on import: the library never configures logging. ``oncely run`` calls
``configure_logging``; an embedding application either does the same or puts
``LogFormatter`` (and, when its handler formats on another thread, ``MessageFilter``) on its
own handlers.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from typing import IO, Any, Literal

__all__ = [
    "MESSAGE",
    "LogFormatter",
    "MessageFilter",
    "configure_logging",
    "message_fields",
    "note_key",
    "redact_values",
]

MESSAGE: ContextVar[list[Any] | None] = ContextVar("oncely_message", default=None)
"""``[handler name, delivery]`` of the delivery the current task runs, while it runs, and
its idempotency key once the runtime has extracted it (``note_key``).

The runtime empties the list when the run ends: a task started during the run (a heartbeat,
a connection pool's reader) inherits the variable and outlives the run, and its later lines
are not about that message. A list rather than a tuple for that reason."""

PAYLOAD_LIMIT = 4096
"""Most payload bytes a line carries when payloads are logged."""

_ATTR = "oncely_message"
"""The record attribute ``MessageFilter`` stores the fields in."""

# Everything a LogRecord has of its own; the rest came from ``extra=`` and is logged too.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", _ATTR}


def message_fields(*, payloads: bool = False) -> dict[str, Any] | None:
    """The fields of the message the current task runs, or ``None`` outside a delivery.

    Args:
        payloads: add ``payload``: the body as UTF-8 text (else base64), clipped to
            ``PAYLOAD_LIMIT`` bytes.
    """
    current = MESSAGE.get()
    if not current:
        return None
    handler, delivery = current[0], current[1]
    fields: dict[str, Any] = {
        "handler": handler,
        "topic": delivery.topic,
        "message_id": delivery.id,
        # The idempotency key the runtime extracted (None: the handler runs without one),
        # else, for handlers without a store or before extraction, the message's own key.
        "key": current[2] if len(current) > 2 else delivery.key,
        "attempt": delivery.attempt,
    }
    if payloads:
        fields["payload"] = _payload(delivery.body)
    return fields


def note_key(key: str | None) -> None:
    """Record the idempotency key of the delivery the current task runs (which a key source
    such as ``payload:order_id`` may take from the payload), for its later log lines."""
    current = MESSAGE.get()
    if current:
        current.append(key)


# What msgspec quotes from the input in its errors: "Invalid enum value 'x'" (also unquoted
# numbers), "unknown field `x`", and any other quoted literal.
_VALUES = (
    (re.compile(r"Invalid enum value .*?(?= - at |$)"), "Invalid enum value <redacted>"),
    (re.compile(r"unknown field `[^`]*`"), "unknown field `<redacted>`"),
    (re.compile(r"'[^']*'"), "'<redacted>'"),
)


def redact_values(text: str) -> str:
    """``text`` (a decode error's message) without the input values it quotes, for a log
    line: ``Invalid enum value 'card-4242' - at `$.kind``` becomes ``Invalid enum value
    <redacted> - at `$.kind```. The paths (``$.kind``) stay."""
    for pattern, replacement in _VALUES:
        text = pattern.sub(replacement, text)
    return text


def _payload(body: bytes) -> str:
    clipped = body[:PAYLOAD_LIMIT]
    try:
        text = clipped.decode("utf-8")
    except UnicodeDecodeError:
        text = "base64:" + base64.b64encode(clipped).decode("ascii")
    return text + ("…" if len(body) > PAYLOAD_LIMIT else "")


class MessageFilter(logging.Filter):
    """Stores the current message's fields on each record (``record.oncely_message``).

    Only needed on a handler that formats records away from the task that logged them (a
    ``QueueHandler``): the formatter there can no longer see the task's context. Never drops a
    record.
    """

    def __init__(self, *, payloads: bool = False) -> None:
        super().__init__()
        self.payloads = payloads

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, _ATTR):
            setattr(record, _ATTR, message_fields(payloads=self.payloads))
        return True


class LogFormatter(logging.Formatter):
    """Formats records as JSON lines (``kind="json"``) or readable text (``"text"``).

    A JSON line holds ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the message
    fields when the line is about one (``handler``, ``topic``, ``message_id``, ``key``,
    ``attempt``; ``payload`` only with ``payloads=True``), ``exc`` (the traceback) when there
    is one, and any ``extra=`` values. A text line is ``time level logger: msg`` followed by
    the message fields in brackets.
    """

    def __init__(self, kind: Literal["json", "text"] = "json", *, payloads: bool = False) -> None:
        if kind not in ("json", "text"):
            raise ValueError(f"kind must be 'json' or 'text', got {kind!r}")
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json = kind == "json"
        self.payloads = payloads

    def _fields(self, record: logging.LogRecord) -> dict[str, Any] | None:
        if hasattr(record, _ATTR):
            fields: dict[str, Any] | None = getattr(record, _ATTR)
            if fields is not None and not self.payloads:
                fields = {k: v for k, v in fields.items() if k != "payload"}
            return fields
        return message_fields(payloads=self.payloads)

    def format(self, record: logging.LogRecord) -> str:
        fields = self._fields(record)
        if not self.json:
            line = super().format(record)
            if not fields:
                return line
            tags = " ".join(f"{k}={v}" for k, v in fields.items())
            head, sep, rest = line.partition("\n")
            return f"{head} [{tags}]{sep}{rest}"
        out: dict[str, Any] = {
            "ts": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if fields:
            out.update(fields)
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in out:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(out, default=_repr, ensure_ascii=False)
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                # A lone surrogate (text decoded with ``surrogateescape``): no UTF-8 stream
                # takes it as it is, but JSON carries it as an escape.
                line = json.dumps(out, default=_repr)
        return line


def _repr(value: object) -> str:
    """An ``extra=`` value JSON cannot hold, as text; never raises (a broken ``__repr__`` would
    lose the line)."""
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}: unprintable>"


def _iso(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


_installed: logging.Handler | None = None


def configure_logging(
    level: str | int = "INFO",
    *,
    log_format: Literal["auto", "json", "text"] = "auto",
    stream: IO[str] | None = None,
    payloads: bool = False,
) -> logging.Handler:
    """Send logs to ``stream`` (default stderr) formatted by ``LogFormatter``.

    Sets the level of the ``oncely`` logger tree only: the root logger's level, and so other
    libraries' verbosity, stays what the application made it. The handler goes on the root
    logger so the application's own lines come out in the same format; calling this again
    replaces the handler it installed before (never anyone else's). What ``oncely run`` does.

    Args:
        level: the level of ``oncely`` loggers (``"DEBUG"``, ``"INFO"``, ...).
        log_format: ``"json"``, ``"text"``, or ``"auto"``: text when ``stream`` is a TTY, else
            JSON.
        stream: where lines go; default ``sys.stderr``.
        payloads: add message payloads to lines about a message (off by default: payloads
            may hold personal data or secrets).

    Returns:
        The handler installed.
    """
    global _installed
    out = sys.stderr if stream is None else stream
    kind: Literal["json", "text"] = "json"
    if log_format == "text" or (log_format == "auto" and _isatty(out)):
        kind = "text"
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogFormatter(kind, payloads=payloads))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    _installed = handler
    logging.getLogger("oncely").setLevel(level)
    return handler


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
