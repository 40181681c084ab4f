"""An ack that waits for the completion it must follow: ``ack_after``, where a broker offers it.

The runtime records a success in the idempotency store and only then acks. Done in turn, the
delivery's task waits twice: for the store's reply, then for the ack. An adapter whose acks
are batched on a task of their own (AMQP's ``AckWindow``) can take the ack at once with the
completion's future as its condition: its batch waits for that future before it sends
anything, acks the deliveries whose completion was recorded and withholds the others, whose
callers get ``AckWithheld`` and may settle them another way. The order "recorded, then
acked" holds as before; the delivery's task waits once.

A broker offers it by setting ``acks_after = True`` on the class that defines ``consume``
(the runtime reads it as it reads ``ack_on_caller``); its deliveries then have
``ack_after(recorded)`` with these guarantees:

- nothing is acked unless ``recorded`` is done without an error;
- if it failed (or was cancelled), nothing was sent for the delivery, which is still open
  (unsettled) and may be acked, nacked or rejected afterwards: ``AckWithheld`` carries the
  error;
- any other error is the ack's own, as from ``ack``.

A caller cancelled while it waits gives up on the outcome, as with ``ack``; the adapter
treats the delivery as settled. If the condition then fails, nothing is acked and the
message comes back when its channel closes. (The runtime never cancels it: the settle runs
whole, ``oncely.runtime._whole``, and a handed-on settle is awaited by the worker's stop.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from oncely.errors import StoreUnavailable

__all__ = ["AckWithheld", "withheld"]


class AckWithheld(Exception):
    """The condition of ``ack_after`` failed: nothing was acked; ``error`` is its failure."""

    def __init__(self, error: Exception) -> None:
        super().__init__(f"ack withheld: the completion it waited for failed: {error!r}")
        self.error = error


async def withheld(conditions: dict[int, asyncio.Future[Any]]) -> dict[int, AckWithheld]:
    """Wait for every condition (by delivery tag), then ``{tag: AckWithheld}`` for those that
    failed. A cancel of the task that waits (the ack batch's, only at the loop's end; the
    caller's, with one-by-one acks) cancels the condition it waits on, as awaiting the
    store's call itself would: its owner sees an abandoned call."""
    for condition in conditions.values():
        if not condition.done():
            # Awaited one at a time, directly: they mostly resolve together (one store
            # batch), so after the first the rest are done. (asyncio.wait or shield would
            # add a future and a callback per wait, ~1 k instructions a message.)
            try:
                await condition
            except asyncio.CancelledError:
                # This task's own cancel cancels the condition too: only the task can tell.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:  # the condition's own outcome, read below
                pass
    failed: dict[int, AckWithheld] = {}
    for tag, condition in conditions.items():
        if condition.cancelled():
            error: BaseException | None = StoreUnavailable("the completion's call was cancelled")
        else:
            error = condition.exception()  # also marks the error retrieved
        if error is not None:
            failed[tag] = AckWithheld(
                error if isinstance(error, Exception) else StoreUnavailable(repr(error))
            )
    return failed
