"""Event-loop lag: a beat on the loop, and a thread that notices when the beats stop.

A blocked loop answers nothing, the health server included, so the two halves split the work:

- a timer callback on the loop (``beat``) runs every ``interval`` seconds and measures how late
  it ran; a beat later than ``threshold`` records a *stall* (when it ended, how long it was);
- a daemon thread wakes every ``interval`` seconds and, when no beat came for longer than
  ``threshold``, logs a WARNING once per stall with the loop thread's current stack (where it
  is stuck: the one thing an operator needs and cannot get afterwards), and again when the
  loop is back.

``/livez`` is answered on the loop, so it can report a stall only once the loop answers again:
it fails while a stall is recent (``hold`` seconds after it ended). A loop blocked for good
never answers, and the probe's own timeout (the kubelet's ``timeoutSeconds``) is what fails it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass

log = logging.getLogger("oncely.health")


@dataclass(frozen=True, slots=True)
class Stall:
    """A span during which the loop ran no callback."""

    seconds: float
    ended_at: float
    """``time.monotonic()`` when the loop ran again."""


class LoopMonitor:
    """Measures the running loop's lag; ``start()`` on the loop, ``stop()`` from anywhere.

    Args:
        threshold: seconds of lag that count as a stall.
        interval: seconds between beats (and between the thread's checks).
        hold: seconds a stall keeps ``/livez`` failing after the loop is back.
    """

    def __init__(self, threshold: float = 1.0, interval: float = 0.25, hold: float = 10.0) -> None:
        self.threshold = threshold
        self.interval = interval
        self.hold = hold
        self.last_beat = time.monotonic()
        self.last_stall: Stall | None = None
        self.stalls = 0
        """Stalls seen since ``start()``."""
        self.max_lag = 0.0
        self._due = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread = 0

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self) -> None:
        if self._timer is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop.clear()
        self.last_beat = time.monotonic()
        self._schedule()
        self._thread = threading.Thread(target=self._watch, name="oncely-loop-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = time.monotonic() + self.interval
        self._timer = self._loop.call_later(self.interval, self._beat)

    def _beat(self) -> None:
        now = time.monotonic()
        lag = now - self._due
        self.last_beat = now
        self.max_lag = max(self.max_lag, lag)
        if lag > self.threshold:
            self.stalls += 1
            self.last_stall = Stall(lag, now)
        self._schedule()

    def problem(self) -> str | None:
        """Why the loop is not healthy now (a stall going on, or a recent one), or ``None``."""
        now = time.monotonic()
        silent = now - self.last_beat - self.interval
        if self.running and silent > self.threshold:
            return f"event loop blocked for {silent:.1f}s so far (threshold {self.threshold:g}s)"
        stall = self.last_stall
        if stall is not None and now - stall.ended_at < self.hold:
            return (
                f"event loop was blocked for {stall.seconds:.1f}s, {now - stall.ended_at:.1f}s "
                f"ago (threshold {self.threshold:g}s; reported for {self.hold:g}s after)"
            )
        return None

    def _watch(self) -> None:
        reported = False
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self.last_beat - self.interval
            if silent > self.threshold and not reported:
                reported = True
                log.warning(
                    "event loop blocked for %.1fs (threshold %gs); it is at:\n%s",
                    silent,
                    self.threshold,
                    self._stack(),
                )
            elif silent <= self.threshold and reported:
                reported = False
                stall = self.last_stall
                log.warning(
                    "event loop running again after %.1fs",
                    stall.seconds if stall is not None else silent,
                )

    def _stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return "  (stack unavailable)"
        return "".join(traceback.format_stack(frame, limit=12))
