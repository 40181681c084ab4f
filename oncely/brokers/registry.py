"""Broker URL schemes. ``broker_from_url("amqp://...")`` imports only what that scheme needs."""

from __future__ import annotations

from oncely._registry import Registry
from oncely.brokers.base import Broker

__all__ = ["broker_from_url", "register_broker"]

_brokers: Registry[Broker] = Registry("broker", Broker)
_brokers.register("memory", "oncely.brokers.memory:MemoryBroker")
_brokers.register(
    "sqlite", "oncely.brokers.sqlite:SqliteBroker", extra="sqlite", driver="aiosqlite"
)
_brokers.register("amqp", "oncely.brokers.amqp:AmqpBroker", extra="amqp", driver="aio_pika")
_brokers.register("amqps", "oncely.brokers.amqp:AmqpBroker", extra="amqp", driver="aio_pika")
_brokers.register("sqs", "oncely.brokers.sqs:SqsBroker", extra="sqs", driver="aiobotocore")
_brokers.register("kafka", "oncely.brokers.kafka:KafkaBroker", extra="kafka", driver="aiokafka")


def broker_from_url(url: str | Broker) -> Broker:
    """Build a broker from its URL, or return a ready ``Broker`` instance unchanged.

    Raises:
        UnknownScheme: no broker is registered for the URL's scheme.
        MissingExtra: the broker's driver is not installed; the message names the extra.
        ConfigError: the URL is malformed for that broker.
    """
    return _brokers.resolve(url)


def register_broker(scheme: str, target: str, *, extra: str = "", driver: str = "") -> None:
    """Register a third-party broker: ``target`` is ``"package.module:Class"`` whose class has a
    ``from_url(url)`` classmethod. ``driver`` is the module whose absence means ``extra`` is
    missing."""
    _brokers.register(scheme, target, extra=extra, driver=driver)
