"""Cost of the sans-I/O core for one bridged call, without sockets, asyncio or logging.

One call is what sbc's core does for a call from 3CX (UDP) bridged to Retell (TCP):

  caller leg, sbc is UAS (layer ``pbx``, unreliable):
    INVITE in (parse, validate, receive), 180 and 200 out (build_response, respond,
    serialize), ACK in, BYE in, 200 out
  agent leg, sbc is UAC (layer ``retell``, reliable):
    INVITE out (build, send_request, serialize), 100, 180, 200 in (StreamParser, validate,
    receive), ACK out (send_stateless), BYE out, 200 in
  the dialogs of both legs (from_uas, from_uac, create_request for the ACK and BYE to Retell)

Every call has its own Call-ID, tags and branches (memos by text must not flatter it). The
messages a peer sends are made before the measured part.

With ``--sdp`` each call also does what pass-through media does to the two SDP bodies with the
sans-I/O SDP code (``sbc.sdp``): the 3CX offer parsed, filtered to the default codecs, given
sbc's ``o=`` line and written out for Retell; Retell's answer parsed, given sbc's ``o=`` line
and written out for 3CX; the offer's and the answer's first audio stream and direction read
(what the media session reads to decide where RTP goes). Each call's SDP has its own
session id and port. Reports:

* us/call: wall time of the measured part divided by the calls (noisy on a shared machine);
* retained bytes per completed transaction (tracemalloc): what the layers still hold after the
  calls while the transactions wait for Timers L, M, J (32 s over UDP; the simulated clock runs
  at ``--rate`` calls/s, so 2,000 calls end before the first of them fires), then after the
  timers fired (must be back to about zero);
* with ``--phase setup`` only the messages are made: run both phases under callgrind and
  divide the difference of the instruction counts by the calls (see docs/performance.md).

Run from the repository root:  python bench/bench_core.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbc.sdp.model import Origin
from sbc.sdp.offer_answer import filter_codecs
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.dialog import Dialog
from sbc.sip.fields import parse_via
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.serializer import serialize
from sbc.sip.server_transaction import build_response
from sbc.sip.transaction import (
    AckReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    TransactionLayer,
)
from sbc.sip.uri import parse_uri
from sbc.sip.validate import validate_request, validate_response

PBX = ("192.168.1.10", 5060, "udp")
RETELL = ("sip.retellai.com", 5060, "tcp")


def sdp_3cx(i: int) -> bytes:
    """3CX's offer for call ``i`` (its own session id and RTP port; same length every call)."""
    return (
        b"v=0\r\n"
        b"o=3cxPS %d %d IN IP4 192.168.1.10\r\n"
        b"s=3cxPS Audio call\r\n"
        b"c=IN IP4 192.168.1.10\r\n"
        b"t=0 0\r\n"
        b"m=audio %d RTP/AVP 0 8 9 101\r\n"
        b"a=rtpmap:0 PCMU/8000\r\n"
        b"a=rtpmap:8 PCMA/8000\r\n"
        b"a=rtpmap:9 G722/8000\r\n"
        b"a=rtpmap:101 telephone-event/8000\r\n"
        b"a=fmtp:101 0-11,16\r\n"
        b"a=sendrecv\r\n"
    ) % (297321271296 + i, 734282285057 + i, 7078 + 2 * (i % 1000))


def sdp_retell(i: int) -> bytes:
    """Retell's answer for call ``i`` (its own session id and RTP port)."""
    return (
        b"v=0\r\n"
        b"o=- %d %d IN IP4 10.20.30.40\r\n"
        b"s=-\r\n"
        b"c=IN IP4 10.20.30.40\r\n"
        b"t=0 0\r\n"
        b"m=audio %d RTP/AVP 0 101\r\n"
        b"a=rtpmap:0 PCMU/8000\r\n"
        b"a=rtpmap:101 telephone-event/8000\r\n"
        b"a=fmtp:101 0-16\r\n"
        b"a=sendrecv\r\n"
    ) % (3942342 + i, 3942343 + i, 30000 + 2 * (i % 10000))


# What pass-through media puts in the o= line of what it sends, and its default codecs.
SBC_ORIGIN = Origin("sbc", "1804289383", 1804289383, "IN", "IP4", "192.168.1.50")
CODECS = ("PCMU", "PCMA", "G722", "telephone-event")


def sdp_offer(body: bytes) -> bytes:
    """3CX's offer as sbc sends it on to Retell (pass-through media)."""
    offer = parse_sdp(body)
    audio = offer.audio()
    assert audio is not None and offer.direction(audio) == "sendrecv"
    return serialize_sdp(dataclasses.replace(filter_codecs(offer, CODECS), origin=SBC_ORIGIN))


def sdp_answer(body: bytes) -> bytes:
    """Retell's answer as sbc sends it on to 3CX (pass-through media)."""
    answer = parse_sdp(body)
    audio = answer.audio()
    assert audio is not None and answer.direction(audio) == "sendrecv"
    return serialize_sdp(dataclasses.replace(answer, origin=SBC_ORIGIN))


def _msg(head: str, body: bytes = b"") -> bytes:
    lines = head.strip("\n").split("\n")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def pbx_messages(i: int) -> tuple[bytes, bytes, bytes]:
    """INVITE, ACK and BYE as 3CX sends them for call ``i`` (the To tag is sbc's ``s{i}``)."""
    common = (
        f'From: "+1415555{i:04d}"<sip:10000@192.168.1.10:5060>;tag=7b3f{i:x}\n'
        f"Call-ID: ZmY2NmQ1YzE0OTc1NzE1ZjYyYzE4{i:08d}.\n"
    )
    invite = _msg(
        "INVITE sip:201@192.168.1.50:5060;transport=UDP SIP/2.0\n"
        f"Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-524287-1---4f7a{i:012x};rport\n"
        "Max-Forwards: 70\n"
        "Contact: <sip:10000@192.168.1.10:5060>\n"
        'To: "Retell Agent"<sip:201@192.168.1.50:5060>\n'
        f"{common}"
        "CSeq: 2 INVITE\n"
        "Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REGISTER, SUBSCRIBE, NOTIFY, REFER, INFO,"
        " MESSAGE, UPDATE\n"
        "Content-Type: application/sdp\n"
        "Supported: replaces, timer\n"
        "User-Agent: 3CXPhoneSystem 18.0.9.20 (20)\n"
        "P-Asserted-Identity: <sip:+14155550100@192.168.1.10:5060>\n"
        "Session-Expires: 1800;refresher=uac\n"
        "Min-SE: 90\n"
        "X-3CX-CallID: 00000191A2B3C4D5",
        sdp_3cx(i),
    )
    to = f'To: "Retell Agent"<sip:201@192.168.1.50:5060>;tag=s{i}\n'
    ack = _msg(
        "ACK sip:201@192.168.1.50:5060;transport=udp SIP/2.0\n"
        f"Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-524287-1---a1c{i:012x};rport\n"
        "Max-Forwards: 70\n"
        f"{to}{common}"
        "CSeq: 2 ACK\n"
        "User-Agent: 3CXPhoneSystem 18.0.9.20 (20)"
    )
    bye = _msg(
        "BYE sip:201@192.168.1.50:5060;transport=udp SIP/2.0\n"
        f"Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-524287-1---b7e{i:012x};rport\n"
        "Max-Forwards: 70\n"
        f"{to}{common}"
        "CSeq: 3 BYE\n"
        "User-Agent: 3CXPhoneSystem 18.0.9.20 (20)"
    )
    return invite, ack, bye


