"""A lazy URL-scheme registry shared by brokers and stores.

A backend module is imported only when its scheme is used, so ``import oncely`` never pulls in
aio-pika, aiokafka or asyncpg. A missing driver becomes ``MissingExtra`` naming the extra.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import urlsplit

from oncely._options import mask
from oncely.errors import ConfigError, MissingExtra, UnknownScheme

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry:
    target: str
    """``"package.module:Class"``; the class has a ``from_url(url)`` classmethod."""
    extra: str
    """The pip extra that installs the driver."""
    driver: str
    """The top-level module the backend imports (checked to name the extra)."""


class Registry(Generic[T]):
    def __init__(self, kind: str, base: Any) -> None:
        # ``Any``: the base is an ABC, which mypy will not accept as ``type[T]``.
        self._kind = kind
        self._base = base
        self._entries: dict[str, Entry] = {}

    def register(self, scheme: str, target: str, *, extra: str = "", driver: str = "") -> None:
        """Register ``scheme`` (replacing any previous entry) to ``"module:Class"``."""
        self._entries[scheme.lower()] = Entry(target, extra, driver)

    def schemes(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, url_or_instance: str | T) -> T:
        """Build a backend from a URL, or pass an instance through."""
        if isinstance(url_or_instance, self._base):
            return cast("T", url_or_instance)
        if not isinstance(url_or_instance, str):
            raise ConfigError(
                f"{self._kind} must be a URL string or a {self._base.__name__} instance, "
                f"got {type(url_or_instance).__name__}"
            )
        url = url_or_instance.strip()
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
        entry = self._entries.get(scheme)
        if entry is None:
            known = ", ".join(f"{s}://" for s in self.schemes())
            what = f"scheme {scheme!r}" if scheme else "no scheme"
            bare = urlsplit(url).scheme.lower()
            if not scheme and bare in self._entries:  # sqlite:x.db
                what = f"no '//' after {bare}:; write {bare}://..."
            shown = mask(url)  # a mistyped scheme still carries the real password
            raise UnknownScheme(f"unknown {self._kind} URL {shown!r} ({what}); known: {known}")
        cls = self._load(scheme, entry)
        backend = cls.from_url(url)
        if not isinstance(backend, self._base):
            raise ConfigError(f"{entry.target}.from_url returned {type(backend).__name__}")
        return cast("T", backend)

    def _load(self, scheme: str, entry: Entry) -> Any:
        module_name, _, attr = entry.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if entry.driver and missing == entry.driver:
                raise MissingExtra(scheme, entry.extra, entry.driver) from exc
            raise
        return getattr(module, attr)
