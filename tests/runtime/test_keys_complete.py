"""``Keys.complete``: the first try inline (timings off) and the retrying path (timings on, or
after a first failure) record, retry, give up and wake local duplicates alike."""

from __future__ import annotations

import asyncio

import pytest

import oncely
from oncely.runtime._keys import COMPLETE_TRIES, Keys, Lease
from oncely.runtime.stats import Stats
from oncely.stores.base import Outcome
from tests.runtime._faulty import FaultyStore

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("timed", [False, True], ids=["untimed", "timed"]),
]


async def _held(store: FaultyStore, timed: bool, key: str) -> tuple[Keys, Lease]:
    stats = Stats()
    if timed:
        stats.enable_timings()
    keys = Keys("h", store, stats, visibility=30.0)
    begun = await keys.begin(key, "fp")
    assert begun.outcome is Outcome.NEW and begun.token is not None
    return keys, Lease(key, begun.token)


async def _waiter(keys: Keys, key: str) -> asyncio.Event:
    # What a local duplicate waits on (Keys._after_local_holder makes it the same way).
    event = keys._held[key] = asyncio.Event()
    return event


async def test_a_completion_recorded_at_once(timed: bool, unique: str) -> None:
    async with FaultyStore() as store:
        keys, lease = await _held(store, timed, unique)
        woken = await _waiter(keys, unique)
        await keys.complete(lease, b"r", 60.0)
        again = await store.begin(unique, "fp", 30.0)
    assert again.outcome is Outcome.COMPLETED and again.result == b"r"
    assert store.completions == 1 and woken.is_set() and unique not in keys._held
    stats = keys.stats
    assert (stats.store_errors, stats.complete_retries, stats.unrecorded) == (0, 0, 0)
    if timed:
        assert stats.store_seconds is not None and stats.store_seconds.count == 2  # begin too
    else:
        assert stats.store_seconds is None


async def test_a_failing_first_try_is_retried(timed: bool, unique: str) -> None:
    async with FaultyStore() as store:
        keys, lease = await _held(store, timed, unique)
        woken = await _waiter(keys, unique)
        store.complete_errors = [oncely.StoreUnavailable("blip"), RuntimeError("driver blip")]
        await keys.complete(lease, None, 60.0)
    assert store.completions == 1 and woken.is_set() and unique not in keys._held
    stats = keys.stats
    assert (stats.store_errors, stats.complete_retries, stats.unrecorded) == (2, 2, 0)
    if timed:
        assert stats.store_seconds is not None and stats.store_seconds.count == 4  # begin + 3


async def test_a_lost_lease_is_not_retried(timed: bool, unique: str) -> None:
    async with FaultyStore() as store:
        keys, lease = await _held(store, timed, unique)
        woken = await _waiter(keys, unique)
        store.complete_errors = [oncely.LeaseLost("taken over")]
        await keys.complete(lease, None, 60.0)
    assert store.completions == 0 and woken.is_set() and unique not in keys._held
    stats = keys.stats
    assert (stats.store_errors, stats.complete_retries, stats.unrecorded) == (0, 0, 1)


async def test_a_completion_that_never_records_gives_up_after_its_tries(
    timed: bool, unique: str
) -> None:
    async with FaultyStore() as store:
        keys, lease = await _held(store, timed, unique)
        woken = await _waiter(keys, unique)
        store.complete_errors = [oncely.StoreUnavailable("down")] * (COMPLETE_TRIES + 3)
        await keys.complete(lease, None, 60.0)
        left = len(store.complete_errors)
    assert left == 3 and store.completions == 0  # exactly COMPLETE_TRIES tries
    assert woken.is_set() and unique not in keys._held
    stats = keys.stats
    assert (stats.store_errors, stats.complete_retries, stats.unrecorded) == (
        COMPLETE_TRIES,
        COMPLETE_TRIES - 1,
        1,
    )


async def test_a_cancelled_completion_still_wakes_local_duplicates(
    timed: bool, unique: str
) -> None:
    async with FaultyStore() as store:
        keys, lease = await _held(store, timed, unique)
        woken = await _waiter(keys, unique)
        store.complete_errors = [oncely.StoreUnavailable("blip")]  # then a retry pause
        completing = asyncio.create_task(keys.complete(lease, None, 60.0))
        await asyncio.sleep(0)  # into the pause before the second try
        completing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await completing
    assert woken.is_set() and unique not in keys._held
