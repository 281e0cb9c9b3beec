"""Bytes the engine and the transaction layer keep per answered INVITE while the transactions'
timers run (Timer L at the UAS, Timer M at the UAC: 32 s), measured with tracemalloc.

    python bench/bench_tx_retained.py [--calls 1000]

Two engines in this process over loopback UDP (127.0.0.1 sends, 127.0.0.2 answers), N INVITEs
with an SDP body, each answered 180 then 200 with SDP by the far engine's handler, which
keeps nothing; the sender lets go of each handle once its final response came, as the call
layer does. Reports the traced heap grown per INVITE once every final response came (both
engines: the UAC's client transaction and the UAS's server transaction are alive), and after
both engines stopped. Deterministic enough for an A/B of two checkouts (PYTHONPATH naming each).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import pathlib
import socket
import sys
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.uri import parse_uri

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 8 0 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((host, 0))
        port: int = udp.getsockname()[1]
    return port


def invite(i: int) -> Request:
    headers = Headers(
        [
            ("Max-Forwards", "70"),
            ("From", f'"+44207123{i:04d}" <sip:+44207123{i:04d}@127.0.0.1>;tag=f{i}'),
            ("To", "<sip:agent@127.0.0.2>"),
            ("Call-ID", f"retained-{i}@127.0.0.1"),
            ("CSeq", "1 INVITE"),
            ("Contact", "<sip:sbc@127.0.0.1:5060>"),
            ("Content-Type", "application/sdp"),
            ("X-Call-Uuid", f"00000000-0000-0000-0000-{i:012d}"),
        ]
    )
    return Request("INVITE", parse_uri("sip:agent@127.0.0.2"), headers, SDP)


async def run(calls: int) -> None:
    a = SipEngine(TransportConfig(bind="127.0.0.1", port=free_port("127.0.0.1"), tcp=False))
    b = SipEngine(TransportConfig(bind="127.0.0.2", port=free_port("127.0.0.2"), tcp=False))
    await a.start()
    await b.start()
    contact = (("Contact", f"<sip:agent@127.0.0.2:{b.config.port}>"),)

    def answer(incoming: IncomingRequest) -> None:
        incoming.respond(180, headers=contact)
        incoming.respond(200, headers=(*contact, ("Content-Type", "application/sdp")), body=SDP)

    b.on_request = answer
    target = Destination("udp", "127.0.0.2", b.config.port)
    # One round first: caches (parsed URIs, names) are filled before the measured part.
    await a.send_request(invite(-1), target)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for start in range(0, calls, 50):
        handles = [a.send_request(invite(i), target) for i in range(start, start + 50)]
        finals = await asyncio.gather(*(handle.wait_final() for handle in handles))
        assert all(final.status == 200 for final in finals), [f.status for f in finals]
        del handles, finals
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    waiting = sum(
        count
        for engine in (a, b)
        for name, count in engine.table_sizes().items()
        if name.startswith("tx_")
    )
    print(f"INVITEs answered: {calls}; transactions waiting for their timers: {waiting}")
    print(f"retained while the timers run: {held / calls:.0f} B per answered INVITE (both ends)")
    print(f"engine tables: a {a.table_sizes()}")
    print(f"               b {b.table_sizes()}")
    await a.stop()
    await b.stop()
    tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    asyncio.run(run(args.calls))


if __name__ == "__main__":
    main()
