"""bench/bench_bridge.py still bridges its calls: sbc in process between the hand-written 3CX
(UDP) and Retell (TCP) of the bench, every call answered and hung up, none left active."""

from __future__ import annotations

import io
import sys

import pytest

from tests.scripts import BENCH, bench_script

pytestmark = pytest.mark.integration


async def test_the_bench_bridges_its_calls(capsys: pytest.CaptureFixture[str]) -> None:
    bench = bench_script("bench_bridge.py")  # it puts bench/ on sys.path itself
    # run() raises when a call is not answered 200, its BYE not 200, or a call stays active.
    log = io.StringIO()
    await bench.run(calls=5, warmup=2, repeat=2, level="info", profile=True, log=log)
    out = capsys.readouterr().out
    assert out.count("function calls per call:") == 2
    assert "5 calls x 2 runs, log level info" in out
    assert str(BENCH) in sys.path
    # sbc logged each call at info (JSON lines), as `sbc run` does.
    assert log.getvalue().count('"event": "call_ended"') == 2 + 5 * 2
