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
