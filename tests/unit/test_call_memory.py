"""What a held call keeps (bench/bench_held.py measures the bytes): one task, one entry in the
loop's deadlines (one loop timer for all calls), no INVITE transaction handle on leg b once
the call is up, and the light fact queue and flag that replace asyncio.Queue and asyncio.Event
behave as the call flow needs."""

from __future__ import annotations

import asyncio

from sbc.b2bua import call as call_module
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


def deadlines() -> int:
    """Entries armed in the running loop's deadlines (the calls' fact queues)."""
    found = call_module._deadlines
    if found is None or found._loop is not asyncio.get_running_loop():
        return 0
    return len(found)


async def test_a_held_call_is_one_task_and_one_deadline() -> None:
    calls = [Harness(t1=0.5, max_duration=3600.0) for _ in range(3)]
    for h in calls:
        await h.connect()
    await asyncio.sleep(0)  # the tasks that answered and ACKed have returned
    assert len(asyncio.all_tasks()) == 1 + len(calls)  # this test and each call's flow
    assert deadlines() == len(calls)  # each call's next deadline (max_duration)
    assert live_timers() == 1  # one loop timer for all of them
    for h in calls:
        await hang_up(h)
    assert deadlines() == 0 and live_timers() == 0


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
    assert deadlines() == live_timers() == 0
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
    # The next wait for the same limit reuses the entry armed for it: one, not one per wait.
    assert deadlines() == live_timers() == 1
    getter = asyncio.ensure_future(facts.get(limit))
    await asyncio.sleep(0)
    assert deadlines() == live_timers() == 1
    facts.put_nowait(third)
    assert await getter is third
    # Another deadline re-arms it; close (the call ended) disarms it.
    getter = asyncio.ensure_future(facts.get(loop.time() + 0.01))
    assert await getter is None
    assert deadlines() == live_timers() == 0
    getter = asyncio.ensure_future(facts.get(limit))
    await asyncio.sleep(0)
    facts.put_nowait(first)
    assert await getter is first
    facts.close()
    assert deadlines() == live_timers() == 0


async def test_many_queues_share_one_loop_timer_each_woken_at_its_deadline() -> None:
    """Queues waiting for different deadlines (calls held with different limits) are woken
    by one loop timer, none before its deadline; those that stopped waiting (the call ended)
    leave nothing of theirs behind, and the heap is rebuilt once most entries are stale."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    queues = [FactQueue() for _ in range(300)]
    # Deadlines 250-500 ms away, not in order; two queues in three get a fact, then end. (Not
    # tens of ms: on a loaded machine the getters can start after such a deadline has passed,
    # and a queue asked to wait for a past deadline arms no timer: the counts below would miss.)
    offsets = [0.25 + 0.25 * ((7 * i) % 300) / 300 for i in range(300)]
    getters = [
        asyncio.ensure_future(q.get(start + offset))
        for q, offset in zip(queues, offsets, strict=True)
    ]
    await asyncio.sleep(0)
    assert deadlines() == 300 and live_timers() == 1
    ended = [i for i in range(300) if i % 3]
    for i in ended:
        queues[i].put_nowait(ShutdownRequested(str(i)))
        queues[i].close()
    shared = call_module._deadlines
    assert shared is not None and deadlines() == 100
    # Rebuilt without the stale entries once they were more than half of the 300.
    assert len(shared._heap) < 200
    results = await asyncio.wait_for(asyncio.gather(*getters), 10)
    for i, result in enumerate(results):
        assert result == (ShutdownRequested(str(i)) if i % 3 else None)
    # Each deadline fired no earlier than it was due (the last one being the latest).
    assert loop.time() >= start + max(offsets[0::3])
    assert deadlines() == live_timers() == 0 and not shared._heap


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
