"""``sbc calls``: the call records, read from the database the service writes (read-only).

::

    sbc calls [--since 1h] [--caller N] [--limit 100] [--json] [--config PATH] [--db PATH]
    sbc calls show CALL_UUID [--json] [--config PATH] [--db PATH]

The list is newest first (by start), at most ``--limit`` rows; ``--since`` takes a duration
back from now (``90s``, ``15m``, ``1h``, ``2d``, ``1w``) or a local date or time
(``2024-05-01``, ``2024-05-01T14:30``); ``--caller`` keeps the calls whose caller number
contains it. ``show`` takes a call_uuid (or a prefix of one that names a single call) and
prints the record and the ladder diagram of all its legs (``sbc/ops/ladder_view.py``).

The database is ``--db`` (an SQLite file), else the one of the ``[records]`` table of the
settings file (``--config``, else ``$SBC_CONFIG``) and ``SBC_RECORDS__*``, as the service uses
it: the PostgreSQL database of ``url`` (password from the URL, ``records.password``, its
``records_password`` credential, or libpq's ``PGPASSWORD``/``~/.pgpass``), else the SQLite file
of ``path`` resolved against the state directory. Only ``[records]`` is read, so the command
works without the service's other secrets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sbc.ops import records_pg
from sbc.ops.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from sbc.ops.ladder_view import render_calls, render_record
from sbc.ops.records import RecordsError, connect_readonly, find_call, list_calls
from sbc.ops.settings import CONFIG_ENV, ENV_PREFIX, RecordsSettings, _credentials

__all__ = ["database_path", "open_records", "parse_since", "run"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)


class UsageError(Exception):
    """A bad value on the command line or in the settings; the message says which."""


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: a duration back from ``now`` (``1h``, ``30m``, ``1h30m``) or a local date or
    date and time (ISO 8601) -> UNIX time."""
    now = time.time() if now is None else now
    compact = text.strip().replace(" ", "")
    if compact and _DURATION.sub("", compact) == "":
        seconds = sum(float(n) * _UNITS[u.lower()] for n, u in _DURATION.findall(compact))
        return now - seconds
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(
            f"--since: expected a duration like 1h, 30m, 2d or a date like 2024-05-01, got {text!r}"
        ) from None


def _records_settings(config: Path | None, env: Mapping[str, str]) -> RecordsSettings:
    data: dict[str, Any] = {}
    if config is not None:
        try:
            table = tomllib.loads(config.read_text(encoding="utf-8")).get("records", {})
        except FileNotFoundError:
            raise UsageError(f"{config}: no such file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{config}: cannot read: {exc}") from None
        if not isinstance(table, dict):
            raise UsageError(f"{config}: records must be a table")
        data.update(table)
    for name in RecordsSettings.model_fields:
        variable = f"{ENV_PREFIX}RECORDS__{name.upper()}"
        if variable in env:
            data[name] = env[variable]
    # records_password from $CREDENTIALS_DIRECTORY, as the service reads it (run under the unit)
    data.update(_credentials(env)[0].get("records", {}))
    try:
        return RecordsSettings(**data)
    except ValidationError as exc:
        problems = [
            f"records.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        ]
        raise UsageError("\n".join(problems)) from None


def _settings(config: Path | None, env: Mapping[str, str]) -> RecordsSettings:
    if config is None and env.get(CONFIG_ENV):
        config = Path(env[CONFIG_ENV])
    return _records_settings(config, env)


def database_path(
    db: Path | None, config: Path | None, env: Mapping[str, str] | None = None
) -> Path:
    """The SQLite database to read (module docstring)."""
    if db is not None:
        return db
    environ = os.environ if env is None else env
    records = _settings(config, environ)
    path = records.database(environ)
    if path is None:
        if records.url is not None:
            raise UsageError("call records are in PostgreSQL (records.url), not in a file")
        raise UsageError('call records are off (records.path = ""); nothing to show')
    return path


def open_records(db: Path | None, config: Path | None, env: Mapping[str, str] | None = None) -> Any:
    """A read-only connection to the records (module docstring): SQLite's or PostgreSQL's,
    both read by :func:`~sbc.ops.records.list_calls` and :func:`~sbc.ops.records.find_call`.
    Raises :class:`UsageError` for the settings, :class:`RecordsError` for the database."""
    environ = os.environ if env is None else env
    if db is None:
        records = _settings(config, environ)
        if records.url is not None:
            password = records.password.get_secret_value() if records.password else None
            return records_pg.connect_readonly(records.url, password)
    return connect_readonly(database_path(db, config, environ))


def run(args: argparse.Namespace) -> int:
    """The ``calls`` command (and ``calls show``) of :mod:`sbc.ops.cli`."""
    try:
        since = None if args.since is None else parse_since(args.since)
        db = open_records(args.db, args.config)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except RecordsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    try:
        if getattr(args, "calls_command", None) == "show":
            return _show(db, args.call_uuid, as_json=args.json)
        records = list_calls(db, since=since, caller=args.caller, limit=args.limit)
    except RecordsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    finally:
        db.close()
    if args.json:
        print(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        print(render_calls(records), end="")
    return EXIT_OK


def _show(db: Any, call_uuid: str, *, as_json: bool) -> int:
    record = find_call(db, call_uuid)
    if record is None:
        print(f"no call record {call_uuid!r} (or the prefix names several)", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(render_record(record), end="")
    return EXIT_OK
