"""The Prometheus metrics oncely exports: names, kinds, labels and meanings, in one place.

The metrics server, the README's runbook, ``examples/prometheus/alerts.yaml`` and
``examples/grafana/oncely-dashboard.json`` all use these names; a test checks that the examples
reference no other name and that the runbook explains every one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METRICS", "NAMES", "Metric", "series_base"]

_HTB = ("handler", "topic", "broker")


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    """The exported name (counters end in ``_total``)."""
    kind: Literal["counter", "histogram", "gauge"]
    labels: tuple[str, ...]
    help: str


METRICS: tuple[Metric, ...] = (
    Metric("oncely_messages_received_total", "counter", _HTB, "Deliveries taken from the broker."),
    Metric("oncely_messages_acked_total", "counter", _HTB, "Deliveries acked (done)."),
    Metric("oncely_messages_nacked_total", "counter", _HTB, "Deliveries given back for later."),
    Metric(
        "oncely_messages_rejected_total",
        "counter",
        _HTB,
        "Deliveries whose handler raised Reject (dead-lettered at once).",
    ),
    Metric("oncely_messages_retried_total", "counter", _HTB, "Failed runs nacked for a retry."),
    Metric(
        "oncely_dead_letters_total",
        "counter",
        _HTB,
        "Deliveries moved to the dead-letter queue, for any reason (DLQ velocity).",
    ),
    Metric(
        "oncely_duplicates_total",
        "counter",
        _HTB,
        "Deliveries acked without running because their key had completed (absorbed).",
    ),
    Metric(
        "oncely_in_progress_collisions_total",
        "counter",
        _HTB,
        "Deliveries deferred because another run held their key (IN_PROGRESS).",
    ),
    Metric(
        "oncely_deferred_total",
        "counter",
        _HTB,
        "Deliveries put back: key held elsewhere, or store unreachable (fail closed).",
    ),
    Metric(
        "oncely_fail_open_total",
        "counter",
        _HTB,
        "Runs started without dedupe because the store was down and fail_open is on.",
    ),
    Metric(
        "oncely_completion_record_failures_total",
        "counter",
        _HTB,
        "Completions the store never recorded: a redelivery would run the effect again.",
    ),
    Metric(
        "oncely_results_not_cached_total",
        "counter",
        _HTB,
        "Runs done whose return value could not be encoded for the result cache.",
    ),
    Metric("oncely_store_errors_total", "counter", _HTB, "Idempotency-store calls that failed."),
    Metric("oncely_visibility_extensions_total", "counter", _HTB, "Visibility extensions made."),
    Metric(
        "oncely_visibility_extension_failures_total",
        "counter",
        _HTB,
        "Visibility extensions or lease renewals that failed.",
    ),
    Metric(
        "oncely_settle_errors_total",
        "counter",
        _HTB,
        "Acks, nacks or rejects the broker refused; it will redeliver those messages.",
    ),
    Metric(
        "oncely_internal_errors_total",
        "counter",
        _HTB,
        "Deliveries on which oncely itself failed (a bug; logged with its traceback).",
    ),
    Metric(
        "oncely_consume_errors_total",
        "counter",
        _HTB,
        "Consume loops that failed and were restarted.",
    ),
    Metric("oncely_handler_duration_seconds", "histogram", _HTB, "Handler run time."),
    Metric("oncely_store_latency_seconds", "histogram", _HTB, "Idempotency-store call latency."),
    Metric("oncely_in_flight", "gauge", _HTB, "Handler runs in progress now."),
    Metric("oncely_broker_connected", "gauge", ("broker",), "1 while the broker is connected."),
    Metric("oncely_worker_ready", "gauge", (), "1 while the worker is ready (/readyz)."),
    Metric("oncely_worker_live", "gauge", (), "1 while the worker is live (/livez)."),
    Metric(
        "oncely_consumer_lag",
        "gauge",
        ("topic", "partition"),
        "Messages behind the end of each partition (Kafka).",
    ),
    Metric(
        "oncely_queue_depth",
        "gauge",
        ("topic",),
        "Messages waiting in the queue, where the broker can tell.",
    ),
    Metric("oncely_outbox_backlog", "gauge", ("outbox",), "Outbox rows not yet published."),
    Metric(
        "oncely_outbox_oldest_row_age_seconds",
        "gauge",
        ("outbox",),
        "Age of the oldest unpublished outbox row.",
    ),
)

NAMES: frozenset[str] = frozenset(m.name for m in METRICS)

_KINDS = {m.name: m.kind for m in METRICS}


def series_base(series: str) -> str:
    """The metric a series name belongs to: ``oncely_handler_duration_seconds_bucket`` (and
    ``_sum``, ``_count``) belong to the histogram; any other name is its own."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and _KINDS.get(base) == "histogram":
            return base
    return series
