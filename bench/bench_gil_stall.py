"""How long the event loop waits for the GIL while the call records writer inserts a batch.

Run from the repository root:

    python bench/bench_gil_stall.py [--seconds 5] [--rows 40] [--work-us 100] [--rounds 2]

The records writer (``sbc/ops/records.py``) inserts the rows of the calls that ended in the
last ``batch_wait`` (0.1 s) in its own thread; making a row (``row_of``: the ladder's
summaries and JSON) is pure Python, and while that thread runs Python the event loop's thread
cannot: a datagram arriving then waits until the writer reaches a statement (SQLite lets the
GIL go) or until ``sys.getswitchinterval()`` (5 ms) has passed and the interpreter forces a
switch. This measures that wait alone, without SIPp or sbc's call path:

* a pinger process sends a datagram every ``--every-us`` (500 us) to an event loop (uvloop),
  each carrying its ``time.monotonic()`` (the same clock in both processes);
* the loop notes, per datagram, how late it read it and spends ``--work-us`` of CPU on it (a
  loop that is not idle: 100 us per 500 us is 20 % busy);
* a thread inserts ``--rows`` records (bench_records.py's twelve-message call) in one batch
  every 0.1 s through ``RecordWriter._insert_batch``, as the service's writer does at
  ``--rows`` x 10 calls/s (40 rows: 400 calls/s).

Modes, alternated for ``--rounds``: no writer; the writer at the interpreter's switch interval
(5 ms); the writer with ``sys.setswitchinterval(--switch)``. Printed per mode: the datagrams'
delay p50, p99, p99.9 and max, and the share later than 1 ms. The machine's other work shows in
every mode alike; what the writer adds is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_records as br  # noqa: E402

from sbc.b2bua.ladder import Ladder  # noqa: E402
from sbc.ops import records  # noqa: E402
from sbc.sip.parser import parse_message  # noqa: E402

PINGER = """
import socket, sys, time
port, every, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end = time.monotonic() + seconds
due = time.monotonic()
while due < end:
    due += every
    pause = due - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    s.sendto(repr(time.monotonic()).encode(), ("127.0.0.1", port))
"""


def make_records(rows: int) -> list[Any]:
    out = []
    for n in range(rows):
        ladder = Ladder(200)
        for direction, data, (dest, leg, peer) in br.CALL:
            message = parse_message(data)
            ladder.note(direction, message, dest, br.LOCAL, leg=leg, peer=peer, at=1.7e9 + n)
        out.append(br.record(n, ladder))
    return out


class Receiver(asyncio.DatagramProtocol):
    def __init__(self, work: float) -> None:
        self.work = work
        self.delays: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = time.monotonic()
        self.delays.append(now - float(data))
        until = time.perf_counter() + self.work
        while time.perf_counter() < until:  # the loop's own work per message
            pass


def writer_thread(stop: threading.Event, batch: list[Any], path: Path) -> None:
    writer = records.RecordWriter(path)
    writer._open()  # this thread's connection, as the service's worker thread opens it
    n = 0
    try:
        while not stop.wait(0.1):
            for i, record in enumerate(batch):  # new keys each batch
                batch[i] = dataclasses.replace(record, call_uuid=f"u-{n}-{i}")
            n += 1
            writer._insert_batch(batch)
    finally:
        writer._close()


async def one_mode(args: argparse.Namespace, writer: bool) -> list[float]:
    loop = asyncio.get_running_loop()
    transport, receiver = await loop.create_datagram_endpoint(
        lambda: Receiver(args.work_us / 1e6), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    stop = threading.Event()
    thread = None
    with tempfile.TemporaryDirectory() as tmp:
        if writer:
            batch = make_records(args.rows)
            path = Path(tmp) / "calls.sqlite3"
            thread = threading.Thread(target=writer_thread, args=(stop, batch, path))
            thread.start()
        pinger = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
            [sys.executable, "-c", PINGER, str(port), str(args.every_us / 1e6), str(args.seconds)]
        )
        try:
            # Polled: a thread of ours waiting for it would be one more taker of the GIL.
            while pinger.poll() is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.05)  # the last datagrams
        finally:
            pinger.wait()
            stop.set()
            if thread is not None:
                thread.join()
            transport.close()
    return receiver.delays


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=40, help="rows per batch (every 0.1 s)")
    parser.add_argument("--work-us", type=float, default=100.0, help="loop CPU per datagram")
    parser.add_argument("--every-us", type=float, default=500.0, help="datagram interval")
    parser.add_argument("--switch", type=float, default=0.0005, help="switch interval to try")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import uvloop

    default = sys.getswitchinterval()
    modes = [
        ("no writer", False, default),
        (f"writer, switch interval {1e3 * default:g} ms", True, default),
        (f"writer, switch interval {1e3 * args.switch:g} ms", True, args.switch),
    ]
    results: dict[str, list[list[float]]] = {name: [] for name, _, _ in modes}
    for _ in range(args.rounds):
        for name, writer, interval in modes:
            sys.setswitchinterval(interval)
            results[name].append(uvloop.run(one_mode(args, writer)))
    sys.setswitchinterval(default)
    print(
        f"{args.rows} rows every 0.1 s; a datagram every {args.every_us:g} us, "
        f"{args.work_us:g} us of loop work each; {args.seconds:g} s x {args.rounds} rounds"
    )
    print("| mode | round | datagrams | p50 ms | p99 ms | p99.9 ms | max ms | later than 1 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        for i, delays in enumerate(runs, 1):
            ms = [1e3 * d for d in delays]
            late = 100 * sum(1 for d in ms if d > 1.0) / len(ms)
            print(
                f"| {name} | {i} | {len(ms)} | {statistics.median(ms):.3f} | {pct(ms, 0.99):.3f}"
                f" | {pct(ms, 0.999):.3f} | {max(ms):.3f} | {late:.2f} % |"
            )


if __name__ == "__main__":
    main()
