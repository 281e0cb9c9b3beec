"""Call records in PostgreSQL, without a server: the [records] url/password/instance settings,
passwords kept out of ``sbc config show`` and errors, one schema for both stores, the SQL of
both dialects, the new route and instance columns (and the SQLite migration adding them), the
service's choice of store, ``sbc calls`` opening the configured one. A real server (and one that
cannot be reached): the integration test ``test_records_postgres.py``."""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from sbc.ops import calls_cmd, cli, records_pg
from sbc.ops.ladder_view import render_calls, render_record
from sbc.ops.records import (
    COLUMNS,
    JSON_COLUMNS,
    MIGRATIONS,
    POSTGRESQL,
    SCHEMA_VERSION,
    SQLITE,
    RecordsError,
    RecordWriter,
    connect_readonly,
    find_call,
    find_calls,
    row_of,
    select_calls,
)
from sbc.ops.records_pg import (
    COLUMN_TYPES,
    CREATE,
    INSERT,
    PostgresRecordWriter,
    connection_params,
    scrub,
)
from sbc.ops.service import records_writer
from sbc.ops.settings import ConfigError, RecordsSettings, load_settings, redact_url
from tests.unit.test_records import NOW, make_record

SECRET = "pw-Hunter9"
GOOD = """
[pbx]
host = "pbx.example.com"
extension = "1000"
password = "hunter2-secret"
[retell]
number = "+14155550100"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SBC_CONFIG", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    for name in ("PATH", "URL", "PASSWORD", "INSTANCE"):
        monkeypatch.delenv(f"SBC_RECORDS__{name}", raising=False)


# -- settings -------------------------------------------------------------------------------------


def test_url_and_path_are_mutually_exclusive_and_the_url_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "sbc.toml"
    url = f"postgresql://sbc:{SECRET}@db.example.com:5432/sbc"
    path.write_text(GOOD + f'[records]\nurl = "{url}"\npath = "calls.db"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(path, env={})
    assert raised.value.problems == (
        "records: url and path are mutually exclusive: set url for PostgreSQL, path for SQLite",
    )
    for bad, problem in (
        (f"mysql://sbc:{SECRET}@db/sbc", "must be a postgresql://user@host:port/dbname URL"),
        (f"postgresql://sbc:{SECRET}@db:99999/sbc", "has a port that is not a number"),
        (f"postgresql://sbc:{SECRET}@db /sbc", "must not contain spaces or control characters"),
    ):
        path.write_text(GOOD + f'[records]\nurl = "{bad}"\n')
        with pytest.raises(ConfigError) as raised:
            load_settings(path, env={})
        (line,) = raised.value.problems
        assert line.startswith(f"records.url: {problem}") and SECRET not in line
    with pytest.raises(ConfigError) as raised:
        load_settings(None, env={"SBC_RECORDS__URL": "42", **_required_env()})
    assert SECRET not in str(raised.value)


def _required_env() -> dict[str, str]:
    return {
        "SBC_PBX__HOST": "pbx.example.com",
        "SBC_PBX__EXTENSION": "1000",
        "SBC_PBX__PASSWORD": "hunter2-secret",
        "SBC_RETELL__NUMBER": "+14155550100",
    }


def test_url_password_and_instance_from_file_environment_and_credential(tmp_path: Path) -> None:
    path = tmp_path / "sbc.toml"
    path.write_text(GOOD + '[records]\nurl = "postgres://sbc@db/sbc"\ninstance = "sbc-1"\n')
    settings = load_settings(path, env={})
    records = settings.records
    assert (records.url, records.password, records.instance) == (
        "postgres://sbc@db/sbc",
        None,
        "sbc-1",
    )
    assert records.postgresql and records.database({}) is None
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "records_password").write_text(SECRET + "\n")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "SBC_RECORDS__INSTANCE": "sbc-2"}
    records = load_settings(path, env=env).records
    assert records.password is not None and records.password.get_secret_value() == SECRET
    assert records.instance == "sbc-2"
    assert SECRET not in repr(records)
    assert RecordsSettings().instance == socket.gethostname()  # the default
    assert not RecordsSettings().postgresql
    for bad in ("", " sbc", "a\nb"):
        with pytest.raises(ValueError, match="instance"):
            RecordsSettings(instance=bad)


def test_redact_url() -> None:
    assert redact_url(f"postgresql://sbc:{SECRET}@db:5432/x") == "postgresql://sbc:***@db:5432/x"
    assert redact_url(f"postgresql://db/x?sslmode=require&password={SECRET}") == (
        "postgresql://db/x?sslmode=require&password=***"
    )
    assert redact_url(f"postgresql://u:{SECRET}@[::1]:5/d") == "postgresql://u:***@[::1]:5/d"
    for unchanged in ("postgresql://sbc@db/x", "/var/lib/sbc/calls.sqlite3", "{caller_number}"):
        assert redact_url(unchanged) == unchanged
    assert redact_url("postgresql://[oops/x") == "***"  # cannot be taken apart: none of it
    assert scrub(f"FATAL: password {SECRET} postgresql://a:b@h/d", SECRET, None) == (
        "FATAL: password *** postgresql://a:***@h/d"
    )


def test_config_show_hides_the_password_of_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tomllib

    path = tmp_path / "sbc.toml"
    path.write_text(GOOD + f'[records]\nurl = "postgresql://sbc:{SECRET}@db:5432/sbc"\n')
    monkeypatch.setenv("SBC_RECORDS__PASSWORD", SECRET + "2")
    assert cli.main(["config", "show", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert SECRET not in out
    lines = out.splitlines()
    assert 'url = "postgresql://sbc:***@db:5432/sbc"  # file' in lines
    assert 'password = "<set>"  # environment SBC_RECORDS__PASSWORD' in lines
    assert tomllib.loads(out)["records"]["instance"] == socket.gethostname()
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_OK
    assert SECRET not in capsys.readouterr().out


# -- one schema, two dialects ---------------------------------------------------------------------


def test_both_stores_have_the_same_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    for step in MIGRATIONS:
        for statement in step:
            db.execute(statement)
    sqlite_columns = [row[1] for row in db.execute("PRAGMA table_info(calls)")]
    db.close()
    assert sqlite_columns == list(COLUMNS) == list(COLUMN_TYPES)
    assert len(MIGRATIONS) == SCHEMA_VERSION == 4
    table = CREATE[0]
    assert table.startswith("CREATE TABLE calls (")
    for name in COLUMNS:
        assert f"\n    {name} {COLUMN_TYPES[name]}" in table
    for name in JSON_COLUMNS:
        assert COLUMN_TYPES[name].startswith("JSON")  # json keeps the text (and key order)
    assert {s.split(" ON ")[0] for s in CREATE[1:]} == {
        "CREATE INDEX calls_started",
        "CREATE INDEX calls_ended",
        "CREATE INDEX calls_caller",
    }


def test_the_insert_replaces_a_row_and_casts_the_json_columns() -> None:
    assert INSERT.startswith(f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES (%s, %s, ")
    assert INSERT.count("%s") == len(COLUMNS)
    assert INSERT.count("%s::json") == len(JSON_COLUMNS) == 4
    _, _, updates = INSERT.partition(" ON CONFLICT (call_uuid) DO UPDATE SET ")
    assert updates.split(", ") == [f"{c} = EXCLUDED.{c}" for c in COLUMNS if c != "call_uuid"]


def test_the_queries_of_both_dialects() -> None:
    assert select_calls(SQLITE) == (
        "SELECT * FROM calls ORDER BY started DESC, call_uuid LIMIT ?",
        [100],
    )
    assert select_calls(POSTGRESQL, since=5.0, caller="+44", limit=-3) == (
        "SELECT * FROM calls WHERE started >= %s AND strpos(caller, %s) > 0 "
        "ORDER BY started DESC, call_uuid LIMIT %s",
        [5.0, "+44", 0],
    )
    assert select_calls(SQLITE, caller="+44")[0].count("instr(caller, ?) > 0") == 1
    assert find_calls(POSTGRESQL, "abc", prefix=False) == (
        "SELECT * FROM calls WHERE call_uuid = %s",
        ["abc"],
    )
    assert find_calls(SQLITE, "a_b%\\", prefix=True) == (
        "SELECT * FROM calls WHERE call_uuid LIKE ? ESCAPE '\\' LIMIT 2",
        ["a\\_b\\%\\\\%"],
    )


def test_connection_params_keep_the_urls_own_and_add_timeouts() -> None:
    params = connection_params(
        "postgresql://sbc:inurl@db:6432/calls?connect_timeout=2&sslmode=require",
        password=SECRET,
        application_name="sbc sbc-1",
    )
    assert params["password"] == SECRET  # records.password wins over the URL's
    assert (params["host"], params["port"], params["dbname"]) == ("db", "6432", "calls")
    assert (params["connect_timeout"], params["sslmode"]) == ("2", "require")
    assert params["keepalives"] == "1" and params["tcp_user_timeout"] == "20000"
    assert params["application_name"] == "sbc sbc-1"
    assert connection_params("postgresql://db/x")["connect_timeout"] == "5"
    assert "password" not in connection_params("postgresql://db/x")


# -- the route and instance columns ---------------------------------------------------------------


def test_route_and_instance_columns() -> None:
    record = make_record()
    row = dict(zip(COLUMNS, row_of(record, "sbc-1"), strict=True))
    assert (row["instance"], row["route"]) == ("sbc-1", getattr(record, "route", "") or None)
    assert dict(zip(COLUMNS, row_of(record), strict=True))["instance"] is None

    @dataclasses.dataclass(frozen=True)
    class Routed:  # a CallRecord with the route field the routes work adds
        record: Any
        route: str

        def __getattr__(self, name: str) -> Any:
            return getattr(self.record, name)

    routed = dict(zip(COLUMNS, row_of(Routed(record, "sales"), "x"), strict=True))  # type: ignore[arg-type]
    assert routed["route"] == "sales"


async def test_an_older_sqlite_file_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    old = sqlite3.connect(path)
    for step in MIGRATIONS[:2]:
        for statement in step:
            old.execute(statement)
    old.execute(
        "INSERT INTO calls (call_uuid, direction, pbx_call_id, retell_call_id, caller, called,"
        " started, ended, end_reason) VALUES ('old', 'pbx->retell', 'p', 'r', '+1', '101', ?, ?,"
        " 'pbx_bye')",
        (NOW, NOW + 5),
    )
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()
    writer = RecordWriter(path, instance="sbc-7", wall_clock=lambda: NOW)
    await writer.start()
    assert await writer.write(make_record("new"))
    await writer.close()
    db = connect_readonly(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    kept, new = find_call(db, "old"), find_call(db, "new")
    db.close()
    assert kept is not None and new is not None
    assert (kept["route"], kept["instance"]) == (None, None)
    assert new["instance"] == "sbc-7"


# -- the service's store, `sbc calls` ------------------------------------------------------------


def test_the_service_picks_the_store_of_the_settings(tmp_path: Path) -> None:
    pg = records_writer(
        RecordsSettings(url="postgresql://sbc@db/x", password=SecretStr(SECRET), instance="i")
    )
    assert isinstance(pg, PostgresRecordWriter)
    assert (pg.url, pg.instance, pg.target) == ("postgresql://sbc@db/x", "i", pg.url)
    lite = records_writer(RecordsSettings(path=str(tmp_path / "c.db"), instance="j"))
    assert type(lite) is RecordWriter and lite.path == tmp_path / "c.db"
    assert lite.instance == "j" and lite.target == str(tmp_path / "c.db")
    assert records_writer(RecordsSettings(path="")) is None


def test_sbc_calls_opens_the_configured_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, str | None]] = []

    def fake_connect(url: str, password: str | None = None) -> Any:
        opened.append((url, password))
        raise RecordsError("call records postgresql://sbc@db/x: cannot read: down")

    monkeypatch.setattr(records_pg, "connect_readonly", fake_connect)
    config = tmp_path / "sbc.toml"
    config.write_text('[records]\nurl = "postgresql://sbc@db/x"\n')
    monkeypatch.setenv("SBC_RECORDS__PASSWORD", SECRET)
    assert cli.main(["calls", "--json", "--config", str(config)]) == cli.EXIT_FAILURE
    assert opened == [("postgresql://sbc@db/x", SECRET)]
    assert "cannot read: down" in capsys.readouterr().err
    with pytest.raises(calls_cmd.UsageError, match="in PostgreSQL"):
        calls_cmd.database_path(None, config, {})


def test_sbc_calls_text_shows_the_instance_when_there_are_several() -> None:
    one = {"call_uuid": "u-1", "started": NOW, "instance": "sbc-a", "end_reason": "pbx_bye"}
    other = {**one, "call_uuid": "u-2", "instance": "sbc-b-long-name"}
    listing = render_calls([one, other]).splitlines()
    assert listing[0].split()[-2:] == ["instance", "call_uuid"]
    assert [line.split()[-2:] for line in listing[1:]] == [
        ["sbc-a", "u-1"],
        ["sbc-b-long-name", "u-2"],
    ]
    assert listing[0].index("call_uuid") == listing[1].index("u-1")  # aligned
    assert "instance" not in render_calls([one])  # one instance: no column
    shown = render_record({**one, "route": "sales", "ended": NOW + 1, "ladder": []})
    assert "instance      sbc-a" in shown and "route         sales" in shown


async def test_without_psycopg_the_start_names_the_missing_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    writer = PostgresRecordWriter(f"postgresql://sbc:{SECRET}@db/x")
    with pytest.raises(RecordsError, match=r"need psycopg: pip install 'sbc\[pg\]'"):
        await writer.start()
    await writer.close()  # nothing open; harmless
    assert (writer.written, writer.failed) == (0, 0)
