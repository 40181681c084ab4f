"""Conformance suites shipped with oncely, so third-party backends can prove they conform.

``BrokerConformance`` and ``StoreConformance`` are the suites this project runs against every
broker and store: subclass one in a test module, give it a factory fixture and a features
record (``BrokerFeatures``/``StoreFeatures``), and pytest runs every case against your backend.
``RuntimeConformance`` (with ``RuntimeFeatures``) takes the same broker factory and runs a real
worker over it. See ``oncely.testing.brokers``, ``oncely.testing.runtime`` and
``oncely.testing.stores`` for the details.
"""

from __future__ import annotations

import pytest

# The cases live outside the test tree; this makes their failed asserts show values too.
pytest.register_assert_rewrite(
    "oncely.testing.brokers", "oncely.testing.runtime", "oncely.testing.stores"
)

from oncely.testing.brokers import (  # noqa: E402
    BrokerConformance,
    BrokerFactory,
    BrokerFeatures,
)
from oncely.testing.runtime import RuntimeConformance, RuntimeFeatures  # noqa: E402
from oncely.testing.stores import (  # noqa: E402
    StoreConformance,
    StoreFactory,
    StoreFeatures,
)

__all__ = [
    "BrokerConformance",
    "BrokerFactory",
    "BrokerFeatures",
    "RuntimeConformance",
    "RuntimeFeatures",
    "StoreConformance",
    "StoreFactory",
    "StoreFeatures",
]
