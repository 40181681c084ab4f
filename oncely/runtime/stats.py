"""Counters and timings a worker keeps per handler, for metrics, the status page, logs and
tests.

Counting is the one thing the hot path always does (an integer add per event). Timings (the
handler-duration and store-latency histograms) cost two clock reads per observation, so they
are off until something reads them: ``Worker.enable_timings()``, which the metrics server and
the status page call.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["DEFAULT_BOUNDS", "Histogram", "Stats", "Totals"]

DEFAULT_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds (seconds) of the histogram buckets: sub-millisecond store round trips up to
minute-long handlers. The last bucket (``+Inf``) is implicit."""


class Histogram:
    """A fixed-bucket histogram with Prometheus semantics (a value lands in the first bucket
    whose upper bound is >= it)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = DEFAULT_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket, not cumulative; the last is ``+Inf``."""
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Estimate the ``q`` quantile (0 < q <= 1) by linear interpolation inside its bucket,
        as PromQL's ``histogram_quantile`` does; ``None`` with no observations."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = self.bounds[i - 1] if i > 0 else 0.0
                if i == len(self.bounds):  # +Inf: the best answer is the largest bound
                    return self.bounds[-1]
                return low + (self.bounds[i] - low) * ((rank - seen) / n)
            seen += n
        return self.bounds[-1]

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: bounds, per-bucket counts, sum, count, p50 and p99."""
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": self.count,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }


@dataclass(slots=True)
class Stats:
    """What a handler did (the worker keeps one per handler). Counters only grow.

    Attributes:
        received: deliveries taken from the broker.
        processed: handler runs that finished and were acked.
        duplicates: deliveries acked without running because their key had completed.
        retried: failed runs nacked for a later retry.
        dead_lettered: deliveries moved to the dead-letter queue (poison, exhausted, rejected,
            key mismatch, missing key).
        deferred: deliveries put back because another worker held their key, or the store was
            unreachable (fail closed).
        in_progress: deferrals because another run held the key (``IN_PROGRESS``): the
            collisions a visibility timeout shorter than the handler's run time causes.
        fail_open: runs started without dedupe because the store was unreachable and
            ``fail_open`` is on.
        acked: acks the broker took (runs, duplicates and at-most-once messages).
        nacked: nacks the broker took (retries, deferrals and give-backs).
        failed: at-most-once runs that failed (already acked, so not retried).
        cancelled: runs cancelled at shutdown and given back to the broker.
        settle_errors: acks, nacks or rejects the broker refused (lease lost, connection
            lost); the broker redelivers those messages.
        lost: at-most-once runs cancelled at shutdown, their ack made or on its way (it
            goes on without its caller), so they are gone (each is logged at WARNING with its
            message id).
        extensions: visibility extensions the heartbeat made (an ``extend`` that changed
            nothing, a settle on its way or SQS's 12-hour cap reached, is not one).
        heartbeat_errors: visibility extensions or lease renewals that failed (each affects
            only its own delivery; the heartbeat goes on for the others).
        delays_clamped: nack delays cut to the broker's ``Capabilities.max_delay``.
        store_errors: idempotency-store calls (begin, complete, release) that failed.
        complete_retries: completions retried because the store failed to record them.
        unrecorded: completions given up (store down past the retries, or lease lost): the
            effect happened but a redelivery of the message would run it again.
        results_not_cached: runs that succeeded but returned a value the codec cannot encode
            (logged at ERROR): the key completed without a result, so a duplicate is still
            absorbed and its ``on_duplicate`` hook gets ``None``.
        internal_errors: deliveries on which the runtime itself failed (a bug, logged with its
            traceback); each was nacked for a later retry, or dead-lettered once the
            message's attempts ran out.
        consume_errors: consume loops that failed and were restarted.
        rejected: runs that raised ``Reject`` (each is also counted in ``dead_lettered`` once
            the broker took the move).
        handler_seconds: handler run times, when timings are on (else ``None``).
        store_seconds: idempotency-store call latencies, when timings are on.
    """

    received: int = 0
    processed: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    deferred: int = 0
    in_progress: int = 0
    fail_open: int = 0
    acked: int = 0
    nacked: int = 0
    failed: int = 0
    cancelled: int = 0
    settle_errors: int = 0
    lost: int = 0
    extensions: int = 0
    heartbeat_errors: int = 0
    delays_clamped: int = 0
    store_errors: int = 0
    complete_retries: int = 0
    unrecorded: int = 0
    results_not_cached: int = 0
    internal_errors: int = 0
    consume_errors: int = 0
    rejected: int = 0
    handler_seconds: Histogram | None = field(default=None, compare=False)
    store_seconds: Histogram | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, int]:
        """The counters (not the histograms)."""
        return {name: getattr(self, name) for name in COUNTERS}

    def enable_timings(self) -> None:
        if self.handler_seconds is None:
            self.handler_seconds = Histogram()
        if self.store_seconds is None:
            self.store_seconds = Histogram()


COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(Stats) if f.type in ("int", int))
"""The counter fields of ``Stats``, in declaration order."""


class Totals:
    """Live sums of the counters of several ``Stats`` (a worker's handlers): read
    ``totals.processed`` at any time and get the current sum."""

    __slots__ = ("_parts",)

    def __init__(self, parts: Sequence[Stats]) -> None:
        self._parts = parts

    def __getattr__(self, name: str) -> int:
        if name not in COUNTERS:
            raise AttributeError(name)
        return sum(getattr(part, name) for part in self._parts)

    def as_dict(self) -> dict[str, int]:
        return {name: sum(getattr(p, name) for p in self._parts) for name in COUNTERS}

    def __repr__(self) -> str:
        return f"Totals({self.as_dict()})"
