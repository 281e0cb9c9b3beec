"""Bytes one held call keeps, in process: N calls answered and held through :class:`Call`
against the scripted engine of the unit tests (``tests/unit/call_harness.py``), measured with
tracemalloc; the same for N calls ended (BYE from the PBX) while the harness still holds them.

    python bench/bench_held.py --calls 500 [--top 15]

Reports bytes per held call (all allocations made while the calls were set up and still
alive, the scripted peers' own records included: they are the same for every version) and
the allocation sites that keep most, so a change to the call layer can be compared A/B.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import pathlib
import sys
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sbc.ops.logging import configure_logging
from tests.unit.call_harness import Harness


async def hold(calls: int, top: int, frames: int) -> None:
    warm = Harness(t1=0.5, t2=4.0, max_duration=3600.0)
    await warm.connect()
    gc.collect()
    tracemalloc.start(frames)
    before = tracemalloc.take_snapshot()
    base = tracemalloc.get_traced_memory()[0]
    harnesses = []
    for _ in range(calls):
        h = Harness(t1=0.5, t2=4.0, max_duration=3600.0, limit=30.0)
        await h.connect()
        # The engine forgets a transaction once its timers have run; the scripted engine keeps
        # every message it saw, so it forgets them here: what remains is what the call holds.
        for kept in (h.engine.handles, h.engine.to_pbx, h.engine.acks, h.engine.timeline):
            kept.clear()
        harnesses.append(h)
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    after = tracemalloc.take_snapshot()
    print(f"held: {held / calls:.0f} bytes per call ({calls} calls)")
    tasks = len(asyncio.all_tasks()) - 1
    timers = len(asyncio.get_running_loop()._scheduled)  # type: ignore[attr-defined]
    print(f"tasks alive per call: {tasks / calls:.2f}, timers per call: {timers / calls:.2f}")
    by_file = after.compare_to(before, "filename")
    for stat in by_file[:top]:
        print(f"  {stat.size_diff / calls:8.0f} B/call  {stat.traceback[0].filename}")
    by_line = after.compare_to(before, "lineno")
    for stat in by_line[:top]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / calls:8.0f} B/call  {frame.filename}:{frame.lineno}")
    if frames > 1:
        for stat in after.compare_to(before, "traceback")[:top]:
            print(f"  {stat.size_diff / calls:8.0f} B/call")
            for line in stat.traceback.format()[-2 * frames :]:
                print(f"      {line}")
    tracemalloc.stop()
    for h in harnesses:
        h.call.hang_up("bench")
    await asyncio.gather(*(h.task for h in harnesses), return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--frames", type=int, default=1, help="more: where the biggest sites come from")
    args = ap.parse_args()
    # Info level as deployed, written to nowhere: the per-call loggers are part of the cost.
    configure_logging("info", "json", open(os.devnull, "w"))  # noqa: SIM115
    asyncio.run(hold(args.calls, args.top, args.frames))


if __name__ == "__main__":
    main()
