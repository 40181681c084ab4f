"""``LogFormatter`` JSON lines stay valid, and get written, whatever a line holds: a lone
surrogate (text decoded with ``surrogateescape``) or an ``extra=`` value whose ``repr``
raises; the heartbeat's lines carry the idempotency key the runtime extracted."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

import oncely
from oncely._logging import LogFormatter, MessageFilter
from tests._wait import eventually
from tests.runtime._faulty import FaultyStore


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class Strict(logging.StreamHandler[io.TextIOWrapper]):
    def handleError(self, record: logging.LogRecord) -> None:
        raise AssertionError("the line was lost")


def emit(record: logging.LogRecord) -> str:
    """Write ``record`` as ``configure_logging``'s handler does, to a strict UTF-8 stream."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    handler = Strict(stream)
    handler.setFormatter(LogFormatter("json"))
    handler.emit(record)
    return raw.getvalue().decode("utf-8")


def test_a_lone_surrogate_makes_a_valid_line() -> None:
    record = logging.makeLogRecord({"msg": "file %s gone", "args": ("b\udcffd",), "name": "x"})
    line = json.loads(emit(record))
    assert line["msg"] == "file b\udcffd gone"


def test_an_extra_value_whose_repr_raises_makes_a_line() -> None:
    record = logging.makeLogRecord({"msg": "hello é", "name": "x", "thing": Unprintable()})
    line = json.loads(emit(record))
    assert line["msg"] == "hello é"
    assert "Unprintable" in line["thing"]


@pytest.mark.anyio
async def test_heartbeat_lines_carry_the_extracted_idempotency_key(
    unique: str, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    """With ``key="payload:order_id"`` the heartbeat's lines about a run show the key the run's
    own lines show (from the payload), not the message's header key."""
    app = oncely.App()
    release = asyncio.Event()

    @app.handler(unique, idempotent=True, key="payload:order_id", visibility=0.1, timeout=30)
    async def charge(order: dict[str, str]) -> None:
        await release.wait()

    store = FaultyStore()
    store.renew_error = lambda key: oncely.StoreUnavailable("store away")
    caplog.handler.addFilter(MessageFilter())
    caplog.set_level(logging.INFO, logger="oncely")
    formatter = LogFormatter("json")
    async with oncely.Worker(app, broker=f"memory://{unique}", store=store) as worker:
        await app.publish(unique, {"order_id": "order-1042"}, key="header-key")
        await eventually(lambda: worker.stats.heartbeat_errors >= 1)
        release.set()
        await eventually(lambda: worker.stats.processed == 1)
    beats = [
        json.loads(formatter.format(r))
        for r in caplog.records
        if "could not renew lease" in r.getMessage()
    ]
    assert beats
    assert {b["key"] for b in beats} == {"order-1042"}
