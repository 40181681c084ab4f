from __future__ import annotations

from pathlib import Path

import pytest

from oncely import ConfigError, Settings, load_settings


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
    with pytest.raises(ConfigError, match="ONCELY_BROKR"):
        load_settings(environ={"ONCELY_BROKR": "memory://"})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", environ={})
