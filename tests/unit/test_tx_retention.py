"""What a transaction keeps once its final response went: only what its remaining duties need.

A completed transaction waits up to 32 s (Timers D, J, K, L, M); thousands wait at a time under
load, so each keeps the response it may resend (or just its To tag), never the request.
"""

from __future__ import annotations

from test_tx_helpers import UAC, UAS, make_request, on_wire, reply

from sbc.sip.errors import ParseError
from sbc.sip.message import parse_address
from sbc.sip.serializer import serialize
from sbc.sip.transaction import (
    AckReceived,
    CancelReceived,
    ClientState,
    RequestReceived,
    ResponseReceived,
    ServerState,
    TransactionLayer,
    TransactionTerminated,
    build_cancel,
)
from sbc.sip.uri import parse_name_addr


def _server(method: str = "INVITE", **kw: object) -> tuple[TransactionLayer, str]:
    layer = TransactionLayer()
    layer.receive(make_request(method, **kw), source=UAC, reliable=False, now=0.0)
    [event] = layer.events()
    assert isinstance(event, RequestReceived)
    return layer, event.key


def test_accepted_invite_server_keeps_the_to_tag_only() -> None:
    layer, key = _server()
    invite = make_request()
    ok = reply(invite, 200, "uas1")
    layer.respond(key, ok, now=0.1)
    assert layer.datagrams_to_send() == [(UAC, ok)]
    # Retired: the transaction object is gone, its record keeps the source and the To tag.
    assert key not in layer._servers
    assert layer._done[key] == (0.1 + 32, key, ServerState.ACCEPTED, UAC, "uas1")
    assert layer.server_state(key) is ServerState.ACCEPTED
    # RFC 6026 §7.1: the TU's 2xx copies go out and are not kept either.
    layer.respond(key, ok, now=0.6)
    assert layer.datagrams_to_send() == [(UAC, ok)]
    assert layer._done[key][4] == "uas1"
    # An INVITE copy is absorbed (nothing sent), the ACK passed up.
    layer.receive(invite, source=UAC, reliable=False, now=0.7)
    ack = make_request("ACK", cseq_method="ACK", to_tag="uas1")
    layer.receive(ack, source=UAC, reliable=False, now=0.8)
    assert layer.datagrams_to_send() == []
    assert layer.events() == [AckReceived(ack, UAC)]


def test_cancel_after_the_2xx_gets_the_tag_of_the_2xx() -> None:
    layer, key = _server()
    invite = make_request()
    layer.respond(key, reply(invite, 200, "uas1"), now=0.1)
    layer.datagrams_to_send()
    layer.receive(build_cancel(invite), source=UAC, reliable=False, now=0.2)
    [(_, answer)] = layer.datagrams_to_send()
    assert (answer.status, answer.to_tag) == (200, "uas1")  # type: ignore[union-attr]
    # Too late to cancel: the TU is not told.
    assert not any(isinstance(e, CancelReceived) for e in layer.events())


def test_rfc2543_ack_matches_the_tag_of_the_final_response() -> None:
    # Without the magic cookie the ACK's To tag must be that of the response sent (§17.2.3).
    layer, key = _server(branch=None)
    invite = make_request(branch=None)
    busy = reply(invite, 486, "uas1")
    layer.respond(key, busy, now=0.1)
    assert layer._servers[key].request is None
    assert layer._servers[key].last_response == busy  # resent on Timer G and INVITE copies
    other = make_request("ACK", branch=None, cseq_method="ACK", to_tag="other")
    layer.receive(other, source=UAC, reliable=False, now=0.2)
    assert layer.events() == [AckReceived(other, UAC)]  # not this transaction's
    ack = make_request("ACK", branch=None, cseq_method="ACK", to_tag="uas1")
    layer.receive(ack, source=UAC, reliable=False, now=0.3)
    assert layer.events() == []  # absorbed: Confirmed
    layer.handle_timer(0.5)  # Timer G was stopped by the ACK
    assert layer.datagrams_to_send() == [(UAC, busy)]


def test_rfc2543_ack_after_a_2xx_without_tag_matches() -> None:
    layer, key = _server(branch=None)
    invite = make_request(branch=None)
    layer.respond(key, reply(invite, 200, None), now=0.1)
    assert layer._done[key][2:] == (ServerState.ACCEPTED, UAC, None)
    ack = make_request("ACK", branch=None, cseq_method="ACK")
    layer.receive(ack, source=UAC, reliable=False, now=0.2)
    assert layer.events() == [AckReceived(ack, UAC)]  # passed up by the Accepted transaction


def test_non_invite_server_answers_copies_without_the_request() -> None:
    layer, key = _server("BYE", to_tag="uas1")
    bye = make_request("BYE", to_tag="uas1")
    ok = reply(bye, 200, None)
    layer.respond(key, ok, now=0.1)
    layer.datagrams_to_send()
    assert layer._done[key][2:] == (ServerState.COMPLETED, UAC, serialize(ok))
    layer.receive(bye, source=UAC, reliable=False, now=1.0)
    assert on_wire(layer.datagrams_to_send()) == on_wire([(UAC, ok)])


def test_client_transactions_drop_the_request_at_the_final_response() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    bye = make_request("BYE", branch="z9hG4bKbye", cseq=2, to_tag="uas1")
    bye_key = layer.send_request(bye, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    ok = reply(invite, 200, "uas1")
    layer.receive(ok, source=UAS, reliable=False, now=0.1)
    layer.receive(reply(bye, 200, None), source=UAS, reliable=False, now=0.1)
    assert not layer._clients
    assert layer._done[key][2:] == (ClientState.ACCEPTED, UAS, "uas1")
    assert layer._done[bye_key][2:] == (ClientState.COMPLETED, UAS, None)
    # A 2xx copy is still recognised as one in Accepted (RFC 6026 §8.4).
    layer.receive(ok, source=UAS, reliable=False, now=0.2)
    events = layer.events()
    assert [(e.key, e.retransmission) for e in events if isinstance(e, ResponseReceived)] == [
        (key, False),
        (bye_key, False),
        (key, True),
    ]
    # Nothing is retransmitted from here on; the timers end both transactions.
    while (deadline := layer.next_deadline()) is not None:
        layer.handle_timer(deadline)
    assert layer.datagrams_to_send() == []
    assert len(layer) == 0
    assert {e.key for e in layer.events() if isinstance(e, TransactionTerminated)} == {key, bye_key}


def test_completed_invite_client_resends_its_ack_without_the_request() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    busy = reply(invite, 486, "uas1")
    layer.receive(busy, source=UAS, reliable=False, now=0.1)
    [(_, ack)] = layer.datagrams_to_send()
    assert layer._done[key][2:] == (ClientState.COMPLETED, UAS, serialize(ack))
    layer.receive(busy, source=UAS, reliable=False, now=0.2)
    assert on_wire(layer.datagrams_to_send()) == on_wire([(UAS, ack)])


def test_from_memo_by_uri_gives_the_parsers_values() -> None:
    # The quoted display name is split off before the memo; what follows must still be a
    # <URI> for that (else the whole value is parsed, and may fail as the parser fails).
    for text in (
        '"+14155550100"<sip:10000@192.0.2.1:5060>;tag=a1',
        '"Doe" <sip:j@x;transport=tcp>;x=1;tag=b2',
        '"no angle" sip:j@x;tag=c3',
        '"esc\\"aped" <sip:j@x>;tag=d4',
    ):
        try:
            expected: object = parse_name_addr(text)
        except ParseError:
            expected = "ParseError"
        try:
            got: object = parse_address(text)
        except ParseError:
            got = "ParseError"
        assert got == expected
