from __future__ import annotations

import pytest

from oncely import ConfigError, Retry, RetryPolicy


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
