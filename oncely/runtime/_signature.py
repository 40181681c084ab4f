"""Reading a handler's signature at registration: what it decodes, whether it takes a
``Context``, and refusing what could only fail on every message."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import is_dataclass
from typing import Any

import msgspec
import msgspec.inspect

from oncely.errors import ConfigError
from oncely.runtime.context import Context

__all__ = [
    "check_duplicate_hook",
    "check_key_function",
    "check_key_path",
    "default_name",
    "handler_signature",
    "is_async",
]


def default_name(fn: object) -> str:
    """``module.qualname`` of a function, of a partial's function, or of a callable's class."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not inspect.isroutine(target):
        target = type(target)
    return f"{target.__module__}.{target.__qualname__}"


def is_async(fn: object) -> bool:
    """True for an async function, a partial of one, or an object with an async ``__call__``."""
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(call)


def handler_signature(fn: Callable[..., Any], where: str) -> tuple[Any, bool]:
    """The payload type (first parameter) and whether the handler takes a ``Context``.

    A handler is ``async (payload)`` or ``async (payload, ctx)``. The payload's annotation
    (none means ``Any``) must be a type msgspec can decode JSON into, or ``bytes``. The second
    parameter receives the ``Context``: unannotated it is taken as one by its position;
    annotated, it must say ``Context``. Anything else would register fine and then fail on
    every message, so it is refused here.

    Raises:
        ConfigError: the handler is not async, takes other parameters, or a type is wrong.
    """
    if not is_async(fn):
        raise ConfigError(
            f"{where} must be an async function (async def), or an object with an async "
            f"__call__; got {type(fn).__name__}"
        )
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read its signature: {exc}") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not 1 <= len(params) <= 2 or any(p.kind not in positional for p in params):
        # The Signature's own rendering keeps the * and / markers: a keyword-only ctx shown
        # as "(p: dict, ctx: Context)" looked just like what the message asks for.
        shown = inspect.Signature(params)
        raise ConfigError(
            f"{where} must take (payload) or (payload, ctx: oncely.Context), positionally; "
            f"got {shown}"
        )
    target: Any = fn
    if isinstance(target, functools.partial):
        target = target.func
    elif not inspect.isroutine(target):
        target = type(target).__call__
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:
        raise ConfigError(f"{where}: cannot resolve its type annotations: {exc}") from exc
    payload_type = hints.get(params[0].name, Any)
    if _is_context(payload_type):
        raise ConfigError(
            f"{where}: the Context goes second: (payload, ctx: oncely.Context); the first "
            "parameter receives the decoded payload"
        )
    if len(params) == 2 and params[1].name in hints and not _is_context(hints[params[1].name]):
        raise ConfigError(
            f"{where}: its second parameter {params[1].name!r} receives the oncely.Context, "
            f"but is annotated {_name(hints[params[1].name])}"
        )
    _check_decodable(payload_type, where)
    return payload_type, len(params) == 2


def check_duplicate_hook(hook: Callable[..., Any], where: str) -> None:
    """Refuse an ``on_duplicate`` hook that cannot be called as ``await hook(result, ctx)``.

    Registered as is, it would fail on every duplicate, which then goes to the dead-letter
    queue once its retries are spent.

    Raises:
        ConfigError: the hook is not async, or does not take two positional arguments.
    """
    if not is_async(hook):
        raise ConfigError(f"{where}: on_duplicate must be an async function")
    refused = _refuses_two_arguments(hook)
    if refused is not None:
        raise ConfigError(
            f"{where}: on_duplicate must take (result, ctx: oncely.Context), got {refused}"
        )


def check_key_function(fn: Callable[..., Any]) -> None:
    """Refuse a ``key=`` function that cannot be called as ``fn(payload, delivery)``, or is
    async: either way every message would be dead-lettered for its key.

    Raises:
        ConfigError: the function is async or does not take two positional arguments.
    """
    if is_async(fn):
        raise ConfigError(
            f"key function {default_name(fn)!r} must be a plain function (payload, delivery) "
            "-> str | None, not async"
        )
    refused = _refuses_two_arguments(fn)
    if refused is not None:
        raise ConfigError(
            f"key function {default_name(fn)!r} must take (payload, delivery), got {refused}"
        )