def retell_responses(i: int) -> bytes:
    """100, 180 and 200 to sbc's INVITE of call ``i`` and the 200 to its BYE, on one stream."""
    via = f"Via: SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bKsbc{i:x}i;rport=40000;received=1.2.3.4\n"
    bye_via = (
        f"Via: SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bKsbc{i:x}b;rport=40000;received=1.2.3.4\n"
    )
    common = (
        f"From: <sip:+14155550100@sbc.example.com>;tag=a{i:x}\n"
        f"Call-ID: sbc-{i:016x}@sbc.example.com\n"
    )
    to = f"To: <sip:+14155550199@sip.retellai.com>;tag=r{i:x}\n"
    out = [
        _msg(
            f"SIP/2.0 100 Trying\n{via}{common}To: <sip:+14155550199@sip.retellai.com>\n"
            "CSeq: 1 INVITE"
        ),
        _msg(
            f"SIP/2.0 180 Ringing\n{via}{common}{to}CSeq: 1 INVITE\n"
            "Contact: <sip:10.20.30.40:5060;transport=tcp>"
        ),
        _msg(
            f"SIP/2.0 200 OK\n{via}{common}{to}CSeq: 1 INVITE\n"
            "Contact: <sip:10.20.30.40:5060;transport=tcp>\n"
            "Allow: INVITE, ACK, CANCEL, BYE, REFER, OPTIONS\n"
            "Content-Type: application/sdp",
            sdp_retell(i),
        ),
        _msg(f"SIP/2.0 200 OK\n{bye_via}{common}{to}CSeq: 2 BYE"),
    ]
    return b"".join(out)


AGENT_URI = parse_uri("sip:+14155550199@sip.retellai.com;transport=tcp")


def agent_request(
    i: int, method: str, seq: int, branch: str, to_tag: str | None, body: bytes = b""
) -> Request:
    """A request sbc sends to Retell for call ``i``, built as the b2bua builds its own."""
    to = "<sip:+14155550199@sip.retellai.com>"
    if to_tag is not None:
        to += f";tag={to_tag}"
    items = [
        ("Via", f"SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bKsbc{i:x}{branch};rport"),
        ("Max-Forwards", "70"),
        ("From", f"<sip:+14155550100@sbc.example.com>;tag=a{i:x}"),
        ("To", to),
        ("Call-ID", f"sbc-{i:016x}@sbc.example.com"),
        ("CSeq", f"{seq} {method}"),
        ("User-Agent", "sbc"),
    ]
    if method == "INVITE":
        items += [
            ("Contact", "<sip:sbc@127.0.0.1:5061;transport=tcp>"),
            ("X-Retell-Call", f"call-{i}"),
            ("Content-Type", "application/sdp"),
        ]
    return Request(method, AGENT_URI, Headers(items), body)


def in_dialog(dialog: Dialog, method: str, i: int, branch: str, cseq: int | None = None) -> Request:
    """A request in ``dialog`` as a leg makes it (its Via parsed, then given the branch)."""
    via = parse_via("SIP/2.0/TCP 127.0.0.1:5061;branch=z9hG4bKx;rport")
    return dialog.create_request(
        method,
        via=via,
        branch=f"z9hG4bKsbc{i:x}{branch}",
        cseq=cseq,
        headers=[("User-Agent", "sbc")],
    )


