"""Which conformance cases apply to a backend, decided by its features record.

A case marked ``@requires(extend=True)`` is removed from a subclass whose features say
``extend=False``, rather than collected and skipped: a backend's run lists only the cases that
apply to it, and a skip in it always means something went wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_ATTR = "__oncely_requires__"


def requires(**flags: bool) -> Callable[[F], F]:
    """Run the decorated case only where every named feature has the given value."""

    def mark(fn: F) -> F:
        setattr(fn, _ATTR, flags)
        return fn

    return mark


def drop_inapplicable(cls: type, features: object) -> None:
    """Hide from pytest the cases of ``cls`` whose requirements ``features`` does not meet."""
    for name in dir(cls):
        if not name.startswith("test_"):
            continue
        needs: dict[str, bool] | None = getattr(getattr(cls, name), _ATTR, None)
        if needs and any(getattr(features, flag) is not want for flag, want in needs.items()):
            # A non-callable attribute shadows the inherited case, so pytest does not collect it.
            setattr(cls, name, None)
