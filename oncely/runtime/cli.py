"""The ``oncely`` command: run a worker, publish a message, inspect the dead-letter queue.

This is the only place that installs signal handlers or picks an event loop. Errors in user
input print one line and exit 2; a broker or store failure exits 1; neither shows a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from oncely._logging import configure_logging
from oncely._version import __version__
from oncely.errors import ConfigError, OncelyError
from oncely.runtime._cli_dlq import add_dlq_parser
from oncely.runtime._cli_help import (
    DESCRIPTION,
    EPILOG,
    PUBLISH_EPILOG,
    PUBLISH_HELP,
    RUN_EPILOG,
    RUN_HELP,
)
from oncely.runtime._cli_outbox import add_outbox_parser, refuse_in_process_broker
from oncely.runtime._observe import require_metrics
from oncely.runtime.app import App
from oncely.runtime.config import Settings, load_settings
from oncely.runtime.publisher import Publisher
from oncely.runtime.worker import Worker

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``oncely`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(
            config_file=args.config,
            overrides={
                "broker": args.broker,
                "store": getattr(args, "store", None),
                "concurrency": getattr(args, "concurrency", None),
                "grace_period": getattr(args, "grace", None),
                "metrics_port": getattr(args, "metrics_port", None),
                "metrics_host": getattr(args, "metrics_host", None),
                "log_level": args.log_level,
                "log_format": args.log_format,
                "log_payloads": True if args.log_payloads else None,
            },
        )
        # The oncely logger tree only: the root level (other libraries) stays as it was.
        configure_logging(
            settings.log_level, log_format=settings.log_format, payloads=settings.log_payloads
        )
        command: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]] = args.func
        return _run_loop(command(args, settings), args.loop)
    except ConfigError as exc:
        print(f"oncely: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OncelyError as exc:
        print(f"oncely: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--broker", metavar="URL", help="broker URL (default: $ONCELY_BROKER, else sqlite)"
    )
    common.add_argument(
        "--config", metavar="FILE", help="TOML settings file (default: $ONCELY_CONFIG)"
    )
    common.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of oncely's loggers (not the root logger's); default INFO",
    )
    common.add_argument(
        "--log-format",
        choices=["auto", "json", "text"],
        help="log lines on stderr: auto (default) is text on a TTY, else JSON lines",
    )
    common.add_argument(
        "--log-payloads",
        action="store_true",
        default=None,
        help="add message payloads to log lines about a message (off by default)",
    )
    common.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop; auto uses uvloop when installed",
    )
    text = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="oncely", description=DESCRIPTION, epilog=EPILOG, formatter_class=text
    )
    parser.add_argument("--version", action="version", version=f"oncely {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        summary: str,
        description: str,
        epilog: str | None,
        common_flags: bool = True,
    ) -> argparse.ArgumentParser:
        return parent.add_parser(
            name,
            parents=[common] if common_flags else [],
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=text,
        )

    run = command(sub, "run", "run a worker for module:app", RUN_HELP, RUN_EPILOG)
    run.add_argument("target", help="the App to run, as module:attribute (e.g. shop.tasks:app)")
    run.add_argument("--store", metavar="URL", help="idempotency store URL")
    run.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="concurrency of every handler (a [handlers.NAME] setting still wins)",
    )
    run.add_argument("--grace", type=float, metavar="S", help="seconds to drain at shutdown")
    run.add_argument(
        "--handler", action="append", metavar="NAME", help="run only this handler (repeatable)"
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve /metrics, /livez, /readyz and /status.json on port N (needs oncely[metrics])",
    )
    run.add_argument(
        "--metrics-host", metavar="H", help="address for --metrics-port (default: 0.0.0.0)"
    )
    run.set_defaults(func=_cmd_run)

    pub = command(sub, "publish", "publish one JSON message", PUBLISH_HELP, PUBLISH_EPILOG)
    pub.add_argument("topic")
    pub.add_argument("payload", help="the message body, as JSON")
    pub.add_argument("--key", help="idempotency key (sets the oncely-key header)")
    pub.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="seconds to hold it back (>= 0)"
    )
    pub.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    pub.set_defaults(func=_cmd_publish)

    add_dlq_parser(sub, common)
    add_outbox_parser(sub, common)
    return parser


def _run_loop(coro: Coroutine[Any, Any, int], loop: str) -> int:
    if loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                coro.close()
                raise ConfigError(
                    "--loop uvloop needs uvloop; run: pip install 'oncely[uvloop]'"
                ) from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


def load_app(target: str) -> App:
    """Import ``module:attribute`` and return the ``App`` it names.

    Raises:
        ConfigError: the target is malformed, cannot be imported, or is not an App.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected module:app, got {target!r}")
    # Like `python -m`, let the worker find modules in the current directory.
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            exc.name == module_name or module_name.startswith(exc.name + ".")
        ):
            raise ConfigError(f"cannot import module {module_name!r}: {exc}") from None
        _print_user_traceback(exc)
        raise _import_failed(module_name, exc) from None
    except ConfigError as exc:
        # oncely refused something the module declares (a handler signature, a setting of
        # @app.handler): its message says what, and the user's line says where.
        raise ConfigError(f"{_user_line(exc)}{exc}") from None
    except Exception as exc:
        # The user's bug: their own traceback is worth seeing, then oncely's one-line summary.
        _print_user_traceback(exc)
        raise _import_failed(module_name, exc) from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, App):
        raise ConfigError(f"{target!r} is a {type(obj).__name__}, not an oncely.App")
    return obj