def one_call(
    i: int,
    pbx_in: tuple[bytes, bytes, bytes],
    retell_in: bytes,
    pbx: TransactionLayer,
    retell: TransactionLayer,
    now: float,
    sdp: bool = False,
) -> int:
    """Run call ``i``; returns the octets sbc sent (so that nothing is optimised away).

    With ``sdp`` the bodies sbc sends are made from the peers' by :func:`sdp_offer` and
    :func:`sdp_answer`; without, the peers' bodies are sent on as they came."""
    sent = 0
    invite_raw, ack_raw, bye_raw = pbx_in

    def inbound(
        layer: TransactionLayer, message: Request | Response, source: object
    ) -> list[Event]:
        if isinstance(message, Request):
            validate_request(message)
        else:
            validate_response(message)
        layer.receive(message, source=source, reliable=layer is retell, now=now)
        return layer.events()

    def flush(layer: TransactionLayer) -> int:
        return sum(len(serialize(m)) for _, m in layer.datagrams_to_send())

    # Caller leg: the INVITE arrives.
    [req] = inbound(pbx, parse_message(invite_raw), PBX)
    assert isinstance(req, RequestReceived)
    invite_in = req.request
    tag = f"s{i}"
    pbx.respond(req.key, build_response(invite_in, 180, to_tag=tag), now=now)
    # Agent leg: sbc's INVITE to Retell, then its responses.
    offer = sdp_offer(invite_in.body) if sdp else invite_in.body
    agent_invite = agent_request(i, "INVITE", 1, "i", None, offer)
    retell.send_request(agent_invite, dest=RETELL, reliable=True, now=now)
    sent += flush(retell)
    stream = StreamParser()
    responses = stream.feed(retell_in)
    for resp in responses[:3]:
        for event in inbound(retell, resp, RETELL):
            assert isinstance(event, ResponseReceived)
    agent = Dialog.from_uac(agent_invite, responses[2])  # type: ignore[arg-type]
    retell.send_stateless(in_dialog(agent, "ACK", i, "a", cseq=1), dest=RETELL)
    sent += flush(retell)
    # Caller leg: 200 with sbc's SDP, the ACK, later the caller's BYE.
    ok = build_response(
        invite_in,
        200,
        to_tag=tag,
        headers=[("Contact", "<sip:201@192.168.1.50:5060>"), ("Content-Type", "application/sdp")],
        body=sdp_answer(responses[2].body) if sdp else responses[2].body,
    )
    pbx.respond(req.key, ok, now=now)
    caller = Dialog.from_uas(invite_in, ok)
    sent += flush(pbx)
    [ack] = inbound(pbx, parse_message(ack_raw), PBX)
    assert isinstance(ack, AckReceived)
    [bye] = inbound(pbx, parse_message(bye_raw), PBX)
    assert isinstance(bye, RequestReceived)
    pbx.respond(bye.key, build_response(bye.request, 200, to_tag=tag), now=now)
    sent += flush(pbx)
    # Agent leg: BYE to Retell and its 200.
    caller.receive_request(bye.request)
    caller.terminate()
    retell.send_request(in_dialog(agent, "BYE", i, "b"), dest=RETELL, reliable=True, now=now)
    sent += flush(retell)
    events = inbound(retell, responses[3], RETELL)
    assert isinstance(events[0], ResponseReceived)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--phase", choices=("setup", "all"), default="all")
    ap.add_argument("--memory", action="store_true", help="trace allocations (slower run)")
    ap.add_argument("--sdp", action="store_true", help="also the SDP work of pass-through media")
    ap.add_argument(
        "--rate", type=float, default=1000.0, help="calls per second of the simulated clock"
    )
    args = ap.parse_args()
    n = args.calls
    pbx_in = [pbx_messages(i) for i in range(n)]
    retell_in = [retell_responses(i) for i in range(n)]
    pbx, retell = TransactionLayer(), TransactionLayer()
    if args.phase == "setup":
        return
    gc.collect()
    if args.memory:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    sent = 0
    for i in range(n):
        # The clock advances as at --rate calls/s and due timers fire as the engine fires
        # them (the 200 ms Trying timers end; Timers J, L and M wait 32 s).
        now = 1.0 + i / args.rate
        pbx.handle_timer(now)
        retell.handle_timer(now)
        sent += one_call(i, pbx_in[i], retell_in[i], pbx, retell, now=now, sdp=args.sdp)
    elapsed = time.perf_counter() - t0
    pbx.events()
    retell.events()
    gc.collect()
    waiting = len(pbx) + len(retell)
    print(f"calls: {n}  octets sent per call: {sent / n:.0f}")
    print(f"us/call: {elapsed / n * 1e6:.1f}")
    print(f"transactions waiting for their timers: {waiting} ({waiting / n:.1f} per call)")
    if args.memory:
        held = tracemalloc.get_traced_memory()[0] - before
        print(
            f"retained while the timers run: {held / n:.0f} B/call, "
            f"{held / max(waiting, 1):.0f} B/completed transaction"
        )
    for layer in (pbx, retell):
        while (deadline := layer.next_deadline()) is not None:
            layer.handle_timer(deadline)
        layer.events()
    gc.collect()
    assert len(pbx) + len(retell) == 0
    if args.memory:
        after = tracemalloc.get_traced_memory()[0] - before
        print(f"retained after the timers fired: {after / n:.0f} B/call")


if __name__ == "__main__":
    main()
