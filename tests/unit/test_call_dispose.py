"""An ended call is freed by reference counting once the manager lets go of it (found by the
soak, bench/soak.py: ended calls were reference cycles, the call's own bound methods and
closures held by the call and its parts, so they piled up at about 20 KiB each until the rare
full collection the service tunes for, ``sbc.ops.cli.GC_THRESHOLD``).

Each flow is run with the cyclic collector off; after :meth:`Call.dispose` (what the manager
calls once the call's record is published) nothing but the test may hold the call.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

import pytest

from sbc.b2bua.leg import Role
from tests.unit.call_harness import RETELL_SDP, Harness, answer_bye
from tests.unit.test_transfer import (
    CHALLENGE,
    HUMAN_SDP,
    connected,
    harness,
    human_invite,
    notifies,
    refer,
    until,
)

Flow = Callable[[Harness], Awaitable[None]]


async def pbx_hangs_up(h: Harness) -> None:
    await h.connect()
    h.send_pbx(h.pbx_request("BYE", 2))
    await answer_bye(h.engine)


async def retell_hangs_up(h: Harness) -> None:
    invite = await h.connect()
    h.send_retell("BYE", 1, invite)
    await answer_bye(h.engine)


async def retell_busy(h: Harness) -> None:
    invite = await h.b_invite()
    invite.deliver(486)


async def pbx_cancels(h: Harness) -> None:
    invite = await h.b_invite()
    invite.deliver(180)
    await h.pbx_status(180)
    h.call.cancelled(h.call.caller_leg)
    await h.engine.wait(lambda: h.engine.cancelled)
    invite.deliver(487)


async def byes_cross(h: Harness) -> None:
    invite = await h.connect()
    h.send_retell("BYE", 1, invite)
    await h.engine.wait(lambda: h.engine.requests("BYE"))
    h.send_pbx(h.pbx_request("BYE", 2))
    await answer_bye(h.engine)


async def answered_late(h: Harness) -> None:
    invite = await h.b_invite()
    invite.deliver(200, body=RETELL_SDP)
    await h.pbx_status(200)
    h.pbx_ack(1)
    await asyncio.wait_for(h.call.up.wait(), 2.0)
    h.send_pbx(h.pbx_request("BYE", 2))
    await answer_bye(h.engine)


async def refer_mode_transfer(h: Harness) -> None:
    invite = await connected(h)
    refer(h, invite, "sip:sales@sip.retellai.com")
    await notifies(h, 1)
    await h.engine.wait(lambda: h.engine.requests("REFER"))
    pbx_refer = h.engine.requests("REFER")[0]
    pbx_refer.deliver(202, to_tag="pbxtag")
    notify = h.pbx_request(
        "NOTIFY",
        3,
        ("Event", "refer"),
        ("Subscription-State", "terminated;reason=noresource"),
        ("Content-Type", "message/sipfrag;version=2.0"),
        body=b"SIP/2.0 200 OK\r\n",
    )
    h.send_pbx(notify)
    await notifies(h, 2)
    await answer_bye(h.engine, 0)  # sbc leaves the PBX dialog (RFC 5589)
    h.send_retell("BYE", 3, invite)  # Retell hangs up itself


async def invite_mode_transfer(h: Harness) -> None:
    invite = await connected(h)
    refer(h, invite, "sip:sales@sip.retellai.com")
    await notifies(h, 1)
    first = await human_invite(h)
    first.deliver(407, to_tag="q1", headers=CHALLENGE)
    second = await human_invite(h, 2)
    second.deliver(200, to_tag="q1", body=HUMAN_SDP, contact="<sip:800@10.0.0.1:5060>")
    await h.engine.wait(lambda: len(h.engine.requests("INVITE")) == 4)
    h.engine.requests("INVITE")[3].deliver(
        200, to_tag="pbxtag", body=b"", contact="<sip:3cx@10.0.0.1:5060>"
    )
    await notifies(h, 2)
    await until(lambda: h.call.bridge.b.role is Role.HUMAN)
    await answer_bye(h.engine, 0)  # the agent's leg
    h.send_pbx(h.pbx_request("BYE", 9))
    await answer_bye(h.engine, 1)  # the human's leg


@pytest.fixture
def no_cyclic_gc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The harness's deterministic random source is a bound method of the harness, which the
    # call keeps: a cycle of the test's making. A plain function instead.
    counter = itertools.count(1)
    monkeypatch.setattr(
        Harness, "_random", staticmethod(lambda n: next(counter).to_bytes(n, "big"))
    )
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize(
    ("mode", "flow"),
    [
        (None, pbx_hangs_up),
        (None, retell_hangs_up),
        (None, retell_busy),
        (None, pbx_cancels),
        (None, byes_cross),
        (None, answered_late),
        ("refer", refer_mode_transfer),
        ("invite", invite_mode_transfer),
    ],
)
@pytest.mark.usefixtures("no_cyclic_gc")
async def test_an_ended_call_is_freed_without_the_cyclic_collector(
    mode: Literal["refer", "invite"] | None, flow: Flow
) -> None:
    h = Harness() if mode is None else harness(mode)
    await flow(h)
    await h.finished()
    if mode is not None:
        assert [t.outcome for t in h.call.transfers] == ["transferred"]
    call = weakref.ref(h.call)
    legs = [weakref.ref(leg) for leg in h.call.all_legs]
    h.call.dispose()
    del h
    await asyncio.sleep(0)  # the finished task's last callbacks
    assert call() is None
    assert all(leg() is None for leg in legs)
