"""Transactions that only absorb retransmissions are retired into flat records.

Server INVITE Accepted and Confirmed, non-INVITE server Completed, client INVITE Completed and
Accepted, non-INVITE client Completed: each waits up to 32 s (Timers D, I, J, K, L, M) and
thousands wait at a time under load. The layer keeps a tuple per transaction then (what the
state's duties need) instead of the transaction object, its timer dict and heap entry; what
goes on the wire and what the TU is told stays that of RFC 3261 / RFC 6026.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc

import pytest
from test_tx_helpers import UAC, UAS, make_request, reply, wire

from sbc.sip.client_transaction import ClientTransaction
from sbc.sip.errors import ProtocolError
from sbc.sip.message import Request, Response
from sbc.sip.serializer import serialize
from sbc.sip.server_transaction import ServerTransaction
from sbc.sip.transaction import (
    AckReceived,
    ClientState,
    RequestReceived,
    ResponseReceived,
    ServerState,
    TransactionLayer,
    TransactionTerminated,
    build_cancel,
)


def _received(layer: TransactionLayer) -> RequestReceived:
    [event] = layer.events()
    assert isinstance(event, RequestReceived)
    return event


def _ended(layer: TransactionLayer) -> list[str]:
    """Keys of the transactions ended since the last look (nothing else may have happened)."""
    events = layer.events()
    assert all(isinstance(e, TransactionTerminated) for e in events), events
    return [e.key for e in events if isinstance(e, TransactionTerminated)]


def _call(i: int, uac: TransactionLayer, uas: TransactionLayer, now: float) -> None:
    """INVITE answered 200, then a BYE answered 200, over UDP: four transactions left waiting
    (client INVITE Accepted, server INVITE Accepted, both BYEs Completed)."""
    invite = make_request(branch=f"z9hG4bKi{i}", call_id=f"c{i}")
    uac.send_request(invite, dest=UAS, reliable=False, now=now)
    for _, message in uac.datagrams_to_send():
        uas.receive(wire(message), source=UAC, reliable=False, now=now)
    received = _received(uas)
    uas.respond(received.key, reply(received.request, 200, f"t{i}"), now=now)
    for _, message in uas.datagrams_to_send():
        uac.receive(wire(message), source=UAS, reliable=False, now=now)
    bye = make_request("BYE", branch=f"z9hG4bKb{i}", call_id=f"c{i}", cseq=2, to_tag=f"t{i}")
    uac.send_request(bye, dest=UAS, reliable=False, now=now)
    for _, message in uac.datagrams_to_send():
        uas.receive(wire(message), source=UAC, reliable=False, now=now)
    received = _received(uas)
    uas.respond(received.key, reply(received.request, 200, None), now=now)
    for _, message in uas.datagrams_to_send():
        uac.receive(wire(message), source=UAS, reliable=False, now=now)
    uac.events()


def _transactions_alive() -> list[object]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, (ClientTransaction, ServerTransaction))]


def test_no_transaction_object_survives_its_final_response() -> None:
    # Other tests of the session may leave transactions of their own alive (a REGISTER still
    # Trying in a layer some fixture keeps): only those made here count.
    before = _transactions_alive()
    uac, uas = TransactionLayer(), TransactionLayer()
    for i in range(20):
        _call(i, uac, uas, now=i * 0.01)
    made_here = [o for o in _transactions_alive() if not any(o is b for b in before)]
    assert made_here == []
    # Each is still there as a record, in the state RFC 3261 / RFC 6026 names.
    assert uac.census() == {"client_INVITE_Accepted": 20, "client_BYE_Completed": 20}
    assert uas.census() == {"server_INVITE_Accepted": 20, "server_BYE_Completed": 20}
    assert (len(uac), len(uas)) == (40, 40)


def test_bytes_kept_per_completed_call_while_the_timers_run() -> None:
    # Four transactions a call here: 4,064 B a call with transaction objects (290f245), about
    # 1,430 B as records (each with its key, deadline, expiry entry and what the state keeps:
    # a To tag, the bytes of the BYE's 200).
    uac, uas = TransactionLayer(), TransactionLayer()
    _call(-1, uac, uas, now=0.0)  # memos and tables filled first
    calls = 300
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(calls):
            _call(i, uac, uas, now=0.001 * i)
        gc.collect()
        kept = (tracemalloc.get_traced_memory()[0] - before) / calls
    finally:
        tracemalloc.stop()
    assert len(uac) + len(uas) == 4 * (calls + 1)
    assert kept < 2500, f"{kept:.0f} B per completed call"


def test_disarmed_timers_do_not_stay_in_the_heap_for_32_s() -> None:
    # Timer B of every INVITE answered (and F of every non-INVITE) used to wait in the heap
    # until due, 64*T1 later; the heap is rebuilt without them once it doubles.
    uac, uas = TransactionLayer(), TransactionLayer()
    calls = 2000
    for i in range(calls):
        _call(i, uac, uas, now=0.001 * i)
    assert len(uac._heap) < calls // 2
    # The records' expiries: one per retired transaction.
    assert uac.timers_pending == len(uac._heap) + 2 * calls


def test_records_end_at_their_timers_in_deadline_order() -> None:
    uac, uas = TransactionLayer(), TransactionLayer()
    _call(0, uac, uas, now=0.0)
    seen: list[tuple[float, str]] = []
    while (deadline := uas.next_deadline()) is not None:
        uas.handle_timer(deadline)
        seen.extend((deadline, key) for key in _ended(uas))
    assert [d for d, _ in seen] == [32.0, 32.0]  # Timers L and J, 64*T1
    assert len(uas) == 0 and uas.timers_pending == 0
    # Client side: Timer K (T4) ends the BYE long before Timer M ends the INVITE.
    ended: list[tuple[float, str]] = []
    while (deadline := uac.next_deadline()) is not None:
        uac.handle_timer(deadline)
        ended.extend((deadline, key.rsplit("|", 1)[1]) for key in _ended(uac))
    assert ended == [(5.0, "BYE"), (32.0, "INVITE")]


def test_request_copies_get_the_same_response_bytes() -> None:
    uas = TransactionLayer()
    bye = make_request("BYE", to_tag="uas1")
    uas.receive(bye, source=UAC, reliable=False, now=0.0)
    event = _received(uas)
    ok = reply(bye, 200, None)
    uas.respond(event.key, ok, now=0.0)
    [(_, first)] = uas.datagrams_to_send()
    for at in (0.5, 1.5, 31.9):
        uas.receive(wire(bye), source=UAC, reliable=False, now=at)
        [(dest, again)] = uas.datagrams_to_send()
        assert (dest, serialize(again)) == (UAC, serialize(first))
    assert uas.events() == []
    uas.handle_timer(32.0)  # Timer J
    assert uas.events() == [TransactionTerminated(event.key)]
    # After Timer J a copy is a new request.
    uas.receive(wire(bye), source=UAC, reliable=False, now=33.0)
    assert [type(e) for e in uas.events()] == [RequestReceived]


def test_cancel_copies_get_the_same_200_and_the_tu_hears_once() -> None:
    uas = TransactionLayer()
    invite = make_request()
    uas.receive(invite, source=UAC, reliable=False, now=0.0)
    event = _received(uas)
    uas.respond(event.key, reply(invite, 180, "uas1"), now=0.0)
    uas.datagrams_to_send()
    cancel = build_cancel(invite)
    uas.receive(wire(cancel), source=UAC, reliable=False, now=0.1)
    [(_, answer)] = uas.datagrams_to_send()
    assert [type(e).__name__ for e in uas.events()] == ["CancelReceived"]
    uas.receive(wire(cancel), source=UAC, reliable=False, now=0.6)
    [(_, again)] = uas.datagrams_to_send()
    assert serialize(again) == serialize(answer)
    assert uas.events() == []


def test_late_final_copies_and_a_late_2xx_at_a_completed_invite_client() -> None:
    uac = TransactionLayer()
    invite = make_request()
    key = uac.send_request(invite, dest=UAS, reliable=False, now=0.0)
    uac.datagrams_to_send()
    busy = reply(invite, 486, "uas1")
    uac.receive(wire(busy), source=UAS, reliable=False, now=0.1)
    [(_, ack)] = uac.datagrams_to_send()
    assert isinstance(ack, Request) and ack.method == "ACK"
    uac.events()
    # §17.1.1.2: each copy of the final gets the same ACK; a late provisional is absorbed.
    uac.receive(wire(busy), source=UAS, reliable=False, now=0.6)
    assert [serialize(m) for _, m in uac.datagrams_to_send()] == [serialize(ack)]
    uac.receive(wire(reply(invite, 180, "uas1")), source=UAS, reliable=False, now=0.7)
    assert uac.datagrams_to_send() == [] and uac.events() == []
    # A 2xx after all reaches the TU (which ACKs and ends it).
    ok = wire(reply(invite, 200, "uas2"))
    uac.receive(ok, source=UAS, reliable=False, now=0.8)
    assert isinstance(ok, Response)
    assert uac.events() == [ResponseReceived(key, ok)]
    assert uac.client_state(key) is ClientState.COMPLETED
    uac.handle_timer(32.1)  # Timer D
    assert uac.events() == [TransactionTerminated(key)]
    assert uac.client_state(key) is None


def test_2xx_retransmissions_and_forks_at_an_accepted_invite_client() -> None:
    uac = TransactionLayer()
    invite = make_request()
    key = uac.send_request(invite, dest=UAS, reliable=True, now=0.0)
    uac.datagrams_to_send()
    first = wire(reply(invite, 200, "a"))
    uac.receive(first, source=UAS, reliable=True, now=0.1)
    again = wire(reply(invite, 200, "a"))
    fork = wire(reply(invite, 200, "b"))
    for message in (again, fork, wire(reply(invite, 200, "b")), wire(reply(invite, 503))):
        uac.receive(message, source=UAS, reliable=True, now=0.2)
    events = uac.events()
    assert [(e.response.to_tag, e.retransmission) for e in events] == [  # type: ignore[union-attr]
        ("a", False),
        ("a", True),
        ("b", False),
        ("b", True),
    ]
    assert uac._done[key][4] == ("a", "b")
    # A CANCEL sent now changes nothing (Timer M runs on).
    cancel = build_cancel(invite)
    uac.send_request(cancel, dest=UAS, reliable=True, now=0.3)
    assert uac.client_state(key) is ClientState.ACCEPTED
    assert uac._done[key][0] == pytest.approx(0.1 + 32)  # Timer M even over TCP
    with pytest.raises(ProtocolError, match="already exists"):
        uac.send_request(invite, dest=UAS, reliable=True, now=0.4)


def test_accepted_and_confirmed_servers_absorb_copies_and_pass_the_2xx_ack() -> None:
    uas = TransactionLayer()
    invite = make_request()
    uas.receive(invite, source=UAC, reliable=False, now=0.0)
    event = _received(uas)
    ok = reply(invite, 200, "uas1")
    uas.respond(event.key, ok, now=0.1)
    uas.datagrams_to_send()
    uas.receive(wire(invite), source=UAC, reliable=False, now=0.2)  # absorbed
    assert uas.datagrams_to_send() == [] and uas.events() == []
    ack = make_request("ACK", cseq_method="ACK", to_tag="uas1")
    uas.receive(ack, source=("192.0.2.9", 5060), reliable=False, now=0.3)
    # Passed up with the transaction's source (RFC 6026 §7.1), as before.
    assert uas.events() == [AckReceived(ack, UAC)]
    with pytest.raises(ProtocolError, match="300-699 from TU in state Accepted"):
        uas.respond(event.key, reply(invite, 486, "uas1"), now=0.4)
    # Confirmed (a non-2xx ACKed): INVITE and ACK copies absorbed until Timer I.
    other = make_request(branch="z9hG4bKbbb", call_id="c2")
    uas.receive(other, source=UAC, reliable=False, now=1.0)
    event2 = _received(uas)
    uas.respond(event2.key, reply(other, 486, "x"), now=1.0)
    uas.datagrams_to_send()
    ack2 = make_request("ACK", branch="z9hG4bKbbb", call_id="c2", cseq_method="ACK", to_tag="x")
    for message in (ack2, ack2, other):
        uas.receive(wire(message), source=UAC, reliable=False, now=1.1)
    assert uas.datagrams_to_send() == [] and uas.events() == []
    assert uas.server_state(event2.key) is ServerState.CONFIRMED
    assert uas._done[event2.key][4] == "x"
    with pytest.raises(ProtocolError, match="in state Confirmed"):
        uas.respond(event2.key, reply(other, 200, "x"), now=1.2)
    uas.handle_timer(6.1)  # Timer I: T4
    assert uas.events() == [TransactionTerminated(event2.key)]


def test_transport_error_ends_a_record() -> None:
    uac = TransactionLayer()
    invite = make_request()
    key = uac.send_request(invite, dest=UAS, reliable=False, now=0.0)
    uac.receive(reply(invite, 200, "a"), source=UAS, reliable=False, now=0.1)
    uac.events()
    uac.transport_error(key, now=0.2)
    assert uac.events() == [TransactionTerminated(key)]
    assert len(uac) == 0
    uac.handle_timer(40.0)  # its stale expiry is skipped
    assert uac.events() == []
    uac.transport_error(key, now=41.0)  # unknown by now: ignored
    assert uac.events() == []


def test_reliable_transports_keep_no_record_for_zero_timers() -> None:
    # RFC 3261 Table 4: Timers I, J, K, D are 0 s over TCP: the transaction ends at once.
    uas = TransactionLayer()
    bye = make_request("BYE", to_tag="uas1")
    uas.receive(bye, source=UAC, reliable=True, now=0.0)
    event = _received(uas)
    uas.respond(event.key, reply(bye, 200, None), now=0.0)
    assert uas.events() == [TransactionTerminated(event.key)]
    assert len(uas) == 0 and uas.timers_pending == 0


def test_a_clock_going_back_keeps_the_expiries_in_order() -> None:
    uas = TransactionLayer()
    keys = []
    for i, now in enumerate((10.0, 5.0, 7.0)):
        bye = make_request("BYE", branch=f"z9hG4bK{i}", to_tag="uas1")
        uas.receive(bye, source=UAC, reliable=False, now=now)
        event = _received(uas)
        uas.respond(event.key, reply(bye, 200, None), now=now)
        keys.append(event.key)
    ended: list[str] = []
    while (deadline := uas.next_deadline()) is not None:
        uas.handle_timer(deadline)
        ended.extend(_ended(uas))
    assert ended == [keys[1], keys[2], keys[0]]


def test_a_response_to_a_retired_key_on_the_wrong_side_is_refused() -> None:
    uac = TransactionLayer()
    invite = make_request()
    key = uac.send_request(invite, dest=UAS, reliable=False, now=0.0)
    uac.receive(reply(invite, 200, "a"), source=UAS, reliable=False, now=0.1)
    assert key in uac._done
    with pytest.raises(ProtocolError, match="no server transaction"):
        uac.respond(key, reply(invite, 200, "a"), now=0.2)
    assert uac.server_state(key) is None
    record = uac._done[key]
    assert record[4] == "a"  # the 2xx's To tag only
    assert not any(isinstance(part, (Request, Response)) for part in record)


def test_cancel_before_any_response_and_after_a_non_2xx() -> None:
    uas = TransactionLayer()
    invite = make_request()
    uas.receive(invite, source=UAC, reliable=False, now=0.0)
    key = _received(uas).key
    # Before any response (the Trying timer has not fired): the 200 has no To tag.
    cancel = build_cancel(invite)
    uas.receive(cancel, source=UAC, reliable=False, now=0.05)
    [(_, answer)] = uas.datagrams_to_send()
    assert isinstance(answer, Response) and (answer.status, answer.to_tag) == (200, None)
    assert [type(e).__name__ for e in uas.events()] == ["CancelReceived"]
    # A second INVITE rejected (Completed, still a transaction: Timer G resends the 486):
    # a CANCEL gets the 486's tag, and the TU is not told.
    other = make_request(branch="z9hG4bKbbb", call_id="c2")
    uas.receive(other, source=UAC, reliable=False, now=0.1)
    other_key = _received(uas).key
    uas.respond(other_key, reply(other, 486, "busy"), now=0.1)
    uas.datagrams_to_send()
    uas.receive(build_cancel(other), source=UAC, reliable=False, now=0.2)
    [(_, answer)] = uas.datagrams_to_send()
    assert isinstance(answer, Response) and (answer.status, answer.to_tag) == (200, "busy")
    assert uas.events() == []
    assert uas.server_state(other_key) is ServerState.COMPLETED
    assert uas.server_state(key) is ServerState.PROCEEDING


def test_the_earliest_record_is_found_whatever_the_order_of_its_fifo() -> None:
    # The BYE (Timer K, T4) retired before the INVITE (Timer M, 64*T1): the FIFO of the
    # earliest deadline comes first; the INVITE's later one is not taken for it.
    uac = TransactionLayer()
    bye = make_request("BYE", branch="z9hG4bKbye", to_tag="a", cseq=2)
    uac.send_request(bye, dest=UAS, reliable=False, now=0.0)
    uac.receive(reply(bye, 200, "a"), source=UAS, reliable=False, now=0.0)
    invite = make_request(branch="z9hG4bKinv", call_id="c2")
    uac.send_request(invite, dest=UAS, reliable=False, now=1.0)
    uac.receive(reply(invite, 200, "b"), source=UAS, reliable=False, now=1.0)
    uac.events()
    assert uac.next_deadline() == 5.0
    uac.handle_timer(5.0)
    assert [key.rsplit("|", 1)[1] for key in _ended(uac)] == ["BYE"]
    assert uac.next_deadline() == 33.0
    # A live transaction's timer before it comes first.
    other = make_request(branch="z9hG4bKlive", call_id="c3")
    uac.send_request(other, dest=UAS, reliable=False, now=6.0)
    assert uac.next_deadline() == 6.5  # Timer A


def test_the_records_table_is_let_go_once_empty() -> None:
    # A dict keeps its table when emptied: after a burst of 2,000 calls, ~100 KiB (a third of
    # a MiB for 9,000 records) would stay with the idle service.
    uac, uas = TransactionLayer(), TransactionLayer()
    for i in range(2000):
        _call(i, uac, uas, now=0.001 * i)
    assert sys.getsizeof(uas._done) > 50_000
    uas.handle_timer(100.0)
    assert len(uas) == 0 and len(_ended(uas)) == 4000
    assert sys.getsizeof(uas._done) < 1_000
    assert uas.timers_pending == 0