def _refuses_two_arguments(fn: Callable[..., Any]) -> inspect.Signature | None:
    """``fn``'s signature if it cannot be called with two positional arguments, else None
    (also when it has no readable signature, as some builtins: it is tried when called)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None, None)
    except TypeError:
        return signature
    return None


def check_key_path(payload_type: Any, path: str, where: str) -> None:
    """Refuse ``key="payload:PATH"`` when a typed payload has no such field.

    It would yield no key for any message, so an effectively-once handler would run every
    one without dedupe (or dead-letter it, with ``on_missing_key="reject"``). Only what the
    types fix is checked: past a ``dict``, ``Any`` or a union, any name may exist.

    Raises:
        ConfigError: a field on the path is not one of its struct's or dataclass's fields.
    """
    current = payload_type
    for part in path.split("."):
        if not (isinstance(current, type) and (_is_struct(current) or is_dataclass(current))):
            return
        try:
            hints = typing.get_type_hints(current)
        except Exception:  # a forward reference it cannot resolve: msgspec will say at decode
            return
        if part not in hints:
            raise ConfigError(
                f"{where}: key 'payload:{path}' names no field of {current.__name__}: "
                f"{part!r} is not one of {', '.join(sorted(hints))}"
            )
        current = hints[part]


def _is_struct(tp: type) -> bool:
    return issubclass(tp, msgspec.Struct)


def _is_context(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Context)


def _name(tp: Any) -> str:
    # Only a class by its name: list[X] or X | None would lend it "list" or nothing useful.
    return tp.__qualname__ if isinstance(tp, type) else repr(tp)


def _check_decodable(payload_type: Any, where: str) -> None:
    """Refuse a payload type msgspec cannot decode JSON into (it would fail every message).

    msgspec builds its decoder lazily and accepts any class at first (a "custom type" it
    could only decode with a ``dec_hook``, which oncely does not pass), so the type tree is
    walked for those as well.
    """
    if payload_type is bytes:
        return
    try:
        msgspec.json.Decoder(payload_type)
        info = msgspec.inspect.type_info(payload_type)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: msgspec cannot decode its payload type: {exc}") from None
    custom = _custom_type(info, "$", set())
    if custom is not None:
        path, tp = custom
        raise ConfigError(
            f"{where}: msgspec cannot decode JSON into {_name(tp)} (at {path} of the payload "
            f"type {_name(payload_type)}); use a msgspec.Struct, a dataclass, dict, list, a "
            "builtin type, or bytes for the raw body"
        )


def _custom_type(info: msgspec.inspect.Type, path: str, seen: set[int]) -> tuple[str, Any] | None:
    """The first type in ``info``'s tree that msgspec could only decode with a hook."""
    mi = msgspec.inspect
    if id(info) in seen:  # a recursive Struct
        return None
    seen.add(id(info))
    if isinstance(info, mi.CustomType):
        # msgspec decodes into ``object`` as into ``Any``.
        return None if info.cls is object else (path, info.cls)
    children: list[tuple[str, mi.Type]] = []
    if isinstance(info, mi.Metadata):
        children = [(path, info.type)]
    elif isinstance(info, mi.UnionType):
        children = [(path, t) for t in info.types]
    elif isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        children = [(f"{path}[]", info.item_type)]
    elif isinstance(info, mi.TupleType):
        children = [(f"{path}[{i}]", t) for i, t in enumerate(info.item_types)]
    elif isinstance(info, mi.DictType):
        children = [(f"{path}{{key}}", info.key_type), (f"{path}[]", info.value_type)]
    elif isinstance(info, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.NamedTupleType):
        children = [(f"{path}.{f.encode_name}", f.type) for f in info.fields]
    for child_path, child in children:
        found = _custom_type(child, child_path, seen)
        if found is not None:
            return found
    return None
