"""bench/load.py in its quickest mode against sbc: keeps the load harness from rotting.

A real ``sbc run`` between SIPp as 3CX and SIPp as Retell (the scenarios of
``sip-fixtures/load/``), a few calls per phase at 5-40 calls/s: the ramp steps (and the one
added at half the highest rate) must pass the load rule, every call must have ended at both
SIPp ends (the answerer only counts a call once the B2BUA relayed its BYE), the held and
memory phases must report their figures, the relay phase must relay 20 calls' RTP through the
built-in relay and rtpengine without loss, and the targets table must list every target of
issue 12 with this run's figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from peers import require_binary

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "load.py"


def both_ends_match(result: dict[str, Any]) -> None:
    offered = result["offered"]
    assert result["caller_exit"] == 0 and result["answerer_exit"] == 0, result
    assert result["caller_ok"] == result["answerer_ok"] == offered, result
    assert result["caller_failed"] == result["answerer_failed"] == 0, result


def test_quick_load_run_passes_against_sbc(tmp_path: Path) -> None:
    require_binary("sipp")
    require_binary("rtpengine")
    report = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--systems", "sbc", "--json", str(report)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    figures = json.loads(report.read_text())
    assert figures["failed"] == []

    # 10/s with TCP out, then again at half the highest rate passed (the post-dial target's
    # rate, which the ramp did not have).
    steps = figures["steps"]
    assert [(s["label"], s["sbc_out"], s["rate"]) for s in steps] == [
        ("sbc", "tcp", 10.0),
        ("sbc", "tcp", 5.0),
    ]
    for step in steps:
        assert step["system"] == "sbc"
        assert step["passed"], step["why_failed"]
        both_ends_match(step)
        offered = round(step["rate"] * 2)
        assert step["offered"] == offered
        # Every call's INVITE was seen leaving the caller and reaching the far end, in order.
        assert step["post_dial_samples"] == step["invite_200_samples"] == offered
        assert 0 < step["post_dial_ms_p50"] <= step["post_dial_ms_p99"]
        assert step["cpu_seconds"] > 0

    hold = figures["hold"]["sbc"]
    assert hold["passed"]
    both_ends_match(hold)
    assert hold["sampled_while_held"]
    assert hold["calls_active_metric"] == hold["calls"] == 40  # all up at once when sampled

    memory = figures["memory"]["sbc"]
    assert memory["passed"]
    both_ends_match(memory)

    summary = figures["summary"]["sbc"]
    assert summary["max_rate"] == 10.0 and summary["sbc_out"] == "tcp"
    assert summary["half_rate"] == 5.0 and summary["half_rate_exact"]
    assert summary["half_post_dial_ms_p99"] == steps[1]["post_dial_ms_p99"]
    assert summary["held_calls"] == 40
    assert "| highest rate passed, calls/s | 10 |" in done.stdout

    # The relay phase: 20 calls of G.711-shaped RTP for 1 s, 50 packets/s each way per call,
    # straight between the generator's ends, then through each backend: none lost.
    relay = figures["relay"]
    assert relay["steps"] == [20]
    runs = {r["backend"]: r for r in relay["results"]}
    assert set(runs) == {"direct", "relay", "rtpengine"}
    for name, run in runs.items():
        assert run["calls"] == 20 and run["sent"] == 2 * 50 * 20, name
        assert run["received"] == run["sent"] and run["lost"] == 0, name
    assert runs["relay"]["relay_counters"]["packets"] == runs["relay"]["sent"]
    assert runs["relay"]["relay_counters"]["dropped"] == 0
    assert runs["relay"]["added_p99_us"] == runs["relay"]["p99_us"] - runs["direct"]["p99_us"]

    # The targets table: every target, in order, with this run's figure. At these sizes the
    # rate and held-calls targets cannot be met; the linger was skipped (--quick).
    verdicts = {t["target"]: t["passed"] for t in figures["targets"]}
    assert list(verdicts) == [
        "rate >= 1,000 calls/s (UDP in -> TCP out)",
        "CPU per call <= 0.9 ms at that rate",
        "post-dial p99 added < 5 ms at half that rate",
        "retained per completed call <= 8 KiB (timers running)",
        "RSS back to idle + 5 % after the timers",
        "held calls >= 20,000, < 16 KiB RSS each, none failed",
        "UDP -> UDP rate no lower than UDP -> TCP",
        "relay: 500 calls, zero loss, p99 added < 1 ms",
        "relay capacity >= 0.5 x rtpengine's (same criterion)",
    ]
    assert verdicts["rate >= 1,000 calls/s (UDP in -> TCP out)"] is False
    assert verdicts["CPU per call <= 0.9 ms at that rate"] is False
    assert verdicts["held calls >= 20,000, < 16 KiB RSS each, none failed"] is False
    assert verdicts["RSS back to idle + 5 % after the timers"] is None
    assert verdicts["UDP -> UDP rate no lower than UDP -> TCP"] is None  # TCP out only
    assert verdicts["relay: 500 calls, zero loss, p99 added < 1 ms"] is False  # only 20 run
    assert "| target | this run | result |" in done.stdout
    assert (
        "| rate >= 1,000 calls/s (UDP in -> TCP out) "
        "| 10 calls/s (every step passed: the ceiling is higher) | FAIL |"
    ) in done.stdout