def _import_failed(module_name: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"cannot import module {module_name!r}: {type(exc).__name__}: {exc} "
        "(the traceback above is from that module)"
    )


# Whole directories, with the separator: a user's "oncely_jobs/" or "importlib_play/" is
# their own code, not ours.
_HIDDEN_DIRS = tuple(
    str(Path(p).resolve().parent) + os.sep for p in (Path(__file__).parent, importlib.__file__)
)


def _hidden_frame(filename: str) -> bool:
    """True for a frame of oncely's own package or of importlib, not the user's."""
    if filename.startswith("<frozen importlib"):
        return True
    return str(Path(filename).resolve()).startswith(_HIDDEN_DIRS) if filename else False


def _user_line(exc: BaseException) -> str:
    """``"path:line: "`` of the last frame in ``exc``'s traceback that is not oncely's."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not _hidden_frame(code.co_filename):
            where = f"{code.co_filename}:{tb.tb_lineno}: "
        tb = tb.tb_next
    return where


def _print_user_traceback(exc: BaseException) -> None:
    """Print ``exc``'s traceback from the first frame outside oncely and importlib."""
    tb = exc.__traceback__
    while tb is not None and _hidden_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


async def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    app = load_app(args.target)
    worker = Worker(app, settings=settings, handlers=args.handler)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        # First signal drains within the grace period; a second one stops at once.
        grace = None if signals == 1 else 0.0
        logging.getLogger("oncely").info("signal received, stopping (grace=%s)", grace)
        stops.append(asyncio.ensure_future(worker.stop(grace)))

    stops: list[asyncio.Future[None]] = []
    if settings.metrics_port is not None:
        require_metrics()  # before connecting: a missing extra is a usage error
    await worker.start()
    if settings.metrics_port is not None:
        try:
            port = await worker.serve_http(
                settings.metrics_port, settings.metrics_host, metrics=True
            )
        except OSError as exc:
            await worker.stop(0.0)
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc}"
            ) from None
        logging.getLogger("oncely").info(
            "serving /metrics, /livez, /readyz on %s:%d", settings.metrics_host, port
        )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # After the handlers: a SIGTERM during the collection (~100 ms) still drains gracefully.
    _freeze_startup_heap()
    try:
        await worker.wait_stopped()
        await asyncio.gather(*stops)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if worker.abandoned:
            _exit_now(len(worker.abandoned))
    return 0


def _exit_now(abandoned: int) -> NoReturn:
    """Exit 1 at once, past ``asyncio.run``'s clean-up: it cancels every task left and waits
    for it, so a handler that ignores its cancel (the worker gave up on it) would hold the
    process for ever, whatever signal came next."""
    logging.getLogger("oncely").critical(
        "exiting without waiting for %d handler(s) that ignored their cancel", abandoned
    )
    logging.shutdown()  # flush what is logged; nothing else runs after this
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILURE)


def _freeze_startup_heap() -> None:
    """Move what the started worker holds (the app, the drivers and their loaded models:
    botocore's alone take ~100 ms of CPU per full collection) out of the collector's way.

    It lives as long as the process anyway; left in, every full collection the per-message
    garbage triggers walks it again (SQS, 20,000 messages, two runs: 1.3 and 2.2 us/msg less
    time in collections). Here only, not in ``Worker``: a library must not change
    process-wide state. Collected first, so no garbage of the start-up is frozen with it.
    """
    gc.collect()
    gc.freeze()


async def _cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    if not (math.isfinite(args.delay) and args.delay >= 0):
        raise ConfigError(f"--delay must be a number of seconds >= 0, got {args.delay}")
    if args.key == "":
        raise ConfigError("--key must not be empty (is the variable it came from unset?)")
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"payload is not valid JSON: {exc}") from None
    headers = {}
    for item in args.header:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--header expects NAME=VALUE, got {item!r}")
        if name.lower().startswith("oncely-"):
            # oncely reads these (attempt count, keys, dead-letter fields): one set by hand
            # would cut retries short or change what dedupes.
            raise ConfigError(
                f"--header {name}: names starting with oncely- are oncely's own (reserved); "
                "use --key for the idempotency key"
            )
        headers[name] = value
    refuse_in_process_broker(settings.broker, "oncely publish")
    async with Publisher(settings.broker) as publisher:
        message_id = await publisher.publish(
            args.topic, payload, key=args.key, headers=headers, delay=args.delay
        )
    print(message_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
