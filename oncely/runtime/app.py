"""The application: a router from topics to handlers, and how each handler runs (the
record it runs by, ``HandlerSpec``, and its key source are ``_spec``, re-exported here)."""

from __future__ import annotations

import math
import typing
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from oncely.errors import ConfigError
from oncely.runtime._signature import (
    check_duplicate_hook,
    check_key_path,
    default_name,
    handler_signature,
)
from oncely.runtime._spec import (
    DuplicateHook,
    Guarantee,
    HandlerSpec,
    KeyFunction,
    KeySource,
    MissingKey,
)
from oncely.runtime.codec import Decoder
from oncely.runtime.retry import RetryPolicy

if TYPE_CHECKING:
    from oncely.brokers.base import Broker
    from oncely.runtime.publisher import Publisher

__all__ = ["App", "DuplicateHook", "Guarantee", "HandlerSpec", "KeyFunction", "MissingKey"]

_GUARANTEES = typing.get_args(Guarantee)
_MISSING = typing.get_args(MissingKey)

H = TypeVar("H", bound=Callable[..., Awaitable[Any]])
Hook = TypeVar("Hook", bound=Callable[[], Awaitable[None]])


class App:
    """A set of handlers, each bound to a topic.

    Args:
        name: shown in logs.
        guarantee: the default guarantee of handlers that do not choose one.
        idempotent: shorthand for ``guarantee="effectively_once"`` on every handler.
        broker: the broker URL (or instance) ``app.publish`` uses when no worker runs; the
            worker's own broker wins while it runs.

    Constructing an App does no I/O.
    """

    def __init__(
        self,
        name: str = "oncely",
        *,
        guarantee: Guarantee = "at_least_once",
        idempotent: bool = False,
        broker: str | Broker | None = None,
    ) -> None:
        if guarantee not in _GUARANTEES:
            raise ConfigError(f"guarantee must be one of {_GUARANTEES}, got {guarantee!r}")
        self.name = name
        self.default_guarantee: Guarantee = "effectively_once" if idempotent else guarantee
        self.handlers: dict[str, HandlerSpec] = {}
        self.broker = broker
        self._publisher: Publisher | None = None
        self._bound: list[Publisher] = []
        self.startup_hooks: list[Callable[[], Awaitable[None]]] = []
        self.shutdown_hooks: list[Callable[[], Awaitable[None]]] = []

    def on_startup(self, fn: Hook) -> Hook:
        """Register an async function the worker awaits after connecting, before consuming
        (open a database pool, warm a cache). A failing hook aborts ``Worker.start``."""
        self.startup_hooks.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Register an async function the worker awaits after draining, before closing the
        broker (close what ``on_startup`` opened). Hooks run in reverse order of
        registration; a failing one is logged and the rest still run."""
        self.shutdown_hooks.append(fn)
        return fn

    def handler(
        self,
        topic: str,
        *,
        name: str | None = None,
        concurrency: int = 16,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        guarantee: Guarantee | None = None,
        idempotent: bool | None = None,
        key: str | KeyFunction | None = None,
        on_missing_key: MissingKey = "process",
        transactional: bool = False,
        visibility: float = 30.0,
        result_ttl: float = 7 * 24 * 3600.0,
        on_duplicate: DuplicateHook | None = None,
    ) -> Callable[[H], H]:
        """Register an async handler for ``topic``.

        Args:
            topic: the topic (queue) to consume.
            name: a unique handler name (default: the function's qualified name); it prefixes
                idempotency keys. Two handlers of one topic compete for its messages, and a
                duplicate reaching the other one is not absorbed: one per topic.
            concurrency: the most messages this handler runs at once; the broker prefetch
                follows it.
            timeout: seconds before a running handler is cancelled and counted as failed.
            retry: the retry policy (default ``RetryPolicy()``).
            guarantee: ``at_most_once`` (ack first), ``at_least_once`` (ack after) or
                ``effectively_once`` (ack after, through the idempotency store).
            idempotent: ``True`` is shorthand for ``guarantee="effectively_once"``.
            key: the idempotency key source: ``"auto"`` (``oncely-dedupe-key`` header, then
                ``oncely-key``, then message id), ``"header:NAME"``, ``"message_id"``,
                ``"payload:FIELD"`` or a function.
            on_missing_key: ``"process"`` runs a message without a key without dedupe;
                ``"reject"`` dead-letters it. A transactional handler always dead-letters
                one: without a key there is no lease, so no transaction to run in.
            transactional: run the handler inside the store's transaction
                (``ctx.transaction``) so its writes and the completion commit together.
            visibility: seconds a delivery stays invisible; the heartbeat extends it (and the
                idempotency lease) every third of this while the handler runs.
            result_ttl: seconds a completed key (and its result) is remembered.
            on_duplicate: an async ``(result, ctx)`` function awaited when a duplicate of a
                completed key arrives, with the first run's return value (decoded into the
                handler's return annotation) from the store: the way to answer a duplicate
                request again. It gets ``None`` both for a run that returned ``None`` and for
                one whose result could not be encoded (the store keeps neither). Effectively-
                once handlers only. Without it a duplicate is acked silently.

        Raises:
            ConfigError: a bad argument or a handler already registered under that name.
        """

        def register(fn: H) -> H:
            spec = self._build(
                fn,
                topic=topic,
                name=name,
                concurrency=concurrency,
                timeout=timeout,
                retry=RetryPolicy() if retry is None else retry,
                guarantee=guarantee,
                idempotent=idempotent,
                key=key,
                on_missing_key=on_missing_key,
                transactional=transactional,
                visibility=visibility,
                result_ttl=result_ttl,
                on_duplicate=on_duplicate,
            )
            if spec.name in self.handlers:
                raise ConfigError(f"a handler named {spec.name!r} is already registered")
            self.handlers[spec.name] = spec
            return fn

        return register

    def _build(
        self,
        fn: Callable[..., Awaitable[Any]],
        *,
        topic: str,
        name: str | None,
        concurrency: int,
        timeout: float,
        retry: RetryPolicy,
        guarantee: Guarantee | None,
        idempotent: bool | None,
        key: str | KeyFunction | None,
        on_missing_key: MissingKey,
        transactional: bool,
        visibility: float,
        result_ttl: float,
        on_duplicate: DuplicateHook | None = None,
    ) -> HandlerSpec:
        where = f"handler {getattr(fn, '__qualname__', fn)!r}"
        if not topic:
            raise ConfigError(f"{where} needs a topic")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ConfigError(f"{where}: concurrency must be an integer >= 1, got {concurrency!r}")
        if not isinstance(retry, RetryPolicy):
            # retry=0 ("no retries") read as unset, the default's 5 attempts; retry=3 failed
            # only at the first failure, every one an internal error.
            raise ConfigError(
                f"{where}: retry must be a RetryPolicy, e.g. RetryPolicy(max_attempts=3); "
                f"got {retry!r}"
            )
        for option, seconds in (
            ("timeout", timeout), ("visibility", visibility), ("result_ttl", result_ttl)
        ):  # fmt: skip
            # A string, None or NaN would fail (or never fire) far from here, at run time.
            if not _positive_number(seconds):
                raise ConfigError(f"{where}: {option} must be a number > 0, got {seconds!r}")
        if guarantee is not None and guarantee not in _GUARANTEES:
            raise ConfigError(f"{where}: guarantee must be one of {_GUARANTEES}")
        if idempotent and guarantee not in (None, "effectively_once"):
            raise ConfigError(f"{where}: idempotent=True contradicts guarantee={guarantee!r}")
        if on_missing_key not in _MISSING:
            raise ConfigError(f"{where}: on_missing_key must be one of {_MISSING}")
        chosen: Guarantee = guarantee or (
            "effectively_once" if idempotent else self.default_guarantee
        )
        if idempotent is False and guarantee is None and chosen == "effectively_once":
            chosen = "at_least_once"
        if transactional and chosen != "effectively_once":
            raise ConfigError(f"{where}: transactional=True needs guarantee='effectively_once'")
        key_source = KeySource.parse(key)
        if on_duplicate is not None:
            if chosen != "effectively_once":
                raise ConfigError(f"{where}: on_duplicate needs guarantee='effectively_once'")
            check_duplicate_hook(on_duplicate, where)
        payload_type, wants_context = handler_signature(fn, where)
        if key_source.kind == "payload":
            check_key_path(payload_type, key_source.name, where)
        result_type: Any = Any
        if on_duplicate is not None:
            result_type = _result_type(fn, where)
        return HandlerSpec(
            name=name or default_name(fn),
            topic=topic,
            fn=fn,
            concurrency=concurrency,
            timeout=timeout,
            retry=retry,
            guarantee=chosen,
            key=key_source,
            on_missing_key=on_missing_key,
            transactional=transactional,
            visibility=visibility,
            result_ttl=result_ttl,
            decoder=Decoder(payload_type),
            wants_context=wants_context,
            payload_type=payload_type,
            on_duplicate=on_duplicate,
            result_type=result_type,
        )

    async def publish(
        self,
        topic: str,
        payload: object,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        message_id: str | None = None,
    ) -> str:
        """Publish through the running worker's broker, else through ``App(broker=...)``.

        Returns the message id. See ``Publisher.publish``.
        """
        publisher = self._bound[-1] if self._bound else self._publisher
        if publisher is None:
            from oncely.runtime.publisher import Publisher

            if self.broker is None:
                raise ConfigError(
                    "app.publish needs a broker: run it inside a Worker or pass App(broker=URL)"
                )
            publisher = self._publisher = Publisher(self.broker)
        return await publisher.publish(
            topic, payload, key=key, headers=headers, delay=delay, message_id=message_id
        )

    async def aclose(self) -> None:
        """Close the publisher ``app.publish`` opened outside a worker, if any."""
        if self._publisher is not None:
            publisher, self._publisher = self._publisher, None
            await publisher.aclose()

    def bind(self, publisher: Publisher) -> None:
        """Route ``app.publish`` through a running worker's broker until ``unbind``.

        Several workers may serve one app at once: the latest bound one publishes, and when
        it stops, ``app.publish`` falls back to the one bound before it.
        """
        self._bound.append(publisher)

    def unbind(self, publisher: Publisher) -> None:
        """Stop routing ``app.publish`` through ``publisher``. Unknown publishers are ignored."""
        for i in range(len(self._bound) - 1, -1, -1):
            if self._bound[i] is publisher:
                del self._bound[i]
                return


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


def _result_type(fn: Callable[..., Any], where: str) -> Any:
    """The handler's return annotation, which ``on_duplicate`` results are decoded into."""
    try:
        hint = typing.get_type_hints(fn).get("return", Any)
    except Exception as exc:
        raise ConfigError(f"{where}: cannot resolve its type annotations: {exc}") from exc
    if hint is None or hint is type(None):
        return Any
    try:
        Decoder(hint)
    except TypeError as exc:
        raise ConfigError(
            f"{where}: on_duplicate needs a return annotation msgspec can decode: {exc}"
        ) from exc
    return hint
