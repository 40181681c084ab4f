"""The runtime conformance suite: the worker's promises, on top of any ``Broker``.

``BrokerConformance`` checks a broker's verbs one by one; this suite runs a real ``Worker``
over the broker and checks what users rely on: poison of every kind goes to the dead-letter
queue with a reason and never stalls the worker, retries end in the dead-letter queue with the
last error, duplicates are absorbed, deferrals keep the attempt, and nack delays above the
broker's ``max_delay`` are clamped rather than refused. A broker plugs in exactly as for
``BrokerConformance``::

    class TestRabbitRuntime(RuntimeConformance):
        features = RuntimeFeatures(fuzz_bodies=400, latency=5.0)

        @pytest.fixture
        def broker_factory(self) -> BrokerFactory:
            async def make() -> Broker:
                broker = AmqpBroker.from_url(rabbit_url)
                await broker.connect()
                return broker

            return make

The idempotency store is an in-memory one: the broker is under test here, not the store. The
fuzz case is seeded, so a failure reproduces. Every wait is bounded.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import msgspec
import pytest

from oncely.brokers.base import DeadLetterAdmin
from oncely.errors import StoreUnavailable
from oncely.runtime.app import App
from oncely.runtime.config import Settings
from oncely.runtime.context import Context
from oncely.runtime.retry import RetryPolicy
from oncely.runtime.worker import Worker
from oncely.stores.memory import MemoryStore
from oncely.testing._select import drop_inapplicable, requires

if TYPE_CHECKING:
    from oncely.brokers.base import Broker, DeadLetter
    from oncely.stores.base import Begin
    from oncely.testing.brokers import BrokerFactory

__all__ = ["RuntimeConformance", "RuntimeFeatures"]

FAST = RetryPolicy(max_attempts=3, base=0.01, cap=0.01, jitter=False)


@dataclass(frozen=True, slots=True)
class RuntimeFeatures:
    """Which runtime cases apply to a broker, and how hard to push it.

    Attributes:
        fuzz_bodies: how many bodies the fuzz case publishes (valid and hostile mixed).
        big_body: include one 5 MB body in the fuzz case.
        defer_keeps_attempt: a deferral redelivers with the same attempt
            (``Capabilities.defer_keeps_attempt``).
        dlq_admin: the broker implements ``DeadLetterAdmin``, so dead letters and their
            reasons can be read back.
        latency: the longest a message may take to reach the worker once available.
        settle_seconds: the bound on the fuzz case's wait for every message to settle.
    """

    fuzz_bodies: int = 2000
    big_body: bool = True
    defer_keeps_attempt: bool = True
    dlq_admin: bool = True
    latency: float = 3.0
    settle_seconds: float = 60.0


class Item(msgspec.Struct):
    """The payload type of the suite's handlers."""

    id: str
    n: int


class _DownStore(MemoryStore):
    """The real memory store, switched off while ``down`` is set (fail-closed deferrals)."""

    down = False

    async def begin(self, key: str, fingerprint: str, lease: float) -> Begin:
        if self.down:
            raise StoreUnavailable("store is down (conformance case)")
        return await super().begin(key, fingerprint, lease)


async def _eventually(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within:.1f}s: {what}")
        await anyio.sleep(0.01)


