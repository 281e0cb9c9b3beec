"""bench/bench_core.py's call runs through the core as the bench measures it, and ends clean."""

from __future__ import annotations

from types import ModuleType

from sbc.sip.transaction import TransactionLayer, TransactionTerminated
from tests.scripts import bench_script


def _bench() -> ModuleType:
    return bench_script("bench_core.py")


def test_bridged_calls_leave_only_timed_transactions_then_nothing() -> None:
    bench = _bench()
    pbx, retell = TransactionLayer(), TransactionLayer()
    sent = [
        bench.one_call(i, bench.pbx_messages(i), bench.retell_responses(i), pbx, retell, 1.0 + i)
        for i in range(5)
    ]
    # 180, 200 and the BYE's 200 to 3CX; INVITE, ACK and BYE to Retell: the same every call.
    assert len(set(sent)) == 1 and sent[0] > 2000
    # Waiting: PBX INVITE (Timer L) and BYE (Timer J), Retell INVITE (Timer M); each keeps
    # neither its request nor, for the INVITEs, the 2xx.
    assert (len(pbx), len(retell)) == (10, 5)
    for layer in (pbx, retell):
        layer.events()
        assert all(tx.request is None for tx in layer._servers.values())
        assert all(tx.request is None for tx in layer._clients.values())
        while (deadline := layer.next_deadline()) is not None:
            layer.handle_timer(deadline)
        assert len(layer) == 0
        assert all(isinstance(e, TransactionTerminated) for e in layer.events())


def test_sdp_phase_sends_sbcs_origin_and_the_offered_codecs() -> None:
    bench = _bench()
    offer = bench.sdp_offer(bench.sdp_3cx(7))
    answer = bench.sdp_answer(bench.sdp_retell(7))
    assert b"o=sbc 1804289383 1804289383 IN IP4 192.168.1.50\r\n" in offer
    assert b"m=audio 7092 RTP/AVP 0 8 9 101\r\n" in offer
    assert b"m=audio 30014 RTP/AVP 0 101\r\n" in answer
    pbx, retell = TransactionLayer(), TransactionLayer()
    plain = bench.one_call(1, bench.pbx_messages(1), bench.retell_responses(1), pbx, retell, 1.0)
    with_sdp = bench.one_call(
        2, bench.pbx_messages(2), bench.retell_responses(2), pbx, retell, 1.0, sdp=True
    )
    # The same messages; only the o= lines of the two bodies differ in length.
    assert abs(with_sdp - plain) < 20
