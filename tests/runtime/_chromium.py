"""A headless Chromium (Debian's ``chromium`` package) driven over the DevTools protocol.

The protocol runs over a pair of pipes (``--remote-debugging-pipe``: commands on the browser's
fd 3, answers and events on its fd 4, each a JSON object ended by a NUL byte), so no port and no
websocket client are involved. Page errors (uncaught exceptions, ``console.error``, errors the
browser logs such as CSP violations or failed requests) are collected in ``Page.errors``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import pytest

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
)


def chromium_path() -> str:
    """The browser binary; a missing one fails the test (``scripts/services.sh up`` installs
    it), it is never a skip."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail(
        "chromium is not installed: run `scripts/services.sh up` (apt-get install chromium)"
    )


class Browser:
    """One browser process; use as ``async with Browser() as browser``."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._write_fd = -1
        self._transport: asyncio.ReadTransport | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="oncely-chromium-")

    async def __aenter__(self) -> Browser:
        binary = chromium_path()
        try:
            await self._launch(binary)
        except BaseException:
            # __aexit__ does not run when __aenter__ raises: without this a browser that
            # started but did not answer (or a cancel meanwhile) would outlive the test.
            await self.__aexit__()
            raise
        return self

    async def _launch(self, binary: str) -> None:
        cmd_read, cmd_write = os.pipe()
        out_read, out_write = os.pipe()
        # The browser wants the pipes on fds 3 and 4 exactly: let a shell put them there.
        remap = f'exec "$0" "$@" 3<&{cmd_read} 4>&{out_write} {cmd_read}<&- {out_write}>&-'
        args = [*FLAGS, f"--user-data-dir={self._profile.name}"]
        args.append(f"--window-size={self.width},{self.height}")
        self._proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            remap,
            binary,
            *args,
            "about:blank",
            pass_fds=(cmd_read, out_write),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            # Its own process group, so that its helpers (zygote, renderers) go with it.
            start_new_session=True,
        )
        os.close(cmd_read)
        os.close(out_write)
        self._write_fd = cmd_write
        reader = asyncio.StreamReader(limit=256 * 1024 * 1024)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(out_read, "rb", buffering=0)
        )
        self._reader_task = asyncio.create_task(self._read(reader))
        await self.send("Target.setDiscoverTargets", {"discover": False})

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self.send("Browser.close"), 10)
                await asyncio.wait_for(self._proc.wait(), 10)
            except Exception:  # no answer, a protocol error, a broken pipe: kill it
                pass
        if self._proc is not None:
            # The whole group: helpers of a browser killed (or crashed) may linger otherwise.
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._proc.wait()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self._profile.cleanup()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """One command; its result, or ``RuntimeError`` with the protocol's error."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        if self._reader_task is None or self._reader_task.done():
            raise ConnectionError("chromium exited")  # at once, not after the 30 s below
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        answer = await asyncio.wait_for(future, 30)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\0")
            except asyncio.IncompleteReadError:
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(ConnectionError("chromium exited"))
                return
            message = json.loads(raw[:-1])
            if "id" in message:
                waiter = self._pending.pop(message["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
            elif (page := self._pages.get(message.get("sessionId", ""))) is not None:
                page.event(message["method"], message.get("params", {}))

    async def open(self, url: str) -> Page:
        """A new tab showing ``url`` (returns once its load event fired)."""
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        for domain in ("Runtime", "Log", "Page"):
            await page.send(f"{domain}.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.loaded.clear()
        await page.send("Page.navigate", {"url": url})
        await asyncio.wait_for(page.loaded.wait(), 30)
        return page


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        self.errors: list[str] = []
        """Uncaught exceptions, console errors and browser-logged errors, as text."""
        self.network_errors: list[str] = []
        """Failed requests the browser logged (expected once the server is gone)."""
        self.loaded = asyncio.Event()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    def event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(str(details.get("exception", {}).get("description", details)))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a)) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            target = self.network_errors if entry.get("source") == "network" else self.errors
            target.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        answer = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"evaluate failed: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def until(self, expression: str, within: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; return its value, or fail the test after
        ``within`` seconds (with the last value seen)."""
        deadline = time.monotonic() + within
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"page never satisfied {expression!r} (last: {value!r})")

    async def screenshot(self) -> bytes:
        """A PNG of the viewport."""
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])
