"""What calls tell the rest of the bridge: events, published to any number of observers.

Calls publish facts (:class:`CallStarted`, :class:`CallRefused`, :class:`CallEnded`) and never
wait for who listens: :meth:`EventBus.publish` puts the event on each observer's own bounded
queue and returns at once, and one task per observer hands the events over in order. A slow
observer (call records on a slow disk) only fills its own queue; once full, further events for
it are dropped and counted (``dropped``), logged on the first drop of a run of drops. A failing
observer is logged and keeps receiving. :meth:`EventBus.flush` waits until every queued event
was handled (shutdown: nothing lost).

An observer that only counts (metrics) may be subscribed ``inline``: :meth:`EventBus.publish`
calls it at once, with no queue or task (a queued event cost more than a few counters: a
future, a task step and the queue's bookkeeping per event and observer). It must be a plain
function that neither blocks nor waits; a failure is logged, as for the others.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from sbc.b2bua.ladder import LadderEntry
from sbc.b2bua.transfer import TransferRecord
from sbc.sip.quickinit import quick_init

__all__ = [
    "CallEnded",
    "CallEvent",
    "CallRecord",
    "CallRefused",
    "CallStarted",
    "EventBus",
    "Observer",
    "Subscription",
]

log = structlog.get_logger(__name__)

DEFAULT_QUEUE = 10_000


@quick_init
@dataclass(frozen=True, slots=True)
class CallRecord:
    """What a finished call leaves behind (logs, call records, metrics)."""

    call_uuid: str
    pbx_call_id: str
    retell_call_id: str
    caller: str
    called: str
    started: float  # wall clock
    answered: float | None
    ended: float
    pbx_status: int | None  # final status sent to the PBX's INVITE
    retell_status: int | None  # final status Retell gave the bridge's INVITE
    end_reason: str
    transfers: tuple[TransferRecord, ...] = ()  # every transfer the agent asked for
    # For call records (sbc/ops/records.py); defaults keep other constructors working.
    direction: str = "pbx->retell"  # or "retell->pbx" (a call Retell sent to sbc)
    human_call_id: str = ""  # the human leg's (a transfer by INVITE, a call from Retell)
    caller_name: str = ""
    retell_number: str = ""
    x_headers: tuple[tuple[str, str], ...] = ()  # the X- headers sent to Retell
    hung_up_by: str = ""  # "pbx", "retell" or "sbc" (see hung_up_by in sbc/b2bua/calls.py)
    media: dict[str, Any] | None = None  # the media session's stats() at the end
    ladder: Sequence[LadderEntry] = ()  # the call's SIP messages (sbc/b2bua/ladder.py)
    ladder_omitted: int = 0  # messages left out of a full ladder
    route: str = ""  # the route ([[routes]] name; "default" without [[routes]]) it took


@quick_init
@dataclass(frozen=True, slots=True)
class CallStarted:
    call_uuid: str
    route: str = ""  # the route the call took (metrics by route)


@dataclass(frozen=True, slots=True)
class CallRefused:
    """A new call refused before any call existed (untrusted, other extension, capacity)."""

    status: int


@quick_init
@dataclass(frozen=True, slots=True)
class CallEnded:
    record: CallRecord


CallEvent = CallStarted | CallRefused | CallEnded
# An observer takes one event; it may be a coroutine function.
Observer = Callable[[CallEvent], Awaitable[None] | None]


class Subscription:
    """One observer's queue (none for an inline observer); ``dropped`` counts the events
    that found it full."""

    def __init__(
        self,
        observer: Observer,
        maxsize: int,
        kinds: tuple[type[CallEvent], ...] | None = None,
        *,
        inline: bool = False,
    ) -> None:
        self.observer = observer
        self.inline = inline  # called by publish() itself (no queue, no task)
        self.name = getattr(observer, "__qualname__", repr(observer))
        # An inline observer has no queue (publish() calls it): None.
        self.queue: asyncio.Queue[CallEvent] | None = None if inline else asyncio.Queue(maxsize)
        self.kinds = kinds  # the event types it takes (None: all)
        self.dropped = 0
        self.dropping = False
        self.task: asyncio.Task[None] | None = None
        self.handling = False  # an event taken from the queue and not yet handed over

    async def deliver(self) -> None:
        queue = self.queue
        assert queue is not None  # publish() starts no task for an inline observer
        while True:
            event = await queue.get()
            self.handling = True
            try:
                result = self.observer(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("call_observer_failed", observer=self.name)
            finally:
                self.handling = False
                queue.task_done()
                # Not kept while waiting for the next one: the last call's record (its ladder,
                # a few hundred small objects) would stay alive until another call ended, made
                # at the end of a burst and holding the allocator's arenas of the burst.
                event = result = None  # type: ignore[assignment]


class EventBus:
    """Call events to observers, each through its own bounded queue (module docstring)."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def subscribe(
        self,
        observer: Observer,
        *,
        maxsize: int = DEFAULT_QUEUE,
        kinds: tuple[type[CallEvent], ...] | None = None,
        inline: bool = False,
    ) -> Subscription:
        """Deliver events to ``observer`` through a queue of ``maxsize``; only those of
        ``kinds`` when given (call records take CallEnded alone: the others would only take
        room in their queue). ``inline``: no queue, ``observer`` is called by :meth:`publish`
        (a plain function that only counts; module docstring)."""
        if inline and inspect.iscoroutinefunction(observer):
            raise ValueError("an inline observer must be a plain function")
        subscription = Subscription(observer, maxsize, kinds, inline=inline)
        self._subscriptions.append(subscription)
        return subscription

    @property
    def dropped(self) -> int:
        return sum(s.dropped for s in self._subscriptions)

    def publish(self, event: CallEvent) -> None:
        """Queue ``event`` for every observer; never blocks, never raises."""
        for sub in self._subscriptions:
            if sub.kinds is not None and not isinstance(event, sub.kinds):
                continue
            if sub.inline:
                try:
                    sub.observer(event)
                except Exception:
                    log.exception("call_observer_failed", observer=sub.name)
                continue
            queue = sub.queue
            assert queue is not None  # (inline observers are called above)
            if sub.task is None:
                sub.task = asyncio.ensure_future(sub.deliver())
            try:
                queue.put_nowait(event)
                sub.dropping = False
            except asyncio.QueueFull:
                sub.dropped += 1
                if not sub.dropping:
                    sub.dropping = True
                    log.warning("call_event_dropped", observer=sub.name, queued=queue.qsize())

    async def flush(self) -> None:
        """Wait until every event published so far has been handed to its observer."""
        await asyncio.gather(
            *(s.queue.join() for s in self._subscriptions if s.task and s.queue is not None)
        )

    async def rest(self) -> None:
        """Stop the delivery tasks that have nothing left to deliver; publish() starts them
        again with the next event. The service calls it when idle, before its collection
        (sbc/ops/idle.py): a task waiting for its next event keeps what that wait made (a
        future and its callback), made with the last event of a burst of calls and alive until
        the next call, in the allocator's arenas the burst took, which it then cannot give
        back (docs/performance.md, Round 9: idle)."""
        await self.flush()
        resting: list[asyncio.Task[None]] = []
        for sub in self._subscriptions:
            task, queue = sub.task, sub.queue
            # Nothing queued and nothing being handed over: the task waits in queue.get(),
            # where a cancellation loses no event.
            if task is not None and queue is not None and queue.empty() and not sub.handling:
                task.cancel()
                sub.task = None
                resting.append(task)
        await asyncio.gather(*resting, return_exceptions=True)

    async def close(self) -> None:
        """Flush, then stop the delivery tasks."""
        await self.flush()
        tasks: list[asyncio.Task[Any]] = [s.task for s in self._subscriptions if s.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in self._subscriptions:
            sub.task = None
