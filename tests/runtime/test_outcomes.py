"""``Retry`` and ``Reject`` take the reason first, and a handler can raise either plainly."""

from __future__ import annotations

import pytest

import oncely
from oncely.brokers.base import DeadLetterAdmin
from tests._wait import eventually


def test_retry_and_reject_take_the_reason_first() -> None:
    retry = oncely.Retry("db down")
    assert (retry.reason, retry.delay, str(retry)) == ("db down", None, "db down")
    assert oncely.Retry("later", delay=2.5).delay == 2.5
    assert oncely.Retry().reason == "retry requested"
    assert oncely.Reject("bad total").reason == "bad total"


def test_a_number_where_the_reason_goes_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"Retry\(delay=5\)"):
        oncely.Retry(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="first argument is the reason"):
        oncely.Reject(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        oncely.Retry("x", 5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="delay"):
        oncely.Retry("x", delay=float("nan"))


@pytest.mark.anyio
async def test_raise_retry_with_a_reason_retries_then_dead_letters_with_it(unique: str) -> None:
    app = oncely.App()
    runs: list[int] = []

    @app.handler("jobs", retry=oncely.RetryPolicy(max_attempts=2, base=0.01, cap=0.01))
    async def handle(_: dict[str, int], ctx: oncely.Context) -> None:
        runs.append(ctx.attempt)
        raise oncely.Retry("db down")

    async with oncely.Worker(app, broker=f"memory://{unique}") as worker:
        await app.publish("jobs", {})
        await eventually(lambda: worker.stats.dead_lettered == 1)
        assert isinstance(worker.broker, DeadLetterAdmin)
        (letter,) = await worker.broker.dead_letters("jobs")
    assert runs == [1, 2]
    assert letter.reason.startswith("Retry: db down")


@pytest.mark.anyio
async def test_an_empty_key_is_refused_not_shared_by_every_message(unique: str) -> None:
    """``key=""`` (an unset variable, say) would make every such message one key."""
    app = oncely.App()

    @app.handler("jobs")
    async def handle(_: dict[str, int]) -> None: ...

    async with oncely.Worker(app, broker=f"memory://{unique}"):
        with pytest.raises(ValueError, match="key must be a non-empty string"):
            await app.publish("jobs", {}, key="")


@pytest.mark.anyio
async def test_a_key_with_no_utf8_form_is_dead_lettered_not_deferred_for_ever(
    unique: str,
) -> None:
    """A store refuses such a key on every redelivery (Redis and PostgreSQL raise a
    ``StoreError``), which the runtime read as "store unreachable" and deferred for ever."""
    app = oncely.App()

    def key(payload: dict[str, str], _: object) -> str:
        return payload["id"] + "\ud800"  # e.g. text cut in the middle of a surrogate pair

    @app.handler("jobs", idempotent=True, key=key)
    async def handle(_: dict[str, str]) -> None: ...

    async with oncely.Worker(app, broker=f"memory://{unique}", store=f"memory://{unique}") as w:
        await app.publish("jobs", {"id": "a"})
        await eventually(lambda: w.stats.dead_lettered == 1)
        assert isinstance(w.broker, DeadLetterAdmin)
        (letter,) = await w.broker.dead_letters("jobs")
    assert letter.reason.startswith("key extraction failed: UnicodeEncodeError"), letter.reason
    assert w.stats.deferred == 0
