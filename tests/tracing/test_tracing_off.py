"""Tracing is off, and adds no header, without the ``otel`` extra or without a tracer
provider. Each case runs in a fresh interpreter: the API's globals are per process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


PRELUDE = {
    # As without the extra: ``import opentelemetry`` raises ImportError.
    "missing": "sys.modules['opentelemetry'] = None\n",
    # The API is installed (it is, in the dev environment) but no provider is set.
    "unset": "",
    "set": (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "trace.set_tracer_provider(TracerProvider())\n"
    ),
}


def run_app(mode: str, db: Path) -> dict[str, Any]:
    code = (
        f"import sys, runpy\n{PRELUDE[mode]}"
        "sys.argv = ['_off_app', sys.argv[1]]\n"
        "runpy.run_module('tests.tracing._off_app', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "Traceback" not in out.stderr, out.stderr
    got: dict[str, Any] = json.loads(out.stdout)
    return got


@pytest.mark.parametrize("mode", ["missing", "unset"])
def test_no_span_and_no_header_when_tracing_is_off(mode: str, tmp_path: Path) -> None:
    got = run_app(mode, tmp_path / "ob.db")
    assert got["headers"] == ["oncely-key", "oncely-published-at"]
    assert got["row_headers"] == ["h"]
    assert got["tracing"] == [False, False]
    assert got["otel_imported"] is (mode == "unset")


def test_the_same_app_traces_once_a_provider_is_set(tmp_path: Path) -> None:
    """The counterpart of the test above, so that it cannot pass for a broken app: with a
    provider set before the worker starts, the same script sees trace headers."""
    got = run_app("set", tmp_path / "ob.db")
    assert "traceparent" in got["headers"]
    assert got["row_headers"] == ["h", "traceparent"]
    assert got["tracing"] == [True, True]
