"""The live status page served at ``/``: one self-contained HTML document,
``status_page.html`` beside this module.

It has no external assets and no framework: a script fetches ``status.json`` (relative, so the
page also works when the endpoints are mounted under a prefix ending in ``/``) once a second and
computes rates from successive snapshots over a short window. Every user string (handler and
topic names, URLs, check details) goes into the DOM through ``textContent`` or
``setAttribute``, never as markup, and the Content-Security-Policy lets only the page's own
script run (by hash) and talk to nothing but its own origin.

Stable hooks for tests and scrapers: ``#state``, ``#broker-conn``, ``#live``, ``#ready`` and
``#in-flight`` carry ``data-value``; each handler row is ``tr[data-handler=NAME]`` with cells
``td[data-field=FIELD][data-value=RAW]``; ``body[data-ticks]`` counts rendered snapshots and
``#error`` says why the last refresh failed.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from typing import TYPE_CHECKING

from oncely.runtime.http import Response

if TYPE_CHECKING:
    from collections.abc import Mapping

    from oncely.runtime.http import Endpoints

__all__ = ["HEADERS", "PAGE", "RATE_WINDOW", "add_status_page"]

RATE_WINDOW = 5
"""Seconds of snapshots the page's rates are averaged over."""

_TEMPLATE = files("oncely.runtime").joinpath("status_page.html").read_text("utf-8")
_HTML = _TEMPLATE.replace("@WINDOW@", str(RATE_WINDOW))
PAGE = _HTML.encode()
"""The page's bytes."""

_SCRIPTS = re.findall(r"<script>(.*?)</script>", _HTML, re.S)
_HASHES = " ".join(
    f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in _SCRIPTS
)

HEADERS = {
    # Only the page's own script runs, and it can talk to nothing but its own origin.
    "Content-Security-Policy": (
        f"default-src 'none'; script-src {_HASHES}; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def _page_route(query: Mapping[str, str]) -> Response:
    return Response(200, PAGE, "text/html; charset=utf-8", HEADERS)


def add_status_page(endpoints: Endpoints) -> None:
    """Serve the status page at ``/`` (it reads ``status.json`` beside it, which the worker
    serves)."""
    endpoints.add("/", _page_route)
