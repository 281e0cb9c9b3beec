"""Call events reach every observer through its own bounded queue: a slow or failing observer
never blocks a call or another observer, and nothing queued is lost on flush."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from sbc.b2bua.events import CallEnded, CallEvent, CallRecord, CallRefused, CallStarted, EventBus


async def test_every_observer_gets_every_event_in_order() -> None:
    bus = EventBus()
    seen_a: list[CallEvent] = []
    seen_b: list[CallEvent] = []

    async def slow(event: CallEvent) -> None:
        await asyncio.sleep(0.001)
        seen_b.append(event)

    bus.subscribe(seen_a.append)
    bus.subscribe(slow)
    events = [CallStarted(f"u{i}") for i in range(20)] + [CallRefused(403)]
    for event in events:
        bus.publish(event)
    assert seen_a == [] and seen_b == []  # publish never runs an observer itself
    await bus.flush()
    assert seen_a == events and seen_b == events
    await bus.close()


async def test_a_stuck_observer_fills_only_its_own_queue_and_drops_are_counted() -> None:
    bus = EventBus()
    stuck = asyncio.Event()
    fast: list[CallEvent] = []

    async def blocked(event: CallEvent) -> None:
        await stuck.wait()

    bus.subscribe(blocked, maxsize=3)
    bus.subscribe(fast.append)
    for i in range(10):
        bus.publish(CallStarted(f"u{i}"))  # returns at once although one observer is stuck
    # Its queue holds 3 (publish is synchronous: no delivery ran yet); 7 are dropped, for it
    # only: the other observer still gets all 10.
    assert bus.dropped == 7
    stuck.set()
    await asyncio.wait_for(bus.flush(), 1)
    assert [e.call_uuid for e in fast if isinstance(e, CallStarted)] == [f"u{i}" for i in range(10)]
    await bus.close()


async def test_a_failing_observer_is_logged_and_keeps_receiving(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bus = EventBus()
    got: list[CallEvent] = []

    def flaky(event: CallEvent) -> None:
        got.append(event)
        if len(got) == 1:
            raise RuntimeError("disk full")

    bus.subscribe(flaky)
    bus.publish(CallRefused(503))
    bus.publish(CallRefused(404))
    await bus.flush()
    assert got == [CallRefused(503), CallRefused(404)]
    assert "call_observer_failed" in capsys.readouterr().out
    await bus.close()
    bus.publish(CallRefused(486))  # after close a new delivery task starts again
    await bus.flush()
    assert got[-1] == CallRefused(486)
    await bus.close()


async def test_an_inline_observer_gets_each_event_during_publish_as_a_queued_one_gets_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bus = EventBus()
    inline: list[CallEvent] = []
    queued: list[CallEvent] = []
    ended_only: list[CallEvent] = []

    def counting(event: CallEvent) -> None:
        inline.append(event)
        if isinstance(event, CallRefused) and event.status == 500:
            raise RuntimeError("counter broke")

    counted = bus.subscribe(counting, inline=True)
    bus.subscribe(queued.append)
    bus.subscribe(ended_only.append, inline=True, kinds=(CallRefused,))
    assert counted.queue is None  # an inline observer has no queue to hold
    events: list[CallEvent] = [
        CallStarted("u1"),
        CallRefused(500),
        CallStarted("u2"),
        CallRefused(486),
    ]
    for n, event in enumerate(events, 1):
        bus.publish(event)
        assert len(inline) == n  # called by publish itself, failure or not
    assert queued == []
    await bus.flush()
    assert inline == queued == events
    assert ended_only == [CallRefused(500), CallRefused(486)]
    assert bus.dropped == 0
    assert "call_observer_failed" in capsys.readouterr().out
    await bus.close()


def test_a_coroutine_cannot_be_an_inline_observer() -> None:
    async def waits(event: CallEvent) -> None:
        await asyncio.sleep(0)

    with pytest.raises(ValueError, match="plain function"):
        EventBus().subscribe(waits, inline=True)


class _Ladder(list[object]):
    """A record's ladder that a test can hold a weak reference to (a record cannot)."""


async def test_a_delivered_event_is_not_kept_until_the_next_one() -> None:
    """Once an observer had the last call's CallEnded, the delivery task lets go of it: kept
    until another call ended, the record and its ladder stayed alive after a burst of calls,
    holding the allocator's arenas of the burst (docs/performance.md, "Round 4: idle")."""
    bus = EventBus()
    got: list[str] = []

    async def observer(event: CallEvent) -> None:
        await asyncio.sleep(0)
        got.append(type(event).__name__)

    bus.subscribe(observer)
    ladder = _Ladder()
    freed = weakref.ref(ladder)
    record = CallRecord(
        "u-1", "pbx-1", "retell-1", "+15550100", "101", 1.0, 2.0, 3.0, 200, 200, "pbx_bye",
        ladder=ladder,  # type: ignore[arg-type]
    )  # fmt: skip
    bus.publish(CallEnded(record))
    del ladder, record
    gc.disable()  # reference counting alone must free it
    try:
        await asyncio.wait_for(bus.flush(), 1)
        assert got == ["CallEnded"]
        assert freed() is None
    finally:
        gc.enable()
    await bus.close()
