"""Call records under load, end to end: SIPp "3CX" calling through a real sbc to SIPp "Retell"
(``bridge_helpers``), with the records database deliberately slowed.

* 200 short calls at 40 calls/s while every row takes 30 ms to write (slower than calls end):
  no call fails or waits (INVITE to 200 as fast as usual, read from each call's ladder), and
  after the stop every call has its row (the queue was big enough: nothing dropped);
* the same with a queue of 3: records are dropped, counted and logged, and still no call fails;
* a real ``sbc run`` process killed with SIGKILL in the middle of such a load leaves a database
  that passes ``PRAGMA integrity_check`` and that ``sbc calls --json`` reads;
* ``sbc calls show`` draws the ladder of both legs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from bridge_helpers import (
    EXTENSION,
    HEADERS,
    PBX,
    RETELL,
    RETELL_NUMBER,
    SBC,
    Bridge,
    assert_both_ends,
    pbx_call,
    retell,
    running_bridge,
)
from peers import free_port
from sipp_helpers import start_sipp

from sbc.b2bua.events import CallRecord
from sbc.ops import cli
from sbc.ops.records import RecordWriter, connect_readonly, find_call, list_calls
from sbc.ops.settings import RecordsSettings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CALLS = 200
RATE = "40"  # calls per second
ROW_DELAY = 0.03  # seconds each row takes: ~33 rows/s, fewer than the calls that end


def throttle(writer: RecordWriter, delay: float = ROW_DELAY) -> list[float]:
    """Make every row take ``delay`` seconds more (in the writer's thread, as a slow disk
    would); returns the list of write durations, filled as rows are written."""
    real_insert = writer._insert_many
    took: list[float] = []

    def slow_insert(records: list[CallRecord]) -> None:
        began = time.perf_counter()
        time.sleep(delay * len(records))
        real_insert(records)
        took.extend([(time.perf_counter() - began) / len(records)] * len(records))

    writer._insert_many = slow_insert  # type: ignore[method-assign]
    return took


def setup_times(records: list[dict[str, Any]]) -> list[float]:
    """Seconds sbc itself spent setting up each call (from the call's ladder): the PBX's INVITE
    reaching sbc to sbc's INVITE leaving for Retell, plus Retell's 200 reaching sbc to sbc's
    200 leaving for the PBX. Not the time Retell takes to answer: the far end here is SIPp,
    which once sent a 200 9.7 s after its own 180 with nothing asked of it in between."""

    def first(ladder: list[dict[str, Any]], leg: str, direction: str, line: str) -> float:
        return float(
            next(
                e["at"]
                for e in ladder
                if e["leg"] == leg
                and e["direction"] == direction
                and e["first_line"].startswith(line)
                and e["cseq"].endswith("INVITE")
            )
        )

    times = []
    for record in records:
        ladder = record["ladder"]
        forwarded = first(ladder, "agent", "out", "INVITE")
        forwarded -= first(ladder, "caller", "in", "INVITE")
        relayed = first(ladder, "caller", "out", "SIP/2.0 200")
        relayed -= first(ladder, "agent", "in", "SIP/2.0 200")
        times.append(forwarded + relayed)
    return times


async def load(tmp_path: Path, bridge: Bridge) -> None:
    far = await retell(tmp_path, bridge, "retell_uas.xml", calls=CALLS)
    near = await pbx_call(
        tmp_path, bridge, "pbx_caller.xml", calls=CALLS, extra=("-r", RATE, "-d", "200")
    )
    assert_both_ends("3CX", await near.finish(90), near, CALLS)
    assert_both_ends("Retell", await far.finish(30), far, CALLS)
    await bridge.settled()


def read_all(path: Path) -> list[dict[str, Any]]:
    db = connect_readonly(path)
    try:
        return list_calls(db, limit=10 * CALLS, ladder=True)
    finally:
        db.close()


async def test_a_slow_disk_loses_no_call_and_blocks_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "calls.sqlite3"
    records = RecordsSettings(path=str(path), queue=10_000)
    async with running_bridge(tmp_path, records=records, max_concurrent=CALLS) as bridge:
        service = bridge.service
        writer = service.records
        assert writer is not None
        took = throttle(writer)
        began = time.perf_counter()
        await load(tmp_path, bridge)
        calls_done = time.perf_counter() - began
        behind = CALLS - writer.written  # rows still queued when the last call ended
        stopping = time.perf_counter()
    stopped = time.perf_counter() - stopping  # flushing the queue is part of the stop
    assert behind > 0, "the throttled writer should have been behind the calls"
    assert (writer.written, writer.failed, writer.dropped) == (CALLS, 0, 0)
    assert service.bridge.events.dropped == 0
    rows = read_all(path)
    assert len(rows) == CALLS
    assert len({r["call_uuid"] for r in rows}) == CALLS
    assert {r["end_reason"] for r in rows} == {"pbx_bye"}
    assert {r["hung_up_by"] for r in rows} == {"pbx"}
    assert {(r["pbx_status"], r["retell_status"]) for r in rows} == {(200, 200)}
    assert all(r["x_headers"]["X-Called"] == EXTENSION for r in rows)
    assert all({e["leg"] for e in r["ladder"]} == {"caller", "agent"} for r in rows)
    setup = setup_times(rows)
    # sbc's share of a call's set-up is a few milliseconds when the disk keeps up; a call waiting
    # for a row to be written would take at least ROW_DELAY.
    assert statistics.median(setup) < ROW_DELAY, statistics.median(setup)
    assert max(setup) < 0.5, max(setup)
    with capsys.disabled():
        print(
            f"\n{CALLS} calls at {RATE}/s in {calls_done:.1f} s with rows taking "
            f"{statistics.median(took) * 1000:.0f} ms each: sbc's set-up time median "
            f"{statistics.median(setup) * 1000:.1f} ms, p95 "
            f"{sorted(setup)[int(0.95 * len(setup))] * 1000:.1f} ms, max "
            f"{max(setup) * 1000:.1f} ms; {behind} rows still queued at the last call, "
            f"written during the stop ({stopped:.1f} s); all {len(rows)} rows present"
        )

    # `sbc calls show` draws both legs of a call.
    uuid = rows[0]["call_uuid"]
    assert cli.main(["calls", "show", uuid, "--db", str(path)]) == cli.EXIT_OK
    shown = capsys.readouterr().out
    lanes = shown.split("\n\n", 1)[1].splitlines()
    assert lanes[0].split() == ["time", "3CX", "sbc", "Retell"]
    arrows = [line for line in lanes[2:] if "|" in line]
    assert any("INVITE" in line and line.index("INVITE") < line.index("|", 15) for line in arrows)
    assert any("INVITE" in line and line.index("INVITE") > line.index("|", 15) for line in arrows)
    assert sum("  BYE sip:" in line for line in arrows) == 2  # the PBX's, and sbc's to Retell
    assert any(f"INVITE sip:{RETELL_NUMBER}@{RETELL}" in line for line in arrows)


async def test_a_tiny_queue_drops_records_counted_and_logged_never_calls(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    records = RecordsSettings(path=str(path), queue=3)
    with structlog.testing.capture_logs() as logs:
        async with running_bridge(tmp_path, records=records, max_concurrent=CALLS) as bridge:
            service = bridge.service
            writer = service.records
            assert writer is not None
            throttle(writer)
            await load(tmp_path, bridge)
    dropped = writer.dropped
    assert dropped > 0 and writer.failed == 0
    assert service.bridge.events.dropped == dropped  # the metrics' own queue dropped nothing
    assert writer.written + dropped == CALLS
    assert len(read_all(path)) == writer.written
    events = [line["event"] for line in logs]
    assert "call_event_dropped" in events  # logged on the first drop of each run of drops
    closing = [line for line in logs if line["event"] == "call_records_dropped"]
    assert closing and closing[0]["dropped"] == dropped


# -- kill -9 of a real `sbc run` ------------------------------------------------------------------


def _toml(values: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{json.dumps(key)} = {json.dumps(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _wait_for_line(log: Path, event: str, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(15):
        while f'"event": "{event}"' not in _text(log):
            if process.returncode is not None:
                raise AssertionError(f"sbc exited {process.returncode}:\n{_text(log)[-3000:]}")
            await asyncio.sleep(0.05)  # polling a file another process writes


async def _run(*argv: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _rows(path: Path) -> int:
    try:
        db = connect_readonly(path)
    except Exception:
        return 0
    try:
        return int(db.execute("SELECT count(*) FROM calls").fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        db.close()


async def test_kill_9_during_load_leaves_a_readable_database(tmp_path: Path) -> None:
    path = tmp_path / "calls.sqlite3"
    registrar_port = free_port(PBX)
    registrar = await start_sipp(
        "pbx_registrar.xml", workdir=tmp_path, local_ip=PBX, port=registrar_port, time_limit=120
    )
    port, retell_port = free_port(SBC), free_port(RETELL)
    settings: dict[str, dict[str, Any]] = {
        "sip": {"bind": SBC, "port": port, "t1": 0.25, "t2": 2.0},
        "pbx": {
            "host": PBX,
            "port": registrar_port,
            "extension": EXTENSION,
            "auth_id": "6001auth",
            "password": "secret",
            "trusted": [f"{PBX}/32"],
            "keepalive": "off",
        },
        "retell": {"host": RETELL, "port": retell_port, "number": RETELL_NUMBER},
        "headers": HEADERS,
        "calls": {
            "country_code": "44",
            "passthrough_x_headers": ["X-Customer-*"],
            "max_concurrent": 400,
        },
        "media": {"mode": "passthrough"},
        "admin": {"listen": f"{SBC}:{free_port(SBC)}"},
        "records": {"path": str(path)},
        "log": {"format": "json"},
    }
    config = tmp_path / "sbc.toml"
    config.write_text(_toml(settings))
    log = tmp_path / "sbc.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
    env["PYTHONPATH"] = str(REPO)
    far = await start_sipp(
        "retell_uas.xml",
        workdir=tmp_path,
        local_ip=RETELL,
        port=retell_port,
        transport="t1",
        calls=1000,
        time_limit=120,
    )
    await far.wait_listening()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sbc", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=tmp_path,
        )  # fmt: skip
    near = None
    try:
        await _wait_for_line(log, "sip_engine_started", process)
        near = await start_sipp(
            "pbx_caller.xml",
            workdir=tmp_path,
            local_ip=PBX,
            remote=f"{SBC}:{port}",
            calls=1000,
            time_limit=120,
            extra=("-s", EXTENSION, "-r", RATE, "-d", "200"),
        )
        async with asyncio.timeout(30):
            while _rows(path) < 60:  # noqa: ASYNC110 (another process writes the database)
                await asyncio.sleep(0.05)  # polling a database another process writes
        process.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for sipp in (near, far, registrar):
            if sipp is not None:
                with contextlib.suppress(Exception):
                    await sipp.stop(grace=1.0)

    code, checked, err = await _run("sqlite3", str(path), "PRAGMA integrity_check;", env=env)
    assert (code, checked.strip()) == (0, "ok"), err
    argv = (sys.executable, "-m", "sbc", "calls", "--json", "--limit", "1000", "--db", str(path))
    code, listed, err = await _run(*argv, env=env)
    assert code == 0, err
    rows = json.loads(listed)
    assert len(rows) >= 60
    assert all(r["end_reason"] == "pbx_bye" and r["caller"] == "+442071234567" for r in rows)
    db = connect_readonly(path)
    one = find_call(db, rows[-1]["call_uuid"])
    db.close()
    assert one is not None and {e["leg"] for e in one["ladder"]} == {"caller", "agent"}
