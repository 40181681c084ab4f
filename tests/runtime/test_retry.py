from __future__ import annotations

import math
from typing import Any

import pytest

from oncely import App, ConfigError, Retry, RetryPolicy


def test_full_jitter_stays_under_the_capped_exponential_ceiling() -> None:
    policy = RetryPolicy(max_attempts=10, base=0.5, cap=4.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        draws = [policy.delay(attempt) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter spreads the draws over the whole range rather than near the ceiling.
        assert min(draws) < ceiling * 0.25 and max(draws) > ceiling * 0.75
    assert RetryPolicy(base=0.5, cap=4.0, jitter=False).delay(3) == 2.0


def test_exhaustion_counts_deliveries() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_bad_policies_are_rejected() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="delay"):
        Retry(delay=-1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", math.nan),  # never "exhausted": retried for ever
        ("max_attempts", 2.5),
        ("max_attempts", True),
        ("max_attempts", "3"),
        ("base", math.nan),  # every delay silently became the cap
        ("cap", math.nan),  # every delay NaN: every nack failed
        ("base", math.inf),
        ("cap", math.inf),
        ("base", -0.5),
        ("cap", "60"),
    ],
)
def test_a_policy_that_cannot_work_is_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"RetryPolicy.{field} must be"):
        RetryPolicy(**{field: value})


def test_zero_delays_and_a_single_attempt_still_work() -> None:
    policy = RetryPolicy(max_attempts=1, base=0, cap=0)
    assert policy.exhausted(1) and policy.delay(5) == 0.0


@pytest.mark.parametrize("delay", [math.inf, -math.inf])
def test_a_retry_delay_that_never_ends_is_refused(delay: float) -> None:
    # Memory and SQLite have no max_delay to clamp it to: the message was parked for good.
    with pytest.raises(ValueError, match="Retry delay must be a finite number"):
        Retry(delay=delay)


@pytest.mark.parametrize("retry", [0, 3, {"max_attempts": 3}, False])
def test_a_handler_retry_that_is_not_a_policy_is_refused(retry: Any) -> None:
    # Before: 0 and False (meaning "no retries") silently became the default 5 attempts, and
    # 3 or a dict failed only at the handler's first failure, as an internal error each time.
    app = App()

    async def handle(_: Any) -> None: ...

    with pytest.raises(ConfigError, match="retry must be a RetryPolicy"):
        app.handler("t", retry=retry)(handle)