def hostile_bodies(rng: random.Random, count: int, *, big: bool) -> list[tuple[bytes, str | None]]:
    """``count`` bodies, each with the id it carries if valid (``None`` if it must be
    dead-lettered): valid items, some published twice, mixed with random bytes, empty bodies,
    invalid UTF-8 inside strings, deep nesting, wrong types, truncated JSON and, if ``big``,
    one 5 MB body."""
    out: list[tuple[bytes, str | None]] = []
    valid: list[bytes] = []

    def item(i: int) -> bytes:
        return json.dumps({"id": f"v{i}", "n": i}).encode()

    def truncated(body: bytes) -> bytes:
        return body[: rng.randrange(1, len(body) - 1)]

    wrong_types: list[object] = [{"id": 1, "n": "x"}, {"id": "x"}, [], "s", None, 7]
    makers: list[Callable[[int], bytes]] = [
        lambda i: rng.randbytes(rng.randrange(1, 300)),
        lambda i: b"",
        lambda i: b'{"id": "' + rng.randbytes(rng.randrange(1, 8)) + b'\xff\xfe", "n": 1}',
        lambda i: b'{"id": "a\xc3", "n": 2}',
        lambda i: b"[" * 20_000 + b"]" * 20_000,
        lambda i: b'{"id": ' + b"{" * 5_000 + b"}" * 5_000 + b', "n": 1}',
        lambda i: json.dumps(rng.choice(wrong_types)).encode(),
        lambda i: json.dumps({"id": f"v{i}", "n": i * 1.5}).encode(),
        lambda i: truncated(item(i)),
    ]
    i = 0
    while len(out) < count - (1 if big else 0):
        i += 1
        roll = rng.random()
        if roll < 0.45:
            body = item(i)
            valid.append(body)
            out.append((body, f"v{i}"))
        elif roll < 0.55 and valid:
            body = rng.choice(valid)  # a duplicate delivery of a valid item
            out.append((body, json.loads(body)["id"]))
        else:
            out.append((rng.choice(makers)(i), None))
    if big:
        out.append((b'{"id": "' + b"x" * (5 * 1024 * 1024) + b'", "n": "five"}', None))
    rng.shuffle(out)
    return out


