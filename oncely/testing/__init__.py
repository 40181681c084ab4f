"""Conformance suites shipped with oncely, so third-party backends can prove they conform.

``BrokerConformance`` and ``StoreConformance`` are the suites this project runs against every
broker and store: subclass one in a test module, give it a factory fixture and a features
record (``BrokerFeatures``/``StoreFeatures``), and pytest runs every case against your backend.
See ``oncely.testing.brokers``, ``oncely.testing.runtime`` and ``oncely.testing.stores`` for
the details. ``RuntimeConformance`` (with ``RuntimeFeatures``) takes the same broker factory as
``BrokerConformance`` and runs a real worker over it.

They need the ``testing`` extra (``pip install 'oncely[testing]'``: pytest and anyio). The
cases are ``@pytest.mark.anyio`` tests and run on anyio's pytest plugin, which pytest loads by
itself once anyio is installed, next to pytest-asyncio in strict or auto mode. A project that
turns plugin autoloading off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``) adds
``-p anyio.pytest_plugin``.
"""

from __future__ import annotations

from oncely.errors import MissingExtra

try:
    import anyio  # noqa: F401
    import pytest
except ImportError as exc:
    raise MissingExtra(
        "oncely.testing", "testing", exc.name or "pytest", what="oncely.testing"
    ) from None

# The cases live outside the test tree; this makes their failed asserts show values too.
pytest.register_assert_rewrite(
    "oncely.testing.brokers",
    "oncely.testing._broker_base",
    "oncely.testing._broker_delivery",
    "oncely.testing._broker_settle",
    "oncely.testing._broker_visibility",
    "oncely.testing._broker_dlq",
    "oncely.testing.runtime",
    "oncely.testing.stores",
    "oncely.testing._store_base",
    "oncely.testing._store_tx",
    "oncely.testing._store_processes",
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
