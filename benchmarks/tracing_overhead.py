"""What tracing costs: a no-op handler on the memory broker, before tracing existed, with
tracing off, and with tracing on (OpenTelemetry SDK, spans kept in memory).

Per round, on asyncio and on uvloop, it times ``throughput.with_worker`` (a Worker over N
queued messages, start to drained stop) in three ways, interleaved in one process run:

- ``before``: the worker running a ``Runner`` without the tracing hook: today's
  ``oncely/runtime/_process.py`` with every statement that mentions tracing cut out of its
  syntax tree, loaded beside the real one (so it stays today's runner whatever else changes);
- ``off``: the current code with no tracer provider set (the ``otel`` extra's API installed
  but not configured; without the extra the same single ``is None`` test runs);
- ``on``: an SDK ``TracerProvider`` with a ``SimpleSpanProcessor`` into an
  ``InMemorySpanExporter`` (cleared every run): a producer span per publish (not timed), and
  per message the timed consumer span, its context extracted from ``traceparent``.

It prints medians of msgs/s and of client CPU µs per message (process CPU time, which other
load on a shared machine disturbs less than wall time), and the medians of the per-round
ratios off/before and on/off, of msgs/s and of CPU per message, plus the CPU µs per message
that tracing on adds.

    python benchmarks/tracing_overhead.py [--messages 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import importlib.util
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import throughput  # the sibling script: one Worker timing for every broker
import uvloop
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

import oncely.runtime.worker as worker_module
from oncely.runtime._process import Runner

ROOT = Path(__file__).resolve().parents[1]
MODES = ("before", "off", "on")
HOOK = ("tracing", "traced", "for_handler")
"""Names the runner's tracing hook uses, and nothing else in it does."""


class StripTracing(ast.NodeTransformer):
    """Drops every statement that mentions the hook (its import, ``self.tracing = ...``,
    ``traced = ...``, the ``if self.tracing is not None:`` blocks and ``if traced ...``)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and stmts and isinstance(stmts[0], ast.stmt):
                kept = [s for s in stmts if not mentions_hook(s)]
                if not kept and field == "body":
                    kept = [ast.Pass()]
                setattr(node, field, kept)
        return node


def mentions_hook(stmt: ast.stmt) -> bool:
    if isinstance(stmt, ast.ImportFrom):
        return stmt.module == "oncely.runtime._tracing"
    if isinstance(stmt, ast.If | ast.Assign | ast.Expr):
        head = stmt.test if isinstance(stmt, ast.If) else stmt
        return any(
            (isinstance(n, ast.Name) and n.id in HOOK)
            or (isinstance(n, ast.Attribute) and n.attr in HOOK)
            for n in ast.walk(head)
        )
    return False


def load_before(tmp: Path) -> ModuleType:
    """Today's runner module with the tracing hook cut out; checks that it is gone."""
    tree = ast.parse((ROOT / "oncely/runtime/_process.py").read_text())
    source = ast.unparse(ast.fix_missing_locations(StripTracing().visit(tree)))
    left = [name for name in HOOK if name in source]
    assert not left, f"the tracing hook is still in the stripped runner: {left}"
    path = tmp / "_process_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("oncely.runtime._process_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    # Its base class, the failure paths (oncely/runtime/_failures.py), keeps the hook: the
    # no-op handler never takes those paths, and with no tracing they test ``None`` as before.
    module.Runner.tracing = None
    return module


def set_provider(provider: TracerProvider | None) -> None:
    """Swap OpenTelemetry's global tracer provider (the API allows one set per process; this
    puts its globals back first, as OpenTelemetry's own test helpers do)."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    trace._PROXY_TRACER_PROVIDER = trace.ProxyTracerProvider()
    if provider is not None:
        trace.set_tracer_provider(provider)


async def one(mode: str, n: int, concurrency: int, before: type) -> tuple[float, float, float]:
    """msgs/s and CPU µs per message of one worker run in ``mode``, and CPU µs per publish of
    the messages it ran."""
    url = f"memory://bench-{uuid.uuid4().hex[:6]}"
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    cpu = time.process_time()
    await throughput.fill(url, topic, n)
    publish = (time.process_time() - cpu) / n * 1e6
    # The worker builds its runners from this name: swap the class it finds there.
    vars(worker_module)["Runner"] = before if mode == "before" else Runner
    cpu = time.process_time()
    rate = await throughput.with_worker(url, topic, n, concurrency, idem=False)
    return rate, (time.process_time() - cpu) / n * 1e6, publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved; medians shown")
    args = parser.parse_args()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    loops = ("asyncio", "uvloop")
    rates: dict[tuple[str, str], list[float]] = {(m, lp): [] for m in MODES for lp in loops}
    cpus: dict[tuple[str, str], list[float]] = {(m, lp): [] for m in MODES for lp in loops}
    publishes: dict[str, list[float]] = {m: [] for m in MODES}
    spans_per_message: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        before = load_before(Path(tmp)).Runner
        for r in range(args.rounds):
            for loop in loops:
                # Rotate the order so that no mode always runs first (or last) in a round.
                for mode in MODES[r % 3 :] + MODES[: r % 3]:
                    set_provider(provider if mode == "on" else None)
                    exporter.clear()
                    coro = one(mode, args.messages, args.concurrency, before)
                    rate, cpu_us, pub = uvloop.run(coro) if loop == "uvloop" else asyncio.run(coro)
                    publishes[mode].append(pub)
                    if mode == "on":
                        spans_per_message.append(len(exporter.get_finished_spans()) / args.messages)
                    rates[mode, loop].append(rate)
                    cpus[mode, loop].append(cpu_us)
    set_provider(None)
    print(
        f"{args.messages} messages on memory://, concurrency {args.concurrency}, median of "
        f"{args.rounds} interleaved rounds; before = the runner without its tracing hook\n"
    )
    print(
        f"{'loop':<8} {'before':>9} {'off':>9} {'on':>9} {'off/bef':>8} {'on/off':>7}  "
        f"{'CPU µs/msg before':>17} {'off':>6} {'on':>6} {'off/bef':>8} {'on-off':>7}"
    )
    for loop in loops:

        def med(mode: str, loop: str = loop) -> float:
            return statistics.median(rates[mode, loop])

        def cpu(mode: str, loop: str = loop) -> float:
            return statistics.median(cpus[mode, loop])

        def ratio(
            top: str, bottom: str, loop: str = loop, of: dict[Any, list[float]] = rates
        ) -> float:
            pairs = zip(of[top, loop], of[bottom, loop], strict=True)
            return statistics.median(a / b for a, b in pairs)

        added = statistics.median(
            a - b for a, b in zip(cpus["on", loop], cpus["off", loop], strict=True)
        )
        print(
            f"{loop:<8} {med('before'):>9,.0f} {med('off'):>9,.0f} {med('on'):>9,.0f} "
            f"{ratio('off', 'before'):>7.3f}x {ratio('on', 'off'):>6.2f}x  "
            f"{cpu('before'):>17.1f} {cpu('off'):>6.1f} {cpu('on'):>6.1f} "
            f"{ratio('off', 'before', of=cpus):>7.3f}x {added:>7.1f}"
        )
    print(
        f"\nmsgs/s; ratios are medians of per-round ratios. Spans per message with tracing on: "
        f"{statistics.median(spans_per_message):.2f} (one producer span per publish, one "
        f"consumer span per run).\nPublisher.publish, CPU µs per message (both loops): "
        + ", ".join(f"{m} {statistics.median(publishes[m]):.1f}" for m in MODES)
    )


if __name__ == "__main__":
    main()
