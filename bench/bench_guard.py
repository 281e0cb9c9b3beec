"""What a dropped datagram costs: the edge guard's drop path (sbc/net/guard.py), no sockets.

Run from the repository root:

    python bench/bench_guard.py [--count 200000] [--repeat 5]

A ``SipEngine`` with a guard (pbx trusted 10.0.0.0/24, drop mode, the default limits) is built
but not started; each case calls the UDP entry (``Transports._datagram_received``, what asyncio's
``datagram_received`` calls) ``--count`` times with a 420-byte garbage INVITE and prints the best
of ``--repeat`` runs in microseconds per datagram:

* ``untrusted``: one untrusted source whose bucket never runs dry (rate_limit raised), the
  path of a source under its limit;
* ``banned``: one banned source (the default limit, 30 per 2 s, is spent on the first datagrams);
* ``spray``: a new source address for every datagram (a spoofed-source flood), with the source
  table at its cap (10,000 entries) so that the sweep and eviction are paid too;
* ``parsed``: for comparison, the same datagrams with no guard, i.e. what a datagram cost before
  (parsed, then refused as garbage).

``--socket N`` measures the same drop path through a real socket: the engine started on
127.0.0.1 (``--loop uvloop``, as ``sbc run`` uses when installed, or ``asyncio``), a child
process sending N datagrams from 127.0.0.77 (paced so that the kernel's buffer drops none), and
this process's CPU time (user + system, ``getrusage``, the child excluded) from before the
first to after the last datagram, per datagram received: the loop's ``recvfrom`` and callback
included.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import sys
import time
from collections.abc import Callable
from ipaddress import ip_network
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import structlog  # noqa: E402

from sbc.net.addresses import TransportConfig  # noqa: E402
from sbc.net.engine import SipEngine  # noqa: E402
from sbc.net.guard import Guard, GuardConfig  # noqa: E402

GARBAGE = (
    b"INVITE sip:100@203.0.113.1 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 198.51.100.9:5060;branch=z9hG4bK-scan-1\r\n"
    b"From: <sip:scanner@198.51.100.9>;tag=1\r\nTo: <sip:100@203.0.113.1>\r\n"
    b"Call-ID: 0123456789abcdef@198.51.100.9\r\nCSeq: 1 INVITE\r\n"
    b"Contact: <sip:scanner@198.51.100.9>\r\nMax-Forwards: 70\r\n"
    b"User-Agent: friendly-scanner\r\nContent-Length: 9999\r\n\r\n" + b"x" * 80
)


def engine(guard: Guard | None) -> SipEngine:
    return SipEngine(TransportConfig(bind="127.0.0.1", port=5060), guard=guard)


def guard(**overrides: object) -> Guard:
    values: dict[str, object] = {"trusted": (ip_network("10.0.0.0/24"),)}
    values.update(overrides)
    return Guard(GuardConfig(**values))  # type: ignore[arg-type]


def timed(run: Callable[[], None], count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


SENDER = r"""
import socket, sys, time
target, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = bytes.fromhex(sys.argv[4])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("127.0.0.77", 0))
for n in range(count):
    udp.sendto(data, (target, port))
    if n % 500 == 499:
        time.sleep(0.002)
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def over_socket(count: int) -> None:
    sip = SipEngine(TransportConfig(bind="127.0.0.1", port=0, tcp=False), guard=guard())
    await sip.start()
    try:
        assert sip.transports.udp_address is not None
        port = sip.transports.udp_address[1]
        stats = sip.transports.stats
        loop = asyncio.get_running_loop()
        before, started = cpu(), loop.time()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, "127.0.0.1", str(port), str(count), GARBAGE.hex()
        )
        await child.wait()  # the loop reads meanwhile
        # The last datagrams: read once the socket is idle (nothing more arrives; there is no
        # event for "the kernel's queue is empty").
        seen = -1
        while seen != stats.datagrams_received:
            seen = stats.datagrams_received
            await asyncio.sleep(0.05)
        spent, elapsed = cpu() - before, loop.time() - started
    finally:
        await sip.stop()
    received = stats.datagrams_received
    print(
        f"socket     {spent / received * 1e6:6.3f} us/datagram CPU ({received} of {count} "
        f"received, {elapsed:.2f} s; the child's start and a few idle wake-ups included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--socket", type=int, default=0, metavar="N")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    # The ban's one warning (and the parse failures' debug lines) would be timed otherwise.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    count, repeat = args.count, args.repeat
    data = GARBAGE

    under = engine(guard(rate_limit=10**9)).transports
    addr = ("198.51.100.9", 5060)

    def untrusted() -> None:
        receive = under._datagram_received
        for _ in range(count):
            receive(data, addr)

    banned_guard = guard(ban_time=10**6)
    banned = engine(banned_guard).transports

    def banned_run() -> None:
        receive = banned._datagram_received
        for _ in range(count):
            receive(data, addr)

    spray_guard = guard(ban_time=10**6)
    spray = engine(spray_guard).transports
    sources = [(f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}", 5060) for i in range(count)]
    for source in sources[:10_000]:
        spray._datagram_received(data, source)  # the table full before timing

    def spray_run() -> None:
        receive = spray._datagram_received
        for source in sources:
            receive(data, source)

    plain = engine(None).transports
    parsed_count = min(count, 20_000)

    def parsed() -> None:
        receive = plain._datagram_received
        for _ in range(parsed_count):
            receive(data, addr)

    print(f"datagram {len(data)} bytes, {count} per run, best of {repeat}")
    print(f"untrusted  {timed(untrusted, count, repeat):6.3f} us/datagram")
    print(f"banned     {timed(banned_run, count, repeat):6.3f} us/datagram")
    print(f"spray      {timed(spray_run, count, repeat):6.3f} us/datagram (new source each)")
    print(f"parsed     {timed(parsed, parsed_count, repeat):6.3f} us/datagram (no guard)")
    stats = banned_guard.stats
    print(f"banned case: bans {stats.bans}, dropped banned {stats.dropped_banned}")
    print(f"spray case: sources tracked {spray_guard.tracked}, evicted {spray_guard.stats.evicted}")
    if args.socket:
        if args.loop == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(over_socket(args.socket))
        else:
            asyncio.run(over_socket(args.socket))
        print(f"loop: {args.loop}")


if __name__ == "__main__":
    main()
