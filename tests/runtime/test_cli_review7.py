"""Review findings on the `oncely` command, each run as a user runs it (a real subprocess)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from oncely import App, Context
from oncely.errors import ConfigError
from oncely.runtime.config import load_settings
from tests.runtime.test_cli import oncely


@pytest.mark.parametrize("broker", ["memory://", "memory://shop", "MEMORY://"])
def test_publish_refuses_a_memory_broker_it_would_lose_the_message_in(broker: str) -> None:
    # The hub dies with the command: before, this printed a message id and exited 0.
    out = oncely("publish", "orders", '{"id": 1}', "--broker", broker)
    assert out.returncode == 2, out.stdout
    assert out.stdout == ""
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("oncely: error: 'oncely publish' cannot publish to")
    assert "memory:// hub lives inside one process" in line


def test_the_outbox_relay_refuses_a_memory_broker(tmp_path: Path) -> None:
    # Before, the relay started, marked every row sent and lost them all with its process.
    db = f"sqlite:///{tmp_path / 'app.db'}"
    out = oncely("outbox", "relay", "--db", db, "--broker", "memory://", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("oncely: error: 'oncely outbox relay' cannot publish to 'memory://'")
    env_out = oncely(
        "outbox", "relay", "--db", db, env={"ONCELY_BROKER": "memory://x"}, cwd=tmp_path
    )
    assert env_out.returncode == 2 and "cannot publish to 'memory://x'" in env_out.stderr


@pytest.mark.parametrize(
    ("decorated", "message"),
    [
        ("def h(p: dict) -> None: ...", "handler 'h' must be an async function"),
        ("async def h(p: dict, ctx, extra: int) -> None: ...", "handler 'h' must take"),
        ("async def h(p: Foo) -> None: ...", "handler 'h': msgspec cannot decode"),
    ],
)
def test_a_handler_oncely_refuses_is_one_line_naming_the_users_line(
    tmp_path: Path, decorated: str, message: str
) -> None:
    # Before, the ConfigError came with a traceback through oncely's own frames.
    head = 'import oncely\nclass Foo: ...\napp = oncely.App("u")\n@app.handler("t")\n'
    source = f"{head}{decorated}\n"
    (tmp_path / "userapp.py").write_text(source)
    out = oncely("run", "userapp:app", "--broker", "memory://", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"oncely: error: {tmp_path / 'userapp.py'}:4: {message}"), line


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"timeout": "30"}, ": timeout must be a number > 0, got '30'"),
        ({"timeout": float("nan")}, ": timeout must be a number > 0, got nan"),
        ({"visibility": None}, ": visibility must be a number > 0, got None"),
        ({"result_ttl": 0}, ": result_ttl must be a number > 0, got 0"),
        ({"concurrency": 2.5}, ": concurrency must be an integer >= 1, got 2.5"),
        ({"concurrency": True}, ": concurrency must be an integer >= 1, got True"),
    ],
)
def test_a_handler_setting_of_the_wrong_type_is_a_config_error_naming_it(
    setting: dict[str, Any], message: str
) -> None:
    # Before: a TypeError from a comparison ('<=' not supported between 'str' and 'int'), a
    # NaN timeout or a fractional concurrency accepted, and one message for three settings.
    app = App("u")

    async def h(p: dict[str, Any]) -> None: ...

    with pytest.raises(ConfigError) as raised:
        app.handler("t", **setting)(h)
    assert str(raised.value).endswith(f".<locals>.h'{message}")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ONCELY_FAIL_OPEN", "maybe", "ONCELY_FAIL_OPEN='maybe': expected true or false"),
        ("ONCELY_CONCURRENCY", "abc", "ONCELY_CONCURRENCY='abc': expected a whole number"),
        ("ONCELY_STALL_TIMEOUT", "soon", "ONCELY_STALL_TIMEOUT='soon': expected a number"),
    ],
)
def test_a_bad_variable_value_names_the_variable(variable: str, value: str, message: str) -> None:
    # Before: "invalid setting: Expected `bool`, got `str` - at `$.fail_open`", which names
    # neither the variable nor what it takes (and a variable can only ever be a string).
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={variable: value})
    assert str(raised.value) == message


def test_a_bad_value_from_the_file_still_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('concurrency = "x"\n')
    with pytest.raises(ConfigError, match=r"at `\$\.concurrency`"):
        load_settings(config_file=tmp_path / "c.toml", environ={"ONCELY_FAIL_OPEN": "1"})


def test_an_out_of_range_setting_is_shown_as_written(tmp_path: Path) -> None:
    # README: `[handlers."shop.place_order"] timeout must be a number > 0, got 0`; it said 0.0.
    (tmp_path / "c.toml").write_text('[handlers."shop.place_order"]\ntimeout = 0\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config_file=tmp_path / "c.toml", environ={})
    assert str(raised.value) == (
        '[handlers."shop.place_order"] timeout must be a number > 0, got 0'
    )
    with pytest.raises(ConfigError, match=r"^grace_period must be a number > 0, got -0\.5$"):
        load_settings(environ={"ONCELY_GRACE_PERIOD": "-0.5"})


def test_a_keyword_only_context_is_shown_as_keyword_only() -> None:
    # Before: "must take (payload) or (payload, ctx: oncely.Context), got (p: dict, ctx:
    # oncely.runtime.context.Context)", which reads as exactly what it asks for.
    app = App("u")

    async def h(p: dict[str, Any], *, ctx: Context) -> None: ...

    with pytest.raises(ConfigError, match=r"positionally; got \(p: .*, \*, ctx: "):
        app.handler("t")(h)


async def _one_argument(result: dict[str, int]) -> None: ...


async def _keyword_ctx(result: dict[str, int], *, ctx: Context) -> None: ...


async def _right(result: dict[str, int], ctx: Context) -> None: ...


async def _loose(*args: object) -> None: ...


@pytest.mark.parametrize("hook", [_one_argument, _keyword_ctx])
def test_an_on_duplicate_hook_that_cannot_take_result_and_ctx_is_refused(
    hook: Callable[..., Awaitable[None]],
) -> None:
    # Before, it registered, and every duplicate failed with a TypeError in the hook and was
    # dead-lettered once its retries were spent.
    app = App("u")

    async def h(p: dict[str, int]) -> dict[str, int]:
        return p

    with pytest.raises(ConfigError, match=r"on_duplicate must take \(result, ctx"):
        app.handler("t", idempotent=True, on_duplicate=hook)(h)


@pytest.mark.parametrize("hook", [_right, _loose])
def test_an_on_duplicate_hook_that_takes_result_and_ctx_is_taken(
    hook: Callable[..., Awaitable[None]],
) -> None:
    app = App("u")

    async def h(p: dict[str, int]) -> dict[str, int]:
        return p

    app.handler("t", idempotent=True, on_duplicate=hook)(h)


async def _async_key(payload: dict[str, str], delivery: object) -> str:
    return payload["id"]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (lambda p: p["id"], "must take (payload, delivery), got (p)"),
        (_async_key, "must be a plain function (payload, delivery) -> str | None, not async"),
    ],
)
def test_a_key_function_that_cannot_give_a_key_is_refused(key: Any, message: str) -> None:
    # Before, it registered, and every message was dead-lettered at once for its key: a
    # TypeError for the lambda, "key must be a str, got coroutine" for the async one.
    app = App("u")

    async def h(p: dict[str, str]) -> None: ...

    with pytest.raises(ConfigError, match=re.escape(message)):
        app.handler("t", idempotent=True, key=key)(h)
    app.handler("t", idempotent=True, key=lambda p, d: p["id"], name="ok")(h)


class _Address(msgspec.Struct):
    city: str


class _Order(msgspec.Struct):
    id: str
    address: _Address
    meta: dict[str, str]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("order_id", "names no field of _Order: 'order_id' is not one of address, id, meta"),
        ("address.zip", "names no field of _Address: 'zip' is not one of city"),
    ],
)
def test_a_payload_key_naming_no_field_of_the_payload_type_is_refused(
    path: str, message: str
) -> None:
    # Before, it registered and yielded no key for any message: the effectively-once handler
    # ran every message without dedupe (on_missing_key="process"), with no error anywhere.
    app = App("u")

    async def h(order: _Order) -> None: ...

    with pytest.raises(ConfigError, match=re.escape(message)):
        app.handler("t", idempotent=True, key=f"payload:{path}")(h)
    for fine in ("id", "address.city", "meta.anything"):
        app.handler("t", idempotent=True, key=f"payload:{fine}", name=fine)(h)
