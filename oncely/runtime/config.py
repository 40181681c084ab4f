"""Worker settings: one msgspec Struct tree from TOML, ``ONCELY_*`` variables and CLI flags.

Where a value comes from, lowest first: the defaults, the TOML file, the environment, the CLI
flags. An unknown key anywhere (a TOML key, an ``ONCELY_*`` variable, a handler name) is an
error, never silently dropped. Values are checked when the tree is built: a non-positive
``concurrency``, ``timeout``, ``visibility``, ``max_attempts`` or ``grace_period`` is a
one-line ``ConfigError`` that names the key.

What a handler runs with, most specific first (explicit ``None`` checks, so ``0`` is never
mistaken for "unset"):

1. ``[handlers."NAME"]`` settings (``concurrency``, ``timeout``, ``visibility``,
   ``max_attempts``);
2. the global ``concurrency`` (``ONCELY_CONCURRENCY``, ``--concurrency``);
3. what the code declared in ``@app.handler(...)``.

A TOML file looks like::

    broker = "sqlite:///jobs.db"
    store = "sqlite:///jobs.db"
    grace_period = 20

    [handlers."orders"]
    concurrency = 8
    timeout = 120
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from oncely.errors import ConfigError

__all__ = ["DEFAULT_BROKER", "HandlerSettings", "Settings", "load_settings"]

DEFAULT_BROKER = "sqlite:///oncely.db"
"""The embedded default: a durable queue in a file next to the worker, no server needed."""

DEFAULT_MEMORY_STORE = "~default"
"""The store name the process-wide ``memory://`` hub gets by default, shared like the hub."""

ENV_PREFIX = "ONCELY_"
ENV_CONFIG = "ONCELY_CONFIG"
ENV_IGNORED = "ONCELY_TEST_"
"""Variables for oncely's own test suite (server URLs); the strict check passes over them."""


class HandlerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-handler overrides of what the code declared; they beat the global settings.

    Checked by the ``Settings`` that holds them, so the error names the handler.
    """

    concurrency: int | None = None
    timeout: float | None = None
    visibility: float | None = None
    max_attempts: int | None = None


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything a worker can be told from outside the code.

    Attributes:
        broker: the broker URL.
        store: the idempotency store URL. Unset: the broker's own location without its
            options when the broker is ``sqlite://`` or ``memory://`` (see ``store_url``);
            other brokers need it set when any handler is effectively-once.
        concurrency: overrides what the code declared for every handler, unless the
            handler's own ``[handlers."NAME"] concurrency`` is set.
        grace_period: seconds in-flight handlers get to finish at shutdown.
        fail_open: when the store is unreachable, run handlers without dedupe (logged)
            instead of retrying later.
        log_level: the level of the ``oncely`` loggers in the CLI (never the root logger's).
        log_format: how the CLI writes logs to stderr: ``json`` lines, readable ``text``, or
            ``auto`` (text on a TTY, else JSON).
        log_payloads: add message payloads to log lines about a message (off by default:
            payloads may hold personal data or secrets).
        metrics_port: ``oncely run`` serves ``/metrics``, ``/livez``, ``/readyz`` and
            ``/status.json`` on this port (unset: no server; ``0``: any free port).
        metrics_host: the address that server binds (all interfaces by default, so a
            Prometheus scraper and the kubelet's probes can reach it).
        loop_block_threshold: seconds of event-loop lag that fail ``/livez``.
        stall_timeout: seconds a handler may make no progress while work waits (beyond its
            own timeout, for a full pool) before ``/livez`` fails.
        handlers: per-handler overrides, by handler name.
    """

    broker: str = DEFAULT_BROKER
    store: str | None = None
    concurrency: int | None = None
    grace_period: float = 30.0
    fail_open: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    log_payloads: bool = False
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    loop_block_threshold: float = 1.0
    stall_timeout: float = 60.0
    handlers: dict[str, HandlerSettings] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every value; the worker calls it again, in case one was assigned later.

        Raises:
            ConfigError: one line naming the key, e.g. ``[handlers.x] timeout must be a
                number > 0, got 0``.
        """
        _check(self.concurrency, "concurrency", minimum=1)
        # Issue 6: a grace of 0 would cancel every in-flight handler at the first SIGTERM;
        # "stop at once" is the second signal's job, not a setting.
        _check(self.grace_period, "grace_period")
        _check(self.loop_block_threshold, "loop_block_threshold")
        _check(self.stall_timeout, "stall_timeout")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        for name, o in self.handlers.items():
            where = f"[handlers.{_quote(name)}] "
            _check(o.concurrency, where + "concurrency", minimum=1)
            _check(o.timeout, where + "timeout")
            _check(o.visibility, where + "visibility")
            _check(o.max_attempts, where + "max_attempts", minimum=1)

    def store_url(self, broker_url: str | None = None) -> str | None:
        """The store URL, defaulting to the embedded broker's own database.

        The default keeps the broker's location and drops its options: ``sqlite:///x.db
        ?poll_interval=0.1`` gives the store ``sqlite:///x.db``, ``memory://name`` the memory
        store of that name, the process-wide hub ``memory://`` the process-wide store
        ``memory://~default``, and a private ``MemoryBroker()`` a private memory store.

        Args:
            broker_url: the broker actually in use, when it is not ``self.broker`` (for a
                broker instance, its ``url``).
        """
        if self.store:
            return self.store
        broker = self.broker if broker_url is None else broker_url
        parts = urlsplit(broker)
        if parts.scheme == "sqlite":
            # The broker's options (poll_interval, ...) mean nothing to the store.
            return broker.split("?", 1)[0].split("#", 1)[0]
        if parts.scheme == "memory":
            if parts.netloc.startswith("<"):
                # MemoryBroker() names its private hub "memory://<private>": no name to share.
                return "memory://"
            # memory:// is one hub shared by the whole process, but a store URL without a
            # name is private to one store: name it, or each Worker would forget the keys.
            return f"memory://{parts.netloc or DEFAULT_MEMORY_STORE}"
        return None


def _check(value: float | None, key: str, *, minimum: float | None = None) -> None:
    """Raise a one-line ``ConfigError`` naming ``key`` when ``value`` is out of range.

    Without ``minimum`` the value must be a finite number > 0.
    """
    if value is None:
        return
    # As written: a TOML "timeout = 0" arrives as 0.0 in a float field.
    shown = int(value) if math.isfinite(value) and value == int(value) else value
    if minimum is None:
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key} must be a number > 0, got {shown}")
    elif not (value >= minimum and math.isfinite(value)):
        raise ConfigError(f"{key} must be >= {minimum:g}, got {shown}")


def _quote(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else f'"{name}"'


_ENV_FIELDS = {f for f in Settings.__struct_fields__ if f != "handlers"}


def load_settings(
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build ``Settings`` from a TOML file, the environment and explicit overrides.

    Args:
        config_file: a TOML file; defaults to ``$ONCELY_CONFIG`` when set.
        environ: the environment to read (default ``os.environ``).
        overrides: values from CLI flags; ``None`` values are ignored.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or variable, or a bad value; the
            message names the key.
    """
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    from_env: dict[str, str] = {}  # field -> the variable that set it
    path = config_file or env.get(ENV_CONFIG)
    if path:
        merged.update(_read_toml(Path(path)))
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or name.startswith(ENV_IGNORED):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in _ENV_FIELDS:
            known = ", ".join(sorted([ENV_CONFIG, *(ENV_PREFIX + f.upper() for f in _ENV_FIELDS)]))
            raise ConfigError(f"unknown environment variable {name}; known: {known}")
        merged[field] = value
        from_env[field] = name
    chosen = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged.update(chosen)
    try:
        # strict=False lets "8" from the environment become 8 and "true" become True.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        what, _, at = str(exc).partition(" - at `$.")
        variable = from_env.get(at.rstrip("`"))
        if variable is not None and at.rstrip("`") not in chosen:
            # A variable is always a string: "got `str`" would blame the wrong thing.
            raise ConfigError(f"{variable}={env[variable]!r}: {_expected(what)}") from None
        raise ConfigError(f"invalid setting: {_name_handler(exc, merged)}") from None


def _expected(what: str) -> str:
    """What a variable's value should look like, from msgspec's "Expected `T`, got `str`"."""
    if what.startswith("Expected `bool"):
        return "expected true or false"
    if what.startswith("Expected `int"):
        return "expected a whole number"
    if what.startswith("Expected `float"):
        return "expected a number"
    return what


def _name_handler(exc: msgspec.ValidationError, merged: Mapping[str, Any]) -> str:
    """msgspec's message, with its ``$.handlers[...]`` (any handler) replaced by the one."""
    message = str(exc)
    marker = "`$.handlers[...]"
    handlers = merged.get("handlers")
    if marker not in message or not isinstance(handlers, Mapping):
        return message
    for name, table in handlers.items():
        try:
            msgspec.convert(table, HandlerSettings, strict=False)
        except msgspec.ValidationError as inner:
            # "what" alone, or "what - at `$.concurrency`": say which handler's table.
            what, at, path = str(inner).partition(" - at `$.")
            key = f" {path.rstrip('`')}" if at else ""
            return f"{what} - at `[handlers.{_quote(str(name))}]{key}`"
    return message


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
