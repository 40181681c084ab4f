"""Retry policy: capped exponential backoff with full jitter."""

from __future__ import annotations

import math
import random

import msgspec

from oncely.errors import ConfigError

__all__ = ["RetryPolicy"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How often and how far apart a failing message is retried.

    The delay before attempt ``n + 1`` is drawn uniformly from ``[0, min(cap, base * 2**(n-1))]``
    ("full jitter"), which spreads retries of many failed messages instead of letting them
    stampede together. After ``max_attempts`` deliveries the message goes to the dead-letter
    queue with the last error as its reason.

    Attributes:
        max_attempts: deliveries before dead-lettering, counting the first (1 means no retry).
        base: the ceiling of the first retry delay, in seconds.
        cap: the largest ceiling any retry delay may have, in seconds.
        jitter: draw the delay at random below the ceiling; ``False`` uses the ceiling itself
            (deterministic, for tests and demos).
    """

    max_attempts: int = 5
    base: float = 0.5
    cap: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        # A Struct checks no types when built in code, only when decoded, and NaN passes every
        # "< 0" test: max_attempts=NaN never runs out, cap=NaN makes every nack fail, and an
        # infinite delay parks the message for good on a broker without max_delay.
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigError(f"RetryPolicy.max_attempts must be an integer >= 1, got {attempts!r}")
        for name, seconds in (("base", self.base), ("cap", self.cap)):
            if not _seconds(seconds):
                raise ConfigError(
                    f"RetryPolicy.{name} must be a finite number >= 0, got {seconds!r}"
                )

    def exhausted(self, attempt: int) -> bool:
        """True when delivery number ``attempt`` was the last one allowed."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed delivery number ``attempt`` (1-based)."""
        # The exponent is bounded: 2.0**1024 overflows, and a count of deferrals (a store down
        # for hours) can get there; past 2**64 any base has long reached any cap.
        ceiling: float = min(self.cap, self.base * 2.0 ** min(max(attempt - 1, 0), 64))
        if not self.jitter:
            return ceiling
        return random.uniform(0.0, ceiling)


def _seconds(value: object) -> bool:
    """Whether ``value`` is a finite, non-negative number of seconds (a bool is not)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )
