"""What a live ``sbc run`` was doing when a call's INVITE was slow to go out (post-dial tail).

Used as the interpreter of ``bench/load.py`` (or ``bench_calls.py``) through the wrapper
``bench/tail_python.sh`` (their ``--python`` option), which runs ``-m sbc ...`` under this
script and anything else with plain ``python``; ``report`` then reads a step's work directory
(``load.py --keep``):

    python bench/load.py --systems sbc --phases ramp --rates 400 --no-half-rate \\
        --step-seconds 30 --keep --python bench/tail_python.sh
    python bench/tail_probe.py report /tmp/bench-load-XXXX/02-ramp-sbc-400 /tmp/sbc-probe.PID.json

``run`` notes, with their wall-clock start and length, what can hold up the event loop's
thread: every garbage collection (``gc.callbacks``), every batch the call records writer
inserts in its thread (``RecordWriter._insert_batch``, with that thread's CPU time: pure
Python that holds the GIL the loop needs), every flush of the batched log lines, and the
lateness of a loop timer due every 2 ms (the loop's own stalls, whatever their cause). When the
service stops, and at exit, it writes ``$TAIL_PROBE_OUT/sbc-probe.PID.json`` (``/tmp`` by default;
not ``SBC_`` variables: the harnesses keep those, sbc's settings, from the sbc they start).
``TAIL_PROBE_SWITCH_INTERVAL=S`` makes the switch interval ``S`` (``sys.setswitchinterval``; the
service's own is ``sbc.ops.cli.SWITCH_INTERVAL``), to compare.

``report`` takes every call of the step: the caller's INVITE sent and the answerer's INVITE
received (SIPp's stamps, as ``load.py`` reads them) and sbc's own stamps of the INVITE in and
the far INVITE out (the ladder of the call's record); splits each call's post-dial delay into
before sbc (loopback, the socket's queue while the loop was busy, parsing), inside sbc (tap in
to tap out) and after; and for the slowest 1 % and for all calls, the share whose span
overlaps each kind of event, so a cause shows as a share much higher among the slow ones.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import runpy
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROBE_PERIOD = 0.002  # the loop-lag timer; its own cost ~0.5k callbacks/s
LATE = 0.002  # a lateness worth noting (uvloop keeps time in whole milliseconds)


def run(argv: list[str]) -> None:
    events: list[tuple[str, float, float, float]] = []  # kind, wall start, seconds, extra
    started = [0.0, 0.0]

    def gc_hook(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0], started[1] = time.time(), time.perf_counter()
        else:
            spent = time.perf_counter() - started[1]
            events.append((f"gc{info['generation']}", started[0], spent, 0.0))

    def dump() -> None:
        out = Path(os.environ.get("TAIL_PROBE_OUT", "/tmp")) / f"sbc-probe.{os.getpid()}.json"
        out.write_text(json.dumps(events))

    gc.callbacks.append(gc_hook)
    atexit.register(dump)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    interval = os.environ.get("TAIL_PROBE_SWITCH_INTERVAL")
    if interval:
        import sbc.ops.cli as cli

        # What tune_gc() applies (where the checkout has it), and now for the checkouts
        # that do not.
        cli.SWITCH_INTERVAL = float(interval)  # type: ignore[attr-defined,unused-ignore]
        sys.setswitchinterval(float(interval))

    from sbc.ops import logging as sbc_logging
    from sbc.ops import records, service

    insert_batch = records.RecordWriter._insert_batch

    def timed_batch(self: Any, batch: list[Any]) -> Any:
        wall, cpu = time.time(), time.thread_time()
        t0 = time.perf_counter()
        try:
            return insert_batch(self, batch)
        finally:
            spent = time.perf_counter() - t0
            events.append(("records", wall, spent, time.thread_time() - cpu))

    records.RecordWriter._insert_batch = timed_batch  # type: ignore[method-assign,assignment]

    flush = sbc_logging._Output.flush

    def timed_flush(self: Any) -> None:
        wall, t0 = time.time(), time.perf_counter()
        flush(self)
        events.append(("log_flush", wall, time.perf_counter() - t0, 0.0))

    sbc_logging._Output.flush = timed_flush  # type: ignore[method-assign]

    start = service.Service.start

    async def start_with_probe(self: Any) -> None:
        await start(self)
        import asyncio

        loop = asyncio.get_running_loop()
        main = threading.get_ident()

        def tick(due: float) -> None:
            late = loop.time() - due
            if late > LATE and threading.get_ident() == main:
                events.append(("loop_late", time.time() - late, late, 0.0))
            nxt = due + PROBE_PERIOD
            loop.call_at(max(nxt, loop.time()), tick, max(nxt, loop.time()))

        first = loop.time() + PROBE_PERIOD
        loop.call_at(first, tick, first)

    service.Service.start = start_with_probe  # type: ignore[method-assign]
    stop = service.Service.stop

    async def stop_after_dump(self: Any) -> None:
        dump()  # now: a run that overran is killed before its exit handlers
        await stop(self)

    service.Service.stop = stop_after_dump  # type: ignore[method-assign]
    sys.argv = ["sbc", *argv]
    runpy.run_module("sbc", run_name="__main__")


def _stamps(path: Path) -> dict[str, float]:
    """Per call (the caller's Call-ID), the INVITE's stamp in a SIPp ``<log>`` file."""
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        w = line.split()
        if w and w[0] == "invite" and len(w) == 4:  # caller: invite CALL-ID SEC USEC
            out.setdefault(w[1], float(w[2]) + float(w[3]) / 1e6)
        elif w and w[0] == "invite" and len(w) == 5:  # answerer: invite ID PBX-ID SEC USEC
            out.setdefault(w[2], float(w[3]) + float(w[4]) / 1e6)
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(step: Path, probe: Path | None) -> None:
    import sqlite3

    sent = _stamps(step / "caller" / "calls.log")
    arrived = _stamps(step / "answerer" / "calls.log")
    calls: list[tuple[float, float, float, float]] = []  # sent, tap in, tap out, arrived
    db = sqlite3.connect(step / "calls.sqlite3")
    for pbx_call_id, ladder in db.execute("SELECT pbx_call_id, ladder FROM calls"):
        tap_in = tap_out = None
        for entry in json.loads(ladder):
            line = entry["first_line"]
            if tap_in is None and entry["direction"] == "in" and line.startswith("INVITE "):
                tap_in = entry["at"]
            if entry["direction"] == "out" and entry["leg"] == "agent" and line.startswith("INV"):
                tap_out = entry["at"]
                break
        if pbx_call_id in sent and pbx_call_id in arrived and tap_in and tap_out:
            calls.append((sent[pbx_call_id], tap_in, tap_out, arrived[pbx_call_id]))
    calls.sort()
    print(f"{len(calls)} calls")
    parts = {
        "before sbc (send -> tap in)": [1e3 * (c[1] - c[0]) for c in calls],
        "inside sbc (tap in -> tap out)": [1e3 * (c[2] - c[1]) for c in calls],
        "after sbc (tap out -> arrival)": [1e3 * (c[3] - c[2]) for c in calls],
        "post-dial (send -> arrival)": [1e3 * (c[3] - c[0]) for c in calls],
    }
    for name, values in parts.items():
        print(
            f"  {name:32s} p50 {_pct(values, 0.5):7.3f} p90 {_pct(values, 0.9):7.3f} "
            f"p99 {_pct(values, 0.99):7.3f} max {max(values):8.3f} ms"
        )
    slow = sorted(calls, key=lambda c: c[3] - c[0], reverse=True)[: max(1, len(calls) // 100)]
    print(
        f"  slowest 1 % ({len(slow)} calls), mean before / inside / after: "
        + " / ".join(
            f"{1e3 * statistics.fmean(c[k + 1] - c[k] for c in slow):.3f}" for k in range(3)
        )
        + " ms"
    )
    # Arrivals: how many INVITEs were sent within 0.1 ms of another (SIPp's clumps).
    clumped = sum(1 for a, b in itertools.pairwise(calls) if b[0] - a[0] < 1e-4)
    print(f"  INVITEs sent within 0.1 ms of the previous one: {clumped} of {len(calls)}")
    if probe is None:
        return
    events = json.loads(probe.read_text())
    first, last = calls[0][0], calls[-1][3]
    events = [e for e in events if first - 1 <= e[1] <= last + 1]
    kinds = sorted({e[0] for e in events})
    span = last - first
    print(f"  events during the calls ({span:.1f} s):")
    for kind in kinds:
        mine = [e for e in events if e[0] == kind]
        ms = [1e3 * e[2] for e in mine]
        extra = ""
        if kind == "records":
            extra = f", its thread's CPU {1e3 * sum(e[3] for e in mine) / len(mine):.3f} ms mean"
        print(
            f"    {kind:10s} {len(mine):6d} ({len(mine) / span:7.1f}/s), median "
            f"{statistics.median(ms):.3f} p99 {_pct(ms, 0.99):.3f} max {max(ms):.3f} ms, "
            f"{100 * sum(ms) / 1e3 / span:.2f} % of the time{extra}"
        )

    def share(group: list[tuple[float, float, float, float]], kind: str) -> float:
        mine = sorted((e[1], e[1] + e[2]) for e in events if e[0] == kind)
        starts = [m[0] for m in mine]
        import bisect

        hit = 0
        for c in group:
            i = bisect.bisect_left(starts, c[0] - 0.1)  # nothing here lasts 0.1 s
            while i < len(mine) and mine[i][0] <= c[3]:
                if mine[i][1] >= c[0]:
                    hit += 1
                    break
                i += 1
        return 100 * hit / len(group)

    print("  share of calls whose send -> arrival overlaps one (slowest 1 % / all):")
    for kind in kinds:
        print(f"    {kind:10s} {share(slow, kind):6.1f} % / {share(calls, kind):6.1f} %")


def main() -> None:
    if len(sys.argv) >= 2 and sys.argv[1] == "run":
        args = sys.argv[2:]  # "run -m sbc ARGS": what the wrapper passes on
        run(args[2:] if args[:2] == ["-m", "sbc"] else args)
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "report":
        report(Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
