"""Round 9 (call layer): each cut gives what the code before it gave.

* Identifiers' random bytes come from one ``os.urandom`` block handed out in turn, each byte
  once (one system call for dozens of calls, not one per tag, branch and Call-ID); a forked
  child draws its own.
* Leg a's tag is its INVITE transaction's (drawn once, not drawn again for the leg).
* A fact queue moving to a later deadline keeps the loop timer armed for the earlier one.
* A call hanging up answers the requests queued and keeps every other fact, in order.
* Whether an INVITE's source is trusted is remembered by host: the same answers as testing
  the networks.
* A leg's line through :meth:`Leg.info` is the line its bound logger writes.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import os

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.b2bua import call as call_module
from sbc.b2bua.call import Call, FactQueue
from sbc.b2bua.calls import _TRUSTED_MEMO, CallManager
from sbc.b2bua.callstate import (
    AckSettled,
    Fact,
    InviteResponded,
    RequestArrived,
    ShutdownRequested,
)
from sbc.b2bua.leg import Leg, Role
from sbc.b2bua.messages import LocalAddress
from sbc.media.base import PassthroughBackend
from sbc.net import randomness
from sbc.net.addresses import Destination
from sbc.net.handles import IncomingRequest
from sbc.ops.logging import configure_logging
from sbc.sip.message import Response
from tests.unit.call_harness import PBX_SOURCE, FakeEngine, a_invite, config
from tests.unit.engine_sink import engine_without_sockets

# -- random bytes from one block ----------------------------------------------------------------


class _Counting:
    """os.urandom, counting its calls."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []
        self._urandom = os.urandom

    def __call__(self, n: int) -> bytes:
        block = self._urandom(n)
        self.blocks.append(block)
        return block


