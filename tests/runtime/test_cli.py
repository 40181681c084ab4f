"""The `oncely` command as a user runs it: a real subprocess each time."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def oncely(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ONCELY_")}
    return subprocess.run(
        [sys.executable, "-m", "oncely", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=60,
    )


def test_version() -> None:
    out = oncely("--version")
    assert out.returncode == 0 and out.stdout.startswith("oncely ")


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["run", "no_such_module:app"], {}, "cannot import module 'no_such_module'"),
        (["run", "examples.orders"], {}, "expected module:app"),
        (["run", "examples.orders:nope"], {}, "has no attribute 'nope'"),
        (["run", "examples.orders:Order"], {}, "not an oncely.App"),
        (["run", "examples.orders:app", "--broker", "rabbit://x"], {}, "unknown broker URL"),
        (["run", "examples.orders:app"], {"ONCELY_CONCURENCY": "2"}, "ONCELY_CONCURENCY"),
        (["publish", "orders", "{not json"], {}, "payload is not valid JSON"),
        (["publish", "orders", "{}", "--broker", "sqlite://host/x.db"], {}, "has a host"),
        (
            ["publish", "t", "{}", "--delay", "-1", "--broker", "memory://"],
            {},
            "--delay must be a number of seconds >= 0",
        ),
        (
            ["publish", "t", "{}", "--delay", "nan", "--broker", "memory://"],
            {},
            "--delay must be a number of seconds",
        ),
        (
            ["dlq", "list", "t", "--limit", "0", "--broker", "memory://"],
            {},
            "--limit must be >= 1, got 0",
        ),
        (
            ["publish", "t", "{}", "--key", "", "--broker", "memory://"],
            {},
            "--key must not be empty",
        ),
        (["run", "examples.orders:app", "--concurrency", "0"], {}, "concurrency must be >= 1"),
        (["run", "examples.orders:app", "--grace", "-1"], {}, "grace_period must be a number > 0"),
        (["run", "nothere.sub:app"], {}, "cannot import module 'nothere.sub'"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    args: list[str], env: dict[str, str], message: str
) -> None:
    out = oncely(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_publish_then_dead_letters_list_and_replay(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    first = oncely("publish", "jobs", '{"n": 1}', "--key", "k1", "--broker", url)
    assert first.returncode == 0, first.stderr
    message_id = first.stdout.strip()
    assert message_id

    # Dead-letter it through the broker API, as a failing handler would.
    script = (
        "import asyncio, oncely\n"
        "async def main():\n"
        f"    b = oncely.broker_from_url({url!r})\n"
        "    async with b, b.consume('jobs', prefetch=1, visibility=5) as s:\n"
        "        d = await s.__anext__()\n"
        "        assert d.key == 'k1', d.key\n"
        "        await d.reject('poison: bad total')\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)

    listed = oncely("dlq", "list", "jobs", "--broker", url)
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.strip().splitlines()
    letter = json.loads(line)
    assert letter["id"] == message_id
    assert letter["reason"] == "poison: bad total"
    assert json.loads(letter["body"]) == {"n": 1}

    replayed = oncely("dlq", "replay", "jobs", "--all", "--broker", url)
    assert replayed.returncode == 0 and "replayed 1 message" in replayed.stdout
    assert oncely("dlq", "list", "jobs", "--broker", url).stdout.strip() == ""


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("import oncely\napp = oncely.App()\nundefined_name\n", "NameError"),
        ("import oncely\nimport no_such_dependency_xyz\n", "ModuleNotFoundError"),
        ("import oncely\napp = oncely.App(\n", "SyntaxError"),
    ],
)
def test_a_module_that_fails_to_import_shows_its_traceback_then_one_line(
    tmp_path: Path, source: str, error: str
) -> None:
    (tmp_path / "userapp.py").write_text(source)
    out = oncely("run", "userapp:app", "--broker", "memory://", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    # The user's own traceback, pointing into their file, and nothing of oncely's.
    assert str(tmp_path / "userapp.py") in out.stderr
    assert "oncely/runtime" not in out.stderr and "importlib" not in out.stderr
    assert any(line.startswith(error) for line in lines[:-1])
    # Then oncely's one-line summary, last.
    assert lines[-1].startswith(f"oncely: error: cannot import module 'userapp': {error}")
    assert sum(line.startswith("oncely:") for line in lines) == 1


def test_help_is_written_for_users(tmp_path: Path) -> None:
    top = oncely("--help")
    assert top.returncode == 0
    for command in ("run", "publish", "dlq"):
        assert command in top.stdout
    assert "examples:" in top.stdout and "oncely run shop.tasks:app" in top.stdout
    # Not the module's maintainer docstring, and no reStructuredText markup.
    assert "``" not in top.stdout and "installs signal handlers" not in top.stdout
    for args, example in [
        (["run"], "oncely run shop.tasks:app"),
        (["publish"], "oncely publish orders"),
        (["dlq"], "oncely dlq replay orders"),
        (["dlq", "list"], "oncely dlq list orders"),
        (["dlq", "replay"], "oncely dlq replay orders --id"),
    ]:
        out = oncely(*args, "--help")
        assert out.returncode == 0, out.stderr
        assert "examples:" in out.stdout and example in out.stdout
        assert "``" not in out.stdout


def test_the_users_traceback_survives_a_folder_named_like_importlib(tmp_path: Path) -> None:
    """Frames are skipped by location (importlib's own files), not by a substring of the
    path: a project in ``importlib_play/`` still sees its own frame."""
    project = tmp_path / "importlib_play"
    project.mkdir()
    (project / "userapp.py").write_text("import oncely\napp = oncely.App()\nundefined_name\n")
    out = oncely("run", "userapp:app", "--broker", "memory://", cwd=project)
    assert out.returncode == 2, out.stderr
    assert f'File "{project / "userapp.py"}", line 3' in out.stderr, out.stderr


def test_only_oncely_and_importlib_frames_are_hidden() -> None:
    from oncely.runtime import cli

    package = Path(cli.__file__).resolve().parents[1]
    assert cli._hidden_frame(str(package / "runtime" / "cli.py"))
    assert cli._hidden_frame(importlib.__file__)
    assert cli._hidden_frame("<frozen importlib._bootstrap>")
    # Siblings whose names merely start the same are the user's code.
    assert not cli._hidden_frame(f"{package}_jobs/tasks.py")
    assert not cli._hidden_frame(f"{package.parent}/importlib_play/userapp.py")


def test_replay_of_ids_that_are_not_dead_letters_is_an_error(tmp_path: Path) -> None:
    """A misspelt or already replayed ``--id`` must not read as success."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    out = oncely("dlq", "replay", "jobs", "--id", "nope1", "--id", "nope2", "--broker", url)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "replayed 0 message(s) to 'jobs'" in out.stdout
    assert out.stderr.strip() == (
        "oncely: error: 2 of the 2 ids given are not dead letters of 'jobs' "
        "(misspelt, or already replayed)"
    )
    # With --all there is nothing to have missed: an empty queue is not an error.
    assert oncely("dlq", "replay", "jobs", "--all", "--broker", url).returncode == 0
