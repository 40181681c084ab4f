"""Amazon SQS broker over aiobotocore: ``sqs://[queue-prefix]?region=...&endpoint=...``.

A topic is a queue named ``<prefix><topic>``; its dead-letter queue is ``<prefix><topic>-dlq``.
A topic ending in ``.fifo`` (or every topic, with ``fifo=1``) is a FIFO queue, and its DLQ is
``<prefix><topic>-dlq.fifo``. Queue URLs are resolved once per topic and cached. Credentials
and (without ``region=``) the region resolve as botocore always does: environment, shared
config/credentials files (``profile=``), instance or container roles.

URL options (anything else is a ``ConfigError``):

* ``region=eu-west-1``, ``endpoint=http://127.0.0.1:9324`` (an SQS-compatible server),
  ``profile=name``.
* ``wait=20``: ``WaitTimeSeconds`` of each long poll (0-20).
* ``fifo=1``: every topic is a FIFO queue.
* ``create=1``: create missing queues (and the DLQ with a ``RedrivePolicy``) on first use;
  with ``create=0`` they must exist and a missing one is a ``ConfigError``.
* ``max_receive_count=100``: the ``RedrivePolicy`` safety net: after this many receives SQS
  itself moves a message to the DLQ, even if no worker is alive to do it (0: no policy).
* ``max_pollers=8``: concurrent long polls per subscription (``ceil(prefetch / 10)`` up to it).
* ``ack_window=0.01``: seconds an ack or visibility change waits for others to share its batch
  call (a full batch of 10 goes at once).
* ``max_message_size=262144``: bytes one message, and one ``SendMessageBatch``, may carry
  (AWS takes up to 1048576 now; some SQS-compatible servers only 262144).

**Receiving.** Each subscription long-polls with up to ``max_pollers`` concurrent receives of
up to 10 messages, never holding more than ``prefetch`` unsettled (buffered and yielded).
``attempt`` is SQS's ``ApproximateReceiveCount``, ``enqueued_at`` its ``SentTimestamp``, and
the id ``oncely-message-id`` (else the SQS ``MessageId``).

**Acks and visibility** go out in batches of up to 10 per queue (``DeleteMessageBatch``,
``ChangeMessageVisibilityBatch``); every response's ``Failed`` entries are read: the server's
faults are retried, a refused receipt handle fails that caller's ``ack`` with
``DeliveryExpired``. A queued entry cannot be withdrawn, so a delivery counts as settled
from the moment its ``ack`` or ``nack`` is called: a cancelled ack still deletes (or, if the
delete fails, the message comes back when its visibility runs out), and no ``extend`` or
give-back may race it. SQS may also accept a stale handle silently and may redeliver a message
after its delete on a standard queue: that is at-least-once, which the idempotency store
absorbs. ``extend`` sets a new visibility counted from the call; SQS caps a message's
invisibility at 12 hours from its receive, past which extending stops (logged, counted in
``visibility_capped``) and the handler's timeout decides.

**Delay.** ``publish(delay=)`` uses ``DelaySeconds`` (whole seconds, up to 900, not on FIFO
queues); ``nack(delay)`` sets the visibility (up to 12 hours from the receive). Both round up
to whole seconds. ``Capabilities.max_delay`` is 900, the bound both honour.

**Attempts and deferrals.** SQS counts receives itself, so a deferral (``nack(defer=True)``)
counts as an attempt, and so does a visibility expiry; each also counts towards
``max_receive_count``.

**Dead letters.** ``reject`` checks the receipt handle, sends the message to the DLQ with
``oncely-dead-letter-reason``, ``oncely-attempt`` and ``oncely-dead-lettered-at``, then
deletes it (a crash in between leaves both, never neither). See ``_sqs_admin`` for listing
and replay.

**Headers** travel as String message attributes. SQS allows 10 per message; oncely keeps 4
(``oncely-message-id`` and the three dead-letter ones) and a binary body needs one more
(``oncely-body-encoding``), so a message carries at most 6 headers of its own (5 with a binary
body); more is a ``PublishFailed`` naming them, never a silent drop. A UTF-8 body travels as
is (JSON stays readable by any SQS client); any other body is base64.

**FIFO.** ``MessageGroupId`` is the ``oncely-key`` header (else the message id), so a key's
messages run in order and different keys in parallel; ``MessageDeduplicationId`` is the
message id, so re-publishing one ``message_id`` within SQS's 5-minute window is dropped by
SQS. After 5 minutes it is not, which is why the idempotency store still matters.

**Costs.** ``api_calls`` counts calls by kind (receive, delete, change_visibility, send,
admin); on AWS every call is billed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import uuid
from typing import TYPE_CHECKING, Any

from aiobotocore.session import AioSession

from oncely._tasks import spawn
from oncely.brokers import _sqs_admin, _sqs_queues
from oncely.brokers._sqs_batch import Batcher, make_batcher
from oncely.brokers._sqs_client import client_config
from oncely.brokers._sqs_consume import SqsSubscription
from oncely.brokers._sqs_options import SqsOptions, parse_url
from oncely.brokers._sqs_wire import (
    MAX_PUBLISH_DELAY,
    encode,
    fifo_id,
    is_fifo,
    is_missing_queue,
    map_errors,
    queue_name,
)
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Headers,
    check_headers,
)
from oncely.errors import BrokerError, ConnectionLost, NotSupported

if TYPE_CHECKING:
    from collections.abc import Awaitable, Coroutine, Mapping
    from typing import Self

    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        ChangeMessageVisibilityBatchRequestEntryTypeDef as VisEntry,
    )
    from types_aiobotocore_sqs.type_defs import (
        DeleteMessageBatchRequestEntryTypeDef as DelEntry,
    )
    from types_aiobotocore_sqs.type_defs import (
        MessageTypeDef,
    )
    from types_aiobotocore_sqs.type_defs import (
        SendMessageBatchRequestEntryTypeDef as SendEntry,
    )

    from oncely.brokers._sqs_wire import Outgoing

__all__ = ["SqsBroker", "SqsOptions"]

log = logging.getLogger("oncely.brokers.sqs")

_CLOSE_GRACE = 2.0
_CLOSE_FLUSH = 10.0  # bounds the first flush of aclose: a silent server must not hang a close


class SqsBroker(Broker, DeadLetterAdmin):
    """Amazon SQS (or a compatible server) through aiobotocore. See the module docstring."""

    def __init__(self, url: str = "sqs://", *, options: SqsOptions | None = None) -> None:
        self.options = options or parse_url(url)
        self.url = url
        self.capabilities = Capabilities(
            native_delay=True,
            max_delay=float(MAX_PUBLISH_DELAY),
            native_dlq=True,
            extend=True,
            ordering="partition" if self.options.fifo else "none",
            ack_model="message",
            transactions=False,
            durable=True,
            defer_keeps_attempt=False,
        )
        self.api_calls: collections.Counter[str] = collections.Counter()
        """SQS API calls made, by kind: receive, delete, change_visibility, send, admin."""
        self.api_entries: collections.Counter[str] = collections.Counter()
        """Entries sent in batch calls, by kind: ``api_entries[k] / api_calls[k]`` is how full
        the batches of kind ``k`` were (10 at most)."""
        self.visibility_capped = 0
        """Deliveries that reached the 12-hour visibility cap while a handler still ran."""
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: SQSClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._urls: dict[str, tuple[str, str]] = {}
        self._queue_locks: dict[str, asyncio.Lock] = {}
        self._batchers: dict[tuple[str, str], Batcher[Any]] = {}
        self._deleters: dict[str, Batcher[Any]] = {}  # the "delete" ones, by queue URL
        self._subscriptions: list[SqsSubscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> Self:
        return cls(url)

    def __repr__(self) -> str:
        return f"SqsBroker({self.url!r})"

    # ------------------------------------------------------------------------- connection

    async def connect(self) -> None:
        """Create the client and make one cheap call to prove SQS answers. Idempotent.

        Raises:
            ConnectionLost: SQS could not be reached.
            ConfigError: no credentials or region, or they were refused.
        """
        client = await self._connected()
        self.api_calls["admin"] += 1
        try:
            with map_errors("connect"):
                await client.list_queues(
                    QueueNamePrefix=self.options.prefix or "oncely", MaxResults=1
                )
        except BaseException:
            # A client whose first call failed is dropped (its HTTP session closed), so a
            # failed connect leaks nothing and the next connect starts afresh.
            if self._client is client:
                stack, self._stack, self._client = self._stack, None, None
                if stack is not None:
                    with contextlib.suppress(Exception):
                        await stack.aclose()
            raise

    async def _connected(self) -> SQSClient:
        if self._closed:
            raise ConnectionLost("the SQS broker was closed")
        if self._client is not None:
            return self._client
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._client is None:
                o = self.options
                stack = contextlib.AsyncExitStack()
                with map_errors("connect"):
                    session = AioSession(profile=o.profile)
                    config = client_config(o, session)
                    self._client = await stack.enter_async_context(
                        session.create_client(
                            "sqs", region_name=o.region, endpoint_url=o.endpoint, config=config
                        )
                    )
                self._stack = stack
        assert self._client is not None
        return self._client

    async def aclose(self) -> None:
        """Flush pending acks and visibility changes, then close. Idempotent. Unsettled
        deliveries come back once their visibility runs out.

        Long polls still in flight get ``_CLOSE_GRACE`` seconds to finish and hand back what
        they caught; after that they are cut off, and whatever the server had already handed
        them comes back once its visibility runs out (so a shutdown never waits out a 20 s
        poll). Batched acks and visibility changes the flush could not get confirmed in time
        fail their callers with ``ConnectionLost`` and are logged as an error (their messages
        come back once their visibility runs out)."""
        if self._closed:
            return
        for sub in self._subscriptions:
            sub.shutdown()
        await self._flush(_CLOSE_FLUSH)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=_CLOSE_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._flush(5.0)
        self._closed = True
        self._abandon()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _flush(self, within: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                for batcher in list(self._batchers.values()):
                    await batcher.flush()

    def _abandon(self) -> None:
        """What the flush could not send in time fails its callers, and is logged: nobody may
        be awaiting it any more (a cancelled handler), and an unsent ack or hand-back must
        not vanish silently. Those messages come back when their visibility runs out."""
        for (kind, url), batcher in self._batchers.items():
            left = batcher.abandon(ConnectionLost("the SQS broker closed before this was sent"))
            if left:
                log.error(
                    "SQS broker closed with %d %s entr%s for %s not confirmed (the server did "
                    "not answer in time); unsent acks come back when their visibility runs out",
                    left,
                    kind,
                    "y" if left == 1 else "ies",
                    url,
                )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        spawn(self._tasks, coro, log, "SQS background task failed")

    # ----------------------------------------------------------------------------- queues

    async def queue_urls(self, topic: str) -> tuple[str, str]:
        """The (queue URL, DLQ URL) of ``topic``, created on first use unless ``create=0``."""
        urls = self._urls.get(topic)
        if urls is not None:
            return urls
        lock = self._queue_locks.setdefault(topic, asyncio.Lock())
        async with lock:
            urls = self._urls.get(topic)
            if urls is None:
                urls = await self._resolve(topic)
                self._urls[topic] = urls
        return urls

    async def backlog(self, topic: str) -> dict[str, int] | None:
        """``ApproximateNumberOfMessages`` of ``topic``'s queue (visible messages; SQS's
        estimate, eventually consistent). SQS is stateless HTTP, so ``connected`` is
        ``None``: a failing call shows as consume errors instead. Never creates the queue:
        ``BrokerError`` (``QueueDoesNotExist``) when it does not exist."""
        urls = self._urls.get(topic)
        url = urls[0] if urls is not None else await _sqs_queues.lookup(self, topic)
        client = await self._connected()
        self.api_calls["admin"] += 1
        with map_errors("admin"):
            reply = await client.get_queue_attributes(
                QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        return {"": int(reply.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))}

    def _forget(self, topic: str) -> None:
        """The queue vanished (deleted, or an in-memory server restarted): resolve again."""
        self._urls.pop(topic, None)

    async def _resolve(self, topic: str) -> tuple[str, str]:
        return await _sqs_queues.resolve(self, topic)

    # ---------------------------------------------------------------------------- publish

    async def publish(
        self,
        topic: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
        delay: float = 0.0,
    ) -> str:
        """Send one message; concurrent publishes to a queue share ``SendMessageBatch`` calls.

        Returns once SQS has accepted it. Nothing is sent when the headers or size do not fit.

        Raises:
            PublishFailed: SQS refused the entry, or too many headers, or too large (the
                message names the limit).
            ConnectionLost: SQS could not be reached.
            NotSupported: ``delay`` over 900 s, or any delay on a FIFO topic.
        """
        checked = check_headers(headers)
        if delay > MAX_PUBLISH_DELAY:
            raise NotSupported(f"SQS delays a publish at most {MAX_PUBLISH_DELAY}s, got {delay}")
        fifo = is_fifo(topic, self.options)
        if fifo and delay > 0:
            raise NotSupported("SQS FIFO queues have no per-message delay")
        mid = message_id or uuid.uuid4().hex
        out = encode(mid, body, checked, max_size=self.options.max_message_size)
        group = checked.get(Headers.KEY) or mid if fifo else None
        url, _ = await self.queue_urls(topic)
        try:
            await self._send(url, out, delay=delay, group=group, dedupe=mid)
        except BrokerError as exc:
            if not is_missing_queue(exc):
                raise
            # The queue vanished (deleted, or an in-memory server restarted): resolve again.
            self._forget(topic)
            url, _ = await self.queue_urls(topic)
            await self._send(url, out, delay=delay, group=group, dedupe=mid)
        return mid

    async def _send(
        self, url: str, out: Outgoing, *, delay: float = 0.0, group: str | None, dedupe: str
    ) -> None:
        entry: SendEntry = {
            "Id": "",
            "MessageBody": out.body,
            "MessageAttributes": out.attributes,
        }
        if delay > 0:
            entry["DelaySeconds"] = math.ceil(delay)
        if group is not None:
            entry["MessageGroupId"] = fifo_id(group)
            entry["MessageDeduplicationId"] = fifo_id(dedupe)
        await self._batcher("send", url).submit(entry, out.size)

    # ---------------------------------------------------------------------------- consume

    def check_topic(self, topic: str) -> None:
        queue_name(topic, self.options)  # SQS's queue-name rule, with the prefix and -dlq

    def consume(self, topic: str, *, prefetch: int, visibility: float) -> SqsSubscription:
        """Subscribe with long polling; polling starts on the first ``__anext__``.

        ``visibility`` is rounded up to whole seconds and sent with every receive.
        """
        queue_name(topic, self.options)  # a bad topic fails here, not in a poller
        sub = SqsSubscription(self, topic, prefetch, visibility)
        self._subscriptions = [s for s in self._subscriptions if not s._closed] + [sub]
        return sub

    async def _receive(
        self, topic: str, n: int, visibility: int
    ) -> tuple[str, list[MessageTypeDef]]:
        url = (self._urls.get(topic) or await self.queue_urls(topic))[0]  # no coroutine if known
        client = self._client or await self._connected()
        self.api_calls["receive"] += 1
        with map_errors("receive"):
            got = await client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=n,
                WaitTimeSeconds=self.options.wait,
                VisibilityTimeout=visibility,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=[
                    "ApproximateReceiveCount",
                    "SentTimestamp",
                    "MessageGroupId",
                ],
            )
        return url, got.get("Messages", [])

    # --------------------------------------------------------------------------- settling

    # Plain functions returning the batcher's future: a coroutine per ack is measurable.
    def _delete(self, url: str, receipt: str) -> Awaitable[object]:
        entry: DelEntry = {"Id": "", "ReceiptHandle": receipt}
        # Once per ack: a look-up by the URL alone, no (kind, url) tuple made each time.
        batcher = self._deleters.get(url)
        if batcher is None:
            batcher = self._deleters[url] = self._batcher("delete", url)
        return batcher.submit(entry)

    def _change_visibility(self, url: str, receipt: str, seconds: int) -> Awaitable[object]:
        entry: VisEntry = {"Id": "", "ReceiptHandle": receipt, "VisibilityTimeout": seconds}
        return self._batcher("change_visibility", url).submit(entry)

    def _batcher(self, kind: str, url: str) -> Batcher[Any]:
        batcher = self._batchers.get((kind, url))
        if batcher is None:
            batcher = make_batcher(self, kind, url)
            self._batchers[(kind, url)] = batcher
        return batcher

    async def _dead_letter(self, delivery: Any, reason: str) -> None:
        await _sqs_admin.dead_letter(self, delivery, reason)

    # ------------------------------------------------------------------------- dead letters

    async def has_dead_letter_queue(self, topic: str) -> bool:
        return await _sqs_queues.dlq_exists(self, topic)

    async def dead_letters(self, topic: str, *, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first, left in place; see ``_sqs_admin``."""
        return await _sqs_admin.dead_letters(self, topic, limit=limit)

    async def replay(self, topic: str, *, ids: list[str] | None = None) -> int:
        """Re-send dead letters to ``topic`` with a fresh attempt; see ``_sqs_admin``."""
        return await _sqs_admin.replay(self, topic, ids=ids)

    async def purge(self, topic: str, *, older_than: float | None = None) -> int:
        """Delete dead letters older than ``older_than`` seconds; see ``_sqs_admin``."""
        return await _sqs_admin.purge(self, topic, older_than=older_than)
