"""The live status page at ``/``, loaded in a real headless Chromium while a worker works."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

import oncely
from oncely.runtime._page import RATE_WINDOW, add_status_page
from oncely.runtime.http import Endpoints, Response
from tests._wait import eventually
from tests.conftest import one_loop
from tests.runtime._chromium import Browser, Page

# A handler name is a user string: this one would run script if the page inserted it as markup.
MARKUP = '<img src=x onerror="window.pwned=1">&amp;'

# Everything the page shows, read from its data attributes.
READ = """(() => {
  const v = (id) => document.getElementById(id).getAttribute("data-value");
  const handlers = {};
  for (const tr of document.querySelectorAll("tr[data-handler]")) {
    const row = {};
    for (const td of tr.querySelectorAll("td[data-field]")) {
      row[td.dataset.field] = td.dataset.value;
    }
    handlers[tr.getAttribute("data-handler")] = row;
  }
  const checks = {};
  for (const li of document.querySelectorAll("#checks li")) {
    checks[li.dataset.check] = li.dataset.ok;
  }
  return {
    ticks: Number(document.body.dataset.ticks), state: v("state"), conn: v("broker-conn"),
    live: v("live"), ready: v("ready"), in_flight: v("in-flight"), error: v("error"),
    failure: document.getElementById("failure").textContent, checks, handlers,
    images: document.querySelectorAll("img").length, pwned: window.pwned === undefined ? null : 1,
  };
})()"""

FIELDS = ("processed", "retried", "dead_lettered", "duplicates", "in_progress", "store_errors")


async def view_until(page: Page, cond: Any, within: float = 30.0) -> dict[str, Any]:
    """Read the page until ``cond(view)`` holds; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = await page.evaluate(READ)
        if cond(view):
            return view
        await asyncio.sleep(0.05)
    raise AssertionError(f"the page never showed what was expected; last view: {view}")


def rate_of(view: dict[str, Any], handler: str) -> str | None:
    rate: str | None = view["handlers"].get(handler, {}).get("rate")
    return rate


def broker_connection(snap: dict[str, Any]) -> str:
    """What the page must show for the broker connection, from the snapshot's health checks."""
    for name, check in (snap.get("health") or {}).get("checks", {}).items():
        if name.startswith("broker"):
            return "connected" if check["ok"] else "disconnected"
    return "unknown"


def shows_snapshot(view: dict[str, Any], snap: dict[str, Any]) -> bool:
    if view["state"] != snap["state"] or view["in_flight"] != str(snap["in_flight"]):
        return False
    for handler in snap["handlers"]:
        row = view["handlers"].get(handler["name"])
        if row is None or row["in_flight"] != str(handler["in_flight"]):
            return False
        if any(row[f] != str(handler["counters"][f]) for f in FIELDS):
            return False
        for prefix, hist in (
            ("store", handler["store_seconds"]),
            ("handler", handler["handler_seconds"]),
        ):
            for q in ("p50", "p99"):
                shown = row[f"{prefix}_{q}"]
                if (float(shown) if shown else None) != (hist and hist[q]):
                    return False
    return True


