"""Retell over UDP with a socket of its own (``[retell] local_udp_port``), on the wire.

SIPp "3CX" calls sbc over UDP at ``sip.port``; SIPp "Retell" answers over UDP. What SIPp as
Retell received shows which port sbc wrote into its Via (where RFC 3581 answers go) and that its
Contact still names the documented ``sip.port``; sbc's message tap shows, for each message, the
socket the engine handed it to or read it from; /proc/net/udp shows the socket bound while sbc
runs and gone once it stopped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bridge_helpers import PBX, RETELL, SBC, assert_both_ends, pbx_call, retell, running_bridge
from peers import free_port
from sipp_helpers import listening

from sbc.net.addresses import Destination
from sbc.sip.message import Request, Response

pytestmark = pytest.mark.integration

CALLS = 3


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_port", "kernel_port"])
async def test_retell_requests_leave_and_answers_arrive_at_its_own_socket(
    tmp_path: Path, fixed: bool
) -> None:
    wanted = free_port(SBC) if fixed else 0
    seen: list[tuple[str, Request | Response, Destination]] = []
    async with running_bridge(tmp_path, retell_transport="udp", retell_udp_port=wanted) as bridge:
        engine = bridge.service.engine
        host, own = engine.transports.udp_named_addresses["retell"]
        assert host == SBC and own != bridge.port and (own == wanted or not fixed)
        assert listening(SBC, own, "u1")
        tap = engine.on_message

        def recording(direction: str, message: Request | Response, peer: Destination) -> None:
            seen.append((direction, message, peer))
            if tap is not None:
                tap(direction, message, peer)

        engine.on_message = recording
        far = await retell(tmp_path, bridge, "retell_uas_any.xml", calls=CALLS, transport="u1")
        near = await pbx_call(
            tmp_path, bridge, "pbx_caller.xml", calls=CALLS, extra=("-r", "10", "-d", "200")
        )
        assert_both_ends("3CX", await near.finish(30), near, CALLS)
        assert_both_ends("Retell", await far.finish(30), far, CALLS)
        await bridge.settled()
        records = bridge.calls.records
        assert [r.retell_status for r in records] == [200] * CALLS
    # Stopped: the socket is closed with the rest.
    assert not listening(SBC, own, "u1")

    # What Retell received from sbc: every request's Via names the socket of its own (so
    # Retell's answers go there), every INVITE's Contact the documented SIP port (Retell's
    # BYEs and REFERs keep arriving where the firewall lets them in).
    got = [m.message for m in far.traced() if m.received and isinstance(m.message, Request)]
    assert sorted(r.method for r in got) == sorted(["INVITE", "ACK", "BYE"] * CALLS)
    for request in got:
        via = request.top_via
        assert (via.transport, via.host, via.port) == ("UDP", SBC, own), request.method
    for invite in (r for r in got if r.method == "INVITE"):
        assert invite.headers.get("Contact") == f"<sip:{SBC}:{bridge.port}>"

    # sbc's side of the same: everything to and from Retell went through that socket (its
    # 100, 180 and 200 read there), nothing of 3CX's did.
    retell_side = [(d, m, p) for d, m, p in seen if p.host == RETELL]
    pbx_side = [(d, m, p) for d, m, p in seen if p.host == PBX]
    assert retell_side and pbx_side
    assert {p.local for _, _, p in retell_side} == {"retell"}
    assert {p.local for _, _, p in pbx_side} == {None}
    answers = [
        m.status
        for d, m, p in retell_side
        if d == "in" and isinstance(m, Response) and m.cseq.method == "INVITE"
    ]
    assert sorted(answers) == sorted([100, 180, 200] * CALLS)
    # 3CX's side unchanged: sbc's answers to its INVITEs name the SIP port in their Contact.
    oks = [
        m
        for d, m, _ in pbx_side
        if d == "out" and isinstance(m, Response) and m.status == 200 and m.cseq.method == "INVITE"
    ]
    assert len(oks) == CALLS
    assert all(f"{SBC}:{bridge.port}" in (m.headers.get("Contact") or "") for m in oks)
