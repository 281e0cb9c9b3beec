"""Server transactions (RFC 3261 §17.2, RFC 6026), CANCEL (§9.2) and request matching."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from test_tx_helpers import UAC, make_request, on_wire, reply, run_until

from sbc.sip.errors import BadRequest, ProtocolError
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import INVITE_SERVER_TABLE, ServerInput
from sbc.sip.transaction import (
    AckReceived,
    CancelReceived,
    RequestReceived,
    ServerState,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    build_cancel,
    build_response,
    build_trying,
    cancelled_key,
    server_key,
)


def start(
    method: str = "INVITE", *, reliable: bool = False, **kw: Any
) -> tuple[TransactionLayer, Request, str]:
    layer = TransactionLayer()
    request = make_request(method, **kw)
    layer.receive(request, source=UAC, reliable=reliable, now=0.0)
    [event] = layer.events()
    assert isinstance(event, RequestReceived)
    assert event.request == request
    assert event.source == UAC
    return layer, request, event.key


def statuses(layer: TransactionLayer) -> list[int]:
    return [m.status for _, m in layer.datagrams_to_send() if isinstance(m, Response)]


# -- INVITE server transaction ---------------------------------------------------------------


def test_invite_server_sends_100_trying_after_200_ms() -> None:
    layer, invite, key = start(extra=(("Timestamp", "54"),))
    assert layer.server_state(key) is ServerState.PROCEEDING
    assert layer.datagrams_to_send() == []
    assert layer.next_deadline() == pytest.approx(0.2)
    layer.handle_timer(0.2)
    [(dest, trying)] = layer.datagrams_to_send()
    assert dest == UAC
    assert isinstance(trying, Response)
    assert trying.status == 100
    assert trying.to_tag is None  # §8.2.6.1
    assert trying.headers.get("Timestamp") == "54"
    assert trying == build_trying(invite)
    # §17.2.1: a retransmitted INVITE gets the last provisional response again.
    layer.receive(invite, source=UAC, reliable=False, now=0.5)
    assert layer.datagrams_to_send() == [(UAC, trying)]
    assert layer.events() == []


def test_no_automatic_100_when_tu_answers_in_time() -> None:
    layer, invite, key = start()
    layer.receive(invite, source=UAC, reliable=False, now=0.05)  # nothing to resend yet
    ringing = reply(invite, 180)
    layer.respond(key, ringing, now=0.1)
    assert layer.datagrams_to_send() == [(UAC, ringing)]
    assert layer.next_deadline() is None
    layer.handle_timer(1.0)
    assert layer.datagrams_to_send() == []


def test_invite_non_2xx_retransmitted_with_timer_g_until_ack_then_timer_i() -> None:
    layer, invite, key = start()
    busy = reply(invite, 486)
    layer.respond(key, busy, now=0.1)
    assert layer.datagrams_to_send() == [(UAC, busy)]
    assert layer.server_state(key) is ServerState.COMPLETED
    sent = run_until(layer, 8.0)
    assert sent == pytest.approx([0.6, 1.6, 3.6, 7.6])
    # A retransmitted INVITE in Completed gets the final response again.
    layer.receive(invite, source=UAC, reliable=False, now=8.0)
    assert layer.datagrams_to_send() == [(UAC, busy)]
    ack = make_request("ACK", cseq_method="ACK", to_tag="tt1")
    layer.receive(ack, source=UAC, reliable=False, now=8.1)
    assert layer.server_state(key) is ServerState.CONFIRMED
    assert layer.events() == []  # absorbed: the ACK of a non-2xx is the transaction's
    layer.receive(ack, source=UAC, reliable=False, now=9.0)
    layer.receive(invite, source=UAC, reliable=False, now=9.0)
    assert layer.datagrams_to_send() == []
    assert layer.events() == []
    assert layer.next_deadline() == pytest.approx(13.1)  # Timer I = T4
    layer.handle_timer(13.1)
    assert layer.events() == [TransactionTerminated(key)]


def test_invite_timer_g_capped_at_t2_and_timer_h() -> None:
    layer, invite, key = start()
    layer.respond(key, reply(invite, 603), now=0.0)
    layer.datagrams_to_send()
    sent = run_until(layer, 31.9)
    assert sent == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    layer.handle_timer(32.0)
    assert layer.events() == [TransactionTimedOut(key), TransactionTerminated(key)]
    assert layer.next_deadline() is None


def test_invite_server_reliable_no_timer_g_and_timer_i_zero() -> None:
    layer, invite, key = start(reliable=True)
    layer.respond(key, reply(invite, 486), now=0.1)
    layer.datagrams_to_send()
    assert layer.next_deadline() == pytest.approx(32.1)  # only Timer H
    ack = make_request("ACK", cseq_method="ACK", to_tag="tt1")
    layer.receive(ack, source=UAC, reliable=True, now=0.2)
    assert layer.events() == [TransactionTerminated(key)]


def test_invite_2xx_accepted_absorbs_invites_passes_acks_timer_l() -> None:
    layer, invite, key = start()
    ok = reply(invite, 200)
    layer.respond(key, ok, now=0.1)
    assert layer.datagrams_to_send() == [(UAC, ok)]
    assert layer.server_state(key) is ServerState.ACCEPTED
    # RFC 6026 §7.1: INVITE copies absorbed, 2xx retransmissions are the TU's.
    layer.receive(invite, source=UAC, reliable=False, now=0.5)
    assert layer.datagrams_to_send() == []
    layer.respond(key, ok, now=0.6)
    assert layer.datagrams_to_send() == [(UAC, ok)]
    # The ACK of a 2xx has its own branch: it matches no transaction.
    ack = make_request("ACK", branch="z9hG4bKack", cseq_method="ACK", to_tag="tt1")
    layer.receive(ack, source=UAC, reliable=False, now=0.7)
    assert layer.events() == [AckReceived(ack, UAC)]
    # An ACK with the INVITE's branch (an RFC 2543-style or buggy peer) is passed up too.
    same_branch_ack = make_request("ACK", cseq_method="ACK", to_tag="tt1")
    layer.receive(same_branch_ack, source=UAC, reliable=False, now=0.8)
    assert layer.events() == [AckReceived(same_branch_ack, UAC)]
    with pytest.raises(ProtocolError):
        layer.respond(key, reply(invite, 180), now=0.9)
    assert layer.next_deadline() == pytest.approx(32.1)  # Timer L = 64*T1
    layer.handle_timer(32.1)
    assert layer.events() == [TransactionTerminated(key)]
    with pytest.raises(ProtocolError):
        layer.respond(key, ok, now=33.0)


def test_ack_before_final_is_dropped() -> None:
    layer, _, key = start()
    ack = make_request("ACK", cseq_method="ACK")
    layer.receive(ack, source=UAC, reliable=False, now=0.1)
    assert layer.events() == []
    assert layer.server_state(key) is ServerState.PROCEEDING


def test_server_transport_errors_terminate() -> None:
    for responses in ((), (486,), (486, "ack"), (200,)):
        layer, invite, key = start()
        for r in responses:
            if r == "ack":
                layer.receive(
                    make_request("ACK", cseq_method="ACK", to_tag="tt1"),
                    source=UAC,
                    reliable=False,
                    now=0.2,
                )
            else:
                layer.respond(key, reply(invite, r), now=0.1)
        layer.transport_error(key, now=0.3)
        assert layer.events() == [TransactionTerminated(key)]
        assert len(layer) == 0
    for first in (None, 100, 200):
        layer, request, key = start("OPTIONS")
        if first is not None:
            layer.respond(key, reply(request, first), now=0.1)
        layer.transport_error(key, now=0.3)
        assert layer.events() == [TransactionTerminated(key)]


# -- non-INVITE server transaction -----------------------------------------------------------


def test_non_invite_server_trying_proceeding_completed_timer_j() -> None:
    layer, bye, key = start("BYE", to_tag="tt1")
    assert layer.server_state(key) is ServerState.TRYING
    assert layer.next_deadline() is None  # no automatic 100 for non-INVITE
    layer.receive(bye, source=UAC, reliable=False, now=0.3)
    assert layer.datagrams_to_send() == []  # §17.2.2: discarded in Trying
    assert layer.events() == []
    trying = reply(bye, 100, None)
    layer.respond(key, trying, now=0.4)
    assert layer.server_state(key) is ServerState.PROCEEDING
    layer.receive(bye, source=UAC, reliable=False, now=0.5)
    assert layer.datagrams_to_send() == [(UAC, trying), (UAC, trying)]
    layer.respond(key, reply(bye, 100, None), now=0.55)
    layer.datagrams_to_send()
    ok = reply(bye, 200)
    layer.respond(key, ok, now=0.6)
    assert layer.server_state(key) is ServerState.COMPLETED
    layer.receive(bye, source=UAC, reliable=False, now=1.0)
    assert on_wire(layer.datagrams_to_send()) == on_wire([(UAC, ok), (UAC, ok)])
    with pytest.raises(ProtocolError):
        layer.respond(key, reply(bye, 500), now=1.0)
    assert layer.next_deadline() == pytest.approx(32.6)  # Timer J = 64*T1
    layer.handle_timer(32.6)
    assert layer.events() == [TransactionTerminated(key)]
    # After Timer J a copy is a new request.
    layer.receive(bye, source=UAC, reliable=False, now=33.0)
    assert [type(e) for e in layer.events()] == [RequestReceived]


def test_non_invite_server_reliable_timer_j_zero() -> None:
    layer, options, key = start("OPTIONS", reliable=True)
    layer.respond(key, reply(options, 200), now=0.1)
    assert layer.events() == [TransactionTerminated(key)]


def test_respond_to_unknown_key() -> None:
    layer = TransactionLayer()
    with pytest.raises(ProtocolError):
        layer.respond("s|nope", reply(make_request(), 200), now=0.0)


def test_missing_server_table_entry_is_a_protocol_error() -> None:
    layer, _, key = start()
    tx = layer._servers[key]
    assert (ServerState.PROCEEDING, ServerInput.TIMER_J) not in INVITE_SERVER_TABLE
    with pytest.raises(ProtocolError, match="Timer J in state Proceeding"):
        tx._dispatch(ServerInput.TIMER_J, None, 0.0)
    assert "Proceeding" in repr(tx)


# -- CANCEL (§9.2) ---------------------------------------------------------------------------


def test_cancel_matching_invite_answered_200_and_tu_told() -> None:
    layer, invite, key = start()
    ringing = reply(invite, 180, "uas-tag")
    layer.respond(key, ringing, now=0.1)
    layer.datagrams_to_send()
    cancel = build_cancel(invite)
    layer.receive(cancel, source=UAC, reliable=False, now=1.0)
    cancel_key = server_key(cancel)
    assert cancelled_key(cancel) == key
    assert layer.events() == [CancelReceived(key, cancel_key, cancel)]
    [(dest, ok)] = layer.datagrams_to_send()
    assert dest == UAC
    assert isinstance(ok, Response)
    assert ok.status == 200
    assert ok.headers.get("CSeq") == "1 CANCEL"
    assert ok.to_tag == "uas-tag"  # §9.2: same To tag as the INVITE's responses
    # A retransmitted CANCEL gets the 200 again, no second event.
    layer.receive(cancel, source=UAC, reliable=False, now=1.5)
    assert on_wire(layer.datagrams_to_send()) == on_wire([(UAC, ok)])
    assert layer.events() == []
    # The TU answers the INVITE 487.
    layer.respond(key, reply(invite, 487, "uas-tag"), now=1.6)
    assert statuses(layer) == [487]
    assert layer.server_state(key) is ServerState.COMPLETED


def test_cancel_after_final_response_answered_200_without_event() -> None:
    layer, invite, key = start()
    layer.respond(key, reply(invite, 200), now=0.1)
    layer.datagrams_to_send()
    layer.receive(build_cancel(invite), source=UAC, reliable=False, now=0.2)
    assert layer.events() == []
    [(_, ok)] = layer.datagrams_to_send()
    assert isinstance(ok, Response)
    assert ok.status == 200


def test_cancel_matching_nothing_answered_481() -> None:
    layer = TransactionLayer()
    cancel = build_cancel(make_request())
    layer.receive(cancel, source=UAC, reliable=False, now=0.0)
    assert layer.events() == []
    [(dest, answer)] = layer.datagrams_to_send()
    assert isinstance(answer, Response)
    assert (dest, answer.status) == (UAC, 481)
    assert answer.headers.get("CSeq") == "1 CANCEL"
    # A CANCEL for a non-INVITE transaction matches nothing either.
    layer2, options, _ = start("OPTIONS")
    layer2.receive(build_cancel(options), source=UAC, reliable=False, now=0.1)
    assert statuses(layer2) == [481]


# -- matching (§17.2.3) ----------------------------------------------------------------------


def test_same_branch_different_sent_by_or_method_is_a_new_transaction() -> None:
    layer, _, key = start()
    other_host = make_request(via_host="192.0.2.99:5060")
    layer.receive(other_host, source=UAC, reliable=False, now=0.1)
    options = make_request("OPTIONS")
    layer.receive(options, source=UAC, reliable=False, now=0.1)
    events = layer.events()
    assert [type(e) for e in events] == [RequestReceived, RequestReceived]
    keys = {e.key for e in events if isinstance(e, RequestReceived)}
    assert len({key, *keys}) == 3


def test_sent_by_host_case_and_default_port() -> None:
    a = make_request(via_host="HOST.example.com")
    b = make_request(via_host="host.example.com")
    c = make_request(via_host="host.example.com:5060")
    assert server_key(a) == server_key(b) != server_key(c)


def test_rfc2543_matching_without_magic_cookie() -> None:
    layer, invite, key = start(branch="1234old")
    assert key.startswith("s2543|")
    # A retransmission (same fields) matches; a different CSeq does not.
    layer.receive(invite, source=UAC, reliable=False, now=0.1)
    assert layer.events() == []
    layer.receive(make_request(branch="1234old", cseq=2), source=UAC, reliable=False, now=0.1)
    assert [type(e) for e in layer.events()] == [RequestReceived]
    layer.respond(key, reply(invite, 486, "resp-tag"), now=0.2)
    layer.datagrams_to_send()
    # The ACK must carry the To tag of the response sent (§17.2.3).
    wrong = make_request("ACK", branch="1234old", cseq_method="ACK", to_tag="other")
    layer.receive(wrong, source=UAC, reliable=False, now=0.3)
    assert layer.events() == [AckReceived(wrong, UAC)]
    assert layer.server_state(key) is ServerState.COMPLETED
    right = make_request("ACK", branch="1234old", cseq_method="ACK", to_tag="resp-tag")
    layer.receive(right, source=UAC, reliable=False, now=0.4)
    assert layer.events() == []
    assert layer.server_state(key) is ServerState.CONFIRMED


def test_rfc2543_without_branch_and_ack_before_response() -> None:
    layer, invite, key = start(branch=None)
    ack = make_request("ACK", branch=None, cseq_method="ACK", to_tag="x")
    layer.receive(ack, source=UAC, reliable=False, now=0.1)
    assert layer.events() == [AckReceived(ack, UAC)]
    assert layer.server_state(key) is ServerState.PROCEEDING
    assert invite.top_via.branch is None


def test_request_without_via_raises_sip_error() -> None:
    layer = TransactionLayer()
    request = make_request()
    broken = dataclasses.replace(request, headers=request.headers.remove("Via"))
    with pytest.raises(BadRequest):
        layer.receive(broken, source=UAC, reliable=False, now=0.0)


# -- build_response (§8.2.6) -----------------------------------------------------------------


def test_build_response_copies_fields_and_adds_tag() -> None:
    invite = make_request(
        extra=(("Via", "SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKp"), ("Record-Route", "<sip:p>"))
    )
    response = build_response(
        invite, 180, to_tag="t1", headers=(("Contact", "<sip:b@h>"),), body=b"x"
    )
    assert response.reason == "Ringing"
    assert response.headers.get_all("Via") == invite.headers.get_all("Via")
    assert response.to_tag == "t1"
    assert response.headers.get("From") == invite.headers.get("From")
    assert response.headers.get("Call-ID") == invite.call_id
    assert response.headers.get("CSeq") == "1 INVITE"
    assert response.headers.get("Contact") == "<sip:b@h>"
    assert "Record-Route" not in response.headers  # the TU's to copy (§12.1.1)
    assert response.body == b"x"
    # An existing To tag is kept; a 100 never gets one; a custom reason is used.
    tagged = make_request("BYE", to_tag="keep")
    assert build_response(tagged, 200, to_tag="new").to_tag == "keep"
    assert build_response(invite, 100, to_tag="t1").to_tag is None
    assert build_response(invite, 404, "Nobody Here").reason == "Nobody Here"
    bare = dataclasses.replace(invite, headers=invite.headers.remove("Call-ID"))
    assert "Call-ID" not in build_response(bare, 500).headers
