"""SQS errors for ``SqsBroker``: botocore's and aiohttp's errors translated into oncely's, by
operation (``map_errors``), and the error of one failed entry of a batch (``entry_error``)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import aiohttp
import botocore.exceptions

from oncely.errors import (
    BrokerError,
    ConfigError,
    ConnectionLost,
    DeliveryExpired,
    PublishFailed,
)

_EXPIRED_CODES = frozenset(
    {
        "ReceiptHandleIsInvalid",
        "InvalidParameterValue",
        "MessageNotInflight",
        "InvalidReceiptHandle",
    }
)
Op = Literal["connect", "receive", "settle", "publish", "admin"]


_TRANSPORT = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.HTTPClientError,
    aiohttp.ClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)


_CREDENTIALS = (
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        code: Any = exc.response.get("Error", {}).get("Code", "")
        return str(code)
    return ""


def is_missing_queue(exc: BaseException) -> bool:
    """True for ``QueueDoesNotExist`` however the server spells it (a ``__cause__`` too)."""
    cause = exc.__cause__ if isinstance(exc, BrokerError) else exc
    code = error_code(cause) if cause is not None else ""
    return code.endswith(("QueueDoesNotExist", "NonExistentQueue"))


def entry_error(op: Op, code: str, message: str) -> BrokerError:
    """The error for one failed entry of a batch response (``SenderFault`` true)."""
    what = f"SQS refused the entry: {code}: {message}"
    if op == "settle" and code in _EXPIRED_CODES:
        return DeliveryExpired(f"the receipt handle is stale or invalid ({what})")
    if op == "publish":
        return PublishFailed(what)
    return BrokerError(what)


def map_errors(op: Op) -> _ErrorMap:
    """Translate botocore/aiohttp errors into oncely's, by operation.

    A server that cannot be reached (after botocore's own retries) is ``ConnectionLost``.
    A stale or invalid receipt handle on a settle is ``DeliveryExpired``; a refused publish is
    ``PublishFailed``; missing credentials or region are ``ConfigError``. Anything else the
    service returned is a ``BrokerError`` naming its code, and so is any other botocore error.
    """
    return _ERROR_MAPS[op]


class _ErrorMap:
    """``map_errors``' context manager: one per operation, made once and shared (it holds no
    state), where a ``@contextmanager`` made a generator and its wrapper per API call."""

    __slots__ = ("op",)

    def __init__(self, op: Op) -> None:
        self.op = op

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is not None:
            _translate(self.op, exc)  # raises the oncely error, or lets ``exc`` through


def _translate(op: Op, exc: BaseException) -> None:
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        message = str(exc)
        if op == "settle" and code in _EXPIRED_CODES:
            raise DeliveryExpired(f"the receipt handle is stale or invalid: {message}") from exc
        if code in ("AccessDenied", "InvalidClientTokenId", "SignatureDoesNotMatch"):
            raise ConfigError(f"SQS refused the credentials: {message}") from exc
        if op == "publish":
            raise PublishFailed(message) from exc
        raise BrokerError(message) from exc
    if isinstance(exc, (botocore.exceptions.NoCredentialsError, botocore.exceptions.NoRegionError)):
        raise ConfigError(
            f"SQS needs credentials and a region (env, profile or ?region=): {exc}"
        ) from exc
    if isinstance(exc, _TRANSPORT):
        raise ConnectionLost(f"SQS is unreachable ({op}): {type(exc).__name__}: {exc}") from exc
    if isinstance(exc, _CREDENTIALS):
        raise ConfigError(f"SQS credentials could not be resolved: {exc}") from exc
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        # Anything else botocore raises (a response it cannot parse, a parameter it
        # refuses): still an oncely error, so callers and the runtime handle it as one.
        raise BrokerError(f"SQS {op} failed: {type(exc).__name__}: {exc}") from exc


_ERROR_MAPS: dict[str, _ErrorMap] = {op: _ErrorMap(op) for op in get_args(Op)}
