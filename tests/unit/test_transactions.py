"""Client transactions (RFC 3261 §17.1, RFC 6026) through the TransactionLayer API."""

from __future__ import annotations

import pytest
from test_tx_helpers import UAS, make_request, on_wire, reply, run_until

from sbc.sip.client_transaction import (
    INVITE_CLIENT_TABLE,
    ClientInput,
    ClientState,
    build_ack,
)
from sbc.sip.errors import ProtocolError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.transaction import (
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    build_cancel,
    client_key,
    server_key,
)

KEY = client_key("z9hG4bKaaa", "INVITE")


def test_invite_udp_timer_a_doubles_without_cap_until_timer_b() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    assert key == KEY
    assert layer.datagrams_to_send() == [(UAS, invite)]
    assert layer.client_state(key) is ClientState.CALLING
    sent = run_until(layer, 31.9)
    # RFC 3261 §17.1.1.2: intervals 0.5, 1, 2, 4, 8, 16 (T2 does not cap INVITE).
    assert sent == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert layer.events() == []
    assert layer.next_deadline() == 32.0  # Timer B = 64*T1
    layer.handle_timer(32.0)
    assert layer.events() == [TransactionTimedOut(key), TransactionTerminated(key)]
    assert layer.datagrams_to_send() == []
    assert layer.next_deadline() is None
    assert layer.client_state(key) is None
    assert len(layer) == 0


def test_non_invite_udp_timer_e_capped_at_t2_and_timer_f() -> None:
    layer = TransactionLayer()
    options = make_request("OPTIONS")
    key = layer.send_request(options, dest=UAS, reliable=False, now=10.0)
    layer.datagrams_to_send()
    sent = run_until(layer, 41.99)
    intervals = [round(b - a, 6) for a, b in zip([10.0, *sent], sent, strict=False)]
    assert intervals == [0.5, 1, 2, 4, 4, 4, 4, 4, 4, 4]
    layer.handle_timer(42.0)
    assert layer.events() == [TransactionTimedOut(key), TransactionTerminated(key)]


