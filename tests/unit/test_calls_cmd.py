"""``sbc calls`` and ``sbc calls show`` (sbc/ops/calls_cmd.py), the [records] and
[log] sip_trace settings."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sbc.ops import cli
from sbc.ops.calls_cmd import UsageError, database_path, parse_since
from sbc.ops.records import RecordWriter
from sbc.ops.settings import (
    DEFAULT_STATE_DIRECTORY,
    LogSettings,
    RecordsSettings,
    load_settings,
    state_directory,
)
from tests.unit.test_records import make_record

NOW = time.time()
SETTINGS = """
[pbx]
host = "pbx.example.com"
extension = "1000"
password = "hunter2-secret"
[retell]
number = "+14155550100"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("SBC_CONFIG", "SBC_RECORDS__PATH", "STATE_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
async def database(tmp_path: Path) -> Path:
    path = tmp_path / "calls.sqlite3"
    writer = RecordWriter(path)
    await writer.start()
    await writer.write(make_record("old-call", started=NOW - 7200, caller="+442071234567"))
    await writer.write(make_record("mid-call", started=NOW - 600, caller="+14155550123"))
    await writer.write(make_record("new-call", started=NOW - 60, caller="+442079999999"))
    await writer.close()
    return path


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Any:
    assert cli.main(argv) == cli.EXIT_OK
    return json.loads(capsys.readouterr().out)


async def test_json_list_is_parseable_newest_first(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listed = _json(capsys, ["calls", "--json", "--db", str(database)])
    assert isinstance(listed, list)
    assert [r["call_uuid"] for r in listed] == ["new-call", "mid-call", "old-call"]
    first = listed[0]
    assert first["x_headers"]["X-Caller-Number"] == "+442079999999"
    assert first["transfers"][0]["target"] == "800"
    assert first["a_packets"] == 3000 and "ladder" not in first


async def test_filters(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = ["--db", str(database), "--json"]
    recent = _json(capsys, ["calls", "--since", "1h", *db])
    assert [r["call_uuid"] for r in recent] == ["new-call", "mid-call"]
    london = _json(capsys, ["calls", "--caller", "+4420", *db])
    assert [r["call_uuid"] for r in london] == ["new-call", "old-call"]
    both = _json(capsys, ["calls", "--caller", "+4420", "--since", "30m", *db])
    assert [r["call_uuid"] for r in both] == ["new-call"]
    one = _json(capsys, ["calls", "--limit", "1", *db])
    assert [r["call_uuid"] for r in one] == ["new-call"]
    assert _json(capsys, ["calls", "--caller", "+33", *db]) == []


async def test_text_list(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calls", "--db", str(database)]) == cli.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("started")
    assert [line.split()[-1] for line in lines[1:]] == ["new-call", "mid-call", "old-call"]


async def test_show_prints_the_record_and_its_ladder(
    database: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["calls", "show", "mid-call", "--db", str(database)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("call          mid-call\n")
    assert "3CX" in out and "Retell" in out and "|" in out
    assert "INVITE sip:+14155550100@127.0.0.23" in out
    # options before `show` count too; a prefix names one call
    shown = _json(capsys, ["calls", "--json", "--db", str(database), "show", "new"])
    assert isinstance(shown, dict) and shown["call_uuid"] == "new-call"
    assert len(shown["ladder"]) == 3


async def test_show_an_unknown_call(database: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calls", "show", "nope", "--db", str(database)]) == cli.EXIT_FAILURE
    assert "no call record 'nope'" in capsys.readouterr().err


def test_a_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "none.sqlite3"
    assert cli.main(["calls", "--db", str(missing)]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"call records {missing}: no such file\n"


def test_a_bad_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["calls", "--since", "yesterday", "--db", str(tmp_path)]) == cli.EXIT_CONFIG
    assert "--since: expected a duration" in capsys.readouterr().err


async def test_the_database_named_by_the_settings_file(
    database: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = tmp_path / "sbc.toml"
    # Only [records] is read: the file may lack the secrets (no pbx.password here).
    config.write_text(f'[pbx]\nhost = "x"\n[records]\npath = "{database}"\n')
    listed = _json(capsys, ["calls", "--json", "--config", str(config)])
    assert len(listed) == 3
    monkeypatch.setenv("SBC_CONFIG", str(config))
    assert len(_json(capsys, ["calls", "--json"])) == 3
    # relative: to the state directory
    monkeypatch.setenv("STATE_DIRECTORY", str(database.parent))
    config.write_text('[records]\npath = "calls.sqlite3"\n')
    assert len(_json(capsys, ["calls", "--json"])) == 3
    config.write_text('[records]\npath = ""\n')
    assert cli.main(["calls"]) == cli.EXIT_CONFIG
    assert "call records are off" in capsys.readouterr().err
    config.write_text("[records]\nqueue = 0\n")
    assert cli.main(["calls"]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.startswith("records.queue: ")


def test_database_path_resolution(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": str(tmp_path)}
    assert database_path(None, None, env) == tmp_path / "calls.sqlite3"
    assert database_path(None, None, {}) == DEFAULT_STATE_DIRECTORY / "calls.sqlite3"
    assert database_path(Path("/x.db"), None, env) == Path("/x.db")
    env["SBC_RECORDS__PATH"] = "/srv/records.db"
    assert database_path(None, None, env) == Path("/srv/records.db")
    with pytest.raises(UsageError, match="no such file"):
        database_path(None, tmp_path / "missing.toml", env)


def test_since() -> None:
    now = 1_000_000.0
    assert parse_since("1h", now) == now - 3600
    assert parse_since("90s", now) == now - 90
    assert parse_since("1h30m", now) == now - 5400
    assert parse_since("2d", now) == now - 2 * 86400
    assert parse_since("1w", now) == now - 7 * 86400
    assert parse_since("2024-05-01") == time.mktime((2024, 5, 1, 0, 0, 0, 0, 0, -1))
    assert parse_since("2024-05-01T14:30", now) == time.mktime((2024, 5, 1, 14, 30, 0, 0, 0, -1))
    for bad in ("", "h", "1x", "soon"):
        with pytest.raises(UsageError):
            parse_since(bad, now)


# -- settings -------------------------------------------------------------------------------------


def test_records_settings_defaults_and_where_the_file_goes(tmp_path: Path) -> None:
    records = RecordsSettings()
    assert (records.keep_days, records.queue, records.ladder_messages) == (90, 10_000, 200)
    assert records.database({}) == Path("/var/lib/sbc/calls.sqlite3")
    systemd = {"STATE_DIRECTORY": f"{tmp_path}:/var/lib/other"}
    assert records.database(systemd) == tmp_path / "calls.sqlite3"
    assert state_directory(systemd) == tmp_path
    assert RecordsSettings(path="").database(systemd) is None
    assert RecordsSettings(path="sub/c.db").database(systemd) == tmp_path / "sub" / "c.db"
    assert RecordsSettings(path="/srv/c.db").database(systemd) == Path("/srv/c.db")


def test_records_settings_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "sbc.toml"
    path.write_text(SETTINGS + '[records]\npath = "/srv/calls.db"\nkeep_days = 30\n')
    settings = load_settings(path, env={"SBC_RECORDS__QUEUE": "50"})
    assert settings.records == RecordsSettings(path="/srv/calls.db", keep_days=30, queue=50)
    bad = SETTINGS + "[records]\nqueue = 0\nladder_messages = -1\nkeep_days = -2\n"
    path.write_text(bad)
    with pytest.raises(Exception, match=r"records\.queue") as raised:
        load_settings(path, env={})
    problems = getattr(raised.value, "problems", ())
    assert {p.split(":")[0] for p in problems} == {
        "records.queue",
        "records.ladder_messages",
        "records.keep_days",
    }


def test_sip_trace_follows_the_level_unless_set() -> None:
    assert not LogSettings().trace_sip
    assert LogSettings(level="debug").trace_sip
    assert not LogSettings(level="debug", sip_trace=False).trace_sip
    assert LogSettings(level="info", sip_trace=True).trace_sip
