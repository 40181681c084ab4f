"""SQS throughput and API calls: the Worker against a careful raw aiobotocore loop.

Against a real SQS-compatible server (ElasticMQ from ``scripts/services.sh up``; override
with ``ONCELY_TEST_SQS_ENDPOINT``), on uvloop, in this one process run, over a backlog of
``--messages`` queued before each measurement:

- ``raw``: plain aiobotocore, ``ceil(concurrency / 10)`` pollers, each a loop of
  ``ReceiveMessage`` (10, long poll, asking for the same attributes as oncely), then for each
  message decoding its JSON body and awaiting a no-op handler with it (the work the Worker
  is asked to do), then one ``DeleteMessageBatch`` of what it got: what a careful user
  writes, and the floor of 200 API calls per 1,000 messages. Like the Worker, it starts from
  the queue's name: creating its client and looking up the queue URL are timed too;
- ``raw-ready``: the same loop timed from a client already made and a queue URL already
  known (how ``raw`` was timed before; printed for comparison, not the baseline);
- ``oncely``: a Worker running a no-op at-least-once handler at ``--concurrency``;
- ``oncely+idem``: the same handler effectively-once, through a SQLite store;
- ``heartbeat``: ``--long`` handlers that outlive their visibility at once; the
  ``ChangeMessageVisibility(Batch)`` calls each heartbeat beat costs.

Each run is timed from start to the moment the last message's delete returned (the Worker's
start, which makes its client, connects and resolves the queue, included; ``raw``'s client
and queue look-up likewise). It prints msgs/s (the median of ``--rounds`` interleaved rounds,
and the median of the per-round ratios to ``raw``; ``raw`` and ``oncely`` run back to back,
in turn first), API calls per 1,000 messages (the most of
any round; queue look-ups and creation not counted), this process's CPU time per message (the
backlog fill excluded; a steadier figure than msgs/s on a busy machine) and ratios measured in
the same run. Nothing is asserted.

``--freeze`` runs both sides as ``oncely run`` runs a worker: once started (``raw``: its
client made and the queue looked up; the Worker: ``start()`` returned), ``gc.collect()`` then
``gc.freeze()``, inside the timed window, on both sides alike (and ``gc.unfreeze()`` after).

    python benchmarks/sqs_throughput.py [--messages 5000] [--concurrency 80] [--long 200]
        [--freeze]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop
from aiobotocore.session import AioSession

import oncely
from oncely.brokers.sqs import SqsBroker

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
ENDPOINT = os.environ.get("ONCELY_TEST_SQS_ENDPOINT", "http://127.0.0.1:9324")
URL = f"sqs://?region=us-east-1&endpoint={ENDPOINT}&wait=1"


def client() -> Any:
    return AioSession().create_client("sqs", region_name="us-east-1", endpoint_url=ENDPOINT)


async def fill(topic: str, n: int) -> str:
    """Create the queue (as oncely would) and queue ``n`` small JSON messages."""
    async with SqsBroker.from_url(URL) as broker:
        url, _ = await broker.queue_urls(topic)
    async with client() as sqs:
        slots = asyncio.Semaphore(16)

        async def batch(start: int) -> None:
            async with slots:
                entries = [
                    {"Id": str(i), "MessageBody": f'{{"n": {start + i}}}'}
                    for i in range(min(10, n - start))
                ]
                await sqs.send_message_batch(QueueUrl=url, Entries=entries)

        await asyncio.gather(*(batch(s) for s in range(0, n, 10)))
    return url


async def drop(topic: str) -> None:
    async with client() as sqs:
        for name in (topic, topic + "-dlq"):
            got = await sqs.get_queue_url(QueueName=name)
            await sqs.delete_queue(QueueUrl=got["QueueUrl"])


async def handle(_: dict[str, int]) -> None:
    """The raw loop's no-op handler (the Worker runs the same, as ``noop``)."""


