"""Before/after: the Worker of two source trees against the same raw loop, interleaved.

Each round runs the broker's raw loop (from this tree), then a no-op at-least-once Worker of
``--before`` and of ``--after``, each contender in its own process (so two versions of oncely
never share one), on fresh topics (Kafka: one topic, a fresh consumer group each). It prints,
per contender, the median msgs/s, the median client CPU per message (``time.process_time`` of
the consuming process, brokers excluded: steadier than wall-clock on a shared machine) and the
median of the per-round ratios to the raw loop. Nothing is asserted.

    python benchmarks/dispatch_ab.py memory --before ../main --after . [--messages 20000]
        [--rounds 5] [--loop asyncio|uvloop]

Brokers: ``memory``, ``sqlite`` (raw: ``throughput.raw_concurrent``), ``amqp`` (raw: the
careful raw loop, ``amqp_throughput.raw_careful``) and ``kafka`` (raw:
``getmany`` + ``commit``; the Worker with per-key and per-partition ordering).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent


async def child(kind: str, contender: str, n: int, topic: str | None) -> tuple[float, float]:
    """Run one contender in this process: (msgs/s, CPU µs per message)."""
    import throughput

    if kind in ("memory", "sqlite"):
        url = (
            f"memory://b{uuid.uuid4().hex[:6]}"
            if kind == "memory"
            else f"sqlite:///{tempfile.mkdtemp()}/b.db"
        )
        topic = f"t{uuid.uuid4().hex[:6]}"
        await throughput.fill(url, topic, n)
        cpu = time.process_time()
        if contender == "raw":
            rate = await throughput.raw_concurrent(url, topic, n, 32)
        else:
            rate = await throughput.with_worker(url, topic, n, 32, False)
    elif kind == "amqp":
        import amqp_throughput as a

        topic = f"bench-{uuid.uuid4().hex[:8]}"
        await a.publish_rate(a.URL, topic, n, 256)
        cpu = time.process_time()
        try:
            if contender == "raw":
                rate = await a.raw_careful(topic, n, 32)
            else:
                rate = await a.with_worker(a.URL, topic, n, 32, False)
        finally:
            await a.delete_topology(topic)
    else:
        import kafka_throughput as k

        assert topic is not None
        cpu = time.process_time()
        if contender == "raw":
            rate = await k.raw(topic, n)
        else:
            options = {"ordering": "partition"} if contender == "partition" else {}
            rate = await k.with_worker(topic, None, n, 64, **options)
    return rate, (time.process_time() - cpu) / n * 1e6


def run(tree: Path, args: argparse.Namespace, contender: str, topic: str | None) -> list[float]:
    """One contender in a fresh process whose ``oncely`` comes from ``tree``."""
    command = [sys.executable, str(HERE / "dispatch_ab.py"), args.broker, "--child", contender]
    command += ["--messages", str(args.messages), "--loop", args.loop]
    command += ["--topic", topic] if topic else []
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{HERE}"}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{contender} from {tree} failed:\n{out.stderr[-3000:]}")
    return [float(x) for x in out.stdout.split()[-2:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("broker", choices=["memory", "sqlite", "amqp", "kafka"])
    parser.add_argument("--before", type=Path)
    parser.add_argument("--after", type=Path, default=HERE.parent)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import uvloop

        coro = child(args.broker, args.child, args.messages, args.topic)
        rate, cpu = uvloop.run(coro) if args.loop == "uvloop" else asyncio.run(coro)
        print(f"{rate:.1f} {cpu:.2f}")
        return
    if args.before is None:
        parser.error("--before is required")
    topic = None
    if args.broker == "kafka":
        import kafka_throughput as k

        topic = f"bench-{uuid.uuid4().hex[:8]}"
        asyncio.run(k.fill(topic, f"{topic}-out", args.messages, 4))
    workers = ["key", "partition"] if args.broker == "kafka" else ["oncely"]
    samples: dict[str, list[tuple[float, float, float]]] = {}
    for i in range(args.rounds):
        raw_rate, raw_cpu = run(args.after, args, "raw", topic)
        samples.setdefault("raw", []).append((raw_rate, raw_cpu, 1.0))
        for worker in workers:
            for tag in ("before", "after"):
                rate, cpu = run(getattr(args, tag), args, worker, topic)
                samples.setdefault(f"{tag} {worker}", []).append((rate, cpu, rate / raw_rate))
        ratios = ", ".join(f"{k} {v[-1][2]:.2f}x" for k, v in samples.items() if k != "raw")
        print(f"round {i + 1}: {ratios}", flush=True)
    print(f"\n{args.broker}, {args.loop}, {args.messages} messages, {args.rounds} rounds, medians")
    print(f"{'':<18}{'msgs/s':>10}{'CPU us/msg':>12}{'/raw':>8}")
    for name, rows in samples.items():
        rate, cpu, ratio = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{name:<18}{rate:>10,.0f}{cpu:>12.1f}{ratio:>7.2f}x")


if __name__ == "__main__":
    main()
