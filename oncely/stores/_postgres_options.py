"""``PostgresStore``'s URL options, read with precise errors (see ``oncely.stores.postgres``)."""

from __future__ import annotations

from typing import TypedDict

from oncely._postgres import flag, number, parse_postgres_url, reject_unknown

__all__ = ["OPTIONS", "StoreOptions", "store_options"]

OPTIONS = (
    "table",
    "schema",
    "pool_min",
    "pool_max",
    "command_timeout",
    "sweep_interval",
    "sweep_batch",
    "create_table",
)


class StoreOptions(TypedDict):
    """``PostgresStore``'s keyword arguments, as a URL gives them."""

    table: str
    schema: str | None
    pool_min: int
    pool_max: int
    command_timeout: float
    sweep_interval: float
    sweep_batch: int
    create_table: bool


def store_options(url: str) -> tuple[str, StoreOptions]:
    """The libpq DSN (oncely's options taken out) and the store's arguments from ``url``.

    Raises:
        ConfigError: not a PostgreSQL URL, or a bad or unknown option.
    """
    parsed = parse_postgres_url(url, OPTIONS)
    opts = parsed.options
    options = StoreOptions(
        table=opts.pop("table", "oncely_idempotency"),
        schema=opts.pop("schema", None),
        pool_min=int(number(opts, "pool_min", 1, url, integer=True, minimum=1, inclusive=True)),
        pool_max=int(number(opts, "pool_max", 10, url, integer=True, minimum=2, inclusive=True)),
        command_timeout=number(opts, "command_timeout", 10.0, url),
        # 0 turns the background sweeper off (``sweep()`` is still there to call).
        sweep_interval=number(opts, "sweep_interval", 60.0, url, inclusive=True),
        sweep_batch=int(number(opts, "sweep_batch", 1000, url, integer=True)),
        create_table=flag(opts, "create_table", True, url),
    )
    reject_unknown(opts, url)
    return parsed.dsn, options
