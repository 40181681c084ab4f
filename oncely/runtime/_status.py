"""The worker's state as JSON-ready data, for ``/status.json``, the status page and metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

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


def redact_url(url: str) -> str:
    """``url`` without its password (shown on status pages and in metrics labels)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
