"""OPTIONS round trips per second answered by the engine, SIPp as the client on this machine.

Run from the repository root:

    python bench/bench_options.py [--transport u1|t1|tn] [--calls 50000] [--rate 10000]
                                  [--loop uvloop|asyncio]

The engine runs in a child process (``--serve``) on 127.0.0.1; SIPp (Debian ``sip-tester``) sends
``sip-fixtures/sipp/options_uac.xml`` at ``--rate`` calls per second (``-rp 1000``) with at most
``--limit`` outstanding. Printed: successful and failed round trips, wall time, round trips per
second, and the CPU time of the engine process (utime+stime from /proc/PID/stat) as seconds
and as a share of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
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
    if os.environ.get("BENCH_GC"):
        import gc

        gc.set_threshold(*(int(x) for x in os.environ["BENCH_GC"].split(",")))

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
        await engine.stop()

    if loop_name == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-%d-1-0;rport\r\n"
    b'From: "sipp" <sip:sipp@127.0.0.1:5070>;tag=1SIPpTag01\r\n'
    b"To: <sip:127.0.0.1:5060>\r\n"
    b"Call-ID: %d-1@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Contact: <sip:sipp@127.0.0.1:5070;transport=UDP>\r\n"
    b"Max-Forwards: 70\r\n"
    b"Accept: application/sdp\r\n"
    b"User-Agent: SIPp\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def pieces(count: int = 20000) -> None:
    """Microseconds per OPTIONS for each stage, in one process, no sockets."""
    import timeit

    from sbc.net.addresses import Destination, TransportConfig
    from sbc.net.engine import SipEngine, stamp_via
    from sbc.sip.parser import parse_message
    from sbc.sip.serializer import serialize
    from sbc.sip.transaction import TransactionLayer, build_response
    from sbc.sip.validate import validate_request

    data = OPTIONS % (1, 1)
    request = parse_message(data)
    source = Destination("udp", HOST, 5070)
    stamped = stamp_via(request, source)  # type: ignore[arg-type]
    headers = (("Allow", "INVITE, ACK"), ("Accept", "application/sdp"))
    response = build_response(stamped, 200, to_tag="abc", headers=headers)

    def layer_cycle() -> None:
        layer = TransactionLayer()
        layer.receive(stamped, source=source, reliable=False, now=0.0)
        event = layer.events()[0]
        layer.respond(event.key, response, now=0.0)  # type: ignore[union-attr]
        layer.datagrams_to_send()

    stages = [
        ("parse_message", lambda: parse_message(data)),
        ("stamp_via (received/rport)", lambda: stamp_via(request, source)),  # type: ignore[arg-type]
        ("validate_request", lambda: validate_request(stamped)),
        ("TransactionLayer receive+respond", layer_cycle),
        ("build_response", lambda: build_response(stamped, 200, to_tag="a", headers=headers)),
        ("serialize", lambda: serialize(response)),
    ]
    for name, stage in stages:
        best = min(timeit.repeat(stage, number=count, repeat=3))
        print(f"{name:34s} {1e6 * best / count:7.1f} us")

    async def whole() -> float:
        engine = SipEngine(TransportConfig(bind=HOST, port=0))
        await engine.start()

        class Sink:
            def sendto(self, data: bytes, addr: object) -> None:
                pass

            def close(self) -> None:
                pass

        engine.transports._udp = Sink()  # type: ignore[assignment]
        datagrams = [OPTIONS % (i, i) for i in range(count)]
        started = time.perf_counter()
        for datagram in datagrams:
            engine.transports._datagram_received(datagram, (HOST, 5070))
        elapsed = time.perf_counter() - started
        engine.transports._udp = None
        await engine.stop()
        return elapsed

    elapsed = asyncio.run(whole())
    print(f"{'whole engine path (no sockets)':34s} {1e6 * elapsed / count:7.1f} us")


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
            children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.monotonic()
            sipp = subprocess.run(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp
            )
            elapsed = time.monotonic() - started
            cpu = cpu_seconds(server.pid) - cpu_before
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
        f"retransmissions={result['retransmissions']}"
    )


if __name__ == "__main__":
    main()
