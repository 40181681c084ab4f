"""The public API is exactly what `oncely.__all__` says, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import oncely


def test_all_names_exist_and_are_public() -> None:
    for name in oncely.__all__:
        assert hasattr(oncely, name), name
        assert not name.startswith("_") or name == "__version__"
    assert sorted(oncely.__all__) == oncely.__all__


def test_every_public_attribute_is_exported() -> None:
    public = {
        n
        for n, v in vars(oncely).items()
        if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"
    }
    assert public == set(oncely.__all__) - {"__version__"}


def test_import_does_not_load_broker_drivers() -> None:
    code = (
        "import sys, oncely; "
        "heavy = [m for m in ('aio_pika', 'aiokafka', 'aiobotocore', 'asyncpg', 'redis') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
