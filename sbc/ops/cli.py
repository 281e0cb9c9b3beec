"""The ``sbc`` command.

Subcommands::

    sbc run [--config PATH]           run the bridge (PATH defaults to $SBC_CONFIG)
    sbc check-config [--config PATH]  validate the configuration, print "config OK" or the problems
    sbc config show [--config PATH]   print the effective settings as TOML, each value's source
                                      beside it (file, environment, credential, default)
    sbc demo [--config PATH] [--log-file PATH]
                                      run the bridge against local stand-ins of 3CX and Retell;
                                      its story on stdout, sbc's log lines in the file
    sbc calls [--since 1h] [--caller N] [--json]
                                      list call records, newest first (sbc/ops/calls_cmd.py)
    sbc calls show CALL_UUID          one call record and the ladder diagram of its legs
    sbc version                       print the version

Without ``--config`` and without ``SBC_CONFIG`` the settings come from ``SBC_*`` environment
variables alone. Exit status: see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib.resources
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import structlog

from sbc import __version__
from sbc.ops.logging import configure_logging
from sbc.ops.settings import CONFIG_ENV, ConfigError, Loaded, Settings, load_with_sources

__all__ = [
    "EXIT_CODES",
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "demo_config_path",
    "main",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # the bridge could not start (port taken, rtpengine down) or stopped on an error
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_INTERRUPTED = 130  # Ctrl-C before the bridge installed its own signal handling
EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): the configuration is unusable; do not restart
EXIT_CODES = {
    EXIT_OK: "success; for check-config: the configuration is valid",
    EXIT_FAILURE: "the bridge could not start or stopped on an error (the log says why)",
    EXIT_USAGE: "bad command line",
    EXIT_CONFIG: "configuration error (missing file, TOML syntax, invalid value); one line each",
    EXIT_INTERRUPTED: "interrupted by SIGINT before the bridge took over signal handling",
}

log = structlog.get_logger("sbc.cli")


def demo_config_path() -> Path:
    """The demo's built-in configuration, shipped as package data of :mod:`sbc.ops`."""
    return Path(str(importlib.resources.files("sbc.ops").joinpath("demo.toml")))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sbc`` console script and of ``python -m sbc``; returns the status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help exits 0, a usage error 2
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Callable[[argparse.Namespace], int] = args.handler
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbc",
        description="SIP back-to-back user agent between a 3CX PBX and Retell AI.",
        epilog="exit status: "
        + "; ".join(f"{code} {text}" for code, text in sorted(EXIT_CODES.items())),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"TOML settings file (default: ${CONFIG_ENV}, else environment only)"

    run = sub.add_parser("run", help="run the bridge")
    run.add_argument("--config", type=Path, metavar="PATH", help=config_help)
    run.set_defaults(handler=_cmd_run)

    check = sub.add_parser("check-config", help="validate the settings and exit")
    check.add_argument("--config", type=Path, metavar="PATH", help=config_help)
    check.set_defaults(handler=_cmd_check_config)

    config = sub.add_parser("config", help="inspect the settings")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser(
        "show",
        help="print the effective settings as TOML with each value's source; secrets hidden",
    )
    show.add_argument("--config", type=Path, metavar="PATH", help=config_help)
    show.set_defaults(handler=_cmd_config_show)

    demo = sub.add_parser("demo", help="run the bridge against local stand-ins of 3CX and Retell")
    demo.add_argument(
        "--config", type=Path, metavar="PATH", help="settings (default: the built-in demo.toml)"
    )
    demo.add_argument(
        "--log-file",
        metavar="PATH",
        help="where sbc's own log lines go, so that they do not interleave with the demo's"
        " story on stdout (default: a new sbc-demo-*.log in the temporary directory;"
        " '-': stderr)",
    )
    demo.set_defaults(handler=_cmd_demo)

    calls = sub.add_parser(
        "calls",
        help="list call records, newest first ('calls show CALL_UUID': one, with its ladder)",
    )
    calls.add_argument(
        "--since", metavar="WHEN", help="a duration back from now (1h, 30m, 2d) or a local date"
    )
    calls.add_argument("--caller", metavar="N", help="caller numbers containing N")
    calls.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (100)")
    _calls_options(calls, config_help)
    calls_sub = calls.add_subparsers(dest="calls_command", metavar="ACTION")
    calls_show = calls_sub.add_parser(
        "show", help="one call record and the ladder diagram of all its legs"
    )
    calls_show.add_argument("call_uuid", metavar="CALL_UUID", help="a call_uuid or its prefix")
    # SUPPRESS: an option given before `show` is not reset by show's own default.
    _calls_options(calls_show, config_help, default=argparse.SUPPRESS)
    calls.set_defaults(handler=_cmd_calls)

    version = sub.add_parser("version", help="print the version")
    version.set_defaults(handler=_cmd_version)
    return parser


def _calls_options(parser: argparse.ArgumentParser, config_help: str, default: Any = None) -> None:
    parser.add_argument(
        "--json", action="store_true", default=default or False, help="JSON instead of text"
    )
    parser.add_argument("--config", type=Path, metavar="PATH", default=default, help=config_help)
    parser.add_argument(
        "--db", type=Path, metavar="PATH", default=default, help="the records database itself"
    )


def _cmd_calls(args: argparse.Namespace) -> int:
    from sbc.ops import calls_cmd  # sqlite3 and the views, for this command only

    return calls_cmd.run(args)


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    from_env = os.environ.get(CONFIG_ENV)
    return Path(from_env) if from_env else None