ORDER = ["raw", "oncely", "raw-ready", "oncely+idem"]
"""A round's runs in even rounds; odd rounds swap each pair (see ``main``)."""

FREEZE = False
"""``--freeze``: see the module docstring."""


def once_started() -> None:
    """Both sides call this once started: what ``oncely run`` does then, with ``--freeze``."""
    if FREEZE:
        gc.collect()
        gc.freeze()


async def raw(topic: str, n: int, pollers: int, *, ready: bool = False) -> tuple[float, int]:
    """Returns (msgs/s until the n-th delete returned, API calls). Timed from before the
    client is made, as the Worker is timed from its start (``ready``: from a made client and
    a known queue URL)."""
    done = 0
    calls = 0
    finished = 0.0
    started = time.perf_counter()
    async with client() as sqs:
        # An admin call, not counted (the Worker's queue look-ups are not either).
        url = (await sqs.get_queue_url(QueueName=topic))["QueueUrl"]
        once_started()

        async def poll() -> None:
            nonlocal done, calls, finished
            while done < n:
                calls += 1
                # The same attributes oncely asks for: without them a consumer has no attempt
                # count, no publish time and no headers.
                got = await sqs.receive_message(
                    QueueUrl=url,
                    MaxNumberOfMessages=10,
                    WaitTimeSeconds=1,
                    VisibilityTimeout=30,
                    MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=[
                        "ApproximateReceiveCount",
                        "SentTimestamp",
                        "MessageGroupId",
                    ],
                )
                messages = got.get("Messages", [])
                if not messages:
                    continue
                # The same per-message work the Worker is asked to do: decode the JSON body
                # and await the handler with it.
                for m in messages:
                    await handle(json.loads(m["Body"]))
                calls += 1
                result = await sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[
                        {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                        for i, m in enumerate(messages)
                    ],
                )
                assert not result.get("Failed"), result
                done += len(messages)
                if done >= n and not finished:
                    finished = time.perf_counter()

        if ready:
            started = time.perf_counter()
        await asyncio.gather(*(poll() for _ in range(pollers)))
        return n / (finished - started), calls


async def worker(topic: str, n: int, concurrency: int, store: str | None) -> tuple[float, int]:
    app = oncely.App("bench")
    finished = asyncio.Event()
    count = 0

    @app.handler(topic, concurrency=concurrency, idempotent=store is not None)
    async def noop(_: dict[str, int]) -> None:
        nonlocal count
        count += 1
        if count == n:
            finished.set()

    w = oncely.Worker(app, broker=URL, store=store)
    started = time.perf_counter()
    await w.start()  # connect and resolve the queue: counted against oncely
    once_started()
    await finished.wait()
    # The last acks are part of the work: timed until the n-th delete returned, like raw.
    # (Not through stop(): both loops then wait out their last empty long poll.)
    while w.stats.processed < n:  # noqa: ASYNC110 - no event to wait on
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - started
    broker = w.broker
    assert isinstance(broker, SqsBroker)
    await w.stop()
    calls = sum(v for k, v in broker.api_calls.items() if k != "admin")
    return n / elapsed, calls


async def heartbeat(topic: str, long: int) -> tuple[int, int]:
    """Run ``long`` handlers that outlive their 3 s visibility for a few beats; returns
    (extensions made, ChangeMessageVisibilityBatch calls)."""
    app = oncely.App("bench")
    release, all_running = asyncio.Event(), asyncio.Event()
    running = 0

    @app.handler(topic, concurrency=long, visibility=3.0, timeout=120)
    async def slow(_: dict[str, int]) -> None:
        nonlocal running
        running += 1
        if running == long:
            all_running.set()
        await release.wait()

    async with oncely.Worker(app, broker=URL) as w:
        await all_running.wait()
        broker = w.broker
        assert isinstance(broker, SqsBroker)
        calls = broker.api_calls["change_visibility"]
        entries = broker.api_entries["change_visibility"]
        await asyncio.sleep(3.5)  # about three beats, one per visibility / 3
        calls = broker.api_calls["change_visibility"] - calls
        entries = broker.api_entries["change_visibility"] - entries
        release.set()
    return entries, calls


