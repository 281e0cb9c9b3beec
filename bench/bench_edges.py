"""Instructions of a call's edges in process, one piece at a time (docs/performance.md,
"Round 9: obs").

    python bench/bench_edges.py PIECE N    # invite caller facts render build stamp note none

Runs PIECE N times and nothing else, so that callgrind's counts for two values of N, their
difference divided by the difference of the Ns, give the piece's cost without start-up (any
checkout: PYTHONPATH names it):

    for n in 1000 5000; do PYTHONHASHSEED=0 valgrind --tool=callgrind \\
      --callgrind-out-file=/dev/null python bench/bench_edges.py render $n 2>&1 | grep Collected
    done

invite: what a call does to make its INVITE to Retell (caller_of, call_facts, the five X-
headers of bench_calls.py rendered, LegIds, build_b_invite); caller, facts, render, build: its
parts; stamp: a pass-through session's offer and answer (filter and two o= stamps); note: a new
ladder and ten messages through Ladder.note (five INVITEs, five 200s).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from sbc.b2bua.ladder import Ladder
from sbc.b2bua.messages import (
    BridgeConfig,
    LegIds,
    LocalAddress,
    RetellTarget,
    build_b_invite,
    call_facts,
    caller_of,
)
from sbc.b2bua.numbers import NumberPlan
from sbc.b2bua.templates import compile_headers
from sbc.media.base import PassthroughSession
from sbc.net.addresses import Destination
from sbc.sdp.parser import parse_sdp
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

PLAN = NumberPlan(country_code="44", national_prefix="0", international_prefix="00")
TARGET = RetellTarget("sip.retellai.com", None, "tcp", "+14155550100")
LOCAL = LocalAddress("198.51.100.7", 5080, "tcp")
_HEAD = (
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-pbx-1;rport\r\n"
    b'From: "Alice" <sip:02071234567@10.0.0.1>;tag=pbxtag\r\n'
)
_TAIL = (
    b"Call-ID: pbx-call-1@10.0.0.1\r\nCSeq: 2 INVITE\r\n"
    b"Contact: <sip:6000@10.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n"
)
A: Any = parse_message(
    b"INVITE sip:101@10.0.0.5:5060 SIP/2.0\r\n"
    + _HEAD.replace(b"From", b"Max-Forwards: 69\r\nFrom")
    + b"To: <sip:101@10.0.0.1>\r\n"
    + _TAIL
)
RESP: Any = parse_message(
    b"SIP/2.0 200 OK\r\n" + _HEAD + b"To: <sip:101@10.0.0.1>;tag=x\r\n" + _TAIL
)
assert isinstance(A, Request) and isinstance(RESP, Response)
HEADERS = compile_headers(
    {
        "X-Caller-Number": "{caller_number}",
        "X-Caller-Name": "{caller_name}",
        "X-Called": "{called}",
        "X-PBX-Call-ID": "{pbx_call_id}",
        "X-Call-UUID": "{call_uuid}",
    }
)
CONFIG = BridgeConfig("101", TARGET, user_agent="sbc/0.1", headers=HEADERS)
SDP = (
    b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
    b"m=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
)
SD = parse_sdp(SDP)
CALLER = caller_of(A, PLAN)
FACTS = call_facts(A, CALLER, "101", "u-1", 5.0)
RENDERED = CONFIG.headers.render(FACTS)
DEST = Destination("udp", "10.0.0.1", 5060)


def invite() -> None:
    caller = caller_of(A, PLAN)
    rendered = CONFIG.headers.render(call_facts(A, caller, "101", "u-1", 5.0))
    build_b_invite(CONFIG, LOCAL, LegIds("b-call", "btag"), caller, rendered.headers, SDP)


def _run(coro: Coroutine[Any, Any, Any]) -> None:
    with contextlib.suppress(StopIteration):  # nothing awaited: done in one step
        coro.send(None)


def stamp() -> None:
    session = PassthroughSession("c")
    _run(session.offer("a", SD))
    _run(session.answer("b", SD))


def note() -> None:
    ladder = Ladder()
    for _ in range(5):
        for direction, message in (("in", A), ("out", RESP)):
            ladder.note(
                direction,
                message,
                DEST,
                "10.0.0.5:5060",
                leg="a",
                peer="pbx",
                at=1.0,
                leg_call_id="pbx-call-1@10.0.0.1",
            )


PIECES: dict[str, Callable[[], object]] = {
    "invite": invite,
    "caller": lambda: caller_of(A, PLAN),
    "facts": lambda: call_facts(A, CALLER, "101", "u-1", 5.0),
    "render": lambda: CONFIG.headers.render(FACTS),
    "build": lambda: build_b_invite(
        CONFIG, LOCAL, LegIds("b-call", "btag"), CALLER, RENDERED.headers, SDP
    ),
    "stamp": stamp,
    "note": note,
    "none": lambda: None,
}


def main() -> None:
    piece = PIECES[sys.argv[1]]
    for _ in range(int(sys.argv[2])):
        piece()


if __name__ == "__main__":
    main()
