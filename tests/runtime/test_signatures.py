"""Handler declarations that could only fail on every message are refused at registration."""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Optional

import msgspec
import pytest

import oncely
from oncely import ConfigError
from tests._wait import eventually


class Opaque:
    """A plain class: msgspec accepts it in a decoder, then cannot decode any JSON into it."""


class HasOpaque(msgspec.Struct):
    id: str
    extra: list[Opaque]


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Tree(msgspec.Struct):
    name: str
    children: list[Tree] = []


def register(fn: Any) -> oncely.App:
    app = oncely.App()
    app.handler("t")(fn)
    return app


async def takes_opaque(p: Opaque) -> None: ...


async def takes_nested_opaque(p: HasOpaque) -> None: ...


async def takes_dict_of_opaque(p: dict[str, Opaque]) -> None: ...


async def takes_lock(p: threading.Lock) -> None: ...


async def takes_mixed_union(p: int | Opaque) -> None: ...


async def context_first(ctx: oncely.Context, p: dict[str, int]) -> None: ...


async def context_only(ctx: oncely.Context) -> None: ...


async def second_not_context(p: dict[str, int], meta: dict[str, str]) -> None: ...


async def second_optional_context(p: dict[str, int], ctx: Optional[oncely.Context]) -> None: ...  # noqa: UP045


async def takes_list_of_opaque(p: list[Opaque]) -> None: ...


async def three_params(p: dict[str, int], ctx: oncely.Context, extra: int) -> None: ...


async def keyword_only(p: dict[str, int], *, ctx: oncely.Context) -> None: ...


async def no_params() -> None: ...


def sync_function(p: dict[str, int]) -> None: ...


class SyncCallable:
    def __call__(self, p: dict[str, int]) -> None: ...


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (takes_opaque, r"cannot decode JSON into .*Opaque \(at \$ "),
        (takes_nested_opaque, r"cannot decode JSON into .*Opaque \(at \$\.extra\[\] "),
        (takes_dict_of_opaque, r"Opaque \(at \$\[\] "),
        (takes_lock, "msgspec cannot decode its payload type"),
        (takes_mixed_union, "msgspec cannot decode its payload type"),
        (context_first, "the Context goes second"),
        (context_only, "the Context goes second"),
        (second_not_context, "second parameter 'meta' receives the oncely.Context"),
        (
            second_optional_context,
            r"annotated typing\.Optional\[oncely\.runtime\.context\.Context\]$",
        ),
        (
            takes_list_of_opaque,
            r"of the payload type list\[tests\.runtime\.test_signatures\.Opaque\]\)",
        ),
        (three_params, r"must take \(payload\) or \(payload, ctx"),
        (keyword_only, r"must take \(payload\) or \(payload, ctx"),
        (no_params, r"must take \(payload\)"),
        (sync_function, "must be an async function"),
        (lambda p: None, "must be an async function"),
        (lambda p: takes_opaque(p), "must be an async function"),
        (SyncCallable(), "must be an async function"),
    ],
)
def test_bad_handlers_are_refused_at_registration(fn: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        register(fn)
    assert "\n" not in str(caught.value)


class AsyncCallable:
    def __init__(self) -> None:
        self.seen: list[Point] = []

    async def __call__(self, p: Point, ctx: oncely.Context) -> None:
        self.seen.append(p)


async def unannotated(p, ctx):  # type: ignore[no-untyped-def]
    pass


async def with_prefix(prefix: str, p: dict[str, int]) -> None: ...


@pytest.mark.parametrize(
    ("fn", "payload_type", "wants_context"),
    [
        (unannotated, Any, True),
        (AsyncCallable(), Point, True),
        (functools.partial(with_prefix, "x"), dict[str, int], False),
    ],
)
def test_good_handlers_register(fn: Any, payload_type: Any, wants_context: bool) -> None:
    (spec,) = register(fn).handlers.values()
    assert (spec.payload_type, spec.wants_context) == (payload_type, wants_context)


def test_recursive_and_builtin_payload_types_register() -> None:
    for tp in (Tree, Point, bytes, object, list[Tree], dict[str, Point], int | None, str):

        async def handle(p: Any) -> None: ...

        handle.__annotations__["p"] = tp
        register(handle)


@pytest.mark.anyio
async def test_an_async_callable_object_runs(unique: str) -> None:
    app = oncely.App()
    handler = AsyncCallable()
    app.handler("points")(handler)
    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("points", {"x": 1, "y": 2})
        await eventually(lambda: worker.stats.processed == 1)
    assert handler.seen == [Point(1, 2)]
    assert list(app.handlers) == [f"{__name__}.AsyncCallable"]
