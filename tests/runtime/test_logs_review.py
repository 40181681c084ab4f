"""``LogFormatter`` JSON lines stay valid, and get written, whatever a line holds: a lone
surrogate (text decoded with ``surrogateescape``) or an ``extra=`` value whose ``repr``
raises."""

from __future__ import annotations

import io
import json
import logging

from oncely._logging import LogFormatter


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
