"""``metric_names.METRICS`` is what ``/metrics`` serves: every ``oncely_*`` family a worker
exports, with its kind and labels, and nothing else. The README's table, the alert rules and
the dashboard are checked against ``METRICS`` (test_ops_docs), so this closes the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import oncely
from oncely.runtime.metric_names import METRICS
from oncely.stores.outbox import Outbox
from tests._wait import eventually
from tests.runtime._probe import get

pytestmark = pytest.mark.anyio


async def test_served_families_are_exactly_metric_names(unique: str, tmp_path: Path) -> None:
    app = oncely.App()

    @app.handler(unique, name="h", idempotent=True, key="payload:id")
    async def h(_: dict[str, str]) -> None: ...

    outbox = Outbox.from_url(f"sqlite:///{tmp_path / 'app.db'}")
    await outbox.connect()
    try:
        await outbox.migrate()
        worker = oncely.Worker(app, broker=f"memory://{unique}", store=f"memory://{unique}")
        worker.observer.interval = 0.05
        worker.watch_outbox(outbox)
        async with worker:
            port = await worker.serve_http(0)
            await app.publish(unique, {"id": unique})
            await eventually(
                lambda: (
                    worker.stats.acked == 1
                    and unique in worker.observer.backlog
                    and outbox.table in worker.observer.outbox_samples
                )
            )
            status, body = await get(port, "/metrics")
    finally:
        await outbox.aclose()
    assert status == 200, body
    served: dict[str, tuple[str, tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        if not family.name.startswith("oncely_"):
            continue  # prometheus-client's own process_* series
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        served[name] = (family.type, tuple(sorted(labels)))
    declared = {m.name: (m.kind, tuple(sorted(m.labels))) for m in METRICS}
    # Every family here has at least one sample, so its labels are seen (Kafka's lag aside).
    lag = "oncely_consumer_lag"
    assert served.pop(lag)[0] == declared.pop(lag)[0]
    assert served == declared