def _load(path: Path | None) -> Settings | None:
    """Settings, or None after printing one line per problem to stderr."""
    loaded = _load_with_sources(path)
    return None if loaded is None else loaded.settings


def _load_with_sources(path: Path | None) -> Loaded | None:
    try:
        return load_with_sources(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"sbc {__version__}")
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(_config_path(args))
    if settings is None:
        return EXIT_CONFIG
    print("config OK")
    return EXIT_OK


def _cmd_config_show(args: argparse.Namespace) -> int:
    path = _config_path(args)
    loaded = _load_with_sources(path)
    if loaded is None:
        return EXIT_CONFIG
    from sbc.ops.config_show import render

    print(render(loaded, path), end="")
    return EXIT_OK


# The service and the demo are imported inside their commands: `check-config` and `version`
# stay quick and never load the SIP stack, media or aiohttp.


def _cmd_run(args: argparse.Namespace) -> int:
    path = _config_path(args)
    settings = _load(path)
    if settings is None:
        return EXIT_CONFIG
    from sbc.ops import service

    def reload() -> Settings:
        # SIGHUP: the same file and environment (credential files included) read again.
        return load_with_sources(path).settings

    tune_gc()
    return _serve(functools.partial(service.serve, loader=reload), settings, path)


# Full collections walk every live object, and each answered request keeps a few alive until
# its transaction's Timer J/K ends (32 s over UDP): at 10,000 OPTIONS/s a default-tuned full
# collection paused the loop for 160-340 ms and overflowed the UDP socket buffer. Rarer full
# collections kept the longest pause at 1 ms in the same benchmark (docs/performance.md).
# Under calls the young generations hold what lives for a while (transactions waiting out their
# timers, calls being set up), and CPython lets every death of an old tracked object offset the
# young generation's allocation count, so with the default 700 a generation-0 collection found
# 800-6,400 live young objects and a generation-1 one 4,000-9,700: pauses of 1-7 ms and up to
# 16 ms, which set the post-dial delay's p99 (bench_calls at 300 calls/s, gc.callbacks timing:
# generation 1 median 1.75-4.0 ms, p90 6.3-7.2 ms). Collecting young objects five times as often
# keeps each pause small, for the same total collector time (each survivor is traversed once per
# generation whatever the cadence): with (100, 4, ...) generation 0 took 0.05-0.06 ms (median),
# generation 1 0.17-0.26 ms (median), p99 1.0-1.4 ms. The third value keeps full collections as
# rare per call as before (one every ~300,000 calls): one traverses every held call, and ended
# calls are not reference cycles (Call.dispose, tests/unit/test_call_dispose.py), so there is
# little for it to find.
GC_THRESHOLD = (100, 4, 50000)


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, settings) out of the collector's reach and
    make full collections rarer. For the long-running service only, not for tests.

    The interpreter's switch interval stays at its 5 ms: the one other thread, the records
    writer, gives the GIL back after each row it makes (sbc/ops/records.py, ``_give_way``), and
    with that a 1 ms interval changed nothing measurable (bench/bench_gil_stall.py;
    docs/performance.md, "Round 5 merged")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _cmd_demo(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config is not None else demo_config_path()
    settings = _load(path)
    if settings is None:
        return EXIT_CONFIG
    from sbc.ops import demo

    if args.log_file == "-":
        return _serve(demo.serve, settings, path)
    if args.log_file:
        log_path = Path(args.log_file)
    else:
        handle, name = tempfile.mkstemp(prefix="sbc-demo-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    try:
        log_file = log_path.open("a", encoding="utf-8", buffering=1)
    except OSError as exc:
        print(f"cannot write the log file {log_path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    # The story goes to stdout; the bridge's own log lines (JSON unless [log] format says
    # otherwise) to the file, named before and after the story.
    print(f"sbc's log: {log_path}", flush=True)
    with log_file:
        try:
            status = _serve(demo.serve, settings, path, log_stream=log_file)
        finally:
            configure_logging(settings.log.level, settings.log.format)  # off the file
    print(f"sbc's log: {log_path}")
    return status


def _serve(
    serve: Callable[[Settings], Awaitable[int]],
    settings: Settings,
    path: Path | None,
    *,
    log_stream: TextIO | None = None,
) -> int:
    configure_logging(settings.log.level, settings.log.format, stream=log_stream, batched=True)
    log.info(
        "sbc_starting",
        version=__version__,
        config=str(path) if path else None,
        pbx=f"{settings.pbx.host}:{settings.pbx.port}/{settings.pbx.transport}",
        retell=f"{settings.retell.host}:{settings.retell.port}/{settings.retell.transport}",
        media=settings.media.mode,
    )
    return _run_coroutine(serve, settings)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_coroutine(serve: Callable[[Settings], Awaitable[int]], settings: Settings) -> int:
    """Run ``serve(settings)`` to completion on uvloop when installed (asyncio's loop otherwise).

    The bridge installs its own SIGTERM/SIGINT handlers and returns when it has shut down; its
    return value is the exit status.
    """

    async def _main() -> int:
        return await serve(settings)

    factory = _loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(_main())
    except KeyboardInterrupt:
        log.warning("sbc_interrupted")
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("sbc_crashed", detail="stopped on an unexpected error")
        return EXIT_FAILURE
    log.info("sbc_stopped", status=result)
    return result
