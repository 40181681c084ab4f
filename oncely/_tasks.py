"""Background tasks an object owns: kept referenced until done, and a failure logged."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging
    from collections.abc import Coroutine

__all__ = ["spawn"]


def spawn(
    tasks: set[asyncio.Task[None]],
    work: Coroutine[Any, Any, None],
    log: logging.Logger,
    failed: str,
) -> asyncio.Task[None]:
    """Run ``work`` as a task held in ``tasks`` until it ends (the event loop keeps only a weak
    reference to a task, and the owner's close awaits or cancels what is left there). An
    exception it ends with is logged as ``failed``, with its traceback."""
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)

    def done(t: asyncio.Task[None]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error(failed, exc_info=t.exception())

    task.add_done_callback(done)
    return task
