"""Which handlers a worker runs, each with its settings applied."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from oncely.errors import ConfigError
from oncely.runtime.retry import RetryPolicy

if TYPE_CHECKING:
    from oncely.runtime.app import App, HandlerSpec
    from oncely.runtime.config import Settings

log = logging.getLogger("oncely.worker")


def select_handlers(app: App, settings: Settings, names: list[str] | None) -> list[HandlerSpec]:
    """The chosen handlers, each with its settings applied, most specific first:
    ``[handlers."NAME"]``, then the global ``concurrency``, then the code's declaration
    (see ``oncely.runtime.config``)."""
    settings.validate()
    # The default name is module.function, easy to get wrong: show the names there are.
    known = f"; the handlers are: {', '.join(app.handlers) or '(none)'}"
    unknown = set(settings.handlers) - set(app.handlers)
    if unknown:
        raise ConfigError(f"settings name unknown handler(s): {', '.join(sorted(unknown))}{known}")
    chosen = list(app.handlers) if names is None else names
    missing = [n for n in chosen if n not in app.handlers]
    if missing:
        raise ConfigError(f"unknown handler(s): {', '.join(missing)}{known}")
    if not chosen:
        raise ConfigError(f"app {app.name!r} has no handlers to run")
    specs = []
    for name in chosen:
        spec = app.handlers[name]
        o = settings.handlers.get(name)
        # Explicit None checks: a 0 that slipped past validation must not read as "unset".
        own = o.concurrency if o is not None else None
        shared = settings.concurrency
        concurrency = own if own is not None else shared if shared is not None else None
        timeout = o.timeout if o is not None else None
        visibility = o.visibility if o is not None else None
        retry = spec.retry
        if o is not None and o.max_attempts is not None:
            # Every other field of the code's policy is kept, including any added later.
            kept = {f: getattr(retry, f) for f in retry.__struct_fields__}
            retry = RetryPolicy(**{**kept, "max_attempts": o.max_attempts})
        specs.append(
            replace(
                spec,
                concurrency=spec.concurrency if concurrency is None else concurrency,
                timeout=spec.timeout if timeout is None else timeout,
                visibility=spec.visibility if visibility is None else visibility,
                retry=retry,
            )
        )
    return specs


def warn_shared_topics(specs: list[HandlerSpec]) -> None:
    """Log a WARNING for each topic that several handlers consume, one effectively-once.

    They are competing consumers of one queue (one consumer group on Kafka): each message
    goes to one of them, and each dedupes under its own name, so a duplicate that reaches
    another handler than the first copy did runs again.
    """
    by_topic: dict[str, list[HandlerSpec]] = {}
    for spec in specs:
        by_topic.setdefault(spec.topic, []).append(spec)
    for topic, group in by_topic.items():
        if len(group) > 1 and any(spec.uses_store for spec in group):
            log.warning(
                "handlers %s share topic %r: each message goes to one of them, so a duplicate "
                "that reaches another handler is not absorbed; give a topic one "
                "effectively-once handler",
                ", ".join(spec.name for spec in group),
                topic,
            )
