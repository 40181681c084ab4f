"""What the batched writes of the SQLite and PostgreSQL idempotency stores share: the calls
``GroupCommit`` queues, and completing a batch round by round."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from oncely._batch import copy_error
from oncely.errors import LeaseLost, StoreError

__all__ = ["BeginCall", "CompleteCall", "Fetch", "complete_rounds", "distinct"]


class BeginCall(NamedTuple):
    key: str
    fingerprint: str
    lease: float


class CompleteCall(NamedTuple):
    key: str
    token: str
    result: bytes | None
    ttl: float


Fetch = Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]]
"""Runs one statement and returns its rows; raises ``StoreError`` (``StoreUnavailable`` when
the database cannot serve it)."""


def distinct(calls: list[Any], todo: list[int]) -> tuple[list[int], list[int]]:
    """Split ``todo`` into the first call of each key and the repeats, order kept."""
    keys: set[str] = set()
    first: list[int] = []
    later: list[int] = []
    for i in todo:
        key = calls[i].key
        (later if key in keys else first).append(i)
        keys.add(key)
    return first, later


async def complete_rounds(
    calls: list[CompleteCall],
    write_round: Callable[[list[CompleteCall]], Awaitable[set[str]]],
) -> list[Exception | None]:
    """``complete`` for each call: ``None``, or ``LeaseLost`` where the token no longer holds
    the key. ``write_round`` completes calls of distinct keys in one statement and returns the
    keys it completed. A key repeated in a batch waits for the next round, which orders it
    after the first (so a repeated completion gets ``LeaseLost``).

    A failed statement committed nothing: its error goes to the calls of that round and of
    the rounds after it; calls completed by an earlier round keep their ``None``.
    """
    outcomes: list[Exception | None] = [None] * len(calls)
    todo = list(range(len(calls)))
    try:
        while todo:
            now_round, later = distinct(calls, todo)
            done = await write_round([calls[i] for i in now_round])
            for i in now_round:
                if calls[i].key not in done:
                    outcomes[i] = LeaseLost(
                        f"lease on key {calls[i].key!r} is no longer held by this token"
                    )
            todo = later
    except StoreError as exc:
        for i in todo:
            outcomes[i] = copy_error(exc)
    return outcomes
