from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

import oncely
from oncely import ConfigError, Settings, load_settings
from oncely.runtime.config import HandlerSettings


def test_defaults_use_the_embedded_broker_and_its_own_store() -> None:
    s = load_settings(environ={})
    assert s.broker == "sqlite:///oncely.db"
    assert s.store_url() == "sqlite:///oncely.db"
    assert Settings(broker="amqp://x/").store_url() is None


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "oncely.toml"
    cfg.write_text('broker = "memory://file"\nconcurrency = 3\ngrace_period = 7\n')
    env = {"ONCELY_BROKER": "memory://env", "ONCELY_CONCURRENCY": "5"}
    s = load_settings(config_file=cfg, environ=env, overrides={"concurrency": 9, "store": None})
    assert (s.broker, s.concurrency, s.grace_period) == ("memory://env", 9, 7.0)


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[handlers."shop.place"]\nconcurrency = 2\n')
    s = load_settings(environ={"ONCELY_CONFIG": str(cfg), "ONCELY_FAIL_OPEN": "true"})
    assert s.handlers["shop.place"].concurrency == 2
    assert s.fail_open is True


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('brokr = "memory://"', "brokr"),
        ("concurrency = 0", "concurrency must be >= 1"),
        ('concurrency = "many"', "concurrency"),
        ('[handlers."x"]\nconcurency = 2', "concurency"),
        ("broker = ", "not valid TOML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_settings(config_file=cfg, environ={})


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="ONCELY_BROKR") as refused:
        load_settings(environ={"ONCELY_BROKR": "memory://"})
    # Every variable it would take is listed, the config file's own included.
    assert "ONCELY_BROKER" in str(refused.value) and "ONCELY_CONFIG" in str(refused.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("concurrency = -2", "concurrency must be >= 1, got -2"),
        ("grace_period = -1", "grace_period must be a number > 0, got -1"),
        ("grace_period = 0", "grace_period must be a number > 0, got 0"),
        ("[handlers.h]\ntimeout = 0", "[handlers.h] timeout must be a number > 0, got 0"),
        ("[handlers.h]\ntimeout = -5", "[handlers.h] timeout must be a number > 0, got -5"),
        ("[handlers.h]\nvisibility = 0", "[handlers.h] visibility must be a number > 0"),
        ("[handlers.h]\nvisibility = -1", "[handlers.h] visibility must be a number > 0"),
        ("[handlers.h]\nvisibility = nan", "[handlers.h] visibility must be a number > 0"),
        ("[handlers.h]\nconcurrency = 0", "[handlers.h] concurrency must be >= 1, got 0"),
        ("[handlers.h]\nmax_attempts = 0", "[handlers.h] max_attempts must be >= 1, got 0"),
        ('[handlers."shop.place"]\ntimeout = 0', '[handlers."shop.place"] timeout'),
    ],
)
def test_out_of_range_values_are_one_line_errors_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=cfg, environ={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ONCELY_GRACE_PERIOD", "-1", "grace_period must be a number > 0"),
        ("ONCELY_CONCURRENCY", "0", "concurrency must be >= 1"),
    ],
)
def test_out_of_range_environment_values_name_the_key(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ={name: value})


def test_test_variables_pass_the_strict_environment_check() -> None:
    env = {"ONCELY_TEST_AMQP_URL": "amqp://x/", "ONCELY_TEST_ANYTHING": "1"}
    assert load_settings(environ=env) == load_settings(environ={})
    # The prefix is exact: a near miss is still a misspelt setting.
    with pytest.raises(ConfigError, match="ONCELY_TESTS_AMQP_URL"):
        load_settings(environ={"ONCELY_TESTS_AMQP_URL": "amqp://x/"})