def test_non_invite_proceeding_resets_timer_e_to_t2() -> None:
    layer = TransactionLayer()
    bye = make_request("BYE")
    key = layer.send_request(bye, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    layer.receive(reply(bye, 100, None), source=UAS, reliable=False, now=0.2)
    assert layer.client_state(key) is ClientState.PROCEEDING
    assert [e.response.status for e in layer.events() if isinstance(e, ResponseReceived)] == [100]
    sent = run_until(layer, 20.0)
    # §17.1.2.2: the first firing in Proceeding resets Timer E to T2.
    assert sent == [0.5, 4.5, 8.5, 12.5, 16.5]
    layer.receive(reply(bye, 200), source=UAS, reliable=False, now=20.0)
    assert layer.client_state(key) is ClientState.COMPLETED
    # Timer K = T4 absorbs copies of the final response.
    layer.receive(reply(bye, 200), source=UAS, reliable=False, now=21.0)
    layer.receive(reply(bye, 180), source=UAS, reliable=False, now=21.0)
    events = layer.events()
    assert [type(e) for e in events] == [ResponseReceived]
    assert layer.next_deadline() == 25.0
    layer.handle_timer(25.0)
    assert layer.events() == [TransactionTerminated(key)]


def test_non_invite_reliable_no_retransmission_and_timer_k_zero() -> None:
    layer = TransactionLayer()
    register = make_request("REGISTER")
    key = layer.send_request(register, dest="conn-1", reliable=True, now=0.0)
    assert layer.datagrams_to_send() == [("conn-1", register)]
    assert layer.next_deadline() == 32.0  # only Timer F
    assert run_until(layer, 31.0) == []
    layer.receive(reply(register, 401), source="conn-1", reliable=True, now=1.0)
    events = layer.events()
    assert [type(e) for e in events] == [ResponseReceived, TransactionTerminated]
    assert events[0] == ResponseReceived(key, reply(register, 401))
    assert layer.next_deadline() is None


def test_invite_reliable_only_timer_b() -> None:
    layer = TransactionLayer()
    layer.send_request(make_request(), dest="conn", reliable=True, now=0.0)
    layer.datagrams_to_send()
    assert layer.next_deadline() == 32.0
    layer.handle_timer(32.0)
    assert layer.datagrams_to_send() == []
    assert [type(e) for e in layer.events()] == [TransactionTimedOut, TransactionTerminated]


def test_custom_t1_scales_timers() -> None:
    layer = TransactionLayer(t1=0.1, t2=0.4, t4=1.0)
    layer.send_request(make_request("OPTIONS"), dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    assert run_until(layer, 1.0) == pytest.approx([0.1, 0.3, 0.7])
    assert layer.config.t4 == 1.0


def test_provisional_stops_retransmissions_and_timer_b() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    layer.handle_timer(0.5)
    assert len(layer.datagrams_to_send()) == 1
    layer.receive(reply(invite, 180), source=UAS, reliable=False, now=0.6)
    layer.receive(reply(invite, 183), source=UAS, reliable=False, now=0.7)
    assert layer.client_state(key) is ClientState.PROCEEDING
    assert [e.response.status for e in layer.events()] == [180, 183]  # type: ignore[union-attr]
    # No timer runs in Proceeding: the TU bounds the ringing time itself.
    assert layer.next_deadline() is None
    layer.handle_timer(100.0)
    assert layer.datagrams_to_send() == []


def test_non_2xx_final_acked_by_transaction_and_timer_d() -> None:
    layer = TransactionLayer()
    invite = make_request(
        extra=(
            ("Route", "<sip:p1.example.com;lr>"),
            ("Route", "<sip:p2.example.com;lr>"),
            ("Contact", "<sip:alice@192.0.2.1>"),
        )
    )
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    layer.receive(reply(invite, 180, "tt9"), source=UAS, reliable=False, now=0.1)
    busy = reply(invite, 486, "tt9")
    layer.receive(busy, source=UAS, reliable=False, now=1.0)
    assert layer.events() == [
        ResponseReceived(key, reply(invite, 180, "tt9")),
        ResponseReceived(key, busy),
    ]
    [(dest, ack)] = layer.datagrams_to_send()
    assert dest == UAS
    assert isinstance(ack, Request)
    # RFC 3261 §17.1.1.3.
    assert ack.method == "ACK"
    assert ack.uri == invite.uri
    assert ack.headers.get_all("Via") == ["SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKaaa"]
    assert ack.headers.get("From") == invite.headers.get("From")
    assert ack.headers.get("To") == "Bob <sip:bob@biloxi.example.com>;tag=tt9"
    assert ack.headers.get("Call-ID") == invite.call_id
    assert ack.headers.get("CSeq") == "1 ACK"
    assert ack.headers.get_all("Route") == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert ack.headers.get("Max-Forwards") == "70"
    assert "Contact" not in ack.headers
    assert ack.body == b""
    assert layer.client_state(key) is ClientState.COMPLETED
    # Each retransmitted final gets the same ACK and is not passed up.
    layer.receive(busy, source=UAS, reliable=False, now=2.0)
    layer.receive(busy, source=UAS, reliable=False, now=3.0)
    layer.receive(reply(invite, 180, "tt9"), source=UAS, reliable=False, now=3.0)
    assert on_wire(layer.datagrams_to_send()) == on_wire([(UAS, ack), (UAS, ack)])
    assert layer.events() == []
    # Timer D: 32 s over UDP.
    assert layer.next_deadline() == 33.0
    layer.handle_timer(33.0)
    assert layer.events() == [TransactionTerminated(key)]


def test_non_2xx_final_over_tcp_timer_d_zero() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest="conn", reliable=True, now=0.0)
    layer.datagrams_to_send()
    layer.receive(reply(invite, 503), source="conn", reliable=True, now=1.0)
    assert [type(e) for e in layer.events()] == [ResponseReceived, TransactionTerminated]
    assert [m.method for _, m in layer.datagrams_to_send()] == ["ACK"]  # type: ignore[union-attr]
    assert layer.client_state(key) is None


def test_2xx_accepted_passes_retransmissions_up_then_timer_m() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    ok = reply(invite, 200, "tt1")
    layer.receive(ok, source=UAS, reliable=False, now=1.0)
    assert layer.events() == [ResponseReceived(key, ok, retransmission=False)]
    assert layer.client_state(key) is ClientState.ACCEPTED
    assert layer.datagrams_to_send() == []  # the ACK of a 2xx is the TU's
    # RFC 6026 §8.4: copies go up, flagged; a 2xx of another fork is not a copy.
    layer.receive(ok, source=UAS, reliable=False, now=1.5)
    fork = reply(invite, 200, "tt2")
    layer.receive(fork, source=UAS, reliable=False, now=1.6)
    layer.receive(reply(invite, 180), source=UAS, reliable=False, now=1.7)
    layer.receive(reply(invite, 486), source=UAS, reliable=False, now=1.8)
    assert layer.events() == [
        ResponseReceived(key, ok, retransmission=True),
        ResponseReceived(key, fork, retransmission=False),
    ]
    assert layer.next_deadline() == 33.0  # Timer M = 64*T1
    layer.handle_timer(33.0)
    assert layer.events() == [TransactionTerminated(key)]
    layer.receive(ok, source=UAS, reliable=False, now=34.0)
    assert layer.events() == [StrayResponse(ok, UAS)]


def test_2xx_after_non_2xx_final_is_passed_up() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.receive(reply(invite, 404), source=UAS, reliable=False, now=1.0)
    late = reply(invite, 200, "other")
    layer.events()
    layer.receive(late, source=UAS, reliable=False, now=1.1)
    assert layer.events() == [ResponseReceived(key, late)]


def test_transport_error_gives_synthetic_503() -> None:
    layer = TransactionLayer()
    invite = make_request(extra=(("Route", "<sip:p1;lr>"),))
    key = layer.send_request(invite, dest="conn", reliable=True, now=0.0)
    layer.transport_error(key, now=0.1)
    events = layer.events()
    assert [type(e) for e in events] == [ResponseReceived, TransactionTerminated]
    first = events[0]
    assert isinstance(first, ResponseReceived)
    assert first.response.status == 503
    assert first.response.call_id == invite.call_id
    assert first.response.cseq == invite.cseq
    assert layer.client_state(key) is None
    layer.transport_error(key, now=0.2)  # unknown keys are ignored
    assert layer.events() == []


def test_transport_error_in_completed_only_terminates() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.receive(reply(invite, 486), source=UAS, reliable=False, now=1.0)
    layer.events()
    layer.transport_error(key, now=1.1)
    assert layer.events() == [TransactionTerminated(key)]


def test_transport_error_in_accepted_and_non_invite_proceeding() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.receive(reply(invite, 200), source=UAS, reliable=False, now=1.0)
    layer.events()
    layer.transport_error(key, now=1.1)
    assert layer.events() == [TransactionTerminated(key)]
    info = make_request("INFO", branch="z9hG4bKinfo")
    key2 = layer.send_request(info, dest=UAS, reliable=False, now=2.0)
    layer.receive(reply(info, 100, None), source=UAS, reliable=False, now=2.1)
    layer.events()
    layer.transport_error(key2, now=2.2)
    assert [type(e) for e in layer.events()] == [ResponseReceived, TransactionTerminated]


def test_stray_responses() -> None:
    layer = TransactionLayer()
    invite = make_request()
    layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    other_branch = reply(make_request(branch="z9hG4bKzzz"), 200)
    wrong_method = reply(make_request("INVITE", cseq_method="BYE"), 200)
    two_vias = Response(
        200,
        "OK",
        reply(invite, 200).headers.prepend("Via", "SIP/2.0/UDP 198.51.100.1;branch=z9hG4bKx"),
    )
    no_branch = reply(make_request(branch=None), 200)
    no_cseq = Response(200, "OK", reply(invite, 200).headers.remove("CSeq"))
    no_via = Response(200, "OK", Headers((("CSeq", "1 INVITE"),)))
    for response in (other_branch, wrong_method, two_vias, no_branch, no_cseq, no_via):
        layer.receive(response, source=UAS, reliable=False, now=0.1)
    events = layer.events()
    assert all(isinstance(e, StrayResponse) for e in events)
    assert len(events) == 6
    assert layer.client_state(KEY) is ClientState.CALLING


def test_send_request_refusals() -> None:
    layer = TransactionLayer()
    layer.send_request(make_request(), dest=UAS, reliable=False, now=0.0)
    with pytest.raises(ProtocolError):
        layer.send_request(make_request(), dest=UAS, reliable=False, now=0.0)
    with pytest.raises(ProtocolError):
        layer.send_request(make_request("ACK"), dest=UAS, reliable=False, now=0.0)
    with pytest.raises(ProtocolError):
        layer.send_request(make_request(branch=None), dest=UAS, reliable=False, now=0.0)


def test_cancel_is_its_own_client_transaction() -> None:
    layer = TransactionLayer()
    invite = make_request(extra=(("Route", "<sip:p1;lr>"),))
    invite_key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.receive(reply(invite, 180), source=UAS, reliable=False, now=0.1)
    cancel = build_cancel(invite)
    cancel_key = layer.send_request(cancel, dest=UAS, reliable=False, now=0.2)
    assert cancel_key == client_key("z9hG4bKaaa", "CANCEL") != invite_key
    layer.receive(reply(cancel, 200), source=UAS, reliable=False, now=0.3)
    layer.receive(reply(invite, 487), source=UAS, reliable=False, now=0.4)
    events = [e for e in layer.events() if isinstance(e, ResponseReceived)]
    assert [(e.key, e.response.status) for e in events] == [
        (invite_key, 180),
        (cancel_key, 200),
        (invite_key, 487),
    ]


def test_build_cancel_fields() -> None:
    invite = make_request(
        to_tag=None,
        extra=(("Route", "<sip:p1;lr>"), ("Contact", "<sip:a@h>"), ("Content-Type", "x/y")),
    )
    cancel = build_cancel(invite)
    # RFC 3261 §9.1.
    assert cancel.method == "CANCEL"
    assert cancel.uri == invite.uri
    assert cancel.headers.get_all("Via") == invite.headers.get_all("Via")
    for name in ("From", "To", "Call-ID", "Max-Forwards"):
        assert cancel.headers.get(name) == invite.headers.get(name)
    assert cancel.headers.get("CSeq") == "1 CANCEL"
    assert cancel.headers.get_all("Route") == ["<sip:p1;lr>"]
    assert "Contact" not in cancel.headers
    assert "Content-Type" not in cancel.headers


def test_build_ack_uses_request_to_when_response_has_none() -> None:
    invite = make_request()
    ack = build_ack(invite, Response(408, "Request Timeout", Headers()))
    assert ack.headers.get("To") == invite.headers.get("To")
    # Fields missing from the INVITE are left out rather than invented.
    bare = Request(
        "INVITE",
        invite.uri,
        Headers((("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"), ("CSeq", "4 INVITE"))),
    )
    assert build_ack(bare, Response(500)).headers.items() == (
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("Max-Forwards", "70"),
        ("CSeq", "4 ACK"),
    )
    assert build_cancel(bare).headers.items() == (
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("Max-Forwards", "70"),
        ("CSeq", "4 CANCEL"),
    )


def test_invite_client_table_covers_every_response_in_every_live_state() -> None:
    for state in (
        ClientState.CALLING,
        ClientState.PROCEEDING,
        ClientState.COMPLETED,
        ClientState.ACCEPTED,
    ):
        for kind in (ClientInput.PROVISIONAL, ClientInput.SUCCESS, ClientInput.FAILURE):
            assert (state, kind) in INVITE_CLIENT_TABLE


def test_missing_table_entry_is_a_protocol_error() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    tx = layer._clients[key]
    with pytest.raises(ProtocolError, match="Timer K in state Calling"):
        tx._dispatch(ClientInput.TIMER_K, None, 0.0)
    assert "Calling" in repr(tx)


def test_disarmed_timers_are_skipped_by_handle_timer() -> None:
    layer = TransactionLayer()
    invite = make_request()
    key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.datagrams_to_send()
    layer.receive(reply(invite, 180), source=UAS, reliable=False, now=0.1)
    layer.events()
    layer.handle_timer(100.0)  # Timers A and B were disarmed by the 180
    assert layer.datagrams_to_send() == []
    assert layer.events() == []
    assert layer.client_state(key) is ClientState.PROCEEDING
    assert layer.next_deadline() is None


def test_cancel_rearms_timer_b_on_a_proceeding_invite() -> None:
    layer = TransactionLayer()
    invite = make_request()
    invite_key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
    layer.receive(reply(invite, 180), source=UAS, reliable=False, now=1.0)
    assert layer.next_deadline() is None
    cancel_key = layer.send_request(build_cancel(invite), dest=UAS, reliable=False, now=10.0)
    layer.receive(reply(build_cancel(invite), 200), source=UAS, reliable=False, now=10.1)
    layer.events()
    # §9.1: no 487 within 64*T1 of the CANCEL: the INVITE transaction is given up.
    run_until(layer, 41.9)
    assert layer.client_state(invite_key) is ClientState.PROCEEDING
    layer.handle_timer(42.0)
    events = layer.events()
    assert TransactionTimedOut(invite_key) in events
    assert TransactionTerminated(invite_key) in events
    assert layer.client_state(cancel_key) is None  # Timer K ended the CANCEL's own


def test_cancel_in_other_invite_states_changes_nothing() -> None:
    for status in (None, 486, 200):
        layer = TransactionLayer()
        invite = make_request()
        key = layer.send_request(invite, dest=UAS, reliable=False, now=0.0)
        if status is not None:
            layer.receive(reply(invite, status), source=UAS, reliable=False, now=0.1)
        before = layer.client_state(key)
        layer.send_request(build_cancel(invite), dest=UAS, reliable=False, now=0.2)
        assert layer.client_state(key) is before
    # A CANCEL for a transaction this layer does not hold is just sent.
    other = TransactionLayer()
    other.send_request(build_cancel(make_request()), dest=UAS, reliable=False, now=0.0)
    assert len(other.datagrams_to_send()) == 1


def test_census_names_each_transaction_by_side_method_and_state() -> None:
    # What the leak checks read (sbc_table_entries{table="tx_..."}): which transactions a count
    # that does not drain is made of, and the timer entries still waiting in the heap.
    layer = TransactionLayer()
    invite = make_request("INVITE")
    layer.send_request(invite, dest="pbx", reliable=False, now=0.0)
    bye = make_request("BYE", branch="z9hG4bKbye")
    layer.receive(bye, source="pbx", reliable=False, now=0.0)
    assert layer.census() == {"client_INVITE_Calling": 1, "server_BYE_Trying": 1}
    assert layer.timers_pending == 2  # Timers A and B; the BYE waits for its answer, no timer
    layer.receive(reply(invite, 180), source="pbx", reliable=False, now=0.1)
    assert layer.census() == {"client_INVITE_Proceeding": 1, "server_BYE_Trying": 1}
    assert layer.timers_pending == 2  # cancelled entries stay until due (lazy deletion)
    # Answered, the BYE's transaction keeps no request: the census reads the method off its key.
    layer.respond(server_key(bye), reply(bye, 200), now=0.2)
    assert layer.census() == {"client_INVITE_Proceeding": 1, "server_BYE_Completed": 1}
