"""What a held call keeps (bench/bench_held.py measures the bytes): one task, one timer, no
INVITE transaction handle on leg b once the call is up, and the light fact queue and flag
that replace asyncio.Queue and asyncio.Event behave as the call flow needs."""

from __future__ import annotations

import asyncio

from sbc.b2bua.call import FactQueue, Flag
from sbc.b2bua.callstate import ShutdownRequested
from sbc.net.addresses import Destination
from tests.unit.call_harness import RETELL_SDP, Harness, answer_bye

RETELL = Destination("tcp", "192.0.2.9", 5060)


def live_timers() -> int:
    loop = asyncio.get_running_loop()
    return sum(not handle.cancelled() for handle in loop._scheduled)  # type: ignore[attr-defined]


async def hang_up(h: Harness) -> None:
    h.call.shutdown()
    await answer_bye(h.engine, 0)
    await answer_bye(h.engine, 1)
    await h.finished()


async def test_a_held_call_is_one_task_and_one_timer() -> None:
    calls = [Harness(t1=0.5, max_duration=3600.0) for _ in range(3)]
    for h in calls:
        await h.connect()
    await asyncio.sleep(0)  # the tasks that answered and ACKed have returned
    assert len(asyncio.all_tasks()) == 1 + len(calls)  # this test and each call's flow
    assert live_timers() == len(calls)  # each call's next deadline (max_duration)
    for h in calls:
        await hang_up(h)
    assert live_timers() == 0


async def test_leg_b_lets_go_of_its_invite_once_the_call_is_up() -> None:
    h = Harness()
    invite = await h.b_invite()
    invite.destination = RETELL  # type: ignore[assignment]
    agent = h.call.agent_leg
    assert agent.outgoing is invite  # type: ignore[comparison-overlap]  # what a CANCEL names
    invite.deliver(180)
    invite.deliver(200, body=RETELL_SDP)
    await h.pbx_status(200)
    h.pbx_ack(1)
    await asyncio.wait_for(h.call.up.wait(), 2)
    assert agent.outgoing is None
    assert agent.destination == RETELL  # the manager still finds the connection it is on
    # A copy of Retell's 2xx is still ACKed, with the same ACK.
    assert invite.final is not None
    h.call.response_again(agent, invite.final)
    await h.engine.wait(lambda: len(h.engine.acks) == 2)
    assert h.engine.acks[0] == h.engine.acks[1]
    await hang_up(h)


async def test_fact_queue_deadline_and_order() -> None:
    loop = asyncio.get_running_loop()
    facts = FactQueue()
    assert await facts.get(loop.time() + 0.01) is None  # the deadline passed first
    assert live_timers() == 0
    first, second, third = (ShutdownRequested(reason) for reason in "abc")
    limit = loop.time() + 60
    getter = asyncio.ensure_future(facts.get(limit))
    await asyncio.sleep(0)
    facts.put_nowait(first)
    facts.put_nowait(second)
    assert await getter is first
    assert not facts.empty()
    assert facts.get_nowait() is second
    assert facts.empty()
    # The next wait for the same limit reuses the timer armed for it: one, not one per wait.
    assert live_timers() == 1
    getter = asyncio.ensure_future(facts.get(limit))
    await asyncio.sleep(0)
    assert live_timers() == 1
    facts.put_nowait(third)
    assert await getter is third
    # Another deadline re-arms it; close (the call ended) cancels it.
    getter = asyncio.ensure_future(facts.get(loop.time() + 0.01))
    assert await getter is None
    assert live_timers() == 0
    getter = asyncio.ensure_future(facts.get(limit))
    await asyncio.sleep(0)
    facts.put_nowait(first)
    assert await getter is first
    facts.close()
    assert live_timers() == 0


async def test_flag_wakes_its_waiters_once_set() -> None:
    flag = Flag()
    waiters = [asyncio.ensure_future(flag.wait()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not flag.is_set() and not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.gather(*waiters) == [True, True]
    assert flag.is_set() and await flag.wait()
    cancelled = Flag()
    waiter = asyncio.ensure_future(cancelled.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    cancelled.set()  # nobody left to wake
    assert cancelled.is_set()
