"""CPU cost of one OPTIONS through the engine, in one process, without sockets.

Run from the repository root:

    python bench/bench_engine.py [--count 20000] [--repeat 5] [--no-gc] [--profile] [--whole-only]

Feeds ``--count`` distinct SIPp-style OPTIONS datagrams (one branch, From tag and Call-ID each, as
SIPp's ``options_uac.xml`` sends them; To, Contact and Request-URI the same in all) straight
into ``Transports._datagram_received`` of a started :class:`~sbc.net.engine.SipEngine` whose UDP
socket is replaced by a sink, so each one goes the whole way: parse, Via stamping, validation,
a new server transaction, the engine's 200, serialisation. Every answered OPTIONS keeps its
server transaction for Timer J (32 s over UDP), as in a real run, so the heap grows as it does
under SIPp. Printed (best and median of ``--repeat`` runs, each with a fresh engine):
microseconds per OPTIONS, the share of it spent in the garbage collector, and how many
GC-tracked objects each answered OPTIONS leaves alive. Then the cost of each stage alone.

``--profile`` prints a cProfile of one run instead (sorted by internal time).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOST = "127.0.0.1"

OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-%d-1-0;rport\r\n"
    b'From: "sipp" <sip:sipp@127.0.0.1:5070>;tag=1SIPpTag%d\r\n'
    b"To: <sip:127.0.0.1:5060>\r\n"
    b"Call-ID: %d-1@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Contact: <sip:sipp@127.0.0.1:5070;transport=UDP>\r\n"
    b"Max-Forwards: 70\r\n"
    b"Accept: application/sdp\r\n"
    b"User-Agent: SIPp\r\n"
    b"Content-Length: 0\r\n\r\n"
)


class _GcTimer:
    """Time spent in collections, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1


def _quiet_logging() -> None:
    import logging

    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


async def _whole_path(count: int, profile: bool) -> dict[str, float]:
    from sbc.net.addresses import TransportConfig
    from sbc.net.engine import SipEngine

    engine = SipEngine(TransportConfig(bind=HOST, port=0, tcp=False))
    await engine.start()
    sent: list[bytes] = []

    class Sink:
        def sendto(self, data: bytes, addr: object) -> None:
            sent.append(data)

        def close(self) -> None:
            pass

    real_udp = engine.transports._udp
    engine.transports._udp = Sink()  # type: ignore[assignment]
    datagrams = [OPTIONS % (i, i, i) for i in range(count)]
    receive = engine.transports._datagram_received
    address = (HOST, 5070)
    gc.collect()
    tracked_before = len(gc.get_objects())
    gc_timer = _GcTimer()
    gc.callbacks.append(gc_timer)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    for datagram in datagrams:
        receive(datagram, address)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
    gc.callbacks.remove(gc_timer)
    answered = sum(1 for data in sent if data.startswith(b"SIP/2.0 200 "))
    if answered != count:
        raise RuntimeError(f"{answered} of {count} OPTIONS answered 200")
    del datagrams
    gc.collect()
    retained = (len(gc.get_objects()) - tracked_before) / count
    engine.transports._udp = real_udp
    await engine.stop()
    return {
        "us": 1e6 * elapsed / count,
        "gc_us": 1e6 * gc_timer.seconds / count,
        "retained": retained,
    }


def whole_path(count: int, repeat: int) -> None:
    runs = []
    for _ in range(repeat):
        runs.append(asyncio.run(_whole_path(count, profile=False)))
        gc.collect()
    per_message = [r["us"] for r in runs]
    gc_share = [r["gc_us"] for r in runs]
    print(
        f"whole engine path, {count} distinct OPTIONS, {repeat} runs: "
        f"best {min(per_message):.1f} us, median {statistics.median(per_message):.1f} us per "
        f"OPTIONS (of which GC: median {statistics.median(gc_share):.1f} us); "
        f"{runs[0]['retained']:.1f} tracked objects kept per answered OPTIONS"
    )


def stages(count: int) -> None:
    """Microseconds per OPTIONS for each stage alone (best of 5)."""
    from sbc.net.addresses import Destination
    from sbc.net.engine import stamp_via
    from sbc.sip.parser import parse_message
    from sbc.sip.serializer import serialize
    from sbc.sip.transaction import TransactionLayer, build_response
    from sbc.sip.validate import validate_request

    data = OPTIONS % (1, 1, 1)
    source = Destination("udp", HOST, 5070)
    stamped = stamp_via(parse_message(data), source)  # type: ignore[arg-type]
    headers = (("Allow", "INVITE, ACK"), ("Accept", "application/sdp"))
    response = build_response(stamped, 200, to_tag="abc", headers=headers)

    # Each stage gets a freshly parsed message, as in the engine (parsed fields are remembered
    # per message, so timing one message object over and over would measure the memo).
    def fresh() -> Any:
        return stamp_via(parse_message(data), source)  # type: ignore[arg-type]

    def layer_cycle() -> None:
        layer = TransactionLayer()
        layer.receive(fresh(), source=source, reliable=False, now=0.0)
        event = layer.events()[0]
        layer.respond(event.key, response, now=0.0)  # type: ignore[union-attr]
        layer.datagrams_to_send()

    base = [
        ("parse_message", lambda: parse_message(data)),
        ("parse_message + stamp_via", fresh),
    ]
    rows = [
        ("+ validate_request", lambda: validate_request(fresh())),
        ("+ TransactionLayer receive+respond", layer_cycle),
        ("+ build_response", lambda: build_response(fresh(), 200, to_tag="a", headers=headers)),
    ]
    gc.disable()
    try:
        timings = {}
        for name, stage in [*base, *rows]:
            best = min(timeit.repeat(stage, number=count, repeat=5))
            timings[name] = 1e6 * best / count
        best = min(timeit.repeat(lambda: serialize(response), number=count, repeat=5))
        timings["serialize"] = 1e6 * best / count
    finally:
        gc.enable()
    print("stages (GC off; '+' rows: parse and stamp a fresh message, then the stage):")
    base_us = timings["parse_message + stamp_via"]
    for name, us in timings.items():
        extra = f"  (stage alone {us - base_us:5.1f} us)" if name.startswith("+") else ""
        print(f"  {name:38s} {us:6.1f} us{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-gc", action="store_true", help="disable the garbage collector")
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    parser.add_argument(
        "--whole-only",
        action="store_true",
        help="skip the stage timings (callgrind: run with two --count values, take the difference)",
    )
    args = parser.parse_args()
    _quiet_logging()
    if args.no_gc:
        gc.disable()
    if args.profile:
        asyncio.run(_whole_path(args.count, profile=True))
        return
    whole_path(args.count, args.repeat)
    if not args.whole_only:
        stages(args.count)


if __name__ == "__main__":
    main()
