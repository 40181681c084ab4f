"""URL options of the Redis idempotency store, and the redis-py client they build.

::

    redis://[user:password@]host[:port][/db][?option=value&...]
    rediss://...                                    the same over TLS
    redis://host1:7000,host2:7001/?cluster=1        Redis Cluster, seed nodes comma-separated

Options: ``prefix`` (default ``oncely:``), ``pool_size`` (connections per server, default
16), ``socket_timeout`` and ``connect_timeout`` (seconds, default 5), ``cluster`` (``1`` for
Redis Cluster, default ``0``), and for ``rediss://`` only ``ssl_cert_reqs``
(``required``/``optional``/``none``), ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` and
``ssl_check_hostname`` (``1``/``0``). Anything else is a ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from oncely._options import mask
from oncely.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

DEFAULT_PREFIX = "oncely:"
DEFAULT_PORT = 6379
DEFAULT_POOL_SIZE = 16
DEFAULT_TIMEOUT = 5.0

_CERT_REQS = ("required", "optional", "none")
_TLS_OPTIONS = (
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_check_hostname",
)
_OPTIONS = ("cluster", "prefix", "pool_size", "socket_timeout", "connect_timeout", *_TLS_OPTIONS)
"""Every option ``parse_redis_url`` reads, for the error that names an unknown one."""


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Everything a Redis store URL says."""

    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    cluster: bool = False
    prefix: str = DEFAULT_PREFIX
    pool_size: int = DEFAULT_POOL_SIZE
    socket_timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_TIMEOUT
    ssl: dict[str, Any] = field(default_factory=dict)
    """redis-py's ``ssl_*`` keyword arguments (``rediss://`` only)."""


def check_prefix(prefix: str, where: str) -> str:
    # The store wraps each key in {...}; a brace in the prefix would move the hash tag.
    if "{" in prefix or "}" in prefix:
        raise ConfigError(f"{where}: prefix {prefix!r} must not contain '{{' or '}}'")
    return prefix


def parse_redis_url(url: str) -> RedisOptions:
    """Read a ``redis://`` or ``rediss://`` store URL.

    Raises:
        ConfigError: wrong scheme, bad host list, port or db, or a bad or unknown option.
    """
    parts = urlsplit(url)
    url = mask(url)  # from here on only for messages, which must not carry the password
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URL: {url!r}")
    if parts.fragment:
        raise ConfigError(f"{url!r}: a redis URL takes no #fragment")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(item, url) for item in hostlist.split(","))
    db = _db(parts.path, url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    tls = parts.scheme == "rediss"
    cluster = _flag(options, "cluster", url)
    if cluster and db != 0:
        raise ConfigError(f"{url!r}: Redis Cluster has only db 0")
    if len(nodes) > 1 and not cluster:
        raise ConfigError(f"{url!r}: several hosts need cluster=1 (they are Cluster seed nodes)")
    ssl: dict[str, Any] = {}
    for name in _TLS_OPTIONS:
        if name not in options:
            continue
        if not tls:
            raise ConfigError(f"{url!r}: option {name} needs a rediss:// (TLS) URL")
        raw = options.pop(name)
        if name == "ssl_cert_reqs":
            if raw not in _CERT_REQS:
                raise ConfigError(f"{url!r}: ssl_cert_reqs={raw!r} must be one of {_CERT_REQS}")
            ssl[name] = raw
        elif name == "ssl_check_hostname":
            ssl[name] = _bool(raw, name, url)
        elif not raw:
            raise ConfigError(f"{url!r}: option {name} needs a file path")
        else:
            ssl[name] = raw
    result = RedisOptions(
        nodes=nodes,
        db=db,
        username=username,
        password=password,
        tls=tls,
        cluster=cluster,
        prefix=check_prefix(options.pop("prefix", DEFAULT_PREFIX), repr(url)),
        pool_size=int(_number(options, "pool_size", DEFAULT_POOL_SIZE, url, whole=True)),
        socket_timeout=_number(options, "socket_timeout", DEFAULT_TIMEOUT, url),
        connect_timeout=_number(options, "connect_timeout", DEFAULT_TIMEOUT, url),
        ssl=ssl,
    )
    if options:
        known = ", ".join(sorted(_OPTIONS))
        raise ConfigError(
            f"{url!r}: unknown option(s) {', '.join(sorted(options))}; known: {known}"
        )
    return result


def build_client(options: RedisOptions) -> Redis | RedisCluster:
    """A redis-py asyncio client for ``options``; it connects lazily, on first use."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    common: dict[str, Any] = {
        "username": options.username,
        "password": options.password,
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        # One quick retry covers a pooled connection the server closed while idle; more would
        # only delay StoreUnavailable while the server is down. Every script is idempotent
        # for its token, so a command sent twice is harmless.
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1),
        "decode_responses": False,
    }
    if options.tls:
        common["ssl"] = True
        common.update(options.ssl)
    if options.cluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in options.nodes],
            max_connections=options.pool_size,
            **common,
        )
    [(host, port)] = options.nodes
    ssl = common.pop("ssl", False)
    pool = BlockingConnectionPool(
        connection_class=_ssl_connection() if ssl else _plain_connection(),
        host=host,
        port=port,
        db=options.db,
        max_connections=options.pool_size,
        timeout=options.connect_timeout,
        **common,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


def _plain_connection() -> type[Any]:
    from redis.asyncio.connection import Connection

    return Connection


def _ssl_connection() -> type[Any]:
    from redis.asyncio.connection import SSLConnection

    return SSLConnection


def _node(item: str, url: str) -> tuple[str, int]:
    host, port = item, DEFAULT_PORT
    if item.startswith("["):  # [::1]:6379
        close = item.find("]")
        if close < 0:
            raise ConfigError(f"{url!r}: unbalanced '[' in host {item!r}")
        host, rest = item[1:close], item[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{url!r}: bad host {item!r}")
            port = _port(rest[1:], url)
    elif ":" in item:
        host, _, raw = item.rpartition(":")
        port = _port(raw, url)
    if not host:
        raise ConfigError(f"{url!r}: a host is missing (write redis://host:port/db)")
    return host, port


def _port(raw: str, url: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{url!r}: port {raw!r} is not a number from 1 to 65535")
    return int(raw)


def _db(path: str, url: str) -> int:
    raw = path.strip("/")
    if not raw:
        return 0
    if not raw.isdigit():
        raise ConfigError(f"{url!r}: the path must be a database number, got {raw!r}")
    return int(raw)


def _number(
    options: dict[str, str], name: str, default: float, url: str, *, whole: bool = False
) -> float:
    raw = options.pop(name, None)
    if raw is None:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{url!r}: option {name}={raw!r} is not {kind}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{url!r}: option {name} must be > 0, got {raw}")
    return value


def _flag(options: dict[str, str], name: str, url: str) -> bool:
    raw = options.pop(name, None)
    return False if raw is None else _bool(raw, name, url)


def _bool(raw: str, name: str, url: str) -> bool:
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ConfigError(f"{url!r}: option {name}={raw!r} must be 1 or 0")
