"""Review findings on the `oncely` command, each run as a user runs it (a real subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
