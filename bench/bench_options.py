"""OPTIONS round trips per second answered by the engine, SIPp as the client on this machine.

Run from the repository root:

    python bench/bench_options.py [--transport u1|t1|tn] [--calls 50000] [--rate 10000]
                                  [--loop uvloop|asyncio]

The engine runs in a child process (``--serve``) on 127.0.0.1; SIPp (Debian ``sip-tester``) sends
``sip-fixtures/sipp/options_uac.xml`` at ``--rate`` calls per second (``-rp 1000``) with at most
``--limit`` outstanding. Printed: successful and failed round trips, wall time, round trips per
second, the CPU time of the engine process (utime+stime from /proc/PID/stat) as seconds, as a
share of one core and per round trip, and the UDP datagrams the kernel dropped on full receive
buffers meanwhile (RcvbufErrors, counted for the whole machine). ``BENCH_GC=a,b,c`` sets the
engine's ``gc.set_threshold``; ``BENCH_GC_STATS=1`` makes it print its time in garbage
collections and its longest pause. ``--pieces`` runs ``bench/bench_engine.py`` (no sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOST = "127.0.0.1"


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((HOST, 0))
            port = int(tcp.getsockname()[1])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((HOST, port))
            except OSError:
                continue
            return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def serve(port: int, loop_name: str) -> None:
    import logging

    import structlog

    from sbc.net.addresses import TransportConfig
    from sbc.net.engine import SipEngine

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    import gc

    if os.environ.get("BENCH_GC"):
        gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC"].split(",")))
    gc_time = [0.0, 0.0, 0.0]  # total seconds in collections, longest pause, start of current

    def gc_callback(phase: str, info: dict[str, Any]) -> None:
        now = time.perf_counter()
        if phase == "start":
            gc_time[2] = now
        else:
            pause = now - gc_time[2]
            gc_time[0] += pause
            gc_time[1] = max(gc_time[1], pause)

    if os.environ.get("BENCH_GC_STATS"):
        gc.callbacks.append(gc_callback)

    async def main() -> None:
        engine = SipEngine(
            TransportConfig(
                bind=HOST, port=port, max_connections=100000, max_connections_per_ip=100000
            )
        )
        await engine.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        if os.environ.get("BENCH_GC_STATS"):
            print(
                f"sbc gc: {gc_time[0]:.2f}s in collections, longest pause "
                f"{1e3 * gc_time[1]:.0f} ms",
                file=sys.stderr,
            )
        await engine.stop()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def pieces(count: int = 20000) -> None:
    """Microseconds per OPTIONS, whole path and stage by stage, in one process, no sockets."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_engine

    bench_engine._quiet_logging()
    bench_engine.whole_path(count, repeat=3)
    bench_engine.stages(count)


def udp_receive_buffer_errors() -> int:
    """RcvbufErrors of /proc/net/snmp: datagrams dropped on a full socket buffer, system-wide."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    for names, values in itertools.pairwise(lines):
        if names[0] == "Udp:" and values[0] == "Udp:" and "RcvbufErrors" in names:
            return int(values[names.index("RcvbufErrors")])
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--loop", args.loop],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"engine did not start: {line!r}")
        with tempfile.TemporaryDirectory() as tmp:
            stat_file = Path(tmp) / "stat.csv"
            command = [
                "sipp",
                "-sf",
                str(REPO / "sip-fixtures/sipp/options_uac.xml"),
                f"{HOST}:{port}",
                "-t",
                args.transport,
                "-i",
                HOST,
                "-p",
                str(free_port()),
                "-cp",
                str(free_port()),
                "-m",
                str(args.calls),
                "-r",
                str(args.rate),
                "-rp",
                "1000",
                "-l",
                str(args.limit),
                "-buff_size",
                "4194304",
                "-max_socket",
                str(args.limit + 100),
                "-timeout",
                "120s",
                "-nostdin",
                "-trace_stat",
                "-stf",
                str(stat_file),
            ]
            cpu_before = cpu_seconds(server.pid)
            drops_before = udp_receive_buffer_errors()
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            sipp = subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp
            )
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(server.pid) - cpu_before
            drops = udp_receive_buffer_errors() - drops_before
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            sipp_cpu = (children.ru_utime - children_before.ru_utime) + (
                children.ru_stime - children_before.ru_stime
            )
            rows = list(csv.reader(stat_file.read_text().splitlines(), delimiter=";"))
            stats = dict(zip(rows[0], rows[-1], strict=False))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    successful = int(stats.get("SuccessfulCall(C)", "0"))
    failed = int(stats.get("FailedCall(C)", "0"))
    return {
        "sipp_exit": sipp.returncode,
        "successful": successful,
        "failed": failed,
        "elapsed": elapsed,
        "per_second": successful / elapsed,
        "cpu_seconds": cpu,
        "cpu_share": cpu / elapsed,
        "cpu_us_per_round_trip": 1e6 * cpu / max(successful, 1),
        "sipp_cpu_share": sipp_cpu / elapsed,
        "retransmissions": int(stats.get("Retransmissions(C)", "0") or 0),
        "udp_drops": drops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pieces", action="store_true", help="per-stage cost, no sockets")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--transport", default="u1", help="SIPp -t: u1, t1 or tn")
    parser.add_argument("--calls", type=int, default=50000)
    parser.add_argument("--rate", type=int, default=10000)
    parser.add_argument("--limit", type=int, default=2000, help="SIPp -l: calls in flight")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.loop)
        return
    if args.pieces:
        pieces()
        return
    result = run(args)
    print(
        f"transport={args.transport} loop={args.loop} calls={args.calls} rate={args.rate} "
        f"sipp_exit={result['sipp_exit']} ok={result['successful']} failed={result['failed']} "
        f"elapsed={result['elapsed']:.2f}s per_second={result['per_second']:.0f} "
        f"sbc_cpu={result['cpu_seconds']:.2f}s ({100 * result['cpu_share']:.0f}% of a core, "
        f"{result['cpu_us_per_round_trip']:.0f} us per round trip) "
        f"sipp_cpu={100 * result['sipp_cpu_share']:.0f}% of a core "
        f"retransmissions={result['retransmissions']} "
        f"udp_rcvbuf_drops={result['udp_drops']} (system-wide)"
    )


if __name__ == "__main__":
    main()
