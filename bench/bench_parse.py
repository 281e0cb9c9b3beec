"""Parse and serialize throughput of a ~1 KB 3CX INVITE with SDP, on one core.

Run from the repository root:  python bench/bench_parse.py [--seconds 2]
Prints messages/s (best of 5 timeit repeats) for parse, serialize, parse+serialize, and
parse + reading the fields a B2BUA reads of every message (Call-ID, CSeq, top Via, From/To
tags, Request-URI transport) + serialize.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize

SDP = (
    b"v=0\r\n"
    b"o=3cxPS 297321271296 734282285057 IN IP4 192.168.1.10\r\n"
    b"s=3cxPS Audio call\r\n"
    b"c=IN IP4 192.168.1.10\r\n"
    b"t=0 0\r\n"
    b"m=audio 7078 RTP/AVP 0 8 9 101\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:9 G722/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\n"
    b"a=fmtp:101 0-11,16\r\n"
    b"a=sendrecv\r\n"
)

INVITE = (
    b"INVITE sip:201@192.168.1.50:5060;transport=UDP SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-524287-1---4f7a6d2b0c1e9a83;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:10000@192.168.1.10:5060>\r\n"
    b'To: "Retell Agent"<sip:201@192.168.1.50:5060>\r\n'
    b'From: "+14155550100"<sip:10000@192.168.1.10:5060>;tag=7b3f9a21\r\n'
    b"Call-ID: ZmY2NmQ1YzE0OTc1NzE1ZjYyYzE4NzA2MjQ0MTA0NTE.\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO,"
    b" MESSAGE, UPDATE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Supported: replaces, timer\r\n"
    b"User-Agent: 3CXPhoneSystem 18.0.9.20 (20)\r\n"
    b"P-Asserted-Identity: <sip:+14155550100@192.168.1.10:5060>\r\n"
    b"Session-Expires: 1800;refresher=uac\r\n"
    b"Min-SE: 90\r\n"
    b"X-3CX-CallID: 00000191A2B3C4D5\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)


def distinct_invites(count: int) -> list[bytes]:
    """``count`` INVITEs that differ as real calls do (caller, tag, Call-ID, branch), so the
    parser's memos of repeated values (Request-URI, To) hit and the per-call ones miss."""
    out = []
    for i in range(count):
        out.append(
            INVITE.replace(b"4f7a6d2b0c1e9a83", b"%016x" % (i * 7919))
            .replace(b"tag=7b3f9a21", b"tag=%08x" % (i * 104729))
            .replace(b"ZmY2NmQ1YzE0OTc1NzE1ZjYyYzE4NzA2MjQ0MTA0NTE.", b"c%043d." % i)
            .replace(b"+14155550100", b"+1415%07d" % i)
        )
    return out


def rate(stmt: object, seconds: float) -> float:
    timer = timeit.Timer(stmt)  # type: ignore[arg-type]
    number, _ = timer.autorange()
    number = max(number, int(number * seconds / 0.2))
    best = min(timer.repeat(repeat=5, number=number))
    return number / best


def parse_read_serialize(data: bytes = INVITE) -> bytes:
    msg = parse_message(data)
    _ = (msg.call_id, msg.cseq, msg.top_via.branch, msg.from_tag, msg.to_tag)
    return serialize(msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=0.5, help="rough duration of each repeat")
    args = ap.parse_args()
    msg = parse_message(INVITE)
    assert serialize(msg) == INVITE, "the benchmark message must round-trip byte for byte"
    print(f"message size: {len(INVITE)} bytes")
    results = {
        "parse": rate(lambda: parse_message(INVITE), args.seconds),
        "serialize": rate(lambda: serialize(msg), args.seconds),
        "parse+serialize": rate(lambda: serialize(parse_message(INVITE)), args.seconds),
        "parse+fields+ser": rate(parse_read_serialize, args.seconds),
    }
    # Distinct messages: each call of the statement takes the next one of 4,096.
    messages = distinct_invites(4096)
    assert all(serialize(parse_message(m)) == m for m in messages)
    cycle = itertools.cycle(messages)
    results["parse (distinct)"] = rate(lambda: parse_message(next(cycle)), args.seconds)
    results["parse+fields+ser (distinct)"] = rate(
        lambda: parse_read_serialize(next(cycle)), args.seconds
    )
    for name, value in results.items():
        print(f"{name:28s} {value:12,.0f} messages/s")


if __name__ == "__main__":
    main()