@pytest.mark.anyio
async def test_the_page_shows_the_workers_numbers_while_it_works(tmp_path: Path) -> None:
    app = oncely.App()
    failed: set[int] = set()
    quick = oncely.RetryPolicy(base=0.01, cap=0.01)

    @app.handler("orders", name="orders", idempotent=True, key="payload:id", concurrency=4)
    async def orders(_: dict[str, int]) -> None: ...

    @app.handler("payments", name="payments", retry=quick)
    async def payments(msg: dict[str, int]) -> None:
        if msg["n"] not in failed:
            failed.add(msg["n"])
            raise RuntimeError("card network timeout")

    @app.handler("emails", name="emails")
    async def emails(msg: dict[str, bool]) -> None:
        if msg["bad"]:
            raise oncely.Reject("no such mailbox")

    @app.handler("stream", name=MARKUP)
    async def stream(_: dict[str, int]) -> None: ...

    worker = oncely.Worker(app, broker=f"sqlite:///{tmp_path / 'jobs.db'}")
    async with worker, Browser() as browser:
        port = await worker.serve_http(0)
        streaming = asyncio.Event()
        published = 0

        async def publish_stream() -> None:
            nonlocal published
            while not streaming.is_set():
                await app.publish("stream", {"n": published})
                published += 1
                await asyncio.sleep(0.005)  # pacing, so the stream lasts until stopped

        producer = asyncio.create_task(publish_stream())
        page = await browser.open(f"http://127.0.0.1:{port}/")
        # While messages flow, the page computes a throughput above zero from its snapshots.
        view = await view_until(page, lambda v: float(rate_of(v, MARKUP) or 0) > 0)
        assert view["state"] == "running"
        streaming.set()
        await producer

        # A known workload: duplicates, retries and a dead letter.
        for n in range(10):
            await app.publish("orders", {"id": n})
        for n in range(3):
            await app.publish("payments", {"n": n})
        for bad in (False, True, False):
            await app.publish("emails", {"bad": bad})
        stats = worker.handler_stats
        await eventually(lambda: stats["orders"].processed == 10, within=30)
        for n in range(3):
            await app.publish("orders", {"id": n})  # completed keys: absorbed as duplicates
        await eventually(
            lambda: (
                stats["orders"].duplicates == 3
                and stats["payments"].processed == 3
                and stats["emails"].processed + stats["emails"].dead_lettered == 3
                and stats[MARKUP].processed == published
                and worker.in_flight == 0
            ),
            within=30,
        )
        snap = worker.snapshot()
        view = await view_until(page, lambda v: shows_snapshot(v, snap))
        rows = view["handlers"]
        assert (rows["orders"]["processed"], rows["orders"]["duplicates"]) == ("10", "3")
        assert (rows["payments"]["processed"], rows["payments"]["retried"]) == ("3", "3")
        assert (rows["emails"]["processed"], rows["emails"]["dead_lettered"]) == ("2", "1")
        assert rows[MARKUP]["processed"] == str(published)
        assert view["in_flight"] == "0"
        assert view["conn"] == broker_connection(snap)
        # Timings: serving turned them on, and the page showed the snapshot's quantiles.
        assert float(rows["orders"]["handler_p99"]) > 0 and float(rows["orders"]["store_p50"]) > 0
        # The user's string shows as text: no element was made from it, no script ran.
        assert view["images"] == 0 and view["pwned"] is None
        # Idle now: the rates fall to zero once the window has passed.
        await view_until(
            page,
            lambda v: all(float(r["rate"] or 1) == 0 for r in v["handlers"].values()),
            within=RATE_WINDOW + 30,
        )
        assert page.errors == [] and page.network_errors == []

        await worker.stop()
        # The server is gone: the page says it cannot refresh, and does not throw.
        await view_until(page, lambda v: bool(v["error"]))
        assert page.errors == []


@pytest.mark.anyio
@one_loop  # the subject is the page's script; the server is a stub of /status.json
async def test_the_page_renders_health_failures_and_rates_from_snapshots() -> None:
    """A served sequence of snapshots: 10 more processed per second of snapshot time gives
    10 msgs/s; a failing broker check shows as disconnected and not ready."""
    endpoints = Endpoints()
    add_status_page(endpoints)
    served = 0

    async def status(_: Any) -> Response:
        nonlocal served
        served += 1
        snap = {
            "time": 1_000_000.0 + served,
            "started_at": 1_000_000.0 - 3725,
            "state": "draining",
            "failure": "ConnectionLost('gone')",
            "broker": "amqp://guest:***@127.0.0.1:5672/",
            "store": None,
            "in_flight": 2,
            "health": {
                "live": True,
                "ready": False,
                "checks": {
                    "broker": {"ok": False, "detail": "<b>connection refused</b>"},
                    "event_loop": {"ok": True, "detail": ""},
                },
            },
            "handlers": [
                {
                    "name": "h",
                    "topic": "t",
                    "guarantee": "at_least_once",
                    "concurrency": 8,
                    "in_flight": 2,
                    "counters": {f: (10 * served if f == "processed" else 1) for f in FIELDS},
                    "handler_seconds": None,
                    "store_seconds": None,
                }
            ],
        }
        return Response(200, json.dumps(snap).encode(), "application/json")

    endpoints.add("/status.json", status)
    server = await endpoints.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with Browser() as browser:
            page = await browser.open(f"http://127.0.0.1:{port}/")
            view = await view_until(page, lambda v: v["handlers"].get("h", {}).get("rate"))
            assert float(view["handlers"]["h"]["rate"]) == 10.0
            assert (view["state"], view["conn"]) == ("draining", "disconnected")
            assert (view["live"], view["ready"]) == ("true", "false")
            assert view["checks"] == {"broker": "false", "event_loop": "true"}
            assert view["failure"] == "ConnectionLost('gone')"
            assert view["handlers"]["h"]["handler_p50"] == ""  # timings off: no number
            assert view["images"] == 0
            title = await page.evaluate("document.getElementById('broker-conn').title")
            assert title == "<b>connection refused</b>"
            uptime = await page.evaluate("document.getElementById('uptime').textContent")
            assert uptime.startswith("1h 2m")
            assert page.errors == []
    finally:
        await endpoints.aclose()