async def main(n: int, concurrency: int, long: int, rounds: int) -> None:
    pollers = math.ceil(concurrency / 10)
    print(
        f"{n} messages backlog, concurrency/prefetch {concurrency}, {pollers} pollers, uvloop, "
        f"median of {rounds} interleaved rounds{', gc.freeze() once started' if FREEZE else ''}"
    )
    runs: dict[str, list[tuple[float, int, float]]] = {
        name: [] for name in ("raw", "raw-ready", "oncely", "oncely+idem")
    }
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            # raw and oncely run back to back, first one then the other in turn (likewise
            # raw-ready and oncely+idem after them): the machine's speed drifts between runs,
            # and a fixed order gave the same side the same place every round.
            order = ORDER if r % 2 == 0 else [ORDER[i ^ 1] for i in range(len(ORDER))]
            for name in order:
                got = runs[name]
                topic = f"bench-{uuid.uuid4().hex[:8]}"
                await fill(topic, n)
                # Each run starts from a collected heap: a full collection costs ~100 ms of
                # CPU here (botocore's loaded models), and otherwise whether one lands in a
                # run depends on the rounds before it.
                gc.collect()
                cpu = time.process_time()
                if name.startswith("raw"):
                    rate, calls = await raw(topic, n, pollers, ready=name == "raw-ready")
                else:
                    store = f"sqlite:///{Path(tmp) / topic}.db" if name == "oncely+idem" else None
                    rate, calls = await worker(topic, n, concurrency, store)
                got.append((rate, calls, (time.process_time() - cpu) / n * 1e6))
                gc.unfreeze()
                await drop(topic)
            print(
                "  round:",
                ", ".join(f"{k} {runs[k][-1][0]:.0f}/s {runs[k][-1][2]:.0f}us" for k in order),
            )
    results = {
        name: (
            statistics.median(r for r, _, _ in got),
            max(c for _, c, _ in got),
            statistics.median(u for _, _, u in got),
        )
        for name, got in runs.items()
    }
    base, base_cpu = results["raw"][0], results["raw"][2]
    print(
        f"{'run':<12} {'msgs/s':>9} {'x raw':>6} {'[per round]':>11} {'calls/1000 msgs':>16} "
        f"{'CPU us/msg':>11} {'x raw':>6} {'[per round]':>11}"
    )
    for name, (rate, calls, cpu) in results.items():
        # The median of the per-round ratios: each compares runs made close together in time.
        pairs = list(zip(runs[name], runs["raw"], strict=True))
        per_round = statistics.median(r / b for (r, _, _), (b, _, _) in pairs)
        cpu_per_round = statistics.median(u / b for (_, _, u), (_, _, b) in pairs)
        print(
            f"{name:<12} {rate:>9.0f} {rate / base:>6.2f} {per_round:>11.2f} "
            f"{calls * 1000 / n:>16.0f} {cpu:>11.0f} {cpu / base_cpu:>6.2f} {cpu_per_round:>11.2f}"
        )
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await fill(topic, long)
    extensions, calls = await heartbeat(topic, long)
    await drop(topic)
    beats = extensions / long
    print(
        f"heartbeat: {long} running handlers, {beats:.0f} beats: {extensions} extensions in "
        f"{calls} ChangeMessageVisibilityBatch calls ({calls / beats:.1f} calls per beat, "
        f"{extensions / calls:.1f} extensions per call)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=80)
    parser.add_argument("--long", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--freeze", action="store_true", help="gc.freeze() once started")
    args = parser.parse_args()
    FREEZE = args.freeze
    uvloop.run(main(args.messages, args.concurrency, args.long, args.rounds))
