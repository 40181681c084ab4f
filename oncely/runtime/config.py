"""Worker settings: one msgspec Struct tree from TOML, ``ONCELY_*`` variables and CLI flags.

Precedence, lowest first: the defaults, the TOML file, the environment, the CLI flags. An
unknown key anywhere (a TOML key, an ``ONCELY_*`` variable, a handler name) is an error, never
silently dropped.

A TOML file looks like::

    broker = "sqlite:///jobs.db"
    store = "sqlite:///jobs.db"
    grace_period = 20

    [handlers."orders"]
    concurrency = 8
    timeout = 120
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from oncely.errors import ConfigError

__all__ = ["DEFAULT_BROKER", "HandlerSettings", "Settings", "load_settings"]

DEFAULT_BROKER = "sqlite:///oncely.db"
"""The embedded default: a durable queue in a file next to the worker, no server needed."""

ENV_PREFIX = "ONCELY_"
ENV_CONFIG = "ONCELY_CONFIG"
ENV_IGNORED = "ONCELY_TEST_"
"""Variables for oncely's own test suite (server URLs); the strict check passes over them."""


class HandlerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-handler overrides of what the code declared."""

    concurrency: int | None = None
    timeout: float | None = None
    visibility: float | None = None
    max_attempts: int | None = None


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything a worker can be told from outside the code.

    Attributes:
        broker: the broker URL.
        store: the idempotency store URL. Unset: the broker's own database when the broker is
            ``sqlite://`` or ``memory://``; other brokers need it set when any handler is
            effectively-once.
        concurrency: overrides every handler's concurrency when set.
        grace_period: seconds in-flight handlers get to finish at shutdown.
        fail_open: when the store is unreachable, run handlers without dedupe (logged)
            instead of retrying later.
        log_level: the ``oncely`` logger level in the CLI.
        handlers: per-handler overrides, by handler name.
    """

    broker: str = DEFAULT_BROKER
    store: str | None = None
    concurrency: int | None = None
    grace_period: float = 30.0
    fail_open: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    handlers: dict[str, HandlerSettings] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.grace_period < 0:
            raise ConfigError(f"grace_period must be >= 0, got {self.grace_period}")

    def store_url(self, broker_url: str | None = None) -> str | None:
        """The store URL, defaulting to the embedded broker's own database.

        Args:
            broker_url: the broker actually in use, when it is not ``self.broker``.
        """
        if self.store:
            return self.store
        broker = self.broker if broker_url is None else broker_url
        if broker.startswith(("sqlite:", "memory:")):
            return broker
        return None


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
    path = config_file or env.get(ENV_CONFIG)
    if path:
        merged.update(_read_toml(Path(path)))
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG or name.startswith(ENV_IGNORED):
            continue
        field = name[len(ENV_PREFIX) :].lower()
        if field not in _ENV_FIELDS:
            known = ", ".join(ENV_PREFIX + f.upper() for f in sorted(_ENV_FIELDS))
            raise ConfigError(f"unknown environment variable {name}; known: {known}")
        merged[field] = value
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        # strict=False lets "8" from the environment become 8 and "true" become True.
        return msgspec.convert(merged, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from None


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
