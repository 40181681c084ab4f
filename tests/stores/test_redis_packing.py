"""Arguments the Redis store packs ahead (``Call.argv``): only where the bytes are surely those
of the general packer, which is every other case's way out."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio import Redis

from oncely.errors import ConfigError
from oncely.stores._redis_url import parse_redis_url
from oncely.stores._redis_wire import ascii_compatible, pack_batch
from oncely.stores.base import Begin, Outcome
from oncely.stores.redis import RedisStore
from tests.stores._redis_support import REDIS_URL, with_options

LONG = 30.0


def test_only_encodings_that_write_ascii_as_ascii_pack_ahead() -> None:
    for encoding in ("utf-8", "ascii", "latin-1", "cp1252"):
        assert ascii_compatible((encoding, "strict")), encoding
    for encoding in ("utf-16", "utf-32", "cp037", "no-such-codec"):
        assert not ascii_compatible((encoding, "strict")), encoding


def _spied(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    submitted: list[Any] = []
    put = store._batch.put

    def spy(call: Any) -> Any:
        submitted.append(call)
        return put(call)

    # Every call is queued by put: begin and complete call it, renew and release submit.
    monkeypatch.setattr(store._batch, "put", spy)
    return submitted


@pytest.mark.anyio
async def test_text_that_is_not_ascii_goes_through_the_general_packer(
    unique: str, anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RedisStore(with_options(REDIS_URL, prefix=f"{unique}:")) as store:
        submitted = _spied(store, monkeypatch)
        begun = await store.begin("k", "empreinte-é", LONG)
        assert begun.outcome is Outcome.NEW and begun.token is not None
        # The same fingerprint again: the server saw the very bytes the first call sent.
        assert (await store.begin("k", "empreinte-é", LONG)).outcome is Outcome.IN_PROGRESS
        assert (await store.begin("k", "empreinte-e", LONG)).outcome is Outcome.MISMATCH
        await store.complete("k", begun.token, b"r", LONG)
        assert await store.begin("k", "empreinte-é", LONG) == Begin(Outcome.COMPLETED, result=b"r")
        assert submitted[0].argv is None
        assert_packed_as_the_general_packer_would(submitted)


def assert_packed_as_the_general_packer_would(calls: list[Any]) -> None:
    encoding = ("utf-8", "strict")
    for call in calls:
        assert pack_batch([call], encoding) == pack_batch([call._replace(argv=None)], encoding)


@pytest.mark.anyio
async def test_calls_packed_ahead_go_out_as_the_general_packer_writes_them(
    unique: str, anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # begin and complete pack their own arguments (every message pays for it): the bytes must
    # be those of the general path, for every shape of call they pack.
    async with RedisStore(with_options(REDIS_URL, prefix=f"{unique}:")) as store:
        submitted = _spied(store, monkeypatch)
        a = await store.begin("k-a", "fp-a", 5.5)
        b = await store.begin("k-b", "fp-b", 30)
        assert a.token is not None and b.token is not None
        await store.complete("k-a", a.token, None, 60)
        await store.complete("k-b", b.token, b"result \x00\xff", 0.25)
        assert [c.argv is not None for c in submitted] == [True] * 4
        assert_packed_as_the_general_packer_would(submitted)
        assert await store.begin("k-b", "fp-b", 5) == Begin(
            Outcome.COMPLETED, result=b"result \x00\xff"
        )


@pytest.mark.anyio
async def test_a_client_whose_encoding_is_not_ascii_compatible_is_a_config_error(
    unique: str, anyio_backend: object
) -> None:
    # Its scripts would go out in that encoding too: a Lua syntax error on SCRIPT LOAD.
    [(host, port)] = parse_redis_url(REDIS_URL).nodes
    client = Redis(host=host, port=port, encoding="utf-16")
    try:
        store = RedisStore(client, prefix=f"{unique}:")
        with pytest.raises(ConfigError, match=r"encoding 'utf-16'.*ASCII-compatible"):
            await store.connect()
        assert await client.ping()  # a given client is the caller's: left open
    finally:
        await client.aclose()
