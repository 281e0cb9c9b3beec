"""bench/tail_probe.py splits each call's post-dial delay and finds what its span overlapped."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.scripts import bench_script


def _probe_module() -> Any:
    return bench_script("tail_probe.py")


def _entry(at: float, direction: str, leg: str, first_line: str) -> dict[str, object]:
    return {"at": at, "direction": direction, "leg": leg, "first_line": first_line}


def test_report_splits_before_inside_after_and_counts_overlaps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "caller").mkdir()
    (tmp_path / "answerer").mkdir()
    # Two calls: sent at 100.000 and 200.000 (SIPp's seconds and microseconds).
    (tmp_path / "caller" / "calls.log").write_text(
        "invite c1 100.000000 0.000000\nanswered c1 100.000000 9000.000000\n"
        "invite c2 200.000000 0.000000\n"
    )
    (tmp_path / "answerer" / "calls.log").write_text(
        "invite r1 c1 100.000000 4000.000000\ninvite r2 c2 200.000000 1500.000000\n"
    )
    db = sqlite3.connect(tmp_path / "calls.sqlite3")
    db.execute("CREATE TABLE calls (pbx_call_id TEXT, ladder TEXT)")
    ladders = {
        # c1: 1 ms before sbc, 2.5 ms inside (the 100 out first does not count), 0.5 after;
        # c2: 0.5, 0.5, 0.5
        "c1": [
            _entry(100.001, "in", "caller", "INVITE sip:101@sbc"),
            _entry(100.0015, "out", "caller", "SIP/2.0 100 Trying"),
            _entry(100.0035, "out", "agent", "INVITE sip:+1415@retell"),
        ],
        "c2": [
            _entry(200.0005, "in", "caller", "INVITE sip:101@sbc"),
            _entry(200.001, "out", "agent", "INVITE sip:+1415@retell"),
        ],
    }
    for call_id, ladder in ladders.items():
        db.execute("INSERT INTO calls VALUES (?, ?)", (call_id, json.dumps(ladder)))
    db.commit()
    db.close()
    probe = tmp_path / "probe.json"
    # A records batch during c1 only, a collection long before both.
    probe.write_text(json.dumps([["records", 100.002, 0.001, 0.0009], ["gc1", 99.5, 0.0002, 0]]))
    _probe_module().report(tmp_path, probe)
    out = capsys.readouterr().out
    assert "2 calls" in out
    lines = {line.split("(")[0].strip(): line for line in out.splitlines() if "p50" in line}
    assert "p99   2.500" in lines["inside sbc"]  # c1's 2.5 ms is the larger
    assert "p99   1.000" in lines["before sbc"]  # c1's 1 ms (c2's 0.5)
    assert "p99   0.500" in lines["after sbc"]  # c1's and c2's
    assert "p99   4.000" in lines["post-dial"]
    shares = {line.split()[0]: line for line in out.splitlines() if line.endswith("%")}
    assert shares["records"].split() == ["records", "100.0", "%", "/", "50.0", "%"]
    assert shares["gc1"].split() == ["gc1", "0.0", "%", "/", "0.0", "%"]
