"""bench/gc_pauses.py times the collections of an ``sbc`` it runs, with the threshold asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sbc.ops import cli
from tests.scripts import bench_script

ROOT = Path(__file__).resolve().parents[2]


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, GC_PAUSES_OUT=str(out), PYTHONPATH=str(ROOT), **extra)
    # the wrapper runs "python" from PATH: this interpreter's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_wrapper_runs_sbc_and_writes_each_collection(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ROOT / "bench" / "gc_python.sh"), "-m", "sbc", "--help"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: sbc" in done.stdout
    [dump] = tmp_path.glob("sbc-gc.*.json")
    log = json.loads(dump.read_text())
    assert log, "importing sbc allocates enough for collections"
    for generation, seconds, collected, at in log:
        assert generation in (0, 1, 2)
        assert 0 <= seconds < 5 and collected >= 0 and at > 0


def test_threshold_override_is_what_tune_gc_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    module = bench_script("gc_pauses.py")
    monkeypatch.setattr(cli, "GC_THRESHOLD", cli.GC_THRESHOLD)  # restored after the test
    module.set_threshold("7,3,11")
    assert cli.GC_THRESHOLD == (7, 3, 11)


def test_report_gives_each_generation(tmp_path: Path) -> None:
    dump = tmp_path / "sbc-gc.1.json"
    dump.write_text(json.dumps([[0, 0.001, 0, 1.0], [0, 0.003, 2, 2.0], [1, 0.010, 5, 3.0]]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gc_pauses.py"), "report", str(dump)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "generation 0: 2 collections, median 2.00" in lines[1]
    assert "max 3.00 ms, total 0.004 s" in lines[1]
    assert "generation 1: 1 collections, median 10.00" in lines[2]
    assert len(lines) == 3
