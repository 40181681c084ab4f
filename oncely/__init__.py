"""oncely: effectively-once message handlers over at-least-once brokers.

Users import from here, from ``oncely.brokers.<name>``, ``oncely.stores.<name>`` and
``oncely.testing``; everything else is private.
"""

from __future__ import annotations

from oncely._logging import LogFormatter, MessageFilter, configure_logging
from oncely._version import __version__
from oncely.brokers.base import (
    Broker,
    Capabilities,
    DeadLetter,
    DeadLetterAdmin,
    Delivery,
    Headers,
    Subscription,
)
from oncely.brokers.registry import broker_from_url, register_broker
from oncely.errors import (
    AlreadySettled,
    BrokerError,
    ConfigError,
    ConnectionLost,
    DecodeError,
    DeliveryExpired,
    HandlerOutcome,
    HandlerTimeout,
    LeaseLost,
    MissingExtra,
    NotSupported,
    OncelyError,
    PublishFailed,
    Reject,
    Retry,
    StoreError,
    StoreUnavailable,
    UnknownScheme,
    WorkerFailed,
)
from oncely.runtime.app import App, DuplicateHook, Guarantee, KeyFunction
from oncely.runtime.config import Settings, load_settings
from oncely.runtime.context import Context
from oncely.runtime.publisher import Publisher
from oncely.runtime.retry import RetryPolicy
from oncely.runtime.stats import Stats
from oncely.runtime.worker import Worker
from oncely.stores.base import (
    Begin,
    IdempotencyStore,
    Outcome,
    StoreTransaction,
    TransactionalStore,
)
from oncely.stores.registry import register_store, store_from_url

__all__ = [
    "AlreadySettled",
    "App",
    "Begin",
    "Broker",
    "BrokerError",
    "Capabilities",
    "ConfigError",
    "ConnectionLost",
    "Context",
    "DeadLetter",
    "DeadLetterAdmin",
    "DecodeError",
    "Delivery",
    "DeliveryExpired",
    "DuplicateHook",
    "Guarantee",
    "HandlerOutcome",
    "HandlerTimeout",
    "Headers",
    "IdempotencyStore",
    "KeyFunction",
    "LeaseLost",
    "LogFormatter",
    "MessageFilter",
    "MissingExtra",
    "NotSupported",
    "OncelyError",
    "Outcome",
    "PublishFailed",
    "Publisher",
    "Reject",
    "Retry",
    "RetryPolicy",
    "Settings",
    "Stats",
    "StoreError",
    "StoreTransaction",
    "StoreUnavailable",
    "Subscription",
    "TransactionalStore",
    "UnknownScheme",
    "Worker",
    "WorkerFailed",
    "__version__",
    "broker_from_url",
    "configure_logging",
    "load_settings",
    "register_broker",
    "register_store",
    "store_from_url",
]
