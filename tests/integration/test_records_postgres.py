"""Call records in a real PostgreSQL server (``pg_server``: Debian's binaries, a temporary data
directory, a loopback port):

* two ``sbc run`` instances, each with its own 3CX registrar, caller and Retell (SIPp), write
  their calls' records to one database; ``sbc calls --json`` lists both instances' calls, and
  neither instance's log nor ``sbc config show`` has the database password in it;
* a database that cannot be reached at all (a closed port): the writer starts, counts every
  record as failed, logs the outage once; ``sbc calls`` says so without the password;
* the writer in-process: the table created once by two writers starting together, a row read
  back as SQLite gives it, pruning (``keep_days``), a server down at start and lost mid-run
  (records counted as failed, one log line per outage, reconnected after the backoff), a
  server restarted while the writer was idle (no record lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from bridge_helpers import EXTENSION, HEADERS, PBX, RETELL, RETELL_NUMBER, SBC
from peers import free_port
from pg_server import PASSWORD, PostgresServer, postgres_server
from sbc_process import REPO, running_sbc_process
from sipp_helpers import Sipp, start_sipp

from sbc.ops import cli
from sbc.ops.records import COLUMNS, SCHEMA_VERSION, RecordWriter, find_call, list_calls
from sbc.ops.records import connect_readonly as sqlite_readonly
from sbc.ops.records_pg import PostgresRecordWriter, connect_readonly
from sbc.ops.settings import redact_url
from tests.unit.test_records import make_record

pytestmark = pytest.mark.integration

CALLS = 8  # per instance
DAY = 86_400.0
SECRET = "pw-Hunter9"
NOW = 1_750_000_000.0


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    with postgres_server() as running:
        yield running


# -- two sbc instances, one database --------------------------------------------------------------


def _settings(
    server: PostgresServer, instance: str, port: int, registrar: int, retell: int
) -> dict[str, dict[str, Any]]:
    url = server.url_with_password if instance == "sbc-b" else server.url
    return {
        "sip": {"bind": SBC, "port": port, "t1": 0.25, "t2": 2.0},
        "pbx": {
            "host": PBX,
            "port": registrar,
            "extension": EXTENSION,
            "auth_id": "6001auth",
            "password": "secret",
            "trusted": [f"{PBX}/32"],
            "keepalive": "off",
        },
        "retell": {"host": RETELL, "port": retell, "number": RETELL_NUMBER},
        "headers": HEADERS,
        "calls": {"country_code": "44", "max_concurrent": 50},
        "media": {"mode": "passthrough"},
        "admin": {"listen": f"{SBC}:{free_port(SBC)}"},
        "records": {"url": url, "instance": instance},
        "log": {"format": "json"},
    }


async def _run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_two_instances_write_to_one_database_and_sbc_calls_lists_both(
    server: PostgresServer, tmp_path: Path
) -> None:
    peers: list[Sipp] = []
    try:
        instances = []
        for name in ("sbc-a", "sbc-b"):
            registrar_port, retell_port, port = free_port(PBX), free_port(RETELL), free_port(SBC)
            registrar = await start_sipp(
                "pbx_registrar.xml",
                workdir=tmp_path,
                local_ip=PBX,
                port=registrar_port,
                time_limit=60,
            )
            far = await start_sipp(
                "retell_uas.xml",
                workdir=tmp_path,
                local_ip=RETELL,
                port=retell_port,
                transport="t1",
                calls=CALLS,
                time_limit=60,
            )
            peers += [registrar, far]
            await far.wait_listening()
            instances.append(
                (name, port, _settings(server, name, port, registrar_port, retell_port))
            )

        # sbc-a's password from the environment, sbc-b's in its URL (sbc-a's URL has none).
        env = {"SBC_RECORDS__PASSWORD": PASSWORD}
        async with (
            running_sbc_process(tmp_path, instances[0][2], env=env) as a,
            running_sbc_process(tmp_path, instances[1][2]) as b,
        ):
            for sbc in (a, b):
                await sbc.wait_event("registered", 30)
            opened = [await sbc.wait_event("call_records_opened", 5) for sbc in (a, b)]
            assert [line["path"] for line in opened] == [
                server.url,
                server.url.replace("sbc@", "sbc:***@"),
            ]
            assert [(line["instance"], line["connected"]) for line in opened] == [
                ("sbc-a", True),
                ("sbc-b", True),
            ]
            callers = []
            for _name, port, _ in instances:
                caller = await start_sipp(
                    "pbx_caller.xml",
                    workdir=tmp_path,
                    local_ip=PBX,
                    remote=f"{SBC}:{port}",
                    calls=CALLS,
                    time_limit=60,
                    extra=("-s", EXTENSION, "-r", "10", "-d", "200"),
                )
                peers.append(caller)
                callers.append(caller)
            for caller in callers:
                result = await caller.finish(60)
                assert result.successful == CALLS, result
            for sbc in (a, b):
                sbc.process.terminate()  # SIGTERM: drain, write what is queued, exit
            for sbc in (a, b):
                assert await sbc.wait_exit(30) == 0, sbc.log_text()[-3000:]
                closed = sbc.events("call_records_closed")
                assert closed and (closed[0]["written"], closed[0]["failed"]) == (CALLS, 0)
                assert PASSWORD not in sbc.log_text()

        environ = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
        environ["PYTHONPATH"] = str(REPO)
        config_a = a.config
        # sbc calls, with the settings file of sbc-a (its password from the environment)
        argv = (sys.executable, "-m", "sbc", "calls", "--json", "--limit", "100")
        code, listed, err = await _run(*argv, "--config", str(config_a), env={**environ, **env})
        assert code == 0, err
        rows = json.loads(listed)
        assert len(rows) == 2 * CALLS
        by_instance: dict[str, int] = {}
        for row in rows:
            by_instance[row["instance"]] = by_instance.get(row["instance"], 0) + 1
        assert by_instance == {"sbc-a": CALLS, "sbc-b": CALLS}
        assert {r["end_reason"] for r in rows} == {"pbx_bye"}
        assert all(r["x_headers"]["X-Called"] == EXTENSION for r in rows)
        assert [r["started"] for r in rows] == sorted((r["started"] for r in rows), reverse=True)
        # the text list: a column for the instance, both there
        code, text, err = await _run(*argv[:4], "--config", str(config_a), env={**environ, **env})
        assert code == 0, err
        lines = text.splitlines()
        assert lines[0].split()[-2:] == ["instance", "call_uuid"]
        assert {line.split()[-2] for line in lines[1:]} == {"sbc-a", "sbc-b"}
        # ... and `calls show` with the ladder of both legs, read from PostgreSQL
        code, shown, err = await _run(
            *argv[:4], "show", rows[0]["call_uuid"], "--json", "--config", str(config_a),
            env={**environ, **env},
        )  # fmt: skip
        assert code == 0, err
        assert {e["leg"] for e in json.loads(shown)["ladder"]} == {"caller", "agent"}
        # without the password the database refuses; the message does not show one
        code, _, err = await _run(*argv, "--config", str(b.config), env=environ)
        assert code == 0  # sbc-b's URL carries it
        code, _, err = await _run(*argv, "--config", str(config_a), env=environ)
        assert code == 1 and "password" in err and PASSWORD not in err
        # config show hides the password of sbc-b's URL
        code, shown, err = await _run(
            sys.executable, "-m", "sbc", "config", "show", "--config", str(b.config), env=environ
        )
        assert code == 0, err
        assert PASSWORD not in shown
        assert f'url = "{server.url.replace("sbc@", "sbc:***@")}"' in shown
    finally:
        for sipp in peers:
            with contextlib.suppress(Exception):
                await sipp.stop(grace=1.0)


# -- the writer in-process ------------------------------------------------------------------------


def writer_for(server: PostgresServer, **kwargs: Any) -> PostgresRecordWriter:
    return PostgresRecordWriter(server.url, password=PASSWORD, wall_clock=lambda: NOW, **kwargs)


def read(server: PostgresServer) -> list[dict[str, Any]]:
    db = connect_readonly(server.url, PASSWORD)
    try:
        return list_calls(db, limit=1000, ladder=True)
    finally:
        db.close()


async def test_schema_created_once_and_rows_read_back_like_sqlite(
    server: PostgresServer, tmp_path: Path
) -> None:
    writers = [writer_for(server, instance=f"w{i}") for i in range(3)]
    await asyncio.gather(*(w.start() for w in writers))  # three at once: one creates the table
    record = make_record("u-1")
    assert await writers[0].write(record)
    assert await writers[1].write(make_record("u-2", started=NOW + 1))
    assert await writers[2].write(record)  # the same call_uuid again replaces the row
    for w in writers:
        await w.close()
    rows = read(server)
    assert [r["call_uuid"] for r in rows] == ["u-2", "u-1"]
    assert list(rows[0]) == [c for c in COLUMNS if c != "ladder_packed"]  # read: one ladder
    assert rows[1]["instance"] == "w2" and rows[0]["instance"] == "w1"
    # the same record, as SQLite stores and reads it
    sqlite_writer = RecordWriter(tmp_path / "calls.sqlite3", instance="w2")
    await sqlite_writer.start()
    await sqlite_writer.write(record)
    await sqlite_writer.close()
    lite = sqlite_readonly(tmp_path / "calls.sqlite3")
    expected = find_call(lite, "u-1")
    lite.close()
    assert rows[1] == expected
    db = connect_readonly(server.url, PASSWORD)
    assert find_call(db, "u-") is None  # two calls
    found = find_call(db, "u-1")
    version = db.execute("SELECT version FROM sbc_schema").fetchall()
    with pytest.raises(Exception, match="read-only"):
        db.execute("DELETE FROM calls")
    db.close()
    assert found == expected
    assert version == [{"version": SCHEMA_VERSION}]


async def test_pruning_deletes_old_rows(server: PostgresServer) -> None:
    writer = writer_for(server, keep_days=90)
    await writer.start()
    await writer.write(make_record("ancient", started=NOW - 200 * DAY))
    await writer.write(make_record("recent", started=NOW - 10 * DAY))
    assert await writer.prune() == 1
    await writer.close()
    assert [r["call_uuid"] for r in read(server)] == ["recent"]


async def test_a_database_down_at_start_and_lost_mid_run_stops_nothing(
    server: PostgresServer,
) -> None:
    server.stop()
    clock = [0.0]
    writer = writer_for(server, retry_min=1.0, retry_max=4.0, monotonic=lambda: clock[0])
    with structlog.testing.capture_logs() as logs:
        await writer.start()  # no server: starts all the same
        assert not writer.connected
        assert await writer.write_many([make_record("a"), make_record("b")]) == [False, False]
        clock[0] = 1.5  # past the first retry: the connection is tried, and fails again
        assert not await writer.write(make_record("c"))
        assert writer.failed == 3 and writer.outages == 1
        server.start()
        assert not await writer.write(make_record("d"))  # backoff: 2 s after the last try
        clock[0] = 4.0
        assert await writer.write(make_record("e"))  # reconnected
        assert writer.connected
        server.stop()  # lost mid-run
        assert not await writer.write(make_record("f"))
        assert not await writer.write(make_record("g"))  # within the backoff: fails at once
        server.start()
        clock[0] = 6.0
        assert await writer.write_many([make_record("h"), make_record("i")]) == [True, True]
        await writer.close()
    events = [line["event"] for line in logs]
    assert events.count("call_records_unavailable") == 2  # one per outage
    assert events.count("call_records_reconnected") == 2
    assert events.count("call_record_write_failed") == 2  # the writer's, one per run of failures
    assert (writer.written, writer.failed, writer.outages) == (3, 6, 2)
    reconnected = [line for line in logs if line["event"] == "call_records_reconnected"]
    assert [line["failed"] for line in reconnected] == [4, 2]
    assert all(PASSWORD not in str(line) for line in logs)
    assert sorted(r["call_uuid"] for r in read(server)) == ["e", "h", "i"]


# -- no server at all (a closed loopback port) ---------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sbc_calls_reports_an_unreachable_database_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "sbc.toml"
    url = f"postgresql://sbc:{SECRET}@127.0.0.1:{closed_port()}/x"
    config.write_text(f'[records]\nurl = "{url}"\n')
    assert cli.main(["calls", "--config", str(config)]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith("call records postgresql://sbc:***@127.0.0.1:") and SECRET not in err


async def test_an_unreachable_database_stops_no_start_and_counts_every_record() -> None:
    clock = [0.0]
    url = f"postgresql://sbc:{SECRET}@127.0.0.1:{closed_port()}/x"
    writer = PostgresRecordWriter(url, monotonic=lambda: clock[0], retry_min=1.0, retry_max=4.0)
    with structlog.testing.capture_logs() as logs:
        await writer.start()  # sbc starts all the same
        assert not writer.connected
        for second in range(10):  # tries at 1, 3, 7 (backoff 1, 2, 4); fails every record
            clock[0] = float(second)
            assert await writer.write_many([make_record(f"a{second}"), make_record("b")]) == [
                False,
                False,
            ]
        assert await writer.prune() == 0  # nothing to prune, and no second error line
        await writer.close()
    assert (writer.written, writer.failed, writer.outages) == (0, 20, 1)
    events = [line["event"] for line in logs]
    assert events.count("call_records_unavailable") == 1
    assert events.count("call_record_write_failed") == 1
    assert "call_records_prune_failed" not in events
    assert writer._retry_at == 7.0 + 4.0
    (opened,) = [line for line in logs if line["event"] == "call_records_opened"]
    assert opened["connected"] is False
    (unavailable,) = [line for line in logs if line["event"] == "call_records_unavailable"]
    assert unavailable["path"] == redact_url(url)
    assert all(SECRET not in str(line) for line in logs)


async def test_a_server_restarted_between_calls_loses_no_record(server: PostgresServer) -> None:
    writer = writer_for(server)
    await writer.start()
    assert await writer.write(make_record("a"))
    server.stop()  # the writer's connection dies while it is idle
    server.start()
    with structlog.testing.capture_logs() as logs:
        assert await writer.write(make_record("b"))  # a new connection takes the batch
    await writer.close()
    assert (writer.written, writer.failed, writer.outages) == (2, 0, 1)
    events = [(line["event"], line.get("failed")) for line in logs]
    assert events == [("call_records_unavailable", None), ("call_records_reconnected", 0)]
    assert sorted(r["call_uuid"] for r in read(server)) == ["a", "b"]
