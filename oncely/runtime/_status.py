"""The worker's state as JSON-ready data, for ``/status.json``, the status page and metrics."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from oncely.runtime.app import HandlerSpec
    from oncely.runtime.stats import Histogram, Stats


def snapshot(
    specs: Sequence[HandlerSpec],
    stats_of: Mapping[str, Stats],
    in_flight_of: Mapping[str, int],
    *,
    state: str,
    failure: BaseException | None,
    started_at: float | None,
    broker_url: str,
    store: str | None,
) -> dict[str, Any]:
    """See ``Worker.snapshot``; ``store`` is a URL or a type name."""
    handlers = []
    for spec in specs:
        stats = stats_of[spec.name]
        handlers.append(
            {
                "name": spec.name,
                "topic": spec.topic,
                "guarantee": spec.guarantee,
                "concurrency": spec.concurrency,
                "in_flight": in_flight_of.get(spec.name, 0),
                "counters": stats.as_dict(),
                "handler_seconds": _hist(stats.handler_seconds),
                "store_seconds": _hist(stats.store_seconds),
            }
        )
    return {
        "time": time.time(),
        "started_at": started_at,
        "state": state,
        "failure": None if failure is None else repr(failure),
        "broker": redact_url(broker_url),
        "store": None if store is None else redact_url(store),
        "in_flight": sum(in_flight_of.values()),
        "handlers": handlers,
    }


def _hist(histogram: Histogram | None) -> dict[str, Any] | None:
    return None if histogram is None else histogram.snapshot()


_SECRET_OPTION = re.compile(r"pass|pwd|secret|token|auth|credential|api_?key|access_?key", re.I)
"""Query options whose value is a secret (``?password=`` works with libpq and asyncpg)."""


def redact_url(url: str) -> str:
    """``url`` without its secrets, for status pages and metrics labels: the password of the
    user info, and the values of query options named like secrets (``password``,
    ``sslpassword``, ``token``, ...). A password with an unescaped ``#``, ``?`` or ``/`` ends
    the host part early, and the rest cannot be told apart from it: then only the scheme is
    shown."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return "***"
    # Rebuilt by hand rather than with urlunsplit, which turns sqlite:///x into sqlite:/x.
    sep = url.find("://")
    head, rest = (url[: sep + 3], url[sep + 3 :]) if sep >= 0 and netloc else ("", url)
    if "@" not in netloc and "@" in rest:
        return f"{url[:sep]}://***" if sep >= 0 else "***"
    tail = rest[len(netloc) :] if head else rest
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        if colon:
            netloc = f"{user}:***@{host}"
    before, hash_, fragment = tail.partition("#")
    path, mark, query = before.partition("?")
    query = "&".join(_redact_option(option) for option in query.split("&"))
    return f"{head}{netloc if head else ''}{path}{mark}{query}{hash_}{fragment}"


def _redact_option(option: str) -> str:
    name, equals, value = option.partition("=")
    if equals and value and _SECRET_OPTION.search(name):
        return f"{name}=***"
    return option