class RuntimeConformance:
    """The runtime cases. Subclass it as ``TestSomething`` and provide ``broker_factory`` (a
    fixture) and ``features``; see the module docstring."""

    features: ClassVar[RuntimeFeatures] = RuntimeFeatures()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        drop_inapplicable(cls, cls.features)

    @pytest.fixture
    def broker_factory(self) -> BrokerFactory:
        """Override: return a factory of connected brokers on one location per test."""
        raise NotImplementedError(f"{type(self).__name__} must define a broker_factory fixture")

    @pytest.fixture
    async def broker(self, broker_factory: BrokerFactory) -> AsyncIterator[Broker]:
        broker = await broker_factory()
        try:
            yield broker
        finally:
            await broker.aclose()

    @pytest.fixture
    def topic(self) -> str:
        return self.make_topic()

    def make_topic(self) -> str:
        """A topic name no other test uses."""
        return f"oncely-runtime-{uuid.uuid4().hex[:16]}"

    def worker(self, app: App, broker: Broker, store: MemoryStore | None = None) -> Worker:
        return Worker(
            app, broker=broker, store=store or MemoryStore(), settings=Settings(grace_period=2)
        )

    async def dead_letters(self, broker: Broker, topic: str, count: int) -> list[DeadLetter]:
        assert isinstance(broker, DeadLetterAdmin)
        letters: list[DeadLetter] = []

        async def enough() -> bool:
            nonlocal letters
            letters = await broker.dead_letters(topic, limit=count + 10)
            return len(letters) >= count

        deadline = time.monotonic() + self.features.latency
        while not await enough():
            if time.monotonic() > deadline:
                pytest.fail(f"{len(letters)} dead letters, expected {count}")
            await anyio.sleep(0.05)
        return letters

    # -- cases ---------------------------------------------------------------------------

    @pytest.mark.anyio
    async def test_fuzz_valid_run_once_poison_dead_letters_and_nothing_stalls(
        self, broker: Broker, topic: str
    ) -> None:
        rng = random.Random(20261128)
        bodies = hostile_bodies(rng, self.features.fuzz_bodies, big=self.features.big_body)
        expected_valid = {i for _, i in bodies if i is not None}
        invalid = sum(1 for _, i in bodies if i is None)
        app = App("fuzz")
        runs: Counter[str] = Counter()

        @app.handler(topic, idempotent=True, key="payload:id", concurrency=32, retry=FAST)
        async def handle(item: Item) -> None:
            runs[item.id] += 1

        async with self.worker(app, broker) as worker:
            for start in range(0, len(bodies), 64):
                async with anyio.create_task_group() as tg:
                    for body, _ in bodies[start : start + 64]:
                        tg.start_soon(broker.publish, topic, body)
            s = worker.stats
            await _eventually(
                lambda: s.processed + s.duplicates + s.dead_lettered == len(bodies),
                self.features.settle_seconds,
                f"all {len(bodies)} settled (stats: {s})",
            )
            assert s.internal_errors == 0 and s.settle_errors == 0, s
            letters = (
                await self.dead_letters(broker, topic, invalid) if self.features.dlq_admin else []
            )
        assert set(runs) == expected_valid
        assert all(n == 1 for n in runs.values()), [k for k, n in runs.items() if n > 1]
        assert s.dead_lettered == invalid
        if self.features.dlq_admin:
            assert len(letters) == invalid
            assert all(d.reason.startswith("undecodable payload: ") for d in letters)
            assert all(d.attempt == 1 for d in letters), [d.attempt for d in letters]

    @pytest.mark.anyio
    async def test_retries_then_dead_letters_with_the_last_error(
        self, broker: Broker, topic: str
    ) -> None:
        app = App("retry")
        attempts: list[int] = []

        @app.handler(topic, retry=FAST)
        async def handle(_: Item, ctx: Context) -> None:
            attempts.append(ctx.attempt)
            raise ValueError(f"never works ({ctx.attempt})")

        async with self.worker(app, broker) as worker:
            await broker.publish(topic, b'{"id": "x", "n": 1}')
            await _eventually(
                lambda: worker.stats.dead_lettered == 1, self.features.latency * 3, "DLQ"
            )
            letters = await self.dead_letters(broker, topic, 1) if self.features.dlq_admin else []
        assert attempts == [1, 2, 3] and worker.stats.retried == 2
        if self.features.dlq_admin:
            (letter,) = letters
            assert letter.reason == "ValueError: never works (3) (gave up after 3 attempts)"
            assert letter.attempt == 3
            # The first error comes through the retries where the broker carries errors.
            carried = broker.capabilities.carries_errors
            assert letter.first_error == ("ValueError: never works (1)" if carried else None)

    @pytest.mark.anyio
    async def test_duplicates_are_absorbed(self, broker: Broker, topic: str) -> None:
        app = App("dedupe")
        runs: Counter[str] = Counter()

        @app.handler(topic, idempotent=True, key="payload:id", concurrency=8)
        async def handle(item: Item) -> None:
            runs[item.id] += 1

        async with self.worker(app, broker) as worker:
            for _ in range(3):
                for i in range(5):
                    await broker.publish(topic, json.dumps({"id": f"k{i}", "n": i}).encode())
            await _eventually(
                lambda: worker.stats.processed + worker.stats.duplicates == 15,
                self.features.latency * 3,
                "15 settled",
            )
        assert runs == {f"k{i}": 1 for i in range(5)}
        assert worker.stats.processed == 5 and worker.stats.duplicates == 10

    @requires(defer_keeps_attempt=True)
    @pytest.mark.anyio
    async def test_deferrals_keep_the_attempt(self, broker: Broker, topic: str) -> None:
        app = App("defer")
        attempts: list[int] = []

        @app.handler(topic, idempotent=True, retry=RetryPolicy(max_attempts=2, base=0.01))
        async def handle(_: Item, ctx: Context) -> None:
            attempts.append(ctx.attempt)

        store = _DownStore()
        store.down = True
        async with self.worker(app, broker, store) as worker:
            await broker.publish(topic, b'{"id": "x", "n": 1}')
            await _eventually(
                lambda: worker.stats.deferred >= 3, self.features.latency * 3, "3 deferrals"
            )
            store.down = False
            await _eventually(
                lambda: worker.stats.processed == 1, self.features.latency * 3, "processed"
            )
        assert attempts == [1]

    @pytest.mark.anyio
    async def test_a_retry_delay_over_max_delay_is_clamped_not_refused(
        self, broker: Broker, topic: str
    ) -> None:
        app = App("clamp")
        limit = broker.capabilities.max_delay
        # Far past any broker's limit: where there is none, the message simply waits.
        policy = RetryPolicy(max_attempts=5, base=10 * (limit or 3600.0), jitter=False)
        policy = RetryPolicy(max_attempts=5, base=policy.base, cap=policy.base, jitter=False)

        @app.handler(topic, retry=policy)
        async def handle(_: Item) -> None:
            raise RuntimeError("fails, to be retried much later")

        async with self.worker(app, broker) as worker:
            await broker.publish(topic, b'{"id": "x", "n": 1}')
            await _eventually(
                lambda: worker.stats.retried == 1, self.features.latency * 3, "one retry"
            )
        assert worker.stats.settle_errors == 0
        assert worker.stats.delays_clamped == (0 if limit is None else 1)
