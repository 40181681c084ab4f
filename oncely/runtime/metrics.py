"""Prometheus metrics of a worker (extra ``metrics``: ``pip install 'oncely[metrics]'``).

A custom collector reads the worker's per-handler ``Stats`` and the health sampler's last
results *at scrape time*, so the hot path pays only the integer adds it does anyway, and a
scrape does no I/O. Every name below is a contract (dashboards, alerts and the runbook use
them); per-handler series carry ``handler``, ``topic`` and ``broker`` (the URL scheme).

Counters: ``oncely_messages_{received,acked,nacked,rejected,retried}_total``,
``oncely_dead_letters_total``, ``oncely_duplicates_total``,
``oncely_in_progress_collisions_total``, ``oncely_deferred_total``, ``oncely_fail_open_total``,
``oncely_completion_record_failures_total``, ``oncely_results_not_cached_total``,
``oncely_store_errors_total``,
``oncely_visibility_extensions_total``, ``oncely_visibility_extension_failures_total``,
``oncely_settle_errors_total``, ``oncely_internal_errors_total``,
``oncely_consume_errors_total``.

Histograms: ``oncely_handler_duration_seconds``, ``oncely_store_latency_seconds``.

Gauges: ``oncely_in_flight``, ``oncely_broker_connected{broker}`` (absent when the adapter
cannot tell), ``oncely_worker_ready``, ``oncely_worker_live``, ``oncely_queue_depth{topic}``
(where the broker can tell), ``oncely_consumer_lag{topic,partition}`` (Kafka),
``oncely_outbox_backlog{outbox}`` and ``oncely_outbox_oldest_row_age_seconds{outbox}`` (for
outboxes a worker watches), plus prometheus-client's ``process_*`` series.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from oncely.runtime.http import Response, Route

if TYPE_CHECKING:
    from collections.abc import Mapping

    from oncely.runtime._watch import Sampled, Watched
    from oncely.runtime.stats import Histogram

__all__ = ["COUNTERS", "WorkerCollector", "metrics_route"]

COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("oncely_messages_received", "received", "Deliveries taken from the broker."),
    ("oncely_messages_acked", "acked", "Acks the broker took (runs, duplicates)."),
    ("oncely_messages_nacked", "nacked", "Nacks the broker took (retries, deferrals)."),
    ("oncely_messages_rejected", "rejected", "Handler runs that raised Reject."),
    ("oncely_messages_retried", "retried", "Failed runs nacked for a later retry."),
    ("oncely_dead_letters", "dead_lettered", "Deliveries moved to the dead-letter queue."),
    ("oncely_duplicates", "duplicates", "Deliveries absorbed: their key had completed."),
    (
        "oncely_in_progress_collisions",
        "in_progress",
        "Deliveries deferred because another run held their key.",
    ),
    ("oncely_deferred", "deferred", "Deliveries put back without running."),
    ("oncely_fail_open", "fail_open", "Runs without dedupe because the store was down."),
    (
        "oncely_completion_record_failures",
        "unrecorded",
        "Completions the store did not record (a redelivery would run again).",
    ),
    (
        "oncely_results_not_cached",
        "results_not_cached",
        "Runs whose return value could not be encoded for the result cache.",
    ),
    ("oncely_store_errors", "store_errors", "Idempotency-store calls that failed."),
    ("oncely_visibility_extensions", "extensions", "Visibility extensions made."),
    (
        "oncely_visibility_extension_failures",
        "heartbeat_errors",
        "Visibility extensions or lease renewals that failed.",
    ),
    ("oncely_settle_errors", "settle_errors", "Acks, nacks or rejects the broker refused."),
    ("oncely_internal_errors", "internal_errors", "Deliveries the runtime itself failed on."),
    ("oncely_consume_errors", "consume_errors", "Consume loops that failed and restarted."),
)
"""(metric name without ``_total``, ``Stats`` field, help)."""

LABELS = ("handler", "topic", "broker")


class WorkerCollector(Collector):
    """Reads a worker's counters and its observer's samples on each scrape."""

    def __init__(self, worker: Watched, observer: Sampled) -> None:
        self.worker = worker
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        broker = worker.broker
        scheme = (urlsplit(broker.url).scheme if broker is not None else "") or "unknown"
        rows = [
            ((spec.name, spec.topic, scheme), worker.handler_stats[spec.name])
            for spec in worker.specs
        ]
        for name, field, help_ in COUNTERS:
            counter = CounterMetricFamily(name, help_, labels=LABELS)
            for labels, stats in rows:
                counter.add_metric(labels, getattr(stats, field))
            yield counter
        yield _histogram(
            "oncely_handler_duration_seconds",
            "Handler run time.",
            [(labels, stats.handler_seconds) for labels, stats in rows],
        )
        yield _histogram(
            "oncely_store_latency_seconds",
            "Idempotency-store call latency.",
            [(labels, stats.store_seconds) for labels, stats in rows],
        )
        load = worker.load
        in_flight = GaugeMetricFamily("oncely_in_flight", "Handlers running now.", labels=LABELS)
        for spec in worker.specs:
            in_flight.add_metric((spec.name, spec.topic, scheme), load.get(spec.name, (0, 0))[0])
        yield in_flight
        yield from self._health(scheme)
        yield from self._samples()

    def _health(self, scheme: str) -> Iterator[Metric]:
        broker = self.worker.broker
        connected = None
        if broker is not None:
            try:
                connected = broker.connected
            except Exception:
                connected = None
        gauge = GaugeMetricFamily(
            "oncely_broker_connected", "1 while the broker connection is up.", labels=["broker"]
        )
        if broker is None or connected is not None:
            gauge.add_metric([scheme], 1.0 if connected else 0.0)
        yield gauge
        health = self.observer.health()
        yield GaugeMetricFamily(
            "oncely_worker_ready", "1 while /readyz passes.", value=float(health["ready"])
        )
        yield GaugeMetricFamily(
            "oncely_worker_live", "1 while /livez passes.", value=float(health["live"])
        )

    def _samples(self) -> Iterator[Metric]:
        observer = self.observer
        depth = GaugeMetricFamily(
            "oncely_queue_depth", "Messages ready in the topic (sampled).", labels=["topic"]
        )
        lag = GaugeMetricFamily(
            "oncely_consumer_lag",
            "Records after the committed position, per partition this worker holds (sampled).",
            labels=["topic", "partition"],
        )
        for topic, parts in sorted(observer.backlog.items()):
            for partition, n in sorted(parts.items()):
                if partition == "":
                    depth.add_metric([topic], n)
                else:
                    lag.add_metric([topic, partition], n)
        yield depth
        yield lag
        backlog = GaugeMetricFamily(
            "oncely_outbox_backlog", "Outbox rows not sent yet (sampled).", labels=["outbox"]
        )
        age = GaugeMetricFamily(
            "oncely_outbox_oldest_row_age_seconds",
            "Age of the oldest unsent outbox row (sampled).",
            labels=["outbox"],
        )
        for table, sample in sorted(observer.outbox_samples.items()):
            backlog.add_metric([table], sample.backlog)
            age.add_metric([table], sample.oldest_age or 0.0)
        yield backlog
        yield age


def _histogram(
    name: str, help_: str, rows: list[tuple[tuple[str, str, str], Histogram | None]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_, labels=LABELS)
    for labels, histogram in rows:
        if histogram is None:
            continue
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, n in zip(histogram.bounds, histogram.counts, strict=False):
            cumulative += n
            buckets.append((repr(float(bound)), cumulative))  # Prometheus' own spelling
        buckets.append(("+Inf", histogram.count))
        family.add_metric(labels, buckets, histogram.sum)
    return family


def metrics_route(
    worker: Watched, observer: Sampled, *, process: bool = True
) -> tuple[CollectorRegistry, Route]:
    """A registry with the worker's collector (and the process collector), and the
    ``/metrics`` route serving it in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(worker, observer))
    if process:
        ProcessCollector(registry=registry)

    async def route(query: Mapping[str, str]) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return registry, route