def test_the_project_tests_read_only_the_test_prefix() -> None:
    """Every ONCELY_* variable the test suite reads uses the prefix the check ignores."""
    import re

    tests = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""(?:environ(?:\.get)?[\[(]|getenv\()\s*["'](ONCELY_[A-Z0-9_]+)""")
    read = {m for f in tests.rglob("*.py") for m in pattern.findall(f.read_text())}
    assert read, "the pattern found no variables at all"
    assert {v for v in read if not v.startswith("ONCELY_TEST_")} == set()


def _specs(settings: Settings) -> dict[str, tuple[int, float, float, int]]:
    app = oncely.App()

    @app.handler("a", name="a", concurrency=4, timeout=10, visibility=20)
    async def a(_: object) -> None: ...

    @app.handler("b", name="b", concurrency=4, timeout=10, visibility=20)
    async def b(_: object) -> None: ...

    worker = oncely.Worker(app, broker="memory://", settings=settings)
    return {
        s.name: (s.concurrency, s.timeout, s.visibility, s.retry.max_attempts) for s in worker.specs
    }


def test_the_most_specific_setting_wins() -> None:
    declared = _specs(Settings())
    assert declared == {"a": (4, 10, 20, 5), "b": (4, 10, 20, 5)}
    # The global concurrency beats the code; a handler's own setting beats the global one.
    settings = Settings(
        concurrency=9,
        handlers={"a": HandlerSettings(concurrency=2, timeout=3, visibility=6, max_attempts=7)},
    )
    assert _specs(settings) == {"a": (2, 3, 6, 7), "b": (9, 10, 20, 5)}


def test_values_assigned_after_load_are_checked_by_the_worker() -> None:
    settings = Settings()
    settings.handlers["a"] = HandlerSettings(timeout=0)
    with pytest.raises(ConfigError, match=r"\[handlers.a\] timeout"):
        _specs(settings)


@pytest.mark.parametrize(
    ("broker", "store"),
    [
        ("sqlite:///x.db?poll_interval=0.1", "sqlite:///x.db"),
        ("sqlite:////abs/x.db?poll_interval=0.1&max_poll_interval=1", "sqlite:////abs/x.db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("memory://hub", "memory://hub"),
        ("memory://", "memory://~default"),
        ("memory://<private>", "memory://"),
        ("amqp://guest:guest@localhost/", None),
    ],
)
def test_default_store_keeps_the_broker_location_without_its_options(
    broker: str, store: str | None
) -> None:
    assert Settings(broker=broker).store_url() == store
    assert Settings().store_url(broker) == store
    assert Settings(broker=broker, store="memory://x").store_url() == "memory://x"


def test_sqlite_store_rejects_broker_options() -> None:
    from oncely.stores.registry import store_from_url

    with pytest.raises(ConfigError, match=r"unknown option.*poll_interval"):
        store_from_url("sqlite:///x.db?poll_interval=0.1")


@pytest.mark.parametrize(
    ("toml", "field", "where"),
    [
        ('[handlers."shop.place"]\ntimout = 3', "timout", '[handlers."shop.place"]'),
        (
            "[handlers.a]\ntimeout = 3\n[handlers.b]\nconcurrency = 1.5",
            "concurrency",
            "[handlers.b] concurrency",
        ),
    ],
)
def test_a_bad_handler_table_is_named(tmp_path: Path, toml: str, field: str, where: str) -> None:
    """msgspec writes ``$.handlers[...]`` for any handler; the error must say which one.

    Only oncely's part of the message is asserted (its prefix and the ``- at`` location it
    rewrites) and the name of the bad key: msgspec's own wording may change."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=cfg, environ={})
    message = str(caught.value)
    assert message.startswith("invalid setting: "), message
    assert field in message, message
    assert message.endswith(f" - at `{where}`"), message


def test_a_max_attempts_setting_keeps_the_rest_of_the_codes_retry_policy() -> None:
    """Every field but ``max_attempts`` survives the override, whatever fields there are."""
    declared = oncely.RetryPolicy()
    changed: dict[str, object] = {}
    for f in oncely.RetryPolicy.__struct_fields__:
        value = getattr(declared, f)
        changed[f] = (not value) if isinstance(value, bool) else value * 3 + 1
    policy = oncely.RetryPolicy(**changed)  # type: ignore[arg-type]
    app = oncely.App()

    @app.handler("a", name="a", retry=policy)
    async def a(_: object) -> None: ...

    settings = Settings(handlers={"a": HandlerSettings(max_attempts=2)})
    (spec,) = oncely.Worker(app, broker="memory://", settings=settings).specs
    assert spec.retry == msgspec.structs.replace(policy, max_attempts=2)


def test_an_unknown_handler_name_lists_the_names_there_are() -> None:
    """``[handlers.place_order]`` for a handler named ``shop.place_order`` by default: the
    error must show the name to write, in settings and in ``--handler``."""
    app = oncely.App()

    @app.handler("a", name="shop.place_order")
    async def place_order(_: object) -> None: ...

    settings = Settings(handlers={"place_order": HandlerSettings(timeout=5)})
    with pytest.raises(ConfigError) as caught:
        oncely.Worker(app, broker="memory://", settings=settings)
    assert str(caught.value) == (
        "settings name unknown handler(s): place_order; the handlers are: shop.place_order"
    )
    with pytest.raises(ConfigError) as caught:
        oncely.Worker(app, broker="memory://", handlers=["place_order"])
    assert (
        str(caught.value) == "unknown handler(s): place_order; the handlers are: shop.place_order"
    )
