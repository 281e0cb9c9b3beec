"""Cost of the call-records path per call, in one process: the ladder's tap, the row, SQLite.

Run from the repository root:

    python bench/bench_records.py [--calls 2000] [--repeat 5]

One call is the twelve messages of a bridged call as the engine's tap sees them (3CX INVITE in,
100 out, INVITE to Retell out, its 100 and 200 in, 200 to 3CX out, both ACKs, the BYE from
3CX, its 200, the BYE to Retell and its 200), each parsed from its own bytes. Printed (best of
``--repeat`` runs, microseconds per call): ``note`` the event loop's share (``Ladder.note`` of
each message), ``row`` the writer thread's ``row_of`` (the ladder packed; before round 5 its
summaries and JSON), ``sqlite`` the insert in batches of 20 calls per transaction
(``_insert_batch`` minus a second ``row_of`` of the same records), and ``held`` the bytes a
held call's ladder keeps after its first eight messages (tracemalloc, the messages themselves
let go, as the call would let them go).

For instruction counts (callgrind), ``--count row N`` or ``--count write N`` makes ``--calls``
records and then does only that part for the first N of them (``row_of``; or the writer's
``_insert_batch`` in batches of 20, rows included), so that two runs with different N differ
by that work alone:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
      python bench/bench_records.py --calls 3000 --count row 3000   # and ... row 1000
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbc.b2bua.events import CallRecord
from sbc.b2bua.ladder import Ladder
from sbc.net.addresses import Destination
from sbc.ops import records
from sbc.sip.parser import parse_message

PBX = Destination("udp", "192.168.1.10", 5060)
RETELL = Destination("tcp", "127.0.0.53", 5060)
LOCAL = "udp:127.0.0.52:5060"
VIA_PBX = "SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-1;rport=5060"
VIA_SBC = "SIP/2.0/TCP 127.0.0.52:5060;branch=z9hG4bKsbc1"
PBX_CALL, RETELL_CALL = "pbx-call-1@192.168.1.10", "sbc-retell-abcdef"
INVITE_PBX = "INVITE sip:201@192.168.1.50:5060;transport=UDP SIP/2.0"
INVITE_RETELL = "INVITE sip:+14155550100@127.0.0.53;transport=tcp SIP/2.0"


def wire(first: str, call_id: str, cseq: str, via: str, to_tag: str = "") -> bytes:
    return (
        f"{first}\r\nVia: {via}\r\nMax-Forwards: 70\r\n"
        f'From: "+14155550100" <sip:10000@192.168.1.10>;tag=ft1\r\n'
        f"To: <sip:201@192.168.1.50>{to_tag}\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\n"
        f"Contact: <sip:10000@192.168.1.10:5060>\r\nUser-Agent: 3CX\r\nContent-Length: 0\r\n\r\n"
    ).encode()


A = (PBX, "caller", "pbx")
B = (RETELL, "agent", "retell")
CALL = [
    ("in", wire(INVITE_PBX, PBX_CALL, "2 INVITE", VIA_PBX), A),
    ("out", wire("SIP/2.0 100 Trying", PBX_CALL, "2 INVITE", VIA_PBX), A),
    ("out", wire(INVITE_RETELL, RETELL_CALL, "1 INVITE", VIA_SBC), B),
    ("in", wire("SIP/2.0 100 Trying", RETELL_CALL, "1 INVITE", VIA_SBC), B),
    ("in", wire("SIP/2.0 200 OK", RETELL_CALL, "1 INVITE", VIA_SBC, ";tag=r1"), B),
    ("out", wire("SIP/2.0 200 OK", PBX_CALL, "2 INVITE", VIA_PBX, ";tag=s1"), A),
    ("in", wire("ACK sip:201@192.168.1.50 SIP/2.0", PBX_CALL, "2 ACK", VIA_PBX, ";tag=s1"), A),
    ("out", wire("ACK sip:+1@127.0.0.53 SIP/2.0", RETELL_CALL, "1 ACK", VIA_SBC, ";tag=r1"), B),
    ("in", wire("BYE sip:201@192.168.1.50 SIP/2.0", PBX_CALL, "3 BYE", VIA_PBX, ";tag=s1"), A),
    ("out", wire("SIP/2.0 200 OK", PBX_CALL, "3 BYE", VIA_PBX, ";tag=s1"), A),
    ("out", wire("BYE sip:+1@127.0.0.53 SIP/2.0", RETELL_CALL, "2 BYE", VIA_SBC, ";tag=r1"), B),
    ("in", wire("SIP/2.0 200 OK", RETELL_CALL, "2 BYE", VIA_SBC, ";tag=r1"), B),
]


def record(n: int, ladder: Ladder) -> CallRecord:
    return CallRecord(
        call_uuid=f"u-{n}",
        pbx_call_id=PBX_CALL,
        retell_call_id=RETELL_CALL,
        caller="+14155550100",
        called="201",
        started=1.7e9 + n,
        answered=1.7e9 + n + 0.1,
        ended=1.7e9 + n + 1,
        pbx_status=200,
        retell_status=200,
        end_reason="pbx_bye",
        x_headers=(("X-Caller", "+14155550100"), ("X-Route", "default")),
        ladder=ladder.snapshot(),
        ladder_omitted=ladder.omitted,
    )


def one_run(calls: int, first: int) -> dict[str, float]:
    messages = [[(d, parse_message(data), peer) for d, data, peer in CALL] for _ in range(calls)]
    start = time.perf_counter()
    ladders = []
    for n, call in enumerate(messages):
        ladder = Ladder(200)
        for direction, message, (dest, leg, peer) in call:
            ladder.note(direction, message, dest, LOCAL, leg=leg, peer=peer, at=1.7e9 + n)
        ladders.append(ladder)
    note = time.perf_counter() - start
    recs = [record(first + n, ladder) for n, ladder in enumerate(ladders)]
    start = time.perf_counter()
    for rec in recs:
        records.row_of(rec)
    row = time.perf_counter() - start
    start = time.perf_counter()
    for rec in recs:
        records.row_of(rec)
    row_again = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        writer = records.RecordWriter(Path(tmp) / "calls.sqlite3")
        writer._open()  # the worker thread's connection (WAL, migrated), used here directly
        start = time.perf_counter()
        for i in range(0, calls, 20):
            writer._insert_batch(recs[i : i + 20])
        insert = time.perf_counter() - start
        writer._close()
    return {"note": note, "row": row, "sqlite": insert - row_again}


def held_bytes(calls: int) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ladders = []
    for n in range(calls):
        ladder = Ladder(200)
        for direction, data, (dest, leg, peer) in CALL[:8]:
            message = parse_message(data)
            ladder.note(direction, message, dest, LOCAL, leg=leg, peer=peer, at=1.7e9 + n)
        ladders.append(ladder)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return kept / calls


def noted_records(calls: int, first: int = 0) -> list[CallRecord]:
    """``calls`` records of CALL, numbered from ``first``, each with a ladder noted as the
    event loop notes one (the parsed messages let go, as in the service)."""
    recs = []
    for i in range(calls):
        ladder = Ladder(200)
        for direction, data, (dest, leg, peer) in CALL:
            message = parse_message(data)
            ladder.note(direction, message, dest, LOCAL, leg=leg, peer=peer, at=1.7e9 + i)
        recs.append(record(first + i, ladder))
    return recs


def count_only(calls: int, part: str, n: int) -> None:
    """Make ``calls`` records, then only ``part`` for the first ``n`` (module docstring)."""
    recs = noted_records(calls)
    # What was made so far out of the collector's sight: its passes over 3,000 live ladders
    # would otherwise be counted as the rows' work, growing with the records kept here.
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory() as tmp:
        writer = records.RecordWriter(Path(tmp) / "calls.sqlite3")
        writer._open()
        if part == "row":
            for rec in recs[:n]:
                records.row_of(rec)
        else:
            for i in range(0, n, 20):
                writer._insert_batch(recs[i : min(n, i + 20)])
        writer._close()


# The sender of --stall: another process (its own GIL), writing its monotonic clock (system-wide
# on Linux) into the pipe on its stdout every TICK seconds until its stdin closes.
_SENDER = """
import os, select, struct, sys, time
tick = float(sys.argv[1])
while not select.select([0], [], [], tick)[0]:
    os.write(1, struct.pack("d", time.monotonic()))
