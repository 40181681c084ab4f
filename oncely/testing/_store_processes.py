"""The store conformance suite's multi-process race: children that ``begin`` the same keys."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from oncely.stores.base import IdempotencyStore, Outcome

if TYPE_CHECKING:
    from anyio.abc import Process

_CHILD = "from oncely.testing._store_processes import _hammer_child; _hammer_child()"


async def hammer_in_processes(
    store: IdempotencyStore, keys: list[str], *, processes: int, lease: float
) -> list[dict[str, Any]]:
    """Run ``begin`` on every key in each of ``processes`` child processes at once.

    Each child rebuilds the store from ``type(store).from_url(store.url)``, connects, and
    waits for a "go" line, so that all of them race on the same keys in the same order.

    Returns:
        One report per child: ``{"new": [keys it got NEW for], "outcomes": {outcome: n}}``.
    """
    cls = type(store)
    spec = {"target": f"{cls.__module__}:{cls.__qualname__}", "url": store.url, "keys": keys}
    command = [sys.executable, "-c", _CHILD, json.dumps({**spec, "lease": lease})]
    # The child must import what the parent can, test-local store modules included.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    async with contextlib.AsyncExitStack() as stack:
        children = []
        for _ in range(processes):
            process = await stack.enter_async_context(await anyio.open_process(command, env=env))
            assert process.stdout is not None
            children.append((process, BufferedByteReceiveStream(process.stdout)))
        for process, stdout in children:
            await _line(process, stdout)  # "ready"
        for process, _ in children:
            assert process.stdin is not None
            await process.stdin.send(b"go\n")
        reports: list[dict[str, Any]] = [
            json.loads(await _line(process, stdout)) for process, stdout in children
        ]
    return reports


async def _line(process: Process, stdout: BufferedByteReceiveStream) -> bytes:
    try:
        return await stdout.receive_until(b"\n", 1 << 24)
    except (anyio.IncompleteRead, anyio.EndOfStream):
        errors = b""
        if process.stderr is not None:
            with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
                while True:
                    errors += await process.stderr.receive()
        message = errors.decode(errors="replace")
        raise AssertionError(f"store child process failed:\n{message}") from None


def _hammer_child() -> None:
    """The child side of ``hammer_in_processes``; reads its spec from ``sys.argv[1]``."""
    anyio.run(_hammer, json.loads(sys.argv[1]))


async def _hammer(spec: dict[str, Any]) -> None:
    module, _, name = spec["target"].partition(":")
    cls = getattr(importlib.import_module(module), name)
    store: IdempotencyStore = cls.from_url(spec["url"])
    new: list[str] = []
    outcomes: Counter[str] = Counter()
    async with store:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await anyio.to_thread.run_sync(sys.stdin.readline)
        for key in spec["keys"]:
            begun = await store.begin(key, "fp", spec["lease"])
            outcomes[begun.outcome.value] += 1
            if begun.outcome is Outcome.NEW:
                new.append(key)
    sys.stdout.write(json.dumps({"new": new, "outcomes": outcomes}) + "\n")
    sys.stdout.flush()
