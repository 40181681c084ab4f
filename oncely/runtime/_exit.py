"""A handler's ``KeyboardInterrupt`` or ``SystemExit`` (``sys.exit(n)``), raised on once the
worker it stopped has drained.

The pool hands it to the worker (``Pool.on_exit``) instead of letting it end the event loop's
run at once, with the other handlers mid-flight. The worker stops as ``stop()`` does, then this
task raises it: a ``SystemExit`` or ``KeyboardInterrupt`` in a task ends the loop's run, as
it always has, so ``asyncio.run()`` (and an application embedding the worker) raises it, and
``oncely run`` exits with its code. Signal handling stays in the CLI.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger("oncely.worker")


def raise_when_stopped(stopping: Awaitable[object], exc: BaseException) -> asyncio.Task[None]:
    """A task that awaits ``stopping`` (the worker's stop), then raises ``exc`` on."""
    task = asyncio.create_task(_raise_after(stopping, exc), name="oncely:exit")
    # Read when it ends, or asyncio logs "exception was never retrieved" for it at exit.
    task.add_done_callback(_retrieve)
    return task


async def _raise_after(stopping: Awaitable[object], exc: BaseException) -> None:
    try:
        await stopping
    except asyncio.CancelledError:
        raise  # the loop's own clean-up (an embedding app ended first): nothing to raise into
    except BaseException as failed:
        # A stop that fails (a shutdown hook's BaseException, a close that raises) must not
        # swallow the exit: the loop's run would go on, and `oncely run` wait for ever.
        log.error("stopping the worker after the handler's %r failed", exc, exc_info=failed)
    raise exc


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
