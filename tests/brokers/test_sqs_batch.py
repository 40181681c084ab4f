"""The batching logic of the SQS adapter, on its own: how entries are grouped into calls and
how a response's ``Failed`` entries are retried or surfaced; and the driver-error mapping.

The ``call`` here is a plain function standing for one batch request, so that a server-side
(``SenderFault`` false) failure can be produced on demand; the same code runs against
ElasticMQ in ``test_sqs.py`` (a partial delete batch with stale receipt handles).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import botocore.exceptions
import pytest

from oncely.brokers._sqs_batch import RETRIES, Batcher
from oncely.brokers._sqs_errors import entry_error, map_errors
from oncely.errors import BrokerError, ConfigError, ConnectionLost, DeliveryExpired, PublishFailed
from tests._wait import eventually

pytestmark = pytest.mark.anyio

Entry = dict[str, Any]


class Server:
    """Answers batch calls: entries named in ``fail`` fail with (code, sender_fault), once
    each unless ``sticky``."""

    def __init__(self, fail: Mapping[str, tuple[str, bool]] | None = None, sticky: bool = False):
        self.fail = dict(fail or {})
        self.sticky = sticky
        self.calls: list[list[str]] = []

    async def __call__(self, entries: list[Entry]) -> Mapping[str, Any]:
        self.calls.append([e["name"] for e in entries])
        await asyncio.sleep(0)
        ok, failed = [], []
        for e in entries:
            if e["name"] in self.fail:
                code, sender = self.fail[e["name"]] if self.sticky else self.fail.pop(e["name"])
                failed.append({"Id": e["Id"], "Code": code, "SenderFault": sender, "Message": "x"})
            else:
                ok.append({"Id": e["Id"], "Name": e["name"]})
        return {"Successful": ok, "Failed": failed}


def batcher(server: Server, **kw: Any) -> Batcher[Entry]:
    kw.setdefault("window", 0.005)
    return Batcher(
        server,
        on_failed=lambda code, msg: entry_error("settle", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        **kw,
    )


async def test_entries_share_calls_of_at_most_ten() -> None:
    server = Server()
    b = batcher(server)
    results = await asyncio.gather(*(b.submit({"name": f"e{i}"}) for i in range(25)))
    assert [r["Name"] for r in results] == [f"e{i}" for i in range(25)]
    assert sorted(len(c) for c in server.calls) == [5, 10, 10]


async def test_server_fault_is_retried_sender_fault_is_surfaced() -> None:
    server = Server(
        {"retry-me": ("InternalError", False), "stale": ("ReceiptHandleIsInvalid", True)}
    )
    b = batcher(server)
    results: list[Any] = await asyncio.gather(
        b.submit({"name": "ok"}),
        b.submit({"name": "retry-me"}),
        b.submit({"name": "stale"}),
        return_exceptions=True,
    )
    ok, retried, stale = results
    assert ok == {"Id": "0", "Name": "ok"}
    assert isinstance(retried, Mapping) and retried["Name"] == "retry-me"
    assert isinstance(stale, DeliveryExpired)
    assert server.calls == [["ok", "retry-me", "stale"], ["retry-me"]]


async def test_a_fault_that_persists_fails_after_the_retries() -> None:
    server = Server({"bad": ("InternalError", False)}, sticky=True)
    b = Batcher(
        server,
        on_failed=lambda code, msg: entry_error("publish", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        window=0.0,
    )
    with pytest.raises(PublishFailed, match="InternalError"):
        await b.submit({"name": "bad"})
    assert len(server.calls) == RETRIES + 1


async def test_a_failed_call_fails_every_entry_in_it() -> None:
    async def down(entries: list[Entry]) -> Mapping[str, Any]:
        raise ConnectionLost("SQS is unreachable")

    b = Batcher(
        down,
        on_failed=lambda code, msg: entry_error("settle", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        window=0.001,
    )
    results = await asyncio.gather(
        *(b.submit({"name": str(i)}) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionLost) for r in results)


async def test_size_limit_splits_a_batch_and_flush_sends_what_waits() -> None:
    server = Server()
    b = batcher(server, window=60.0, max_bytes=100)
    waiting = [asyncio.ensure_future(b.submit({"name": f"e{i}"}, size=40)) for i in range(5)]
    await asyncio.sleep(0)
    await b.flush()  # without it the 60 s window would hold the rest
    await asyncio.wait_for(asyncio.gather(*waiting), 1)
    assert all(sum(40 for _ in c) <= 100 for c in server.calls)
    assert sorted(n for c in server.calls for n in c) == [f"e{i}" for i in range(5)]


async def test_concurrent_flushes_all_return() -> None:
    """Two closers flushing at once: each must return once nothing is pending or in flight
    (a flush used to replace the other's idle event, which then never fired)."""
    gate = asyncio.Event()
    server = Server()

    async def slow(entries: list[Entry]) -> Mapping[str, Any]:
        await gate.wait()
        return await server(entries)

    b = Batcher(
        slow,
        on_failed=lambda code, msg: entry_error("settle", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        window=60.0,
    )
    waiting = asyncio.ensure_future(b.submit({"name": "a"}))
    first = asyncio.ensure_future(b.flush())
    await asyncio.sleep(0)
    second = asyncio.ensure_future(b.flush())
    await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second, waiting), 5)
    assert server.calls == [["a"]]


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (botocore.exceptions.ParamValidationError(report="bad"), BrokerError),
        (botocore.exceptions.PartialCredentialsError(provider="env", cred_var="x"), ConfigError),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), ConnectionLost),
    ],
)
def test_every_botocore_error_becomes_an_oncely_error(
    raised: Exception, expected: type[Exception]
) -> None:
    with pytest.raises(expected) as caught:
        with map_errors("receive"):
            raise raised
    assert caught.value.__cause__ is raised


