"""Options in a backend URL's query string, read with precise errors; the URL masked for
messages. Shared by the SQLite and PostgreSQL code (and free of either driver)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from oncely.errors import ConfigError

__all__ = ["flag", "mask", "number", "safe"]


def number(
    options: dict[str, str],
    name: str,
    default: float,
    url: str,
    *,
    integer: bool = False,
    minimum: float = 0.0,
    inclusive: bool = False,
) -> float:
    """Pop a number option, checked against ``minimum`` (exclusive unless ``inclusive``).

    Raises:
        ConfigError: not a number (or not a whole number when ``integer``), or out of range.
    """
    raw = options.pop(name, None)
    if raw is None:
        return default
    try:
        value = float(int(raw)) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{safe(url)}: option {name}={raw!r} is not {kind}") from None
    if value < minimum or (value == minimum and not inclusive):
        bound = ">=" if inclusive else ">"
        raise ConfigError(f"{safe(url)}: option {name} must be {bound} {minimum:g}, got {raw}")
    return value


def flag(options: dict[str, str], name: str, default: bool, url: str) -> bool:
    """Pop a boolean option (``true``/``false``, ``1``/``0``, ``yes``/``no``)."""
    raw = options.pop(name, None)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{safe(url)}: option {name}={raw!r} must be true or false")


def mask(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and ``repr``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def safe(url: str) -> str:
    """``url`` quoted, with its password masked, for error messages."""
    return repr(mask(url))
