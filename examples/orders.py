"""A small shop: the handler module the demo, the tests and `oncely run` all use.

Run it on the embedded default, or on any broker, with no code change::

    oncely run examples.orders:app                              # sqlite:///oncely.db
    ONCELY_BROKER=memory:// oncely run examples.orders:app
    oncely run examples.orders:app --broker amqp://guest:guest@127.0.0.1/ --store sqlite:///keys.db
"""

from __future__ import annotations

import msgspec

import oncely


class Order(msgspec.Struct):
    id: str
    sku: str
    qty: int


class Email(msgspec.Struct):
    to: str
    subject: str


app = oncely.App("shop")

placed: dict[str, int] = {}
"""Effects of `place_order`, kept in memory so the demo can show that none was duplicated."""

emails_sent: list[str] = []


@app.handler(
    "orders",
    concurrency=8,
    timeout=10,
    idempotent=True,
    key="payload:id",
    retry=oncely.RetryPolicy(max_attempts=4, base=0.05, cap=0.5),
)
async def place_order(order: Order) -> dict[str, str]:
    """Effectively once: a duplicate order id is acked without running this again."""
    if order.qty <= 0:
        raise oncely.Reject(f"order {order.id} has qty {order.qty}")
    placed[order.id] = placed.get(order.id, 0) + 1
    return {"order": order.id, "status": "placed"}


@app.handler(
    "emails",
    concurrency=4,
    timeout=10,
    retry=oncely.RetryPolicy(max_attempts=5, base=0.05, cap=0.2),
)
async def send_email(email: Email, ctx: oncely.Context) -> None:
    """At least once, with a mail server that is down for the first two attempts."""
    if ctx.attempt <= 2:
        raise ConnectionError(f"SMTP unavailable (attempt {ctx.attempt})")
    emails_sent.append(email.to)
