"""bench/load.py in its quickest mode against sbc: keeps the load harness from rotting.

A real ``sbc run`` between SIPp as 3CX and SIPp as Retell (the scenarios of
``sip-fixtures/load/``), a few calls per phase at 10-40 calls/s: the ramp step must pass the
load rule, every call must have ended at both SIPp ends (the answerer only counts a call once
the B2BUA relayed its BYE), and the held and memory phases must report their figures.
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
    report = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--systems", "sbc", "--json", str(report)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    figures = json.loads(report.read_text())
    assert figures["failed"] == []

    (step,) = figures["steps"]
    assert step["system"] == "sbc" and step["rate"] == 10.0
    assert step["passed"], step["why_failed"]
    both_ends_match(step)
    assert step["offered"] == 20
    # Every call's INVITE was seen leaving the caller and reaching the far end, in that order.
    assert step["post_dial_samples"] == step["invite_200_samples"] == 20
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
    assert summary["max_rate"] == 10.0
    assert summary["held_calls"] == 40
    assert "| highest rate passed, calls/s | 10 |" in done.stdout