def test_draws_hand_out_one_block_in_turn_each_byte_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _Counting()
    monkeypatch.setattr(os, "urandom", counting)
    randomness._forget()
    size = randomness.POOL_SIZE
    draws = [randomness.random_bytes(12) for _ in range(size // 12)]
    assert [len(d) for d in draws] == [12] * (size // 12)
    assert len(counting.blocks) == 1
    assert b"".join(draws) == counting.blocks[0][: 12 * (size // 12)]
    # Too few bytes left: a new block, its start handed out, the old tail never.
    more = randomness.random_bytes(12)
    assert len(counting.blocks) == 2 and more == counting.blocks[1][:12]
    # Larger than a block: drawn on its own (what was left of the block is dropped).
    large = randomness.random_bytes(size + 1)
    assert len(large) == size + 1 and counting.blocks[2] == large
    assert randomness.random_bytes(4) == counting.blocks[3][:4]


def test_a_forked_child_draws_its_own_bytes() -> None:
    randomness._forget()
    randomness.random_bytes(8)  # the parent has a block, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, randomness.random_bytes(16))
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 16
    assert randomness.random_bytes(16) != child  # the parent's next bytes are not the child's


async def test_transaction_tags_and_vias_from_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a call draws outside the call layer (leg a's tag with its transaction, leg b's
    INVITE's branch) comes from the block too: 50 of each, at most one system call."""
    engine, _ = engine_without_sockets()
    randomness._forget()
    randomness.random_bytes(1)
    counting = _Counting()
    monkeypatch.setattr(os, "urandom", counting)
    tags = {
        IncomingRequest(engine, f"k{i}", a_invite(), PBX_SOURCE, None).local_tag for i in range(50)
    }
    vias = {engine.make_via("udp") for _ in range(50)}
    assert len(tags) == len(vias) == 50
    assert all(tag is not None and len(tag) == 16 for tag in tags)
    assert len(counting.blocks) <= 1


# -- leg a's tag --------------------------------------------------------------------------------


async def test_leg_a_takes_its_transactions_tag_without_a_draw_of_its_own() -> None:
    drawn: list[int] = []

    def random_bytes(n: int) -> bytes:
        drawn.append(n)
        return len(drawn).to_bytes(n, "big")

    engine = FakeEngine()
    incoming = IncomingRequest(engine, "pbx-invite", a_invite(), PBX_SOURCE, None)
    call = Call(
        incoming,
        config=config(),
        engine=engine,  # type: ignore[arg-type]
        media=PassthroughBackend(),
        call_uuid="uuid-1",
        random_bytes=random_bytes,
    )
    assert call.caller_leg.local_tag == incoming.local_tag
    assert drawn == [12, 8]  # leg b's Call-ID and tag
    assert call.agent_leg.local_tag == (2).to_bytes(8, "big").hex()


# -- the fact queue's deadline ------------------------------------------------------------------


def _live_timers() -> int:
    loop = asyncio.get_running_loop()
    return sum(not handle.cancelled() for handle in loop._scheduled)  # type: ignore[attr-defined]


async def test_a_later_deadline_keeps_the_loop_timer_and_fires_when_due() -> None:
    loop = asyncio.get_running_loop()
    facts = FactQueue()
    start = loop.time()
    first = asyncio.ensure_future(facts.get(start + 0.02))  # the answer timeout
    await asyncio.sleep(0)
    shared = call_module._deadlines
    assert shared is not None
    timer = shared._timer
    assert timer is not None and _live_timers() == 1
    facts.put_nowait(ShutdownRequested("answered"))
    assert await first == ShutdownRequested("answered")
    second = asyncio.ensure_future(facts.get(start + 0.08))  # the call limit
    await asyncio.sleep(0)
    # The timer armed for the earlier deadline stays: nothing cancelled, nothing armed.
    assert shared._timer is timer and _live_timers() == 1 and len(shared) == 1
    # It fires early for the later deadline (a stale entry), which still comes when due.
    assert await asyncio.wait_for(second, 2) is None
    assert loop.time() >= start + 0.08
    facts.close()
    assert len(shared) == 0 and _live_timers() == 0 and not shared._heap


async def test_the_last_deadline_disarmed_leaves_no_timer() -> None:
    loop = asyncio.get_running_loop()
    facts = FactQueue()
    getter = asyncio.ensure_future(facts.get(loop.time() + 60))
    await asyncio.sleep(0)
    facts.put_nowait(ShutdownRequested("x"))
    await getter
    getter = asyncio.ensure_future(facts.get(loop.time() + 3600))
    await asyncio.sleep(0)
    facts.put_nowait(ShutdownRequested("y"))
    await getter
    facts.close()
    shared = call_module._deadlines
    assert shared is not None and shared._timer is None and _live_timers() == 0


# -- hanging up with facts queued ---------------------------------------------------------------


def test_take_requests_keeps_the_other_facts_in_order() -> None:
    engine = FakeEngine()
    leg = Leg(
        Role.CALLER,
        local=LocalAddress("10.0.0.5", 5060, "udp"),
        call_id="c",
        local_tag="t",
        engine=engine,  # type: ignore[arg-type]
        random_bytes=os.urandom,
        user_agent="",
        log=structlog.get_logger("test"),
    )
    one = IncomingRequest(engine, "k1", a_invite(), PBX_SOURCE, None)
    two = IncomingRequest(engine, "k2", a_invite(), PBX_SOURCE, None)
    response = Response(180, "Ringing", one.request.headers, b"")
    facts = FactQueue()
    queued: list[Fact] = [
        RequestArrived(leg, one),
        InviteResponded(leg, response),
        RequestArrived(leg, two),
        AckSettled(leg, None),
    ]
    for fact in queued:
        facts.put_nowait(fact)
    assert facts.take_requests() == [queued[0], queued[2]]
    assert [facts.get_nowait(), facts.get_nowait()] == [queued[1], queued[3]]
    assert facts.empty() and facts.take_requests() == []


# -- trust by source host -----------------------------------------------------------------------

PBX_NETS = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("192.0.2.0/28"))
RETELL_NETS = (ipaddress.ip_network("10.0.0.128/25"), ipaddress.ip_network("2001:db8::/32"))
HOSTS = st.one_of(
    st.ip_addresses(v=4, network="10.0.0.0/23").map(str),
    st.ip_addresses(v=4, network="192.0.2.0/27").map(str),
    st.ip_addresses(v=6, network="2001:db8::/31").map(str),
    st.sampled_from(["pbx.example", "", "not an address"]),
)


def _manager() -> CallManager:
    return CallManager(
        FakeEngine(),  # type: ignore[arg-type]
        config(trusted=PBX_NETS, retell_trusted=RETELL_NETS),
        PassthroughBackend(),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(HOSTS, min_size=1, max_size=20))
def test_trust_remembered_by_host_is_trust_tested(hosts: list[str]) -> None:
    manager = _manager()
    for host in hosts * 2:  # the second time from the memo
        source = Destination("udp", host, 5060)
        expected = (
            CallManager._in(PBX_NETS, source),
            CallManager._in(RETELL_NETS, source),
        )
        assert manager._trusted_as(source) == expected


def test_trust_memo_is_bounded_and_emptied_by_reconfigure() -> None:
    manager = _manager()
    for i in range(_TRUSTED_MEMO + 10):
        manager._trusted_as(Destination("udp", f"198.51.{i // 256}.{i % 256}", 5060))
    assert 0 < len(manager._trusted) <= _TRUSTED_MEMO
    pbx = Destination("udp", "10.0.0.7", 5060)
    assert manager._trusted_as(pbx) == (True, False)
    manager.reconfigure(config(trusted=PBX_NETS, retell_trusted=RETELL_NETS))
    assert manager._trusted == {}


# -- a leg's lines ------------------------------------------------------------------------------


def _leg_logged(log: structlog.typing.FilteringBoundLogger) -> Leg:
    return Leg(
        Role.AGENT,
        local=LocalAddress("10.0.0.5", 5060, "tcp"),
        call_id="b-call",
        local_tag="btag",
        engine=FakeEngine(),  # type: ignore[arg-type]
        random_bytes=os.urandom,
        user_agent="",
        log=log,
    )


def test_leg_info_writes_the_line_of_the_legs_bound_logger() -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    call_log = structlog.get_logger("sbc.b2bua.call").bind(
        call_uuid="u-1", route="default", pbx_call_id="a@x", retell_call_id="b"
    )
    call_log.info("call_received")  # the call's context encoded, as in a call
    _leg_logged(call_log).info("bye_sent", status=200)  # not bound for it
    bound = _leg_logged(call_log)
    bound.log.info("bye_sent", status=200)
    _leg_logged(call_log).info("bye_received")
    _leg_logged(call_log).log.info("bye_received")
    bound.log = bound.log.bind(human_call_id="h")  # a leg bound already: its logger
    bound.info("bye_received", crossing=True)
    bound.log.info("bye_received", crossing=True)
    lines = out.getvalue().splitlines()[1:]
    assert len(lines) == 6

    def unstamped(line: str) -> str:
        return line.replace(json.loads(line)["timestamp"], "T")

    first, second, third, fourth, fifth, sixth = map(unstamped, lines)
    assert first == second and third == fourth and fifth == sixth
    assert list(json.loads(first)) == [
        "call_uuid", "route", "pbx_call_id", "retell_call_id", "leg", "status", "event",
        "logger", "level", "timestamp",
    ]  # fmt: skip
    assert json.loads(fifth)["human_call_id"] == "h"


async def test_a_call_draws_no_system_call_per_identifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call made with the default random source draws from the block: no os.urandom."""
    randomness._forget()
    randomness.random_bytes(1)
    counting = _Counting()
    monkeypatch.setattr(os, "urandom", counting)
    engine = FakeEngine()
    incoming = IncomingRequest(engine, "pbx-invite", a_invite(), PBX_SOURCE, None)
    call = Call(
        incoming,
        config=config(),
        engine=engine,  # type: ignore[arg-type]
        media=PassthroughBackend(),
        call_uuid="uuid-1",
    )
    assert call.agent_leg.local_tag != call.caller_leg.local_tag
    assert counting.blocks == []
