"""Tracing on the per-message path, found in review: a traced run leaves its task reusable."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.runtime.test_runtime_review import tasks_running

pytestmark = pytest.mark.anyio


async def test_a_traced_run_detaches_its_span_so_the_pooled_task_runs_the_next(
    unique: str, spans: InMemorySpanExporter
) -> None:
    # The span is attached to the task's context for the run: left attached, the pool ends
    # the task after every delivery (context changed) and later runs would nest in it.
    tasks = await tasks_running(unique, 4)
    assert len(tasks) == 4 and len(set(tasks)) == 1
    runs = [s for s in spans.get_finished_spans() if s.name == "process t"]
    assert len(runs) == 4
    assert len({s.context.trace_id for s in runs if s.context is not None}) == 4
