"""A backend module whose driver is not installed, to test the registry's install hint."""

from __future__ import annotations

import oncely_driver_that_is_not_installed  # type: ignore[import-not-found]  # noqa: F401
