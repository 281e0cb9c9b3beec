"""bench/bench_held_service.py still holds its calls: the whole service in process between the
bench's hand-written 3CX and Retell, every call answered and held, the held bytes read twice
(transactions alive, then ended), then every call hung up and seen ended at Retell."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from tests.scripts import bench_script

pytestmark = pytest.mark.integration


async def test_the_bench_holds_its_calls_and_reads_what_they_keep(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = bench_script("bench_held_service.py")
    args = argparse.Namespace(
        calls=5, warmup=1, top=3, frames=1, t1=0.05, set=[], rss=False, log_level="info"
    )
    log = io.StringIO()
    # run() raises when a call is not answered 200, fewer calls are up than placed, a BYE is
    # not answered 200 or Retell did not see each INVITE, ACK and BYE.
    await bench.run(args, log)
    out = capsys.readouterr().out
    held = [int(n) for n in re.findall(r"(\d+) bytes per held call \(5 calls", out)]
    assert len(held) == 2 and all(n > 0 for n in held)
    assert out.count("B/call") >= 6  # the sites that keep most, and by file
    assert log.getvalue().count('"event": "call_ended"') == 1 + 5
