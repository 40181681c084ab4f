"""What a registered handler is: the record the worker runs it by (``HandlerSpec``), where its
idempotency key comes from (``KeySource``), and the user callables it may be given.
``oncely.runtime.app`` builds them and re-exports the public names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from oncely.brokers.base import Headers
from oncely.errors import ConfigError
from oncely.runtime._signature import check_key_function
from oncely.runtime.codec import Decoder
from oncely.runtime.retry import RetryPolicy

if TYPE_CHECKING:
    from oncely.brokers.base import Delivery
    from oncely.runtime.context import Context

__all__ = ["DuplicateHook", "Guarantee", "HandlerSpec", "KeyFunction", "KeySource", "MissingKey"]

Guarantee = Literal["at_most_once", "at_least_once", "effectively_once"]
"""How hard a handler's effects are protected against redelivery; see README's tier table."""

MissingKey = Literal["process", "reject"]
"""What to do with a message whose key source yields nothing."""


class DuplicateHook(Protocol):
    """A user function awaited when a duplicate of a completed key arrives.

    It receives the handler's stored return value, decoded into the handler's return
    annotation, and the duplicate's ``Context``; for example to send a request/reply answer
    again. The value is ``None`` both when the handler returned ``None`` and when its result
    could not be encoded (``Stats.results_not_cached``): the store keeps no result for either,
    so the two cannot be told apart. If it raises (a stored result that no longer decodes
    included), the duplicate is retried like a failed handler run.
    """

    def __call__(self, result: Any, ctx: Context, /) -> Awaitable[None]: ...


class KeyFunction(Protocol):
    """A user function that derives the idempotency key from the decoded payload."""

    def __call__(self, payload: Any, delivery: Delivery, /) -> str | None: ...


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where a handler's idempotency key comes from.

    ``auto`` reads the ``oncely-dedupe-key`` header (the outbox's per-row identity), then the
    ``oncely-key`` header, then the broker's message id.
    """

    kind: Literal["auto", "header", "message_id", "payload", "function"]
    name: str = ""
    function: KeyFunction | None = None

    @classmethod
    def parse(cls, spec: str | KeyFunction | None) -> KeySource:
        if spec is None or spec == "auto":
            return cls("auto")
        if callable(spec):
            check_key_function(spec)
            return cls("function", function=spec)
        kind, _, name = spec.partition(":")
        if kind == "header":
            return cls("header", name or "oncely-key")
        if kind == "message_id" and not name:
            return cls("message_id")
        if kind == "payload" and name:
            return cls("payload", name)
        raise ConfigError(
            f"bad key source {spec!r}; use 'auto', 'header', 'header:NAME', 'message_id', "
            "'payload:FIELD[.SUB]' or a function (payload, delivery) -> str | None"
        )

    def extract(self, payload: Any, delivery: Delivery) -> str | None:
        if self.kind == "auto":
            return delivery.headers.get(Headers.DEDUPE_KEY) or delivery.key
        if self.kind == "header":
            return delivery.headers.get(self.name)
        if self.kind == "message_id":
            return delivery.id
        if self.kind == "function":
            assert self.function is not None
            return self.function(payload, delivery)
        value: Any = payload
        for part in self.name.split("."):
            if isinstance(value, Mapping):
                value = value.get(part)
            else:
                value = getattr(value, part, None)
            if value is None:
                return None
        return str(value)


@dataclass(slots=True)
class HandlerSpec:
    """Everything the worker needs to run one handler. Built by ``App.handler``."""

    name: str
    topic: str
    fn: Callable[..., Awaitable[Any]]
    concurrency: int
    timeout: float
    retry: RetryPolicy
    guarantee: Guarantee
    key: KeySource
    on_missing_key: MissingKey
    transactional: bool
    visibility: float
    result_ttl: float
    decoder: Decoder
    wants_context: bool
    payload_type: Any = field(default=Any)
    on_duplicate: DuplicateHook | None = None
    result_type: Any = field(default=Any)

    @property
    def uses_store(self) -> bool:
        return self.guarantee == "effectively_once"