"""


async def loop_stalls(recs: list[CallRecord], fd: int) -> tuple[float, float, int]:
    """How late the event loop hears of a message while the writer's thread writes ``recs``
    in one batch: another process writes its clock into the pipe ``fd`` every tick, and
    the loop's reader notes, for each, how long after it was written the loop read it (the
    loop's wake-up and its wait for the GIL the writer holds). The worst, the mean
    (seconds) and how many were read during the batch."""
    import asyncio
    import struct

    late: list[float] = []
    loop = asyncio.get_running_loop()
    pending = b""

    def readable() -> None:
        nonlocal pending
        now = time.monotonic()
        try:
            pending += os.read(fd, 65536)
        except BlockingIOError:
            return
        whole = len(pending) - len(pending) % 8
        late.extend(now - sent for (sent,) in struct.iter_unpack("d", pending[:whole]))
        pending = pending[whole:]

    with tempfile.TemporaryDirectory() as tmp:
        writer = records.RecordWriter(Path(tmp) / "calls.sqlite3", keep_days=0)
        await writer.start()
        loop.add_reader(fd, readable)
        await asyncio.sleep(0.1)
        late.clear()
        await writer.write_many(recs)
        during = list(late)
        loop.remove_reader(fd)
        await writer.close()
    during.sort()
    return during[-1], sum(during) / len(during), len(during)


def stalls(calls: int, repeat: int, tick: float) -> None:
    """``--stall``: :func:`loop_stalls` for batches of ``calls`` records, ``repeat`` times."""
    import asyncio
    import subprocess

    for r in range(repeat):
        recs = noted_records(calls, first=r * calls)
        sender = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(tick)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert sender.stdout is not None and sender.stdin is not None
        os.set_blocking(sender.stdout.fileno(), False)
        start, cpu = time.perf_counter(), time.process_time()
        worst, mean, ticks = asyncio.run(loop_stalls(recs, sender.stdout.fileno()))
        took, cpu = time.perf_counter() - start, time.process_time() - cpu
        sender.stdin.close()
        sender.wait()
        print(
            f"batch of {calls}: loop late worst {worst * 1e3:.3f} ms, mean {mean * 1e3:.3f} ms,"
            f" {ticks} read in {took * 1e3:.0f} ms, process CPU {cpu * 1e3:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--count", nargs=2, metavar=("PART", "N"), help="row N or write N")
    parser.add_argument("--stall", action="store_true", help="the loop's lateness (see stalls)")
    parser.add_argument("--tick", type=float, default=0.0002)
    args = parser.parse_args()
    if args.stall:
        stalls(args.calls, args.repeat, args.tick)
        return
    if args.count:
        count_only(args.calls, args.count[0], int(args.count[1]))
        return
    best: dict[str, float] = {}
    for r in range(args.repeat):
        for name, seconds in one_run(args.calls, r * args.calls).items():
            best[name] = min(best.get(name, seconds), seconds)
    for name, seconds in best.items():
        print(f"{name:8s} {seconds / args.calls * 1e6:7.1f} us/call")
    print(f"{'total':8s} {sum(best.values()) / args.calls * 1e6:7.1f} us/call")
    print(f"{'held':8s} {held_bytes(args.calls):7.0f} B per held call (ladder of 8 messages)")


if __name__ == "__main__":
    main()
