"""RFC 4475 messages whose handling is the transaction layer's (§3.2.1, §3.3.10, §3.4.1)."""

from __future__ import annotations

from pathlib import Path

from test_tx_helpers import UAC, UAS, make_request

from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.transaction import (
    AckReceived,
    ClientState,
    RequestReceived,
    ServerState,
    StrayResponse,
    TransactionLayer,
    build_response,
)

FIXTURES = Path(__file__).parents[2] / "sip-fixtures" / "rfc4475"


def load(name: str) -> Request | Response:
    return parse_message((FIXTURES / name).read_bytes())


def test_bcast_response_with_two_vias_is_dropped() -> None:
    # §3.3.10: the top Via is ours, but a response with a second Via is not for a UA.
    layer = TransactionLayer()
    invite = make_request(
        branch="z9hG4bK1324923",
        via_host="192.0.2.198",
        cseq=35,
        call_id="bcast.0384840201234ksdfak3j2erwedfsASdf",
    )
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    response = load("bcast.dat")
    assert isinstance(response, Response)
    layer.receive(response, source=UAS, reliable=False, now=0.1)
    assert layer.events() == [StrayResponse(response, UAS)]
    assert layer.client_state(key) is ClientState.CALLING


def test_badbranch_cookie_alone_matched_by_rfc2543_rules() -> None:
    # §3.2.1: a branch of just "z9hG4bK" carries no transaction identifier.
    layer = TransactionLayer()
    request = load("badbranch.dat")
    assert isinstance(request, Request)
    layer.receive(request, source=UAC, reliable=False, now=0.0)
    [event] = layer.events()
    assert isinstance(event, RequestReceived)
    assert event.key.startswith("s2543|")
    layer.receive(request, source=UAC, reliable=False, now=0.5)
    assert layer.events() == []
    # Another request with the same bare cookie but another CSeq is another transaction.
    other = make_request("OPTIONS", branch="z9hG4bK", cseq=9)
    layer.receive(other, source=UAC, reliable=False, now=0.6)
    assert [type(e) for e in layer.events()] == [RequestReceived]


def test_inv2543_invite_without_branch_and_its_ack() -> None:
    layer = TransactionLayer()
    invite = load("inv2543.dat")
    assert isinstance(invite, Request)
    layer.receive(invite, source=UAC, reliable=False, now=0.0)
    [event] = layer.events()
    assert isinstance(event, RequestReceived)
    layer.receive(invite, source=UAC, reliable=False, now=0.3)
    assert layer.events() == []
    layer.respond(event.key, build_response(invite, 404, to_tag="t404"), now=0.4)
    layer.datagrams_to_send()
    ack = Request(
        "ACK",
        invite.uri,
        invite.headers.set("CSeq", "56 ACK")
        .set("To", "sip:+16505552222@ss1.example.net;user=phone;tag=t404")
        .remove("Content-Type"),
    )
    layer.receive(ack, source=UAC, reliable=False, now=0.5)
    assert layer.events() == []
    assert layer.server_state(event.key) is ServerState.CONFIRMED
    # An ACK with another To tag is not this transaction's.
    stray = Request("ACK", ack.uri, ack.headers.set("To", "sip:x@y;tag=zzz"))
    layer.receive(stray, source=UAC, reliable=False, now=0.6)
    assert layer.events() == [AckReceived(stray, UAC)]