def test_map_errors_maps_by_operation_lets_other_errors_through_and_nests() -> None:
    """One shared, stateless context manager per operation: it nests, maps the driver's
    errors by the operation it was asked for, and leaves everything else alone."""
    stale = botocore.exceptions.ClientError(
        {"Error": {"Code": "ReceiptHandleIsInvalid", "Message": "stale"}}, "DeleteMessageBatch"
    )
    with pytest.raises(DeliveryExpired) as caught:
        with map_errors("receive"), map_errors("settle"):
            raise stale
    assert caught.value.__cause__ is stale
    with pytest.raises(BrokerError) as plain:
        with map_errors("receive"):
            raise stale
    assert type(plain.value) is BrokerError
    mine = ValueError("not the driver's")
    with pytest.raises(ValueError) as through:
        with map_errors("settle"):
            raise mine
    assert through.value is mine
    with pytest.raises(asyncio.CancelledError):
        with map_errors("receive"):
            raise asyncio.CancelledError
    with map_errors("publish"):
        pass  # a clean exit stays clean


async def test_a_response_naming_unknown_entries_fails_the_batch_with_an_oncely_error() -> None:
    async def confused(entries: list[Entry]) -> Mapping[str, Any]:
        return {"Successful": [{"Id": "7"}], "Failed": [{"Id": "x", "SenderFault": False}]}

    b = Batcher(
        confused,
        on_failed=lambda code, msg: entry_error("settle", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        window=0.0,
    )
    results = await asyncio.gather(
        *(b.submit({"name": str(i)}) for i in range(2)), return_exceptions=True
    )
    assert all(isinstance(r, BrokerError) for r in results), results


async def test_a_cancelled_submit_is_still_sent_and_the_rest_resolve() -> None:
    """``submit`` hands back the entry's own future: cancelling it (what a cancelled caller
    awaiting it does) withdraws nothing, and the other entries of the call still resolve."""
    server = Server()
    b = batcher(server, window=60.0)
    gone = b.submit({"name": "gone"})
    kept = b.submit({"name": "kept"})
    gone.cancel()
    await b.flush()  # without it the 60 s window would hold both
    assert (await asyncio.wait_for(kept, 1))["Name"] == "kept"
    assert server.calls == [["gone", "kept"]]
    assert not b  # nothing left pending or in flight


async def test_abandon_during_a_retry_backoff_fails_the_entry_and_sends_nothing_more() -> None:
    """Closing while a server-fault entry waits out its backoff: the entry fails with the
    closing error, as ``abandon`` reported it unconfirmed, and is never sent after the close
    (before, it was queued again once the backoff was cut off, and went out later)."""
    server = Server({"retry-me": ("InternalError", False)}, sticky=True)
    b = batcher(server)
    retried = b.submit({"name": "retry-me"})
    ok = b.submit({"name": "ok"})
    await asyncio.wait_for(ok, 2)  # the call answered: "retry-me" now backs off
    closing = BrokerError("closing")
    assert b.abandon(closing) == 1
    with pytest.raises(BrokerError) as failed:
        await asyncio.wait_for(retried, 2)
    assert failed.value is closing
    await asyncio.sleep(0)  # the cut-off send's last callbacks
    assert not b
    assert server.calls == [["retry-me", "ok"]]


async def test_abandon_counts_a_call_in_flight_whose_callers_were_cancelled() -> None:
    """Entries of a call still waiting for its answer are unconfirmed, also when the callers
    awaiting them were cancelled (handlers cut off at shutdown: the broker's close logs these
    as the acks that may come back, and nobody else is left to say so)."""
    answer = asyncio.Event()
    server = Server()

    async def slow(entries: list[Entry]) -> Mapping[str, Any]:
        await answer.wait()
        return await server(entries)

    b = Batcher(
        slow,
        on_failed=lambda code, msg: entry_error("settle", code, msg),
        with_id=lambda e, i: {**e, "Id": i},
        window=0.0,
    )
    futures = [b.submit({"name": f"e{i}"}) for i in range(3)]
    await eventually(lambda: len(b) == 1)  # the call is out, waiting for its answer
    assert not server.calls
    for future in futures[:2]:
        future.cancel()  # what a cancelled caller awaiting its ack does
    assert b.abandon(BrokerError("closing")) == 3
    with pytest.raises(BrokerError):
        await asyncio.wait_for(futures[2], 2)
    await asyncio.sleep(0)
    assert not b


async def test_abandon_during_a_backoff_counts_only_the_entries_to_send_again() -> None:
    """A call that answered and backs off before re-sending its server-fault entry: its other
    entries were confirmed, so only the retried one is unconfirmed, its caller cancelled or
    not."""
    server = Server({"retry-me": ("InternalError", False)}, sticky=True)
    b = batcher(server)
    retried = b.submit({"name": "retry-me"})
    ok = [b.submit({"name": f"ok{i}"}) for i in range(3)]
    await asyncio.wait_for(asyncio.gather(*ok), 2)  # answered: "retry-me" now backs off
    retried.cancel()
    assert b.abandon(BrokerError("closing")) == 1
    await asyncio.sleep(0)
    assert not b
    assert server.calls == [["retry-me", "ok0", "ok1", "ok2"]]