@pytest.mark.anyio
async def test_the_page_is_self_contained_and_only_its_own_script_may_run() -> None:
    app = oncely.App()

    @app.handler("jobs")
    async def jobs(_: object) -> None: ...

    worker = oncely.Worker(app, broker="memory://page-csp")
    response = await worker.endpoints.respond("GET", "/")
    assert response.status == 200 and response.content_type.startswith("text/html")
    html = response.body.decode()
    # No external assets: nothing is loaded from another URL.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = response.headers["Content-Security-Policy"]
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


@pytest.mark.anyio
@one_loop  # the subject is the page's script; the server is a stub of /status.json
async def test_the_page_restarts_its_rates_with_the_worker_and_bounds_a_refresh() -> None:
    """A worker restart resets its counters: the page starts its rates over rather than showing
    a stall (0 msgs/s) for a window. A status.json that never answers shows as an error."""
    endpoints = Endpoints()
    add_status_page(endpoints)
    served = 0
    hang = asyncio.Event()
    released = asyncio.Event()

    async def status(_: Any) -> Response:
        nonlocal served
        served += 1
        n = served
        if n == 8:
            hang.set()
            await released.wait()
        first_run = n <= 3
        processed = 1000 + 10 * n if first_run else 10 * (n - 3)
        snap = {
            "time": 1_000_000.0 + n,
            "started_at": 900_000.0 if first_run else 1_000_003.5,
            "state": "running",
            "failure": None,
            "broker": "memory://x",
            "store": None,
            "in_flight": 0,
            "handlers": [
                {
                    "name": name,
                    "topic": "t",
                    "guarantee": "at_least_once",
                    "concurrency": 1,
                    "in_flight": 0,
                    "counters": {
                        **{f: 0 for f in FIELDS},
                        "processed": processed,
                        "received": processed,
                    },
                    "handler_seconds": None,
                    "store_seconds": None,
                }
                for name in ("h", "__proto__")
            ],
        }
        return Response(200, json.dumps(snap).encode(), "application/json")

    endpoints.add("/status.json", status)
    server = await endpoints.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    seen: dict[int, tuple[str | None, str | None]] = {}
    read = """[Number(document.getElementById("updated").dataset.value) - 1000000,
        ...[...document.querySelectorAll("tr[data-handler]")].map(
            (tr) => tr.querySelector("td[data-field=rate]").dataset.value)]"""
    try:
        async with Browser() as browser:
            page = await browser.open(f"http://127.0.0.1:{port}/")
            deadline = time.monotonic() + 60
            while not hang.is_set() or 7 not in seen:
                assert time.monotonic() < deadline, f"the page stopped refreshing: {seen}"
                n, *rates = await page.evaluate(read)
                if n > 0:
                    seen[int(n)] = (rates[0], rates[1])
                await asyncio.sleep(0.05)
            # Before the restart: 10/s; after it, no rate for the first snapshot, then 10/s
            # again; never the 0 that comparing with the old run's counters gives.
            assert seen[3] == ("10", "10")
            after = {n: rates for n, rates in seen.items() if n >= 4}
            assert set(after.values()) <= {("", ""), ("10", "10")}, seen
            assert after.get(7) == ("10", "10"), seen
            # The eighth snapshot never comes: the page says so (within its refresh timeout)...
            view = await view_until(page, lambda v: bool(v["error"]))
            assert "timed out" in view["error"]
            released.set()
            # ...and recovers with the next one.
            await view_until(page, lambda v: not v["error"] and v["ticks"] >= 8)
            assert page.errors == []
    finally:
        released.set()
        await endpoints.aclose()


@pytest.mark.anyio
async def test_a_browser_that_fails_to_start_is_not_left_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The browser started but its first command failed: ``async with`` raises, and no
    process of the browser's group is left behind."""
    browser = Browser()

    async def refuse(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("Target.setDiscoverTargets: refused")

    monkeypatch.setattr(browser, "send", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        async with browser:
            pass
    proc = browser._proc
    assert proc is not None and proc.returncode is not None
    # Killed helpers are zombies until init reaps them: those do not count.
    await eventually(lambda: _live_in_group(proc.pid) == [], within=10)


def _live_in_group(pgid: int) -> list[int]:
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in ("Z", "X"):
            live.append(int(stat.parent.name))
    return live
