"""The ``sqs://`` URL and its options, for ``SqsBroker``."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from oncely.errors import ConfigError

__all__ = ["SqsOptions", "parse_url"]

_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_OPTIONS = frozenset(
    {
        "region",
        "endpoint",
        "profile",
        "wait",
        "fifo",
        "create",
        "max_receive_count",
        "max_pollers",
        "ack_window",
        "max_message_size",
    }
)


@dataclass(frozen=True, slots=True)
class SqsOptions:
    """Settings from the ``sqs://`` URL; see ``oncely.brokers.sqs`` for each one."""

    prefix: str = ""
    region: str | None = None
    endpoint: str | None = None
    profile: str | None = None
    wait: int = 20
    fifo: bool = False
    create: bool = True
    max_receive_count: int = 100
    max_pollers: int = 8
    ack_window: float = 0.01
    max_message_size: int = 262_144


def parse_url(url: str) -> SqsOptions:
    """Parse ``sqs://[prefix]?option=value&...``.

    Raises:
        ConfigError: not an ``sqs://`` URL, an unknown option or an invalid value.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqs" or parts.path not in ("", "/") or parts.fragment:
        raise ConfigError(f"not an SQS URL (sqs://[queue-prefix]?region=...): {url!r}")
    opts: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise ConfigError(
                f"unknown SQS URL option {key!r}; known: {', '.join(sorted(_OPTIONS))}"
            )
        opts[key] = value
    prefix = parts.netloc
    if prefix and not re.fullmatch(r"[A-Za-z0-9_-]{1,60}", prefix):
        raise ConfigError(f"the SQS queue prefix may hold letters, digits, - and _: {prefix!r}")
    endpoint = opts.get("endpoint") or None
    if endpoint is not None:
        # botocore's ValueError('Invalid endpoint') came out of connect as a traceback.
        target = urlsplit(endpoint)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ConfigError(f"SQS option endpoint must be an http(s):// URL, got {endpoint!r}")
    return SqsOptions(
        prefix=prefix,
        region=opts.get("region") or None,
        endpoint=endpoint,
        profile=opts.get("profile") or None,
        wait=_int(opts, "wait", 20, 0, 20),
        fifo=_bool(opts, "fifo", False),
        create=_bool(opts, "create", True),
        max_receive_count=_int(opts, "max_receive_count", 100, 0, 1000),
        max_pollers=_int(opts, "max_pollers", 8, 1, 64),
        ack_window=_float(opts, "ack_window", 0.01, 0.0, 1.0),
        max_message_size=_int(opts, "max_message_size", 262_144, 1024, 1_048_576),
    )


def _int(opts: Mapping[str, str], key: str, default: int, low: int, high: int) -> int:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ConfigError(f"SQS option {key} must be an integer in [{low}, {high}], got {raw!r}")
    return value


def _float(opts: Mapping[str, str], key: str, default: float, low: float, high: float) -> float:
    raw = opts.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        raise ConfigError(f"SQS option {key} must be a number in [{low}, {high}], got {raw!r}")
    return value


def _bool(opts: Mapping[str, str], key: str, default: bool) -> bool:
    raw = opts.get(key)
    if raw is None:
        return default
    if raw.lower() not in _BOOL:
        raise ConfigError(f"SQS option {key} must be a boolean (1/0), got {raw!r}")
    return _BOOL[raw.lower()]
