"""One call: leg ``a`` (an INVITE sbc received; sbc is its UAS) bridged to leg ``b`` (the INVITE
sbc sent for it; sbc is its UAC). ``docs/architecture.md`` ("A call's legs") has the picture.

:class:`Call` is the PBX's call to the extension: the caller's leg bridged to the agent's (sbc's
INVITE to Retell). :class:`~sbc.b2bua.inbound.RetellCall` is the other direction, a call Retell
sends to sbc, bridged to a human on the PBX; it changes only how leg b's INVITE is built and
what leg a is told (the hooks marked below).

:meth:`Call.run` is the whole life of a call and reads top to bottom: set up (offer on leg b,
relay its ringing, answer or refuse leg a), talk (serve in-dialog requests, a transfer, wait
for a BYE or a limit), hang up every leg, release the media. Each step is a small method below;
everything from outside arrives as a fact (``sbc/b2bua/callstate.py``) on one queue, so the
flow never races with itself. The answers sbc gives itself inside the dialogs (holds,
refreshes and the PBX's session timer, INFO DTMF, 2xx repeated until ACKed) are the call's
:class:`~sbc.b2bua.absorber.Absorber`; transfers are :mod:`sbc.b2bua.transfer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from sbc.b2bua.absorber import Absorber
from sbc.b2bua.callstate import (
    TRANSITIONS,
    AckSettled,
    CallInput,
    CallState,
    Cancelled,
    DialogLost,
    Fact,
    InviteResponded,
    RequestArrived,
    ShutdownRequested,
    TransferEnded,
)
from sbc.b2bua.leg import Bridge, Leg, LegState, Role, hang_up_all
from sbc.b2bua.messages import (
    HANDLED,
    TIMEOUT_STATUS,
    BridgeConfig,
    Caller,
    LegIds,
    LocalAddress,
    Peer,
    build_b_invite,
    call_facts,
    called_of,
    caller_of,
    negotiate_session_timer,
    pbx_dialog_headers,
    pbx_provisional_for,
    pbx_status_for_failure,
)
from sbc.b2bua.transfer import Transfer, TransferRecord
from sbc.media.base import MediaBackend
from sbc.net import randomness
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.digest import Credentials
from sbc.sip.errors import (
    MethodNotAllowed,
    NotImplementedMethod,
    ProtocolError,
    SipError,
)
from sbc.sip.headers import Headers
from sbc.sip.ids import new_call_id, new_tag
from sbc.sip.message import Request, Response

log = structlog.get_logger(__name__)
RING_REPEAT = 60.0  # seconds between copies of leg a's provisional response
AGENT_BYE_GRACE = 2.0  # seconds Retell gets to hang up itself after a REFER-mode transfer

__all__ = ["Call", "CallInput", "CallState"]

In = CallInput
HeaderList = tuple[tuple[str, str], ...]
DialogHandler = Callable[["Call", Leg, IncomingRequest], Awaitable[CallInput | None]]


# Call._early before start() offered anything (the flow's task sets the call up).
_NOT_EARLY = object()


def _no_leg(call: Call, leg: Leg) -> None:
    """What a call tells the manager of a new leg before the manager routes its legs, and
    after it ended (see Call.dispose): nothing. Module functions, not a lambda per call."""


def _no_reach(peer: Peer, failure: str | None) -> None:
    """What an ended call reports about reaching a peer: nothing (see Call.dispose)."""


@functools.cache
def _direction(roles: tuple[Role, Role]) -> str:
    """``pbx->retell`` for a call of leg a's and leg b's roles (two per process)."""
    return f"{roles[0].peer.value}->{roles[1].peer.value}"


def _call_id_key(role: Role, *, initial: bool = True) -> str:
    """The log key of a leg's Call-ID: by peer for the two legs a call starts with
    (``pbx_call_id``, ``retell_call_id``), by role for one added later (``human_call_id``)."""
    # _value_: Enum's value is a property (two Python calls); this runs for every leg.
    return f"{role.peer._value_ if initial else role._value_}_call_id"


# "No deadline", one object for the process: float("inf") makes a new float each time, and the
# one _Deadlines keeps when its last entry goes (it lives as long as the loop) was then made in
# the last moments of a burst of calls, in one of the allocator's arenas the burst had taken,
# which it then could not give back (docs/performance.md, Round 8: idle).
_INF = float("inf")


class _Deadlines:
    """The deadlines of one event loop's fact queues, on one loop timer.

    A held call waits hours for its next deadline (its call limit); one timer handle of the
    loop per call is about 580 bytes of every held call (uvloop's handle and timer), an entry
    here about 130. The entries are a heap; the loop timer is armed for the earliest, and
    when it fires every entry due is expired. A queue that stops waiting for its entry (a fact
    came with a new deadline, the call ended) empties it at once (nothing of the call is kept
    by it) and leaves it in the heap; the heap is rebuilt without them once they are more
    than half of it.
    """

    __slots__ = ("_heap", "_loop", "_seq", "_stale", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Entries: [deadline, sequence number (ties, and never a queue compared), queue or None]
        self._heap: list[list[Any]] = []
        # An iterator, not an int attribute: `+= 1` made a new int kept until the next arm, the
        # last one made at the end of a burst of calls and alive after it (see _INF).
        self._seq = itertools.count(1)
        self._stale = 0  # entries whose queue let go of them
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF

    def __len__(self) -> int:
        return len(self._heap) - self._stale

    def arm(self, deadline: float, queue: FactQueue) -> list[Any]:
        """Expire ``queue`` at ``deadline`` (loop time); returns the entry to :meth:`disarm`."""
        entry = [deadline, next(self._seq), queue]
        heapq.heappush(self._heap, entry)
        if deadline < self._timer_at:
            self._arm_timer(deadline)
        return entry

    def disarm(self, entry: list[Any]) -> None:
        entry[2] = None
        self._stale += 1
        heap = self._heap
        if self._stale > 64 and 2 * self._stale > len(heap):
            heap[:] = [e for e in heap if e[2] is not None]
            heapq.heapify(heap)
            self._stale = 0
        if not len(self):
            # Nothing left to wake: no entry and no handle left in the loop.
            heap.clear()
            self._stale = 0
            if self._timer is not None:
                self._timer.cancel()
                self._timer, self._timer_at = None, _INF

    def _arm_timer(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._fire)
        self._timer_at = deadline

    def _fire(self) -> None:
        # Due: what the timer was armed for (the loop may run it a little early) and all
        # that is past by now.
        due = max(self._timer_at, self._loop.time())
        self._timer, self._timer_at = None, _INF
        heap = self._heap
        while heap and (heap[0][0] <= due or heap[0][2] is None):
            queue = heapq.heappop(heap)[2]
            if queue is None:
                self._stale -= 1
            else:
                queue._expire()
        if heap:
            self._arm_timer(heap[0][0])


# The deadlines of the loop that ran last (one loop per process; tests make one per test).
_deadlines: _Deadlines | None = None


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    global _deadlines
    deadlines = _deadlines
    if deadlines is None or deadlines._loop is not loop:
        deadlines = _deadlines = _Deadlines(loop)
    return deadlines


class FactQueue:
    """The call's facts, read by its flow alone: a list and at most one waiting future.

    What an :class:`asyncio.Queue` would do here, without its three deques (about 2.3 KiB per
    call held) and without :func:`asyncio.timeout_at` around each wait (a Timeout object and
    a cancellation of the call's task when it fires). A deadline is one entry of the loop's
    :class:`_Deadlines` that wakes the waiter; it stays armed across waits for the same
    deadline (the flow waits for the same answer timeout or call limit fact after fact) and
    is re-armed only when the deadline changes. :meth:`close` disarms it when the call ends."""

    __slots__ = ("_deadline", "_deadlines", "_entry", "_facts", "_waiter")

    def __init__(self) -> None:
        # A list, not a deque: rarely more than one fact waits, and an empty deque is a block
        # of 64 slots (760 bytes) held for the whole call.
        self._facts: list[Fact] = []
        self._waiter: asyncio.Future[None] | None = None
        self._entry: list[Any] | None = None  # in _deadlines, armed for _deadline
        self._deadlines: _Deadlines | None = None
        self._deadline = float("inf")

    def put_nowait(self, fact: Fact) -> None:
        self._facts.append(fact)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._facts

    def get_nowait(self) -> Fact:
        return self._facts.pop(0)  # IndexError when empty, like QueueEmpty

    def take_requests(self) -> list[RequestArrived]:
        """Take out the queued requests, in order; the other facts stay queued as they were
        (the flow, the queue's only reader, calls this: nobody is waiting)."""
        facts = self._facts
        if not facts:
            return []  # most calls: nothing queued as they hang up
        requests = [fact for fact in facts if isinstance(fact, RequestArrived)]
        if requests:
            facts[:] = [fact for fact in facts if not isinstance(fact, RequestArrived)]
        return requests

    async def get(self, deadline: float = float("inf")) -> Fact | None:
        """The next fact; None once ``deadline`` (loop time) passes first, or at once when it
        has passed already (even with facts queued: they wait for the next get)."""
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            return None
        if self._facts:
            return self._facts.pop(0)
        waiter = self._waiter = loop.create_future()
        if deadline != self._deadline:
            # The new entry first, then the old one out: the heap is never empty in between,
            # so the loop timer armed for the old one stays (it fires early at worst) rather
            # than being cancelled and armed again (each call moves from its answer timeout
            # to its call limit: a loop timer and a cancel fewer a call).
            old, self._entry = self._entry, None
            old_deadlines = self._deadlines
            if deadline != _INF:
                deadlines = self._deadlines = _deadlines_of(loop)
                self._entry = deadlines.arm(deadline, self)
            self._deadline = deadline
            if old is not None:
                assert old_deadlines is not None
                old_deadlines.disarm(old)
        try:
            await waiter
        finally:
            self._waiter = None
        return self._facts.pop(0) if self._facts else None

    def _expire(self) -> None:
        self._entry = None
        self._deadline = float("inf")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """No more waits with a deadline: disarm it (an ended call's entry would otherwise
        keep the queue until its limit, hours away)."""
        entry = self._entry
        if entry is not None:
            self._entry = None
            assert self._deadlines is not None
            self._deadlines.disarm(entry)
        self._deadline = float("inf")


class Flag:
    """What the call's ``up`` needs of an :class:`asyncio.Event` (set, is_set, wait), without
    its deque of waiters (about 760 bytes per call held): nobody waits on most calls'."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> bool:
        if not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if self._waiters is not None and waiter in self._waiters:
                    self._waiters.remove(waiter)
        return True


class Call:
    """One call; the manager (``sbc/b2bua/calls.py``) creates it, feeds it and awaits ``run``."""

    # Slots: no dict per call, held for the whole call (bench/bench_held.py measures it).
    __slots__ = (
        "__weakref__",
        "_b_ok",
        "_closing",
        "_early",
        "_last_provisional",
        "_last_relayed",
        "_late_offer",
        "_random",
        "_ring_again_at",
        "_tasks",
        "_wall",
        "a_invite",
        "absorber",
        "all_legs",
        "answered",
        "bridge",
        "call_uuid",
        "called",
        "caller",
        "config",
        "end_reason",
        "ended",
        "engine",
        "facts",
        "legs",
        "log",
        "media_backend",
        "on_b_reached",
        "on_new_leg",
        "started",
        "state",
        "transfer",
        "transfers",
        "up",
        "x_headers",
    )  # fmt: skip

    def __init__(
        self,
        incoming: IncomingRequest,
        *,
        config: BridgeConfig,
        engine: SipEngine,
        media: MediaBackend,
        call_uuid: str,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = randomness.random_bytes,
    ) -> None:
        self.config = config
        self.engine = engine
        self.media_backend = media
        self.call_uuid = call_uuid
        self.a_invite = incoming.request
        self.state = CallState.INCOMING
        self._wall = wall_clock
        self._random = random_bytes
        self.started = wall_clock()
        self.answered: float | None = None
        self.up = Flag()  # set once legs a and b are answered
        self.ended: float | None = None
        self.end_reason = ""
        self.caller = self._caller_of(self.a_invite)
        self.called = called_of(self.a_invite)
        self.facts = FactQueue()
        self.x_headers: HeaderList = ()  # the X- headers sent to Retell (a transfer keeps them)
        self.transfer: Transfer | None = None
        self.transfers: list[TransferRecord] = []  # every transfer tried, in order
        self.all_legs: list[Leg] = []  # every leg the call ever had (the manager routes them)
        # The manager routes its dialog (one callable for all calls, given the call: not a
        # closure per call).
        self.on_new_leg: Callable[[Call, Leg], None] = _no_leg
        # Leg b's INVITE reached its peer (None) or failed locally (the engine's own 408/503:
        # what went wrong); the manager logs outages once (sbc/b2bua/reachability.py).
        self.on_b_reached: Callable[[Peer, str | None], None] = _no_reach
        # The call's tasks besides its flow, made on the first (most calls have none: an empty
        # set is 216 bytes of every held call).
        self._tasks: set[asyncio.Task[Any]] | None = None
        # Set once the flow hangs up its legs and reads no more facts: a request arriving
        # then (the peer's BYE crossing sbc's) is answered at once, not queued for nobody,
        # or its server transaction would wait for an answer forever.
        self._closing = False
        self._last_relayed: tuple[int, bytes] | None = None
        self._last_provisional: Response | None = None
        self._ring_again_at = float("inf")
        self._late_offer = not self.a_invite.body
        self._b_ok: Response | None = None  # late offer: b's 2xx, ACKed with a's answer
        # What start() did before the flow's task ran: _NOT_EARLY (nothing: the flow sets the
        # call up), True (leg b's INVITE went out), False (refused, leg a answered), or the
        # exception it raised (the flow raises it, as if it had happened there).
        self._early: bool | BaseException | object = _NOT_EARLY
        b_call_id = new_call_id(random_bytes(12))  # drawn now: the manager routes by it at once
        a_role, b_role = self.roles
        # Every line of the call carries its uuid and both Call-IDs, named by peer
        # (pbx_call_id, retell_call_id), whichever side called; a human leg adds its own.
        self.log = log.bind(
            call_uuid=call_uuid,
            route=config.route,
            **{
                _call_id_key(a_role): self.a_invite.call_id,
                _call_id_key(b_role): b_call_id,
            },
        )
        assert incoming.local_tag is not None  # an INVITE without To tag always gets one
        transport = incoming.source.transport
        # Leg a's tag is the one its INVITE's responses carry (drawn with the transaction).
        a_local = self._local(a_role, transport)
        a = self.new_leg(a_role, a_local, self.a_invite.call_id, incoming.local_tag)
        a.incoming = incoming
        b = self.new_leg(b_role, self._local(b_role), b_call_id)
        self.legs: dict[Role, Leg] = {a_role: a, b_role: b}
        self.all_legs.extend((a, b))
        self.bridge = Bridge(a, b)
        self.absorber = Absorber(
            config=config, bridge=self._current_bridge, spawn=self.spawn, log=self.log
        )

    # -- what differs by direction (RetellCall overrides these) -------------------------------
    roles: tuple[Role, Role] = (Role.CALLER, Role.AGENT)  # leg a's role, leg b's

    def _caller_of(self, invite: Request) -> Caller:
        return caller_of(invite, self.config.number_plan)

    def _b_invite(self, b: Leg, sdp: bytes) -> Request:
        """The INVITE to Retell: X- headers rendered from the templates, nothing else copied."""
        rendered = self.config.headers.render(
            call_facts(self.a_invite, self.caller, self.called, self.call_uuid, self.started)
        )
        for rejected in rendered.rejected:
            self.log.warning("header_not_sent", header=rejected.header, reason=rejected.reason)
        self.x_headers = rendered.headers
        ids = LegIds(b.call_id, b.local_tag)
        return build_b_invite(self.config, b.local, ids, self.caller, rendered.headers, sdp)

    def _a_status_for_failure(self, status: int) -> int:
        """What leg a is told when leg b's INVITE fails with ``status``."""
        return pbx_status_for_failure(status)

    def _a_provisional_for(self, status: int) -> int | None:
        return pbx_provisional_for(status)

    def _a_headers(self, request: Request, *, has_body: bool, with_timer: bool) -> HeaderList:
        """Headers of a dialog-forming response to leg a (18x with tag, 2xx)."""
        a = self.bridge.a  # leg a (origin), read directly: the answer path's hot spot
        timer = a.timer if with_timer else None
        return pbx_dialog_headers(
            request,
            a.local,
            user_agent=self.config.user_agent,
            timer=timer,
            has_body=has_body,
        )

    # -- the legs ------------------------------------------------------------------------------
    def new_leg(
        self, role: Role, local: LocalAddress, call_id: str, local_tag: str | None = None
    ) -> Leg:
        """A leg of this call with ``local_tag``, else a fresh tag (the transfer module adds
        the human's here)."""
        leg = Leg(
            role,
            local=local,
            call_id=call_id,
            local_tag=new_tag(self._random(8)) if local_tag is None else local_tag,
            engine=self.engine,
            random_bytes=self._random,
            user_agent=self.config.user_agent,
            log=self.log,
            auth=self._auth_for(role.peer),
        )
        return leg

    def add_leg(self, leg: Leg) -> None:
        """Make ``leg`` reachable: the manager routes its dialog's requests to this call. Its
        Call-ID joins the call's log lines from now on (``human_call_id``)."""
        key = _call_id_key(leg.role, initial=False)
        self.log = self.log.bind(**{key: leg.call_id})
        leg.log = leg.log.bind(**{key: leg.call_id})
        self.all_legs.append(leg)
        self.on_new_leg(self, leg)

    def _auth_for(self, peer: Peer) -> Credentials | None:
        # 3CX challenges what an extension sends (docs/peers.md); Retell may challenge sbc's
        # INVITE, answered with the trunk credentials when configured (the leg makes its
        # ClientAuth on the first challenge).
        return self.config.pbx_credentials if peer is Peer.PBX else self.config.retell_credentials

    def _local(self, role: Role, transport: str | None = None) -> LocalAddress:
        """sbc's Contact toward ``role``'s peer; toward the PBX it carries the extension."""
        if role.peer is Peer.RETELL:
            transport = transport or self.config.retell.transport
            user = None
        else:
            pbx = self.config.pbx
            transport = transport or (pbx.transport if pbx is not None else "udp")
            user = self.config.extension
        port = self.engine.config.via_port(transport)
        return _local_address(self.engine.config.via_host, port, transport, user)

    def _current_bridge(self) -> Bridge:
        """The absorber's view of the bridge (a bound method: no closure and cell per call)."""
        return self.bridge

    @property
    def origin(self) -> Leg:
        """Leg a: the leg whose INVITE made the call."""
        return self.bridge.a

    @property
    def caller_leg(self) -> Leg:
        return self.legs[Role.CALLER]

    @property
    def agent_leg(self) -> Leg:
        return self.legs[Role.AGENT]

    @property
    def incoming(self) -> IncomingRequest:
        incoming = self.bridge.a.incoming
        assert incoming is not None
        return incoming

    def status_of(self, peer: Peer) -> int | None:
        """The final status of the first INVITE of the call's leg with ``peer``."""
        for leg in self.legs.values():
            if leg.role.peer is peer:  # not the property: read several times a call
                return leg.status
        return None

    def call_id_of(self, peer: Peer) -> str:
        for leg in self.legs.values():
            if leg.role.peer is peer:  # not the property: read several times a call
                return leg.call_id
        return ""

    @property
    def pbx_status(self) -> int | None:
        return self.status_of(Peer.PBX)

    @property
    def retell_status(self) -> int | None:
        return self.status_of(Peer.RETELL)

    # -- input from the manager (never blocks) -------------------------------------------------
    def cancelled(self, leg: Leg) -> None:
        self.facts.put_nowait(Cancelled(leg))

    def request_arrived(self, leg: Leg, incoming: IncomingRequest) -> None:
        if self._closing:
            self._answer_closing(leg, incoming)
            return
        self.facts.put_nowait(RequestArrived(leg, incoming))

    def _close(self) -> None:
        """From now on the flow reads no request: answer those queued (other facts stay for
        whatever still waits on them) and, via :meth:`request_arrived`, those to come."""
        self._closing = True
        for fact in self.facts.take_requests():
            self._answer_closing(fact.leg, fact.incoming)

    def _answer_closing(self, leg: Leg, incoming: IncomingRequest) -> None:
        """A request in a dialog of a call that is hanging up: a BYE is answered 200 (both
        ends said goodbye, RFC 3261 §15.1.2), anything else 481 (the dialog is going)."""
        if incoming.final_sent:
            return
        with contextlib.suppress(SipError):
            if incoming.request.method == "BYE":
                incoming.respond(200)
                leg.info("bye_received", crossing=True)
            else:
                incoming.respond(481)

    def ack_arrived(self, leg: Leg, request: Request) -> None:
        """The ACK of a 2xx sbc sent on ``leg`` (copies of it are ignored)."""
        self.absorber.ack_arrived(leg, request)

    def response_again(self, leg: Leg, response: Response) -> None:
        """A copy of a 2xx to an INVITE sbc sent on ``leg``: ACKed again (RFC 3261 §13.2.2.4)."""
        self.spawn(leg.ack_again(response))

    def shutdown(self) -> None:
        self.hang_up("shutdown")

    def hang_up(self, reason: str = "admin") -> None:
        """End the call from outside (an operator, the bridge stopping); returns at once. The
        call's own task does the rest: BYE on every leg that is up, or, while it is being set
        up, 503 to leg a and CANCEL on leg b. ``reason`` becomes the end reason."""
        self.facts.put_nowait(ShutdownRequested(reason))

    # -- the flow ------------------------------------------------------------------------------
    def start(self) -> None:
        """Offer the call on leg b now, in the dispatch of its INVITE, when the media backend
        answers without waiting (``MediaBackend.immediate``: pass-through): leg b's INVITE
        then leaves before the loop reads anything else, not once the call's task first runs,
        after every other message of the loop's pass (a burst of INVITEs: each waited for all
        the others). :meth:`run` goes on from there."""
        if not self.media_backend.immediate:
            return
        self._log_received()
        prepare = self._prepare_offer()
        try:
            prepare.send(None)
        except StopIteration as done:
            offer = done.value
        except Exception as exc:
            self._early = exc
            return
        else:  # it waited after all: a backend's bug, the call fails (its media released)
            prepare.close()
            self._early = RuntimeError("an immediate media backend waited")
            return
        if offer is None:
            self._early = False
            return
        try:
            self._offer_b(offer)
        except Exception as exc:
            self._early = exc
            return
        self._early = True

    def _log_received(self) -> None:
        self.log.info(
            "call_received",
            caller=self.caller.number,
            called=self.called,
            source=str(self.incoming.source),
            direction=_direction(self.roles),
        )

    async def run(self) -> None:
        if self._early is _NOT_EARLY:
            self._log_received()
        try:
            if await self._set_up():
                await self._talk()
        except Exception:
            self.log.exception("call_failed", state=self.state.value)
            await self._fail()
        finally:
            self._close()
            await self._release()
            self.facts.close()
        self.ended = self._wall()
        self.log.info(
            "call_ended",
            reason=self.end_reason or self.state.value,
            pbx_status=self.pbx_status,
            retell_status=self.retell_status,
            talked=None if self.answered is None else round(self.ended - self.answered, 3),
        )

    async def _set_up(self) -> bool:
        """Offer the call on leg b and wait for its answer; True when both legs are up."""
        early = self._early
        if early is _NOT_EARLY:
            offer = await self._prepare_offer()
            if offer is None:
                return False
            self._offer_b(offer)
        elif isinstance(early, BaseException):
            self._early = True  # (the exception not kept past here)
            raise early
        elif early is False:
            return False
        return await self._await_b()

    async def _prepare_offer(self) -> bytes | None:
        """Session timer, media and the offer for leg b (empty for a late offer: the offer
        then comes in leg b's 2xx); None when the call is refused."""
        a = self.origin
        try:
            if a.peer is Peer.PBX:
                a.timer = negotiate_session_timer(self.a_invite, self.config.min_session_expires)
            offer = parse_sdp(self.a_invite.body) if self.a_invite.body else None
            self.bridge.media = await self.media_backend.allocate(self.call_uuid)
            if offer is None:
                return b""
            return serialize_sdp(await self.bridge.media.offer("a", offer))
        except SipError as exc:
            self.log.info("call_refused", status=exc.status, detail=exc.detail)
            self._answer_a_failure(exc.status, headers=exc.headers)
            self._move(In.REJECTED, f"refused:{exc.status}")
            return None

    def _offer_b(self, sdp: bytes) -> None:
        b = self.bridge.b
        invite = self._b_invite(b, sdp)
        b.sdp_sent = sdp
        # No task: the responses come as facts straight from the engine's delivery.
        b.start_invite(invite, lambda r: self.facts.put_nowait(InviteResponded(b, r)))
        self._move(In.OFFER_SENT)

    async def _await_b(self) -> bool:
        """Relay leg b's ringing until it answers, refuses or ``answer_timeout``."""
        answer_by = self._loop_time() + self.config.answer_timeout
        while True:
            fact = await self._next_fact(min(answer_by, self._ring_again_at))
            if fact is None and self._loop_time() < answer_by:
                self._ring_again()
                continue
            if fact is None:
                self.log.info("answer_timeout", after=self.config.answer_timeout)
                self._answer_a_failure(TIMEOUT_STATUS)
                self._move(In.ANSWER_TIMEOUT, "answer_timeout")
                await self._cancel_b()
                return False
            if isinstance(fact, InviteResponded):
                response = fact.response
                self._report_reached(response)
                if response.status < 200:
                    await self._relay_provisional(response)
                    continue
                if response.status < 300:
                    return await self._b_answered(response)
                self._b_refused(response.status)
                return False
            if isinstance(fact, Cancelled):
                self.log.info("a_cancelled")
                self._answer_a_failure(487)
                self._move(In.A_CANCEL, f"{self.origin.peer.value}_cancel")
                await self._cancel_b()
                return False
            if isinstance(fact, ShutdownRequested):
                self._answer_a_failure(503)
                self._move(In.SHUTDOWN, fact.reason)
                await self._cancel_b()
                return False
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)

    def _report_reached(self, response: Response) -> None:
        b = self.bridge.b
        outgoing = b.outgoing
        final = outgoing is not None and response.status >= 200
        self.on_b_reached(b.peer, outgoing.local_failure if final and outgoing else None)

    def _ring_again(self) -> None:
        """RFC 3261 §13.3.1.1: a provisional response at least every minute, so that proxies
        on leg a's side (Timer C) keep the transaction while leg b rings."""
        assert self._last_provisional is not None
        self.incoming.send(self._last_provisional)
        self._ring_again_at = self._loop_time() + RING_REPEAT

    def _b_refused(self, status: int) -> None:
        b = self.bridge.b
        b.refused(status)
        told = self._a_status_for_failure(status)
        self.log.info("b_refused", status=status, a_status=told, peer=b.peer.value)
        self._answer_a_failure(told)
        self._move(In.B_REFUSED, f"{b.peer.value}:{status}")

    async def _b_answered(self, response: Response) -> bool:
        """Leg b answered: ACK it, answer leg a with its SDP, wait for the ACK. With a late
        offer, leg b's 2xx holds the offer: it goes to leg a, whose ACK brings the answer
        that leg b's ACK then carries (RFC 3264 §5)."""
        media = self.bridge.media
        b = self.bridge.b
        assert media is not None
        self._move(In.B_ANSWERED)
        self.answered = self._wall()
        b.confirmed_as_uac(response)
        if not self._late_offer:
            await b.send_ack(response)
        try:
            sdp = parse_sdp(response.body)
            to_a = await (media.offer if self._late_offer else media.answer)("b", sdp)
        except SipError as exc:
            # Leg b's SDP is unusable: nothing can be bridged.
            self.log.warning("b_sdp_unusable", detail=exc.detail)
            if self._late_offer:
                await b.send_ack(response)
            self._answer_a_failure(503)
            self._move(In.FAILED, "b_sdp")
            await self._hang_up(b)
            return False
        if self.incoming.cancelled:
            # RFC 3261 §9.2: leg a's CANCEL beat the answer: 487 there, BYE on leg b.
            if self._late_offer:
                await b.send_ack(response)
            self._answer_a_failure(487)
            self._move(In.A_CANCEL, f"{self.origin.peer.value}_cancel")
            await self._hang_up(b)
            return False
        if self._late_offer:
            self._b_ok = response
        self._answer_a(serialize_sdp(to_a))
        # Only ringing needs these (the 18x repeated to leg a, LiveKit's repeated 180).
        self._last_provisional = self._last_relayed = None
        b.settle()
        self.up.set()
        self.log.info("call_answered")
        return True

    def _answer_a(self, body: bytes) -> None:
        """200 to leg a (repeated until its ACK, see Absorber.send_2xx)."""
        a = self.bridge.a
        incoming = a.incoming
        assert incoming is not None
        headers = self._a_headers(self.a_invite, has_body=True, with_timer=True)
        ok = incoming.response(200, headers=headers, body=body)
        a.answered_as_uas(self.a_invite, ok)
        a.sdp_sent = body
        a.refreshed_at = self._loop_time()
        # No task: the ACK (or its absence after 64*T1) comes back as a fact by callback.
        self.absorber.send_2xx_then(a, incoming, ok, lambda ack: self._ack_settled(a, ack))

    async def _talk(self) -> None:
        """Both legs are up: serve in-dialog requests and transfers until a BYE or a limit."""
        ends_at = self._loop_time() + self.config.max_duration
        a = self.origin
        fact: Fact | None = None
        while True:
            # The fact served last (leg a's ACK, a request) is not kept while the call waits,
            # possibly for hours, for the next one.
            fact = None
            timer = a.timer
            refresh_at = timer.refresh_at(a.refreshed_at) if timer else float("inf")
            expires_at = timer.expires_at(a.refreshed_at) if timer else float("inf")
            silent_at = self.bridge.silent_at(self.config.media_timeout)
            fact = await self._next_fact(min(ends_at, expires_at, refresh_at, silent_at))
            # The clock matters only when no fact came (a deadline passed): not read per fact.
            now = self._loop_time() if fact is None else 0.0
            if fact is None and refresh_at <= now < ends_at:
                a.refreshed_at = now
                self.spawn(self._refresh(a))
                continue
            if fact is None and silent_at <= now < min(ends_at, expires_at):
                if self.bridge.silent_at(self.config.media_timeout) > now:
                    continue  # media came meanwhile
                self.log.info("media_timeout", after=self.config.media_timeout)
                await self._end(In.LIMIT, "media_timeout")
                return
            if fact is None:
                reason = "max_duration" if now >= ends_at else "session_expired"
                self.log.info("call_limit_reached", reason=reason)
                await self._end(In.LIMIT, reason)
                return
            if isinstance(fact, DialogLost):
                self.log.info("dialog_lost", status=fact.status, leg=fact.leg.role.value)
                fact.leg.ended()
                await self._end(In.LIMIT, f"{fact.leg.peer.value}_lost")
                return
            if isinstance(fact, AckSettled):
                if await self._a_acked(fact.ack):
                    continue
                await self._end(In.A_ACK_TIMEOUT, f"{a.peer.value}_no_ack")
                return
            if isinstance(fact, TransferEnded):
                if await self._transfer_ended(fact):
                    continue
                return
            if isinstance(fact, ShutdownRequested):
                await self._end(In.SHUTDOWN, fact.reason)
                return
            if isinstance(fact, RequestArrived):
                ended = await self._serve(fact.leg, fact.incoming)
                if ended is In.B_BYE and self.state is CallState.TRANSFERRING:
                    self._move(In.B_BYE)  # the agent left; the transfer goes on (callstate.py)
                    continue
                if ended is not None:
                    await self._end(ended, f"{fact.leg.role.peer._value_}_bye")
                    return
            # A late InviteResponded or Cancelled changes nothing once answered.

    async def _a_acked(self, ack: Request | None) -> bool:
        """Leg a's ACK came (True) or never did (False). With a late offer it carries the
        answer for leg b's ACK (RFC 3264 §5); without one, leg b is ACKed empty and hung up."""
        b_ok, self._b_ok = self._b_ok, None
        if b_ok is not None:
            body = b""
            media = self.bridge.media
            if ack is not None and ack.body and media is not None:
                try:
                    body = serialize_sdp(await media.answer("a", parse_sdp(ack.body)))
                except SipError as exc:
                    self.log.warning("a_answer_unusable", detail=exc.detail)
                    ack = None
            elif ack is not None:
                self.log.warning("a_ack_without_answer")
                ack = None
            self.bridge.b.sdp_sent = body
            await self.bridge.b.send_ack(b_ok, body)
        if ack is None:
            self.log.warning("a_ack_missing")
            return False
        self._move(In.A_ACK)
        self._slim_a_invite()
        return True

    def _slim_a_invite(self) -> None:
        """Leg a's INVITE is answered and ACKed: keep only the fields read later (Call-ID, and
        Allow for a session refresh by UPDATE), not the whole parsed request with its body and
        fields (held by the call and by leg a's IncomingRequest for the whole call;
        bench/bench_held_service.py). Nothing answers that INVITE any more: its final response
        went (``final_sent``), so what a response is built from (Via, From, To, CSeq) goes too."""
        invite = self.a_invite
        # The parsed fields as they are (names already canonical), not copies of them; the
        # PBX's Allow is the same for every call: one field for all (bounded).
        kept = tuple(
            [
                _shared_allow(item) if item[0] == "Allow" else item
                for item in invite.headers.items()
                if item[0] in _A_INVITE_KEPT
            ]
        )
        slim = Request(invite.method, invite.uri, Headers._trusted(kept), b"", invite.version)
        self.a_invite = slim
        self.incoming.request = slim

    async def _end(self, what: CallInput, reason: str) -> None:
        """Move to ENDING for ``reason`` and hang up every leg still up."""
        self._move(what, reason)
        if self.transfer is not None:
            await self.transfer.abort()
        await self._hang_up(*self.all_legs)

    # -- leg b's INVITE ------------------------------------------------------------------------
    async def _relay_provisional(self, response: Response) -> None:
        """180/183 from leg b to leg a (SDP through the media layer), each kind once."""
        status = self._a_provisional_for(response.status)
        if status is None:
            return
        media = self.bridge.media
        assert media is not None
        body = b""
        if response.body and not self._late_offer:
            try:
                body = serialize_sdp(await media.answer("b", parse_sdp(response.body)))
            except SipError as exc:
                self.log.info("early_sdp_ignored", detail=exc.detail)
        if self._last_relayed == (status, body):
            return  # LiveKit repeats its 180 every second
        self._last_relayed = (status, body)
        self._move(In.B_RINGING)
        a = self.origin
        if body:
            a.sdp_sent = body
        a.state = LegState.EARLY
        self._ring_again_at = self._loop_time() + RING_REPEAT
        self._last_provisional = self.incoming.respond(
            status,
            headers=self._a_headers(self.a_invite, has_body=bool(body), with_timer=False),
            body=body,
        )

    async def _cancel_b(self) -> None:
        """End the pending INVITE of leg b (RFC 3261 §9.1) and wait for its final response.

        The CANCEL goes only once a provisional response came; a 2xx that crosses it is ACKed
        and followed by a BYE. Bounded by 64*T1 (Timer B's length) in all cases.
        """
        b = self.bridge.b
        cancelled = None
        deadline = self._loop_time() + 64 * self.config.t1
        while True:
            outgoing = b.outgoing
            if outgoing is None:
                return
            if outgoing.done:
                break
            if cancelled is not outgoing and any(r.status < 200 for r in outgoing.responses):
                self.engine.cancel(outgoing)
                cancelled = outgoing
            fact = await self._next_fact(deadline)
            if fact is None:
                self.log.warning("cancel_unanswered")
                b.ended()
                self._move(In.ANSWER_TIMEOUT)
                return
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)
            if isinstance(fact, InviteResponded) and fact.response.status >= 200:
                break
        final = await outgoing
        if final.status < 300:
            self.log.info("b_answered_after_cancel")
            self._move(In.B_ANSWERED)
            await b.answered_as_uac(final)
            await self._hang_up(b)
            return
        b.refused(final.status)
        self._move(In.B_REFUSED)

    # -- leg a ---------------------------------------------------------------------------------
    def _answer_a_failure(self, status: int, *, headers: HeaderList = ()) -> None:
        incoming = self.incoming
        if incoming.final_sent:
            return
        self.origin.refused(status)
        try:
            agent = self.config.user_agent  # "": no Server header (settings: sip.user_agent)
            server = (("Server", agent),) if agent else ()
            incoming.respond(status, headers=(*headers, *server))
        except SipError as exc:
            self.log.info("a_response_failed", status=status, detail=exc.detail)

    def _ack_settled(self, leg: Leg, ack: Request | None) -> None:
        self.facts.put_nowait(AckSettled(leg, ack))

    async def _refresh(self, leg: Leg) -> None:
        allows_update = "UPDATE" in (m.upper() for m in self.a_invite.headers.values("Allow"))
        status = await self.absorber.refresh(leg, allows_update=allows_update)
        if status in (408, 481):
            self.facts.put_nowait(DialogLost(leg, status))

    # -- in-dialog requests --------------------------------------------------------------------
    async def _serve(self, leg: Leg, incoming: IncomingRequest) -> CallInput | None:
        """Answer a request received in one of the call's dialogs; returns the input a BYE on
        a bridged leg makes (the call then hangs up the other legs), else None."""
        request = incoming.request
        dialog = leg.dialog
        if dialog is None:
            # RFC 3261 §12.2.2: nothing confirmed yet on that leg (an early UPDATE and such).
            incoming.respond(491 if leg.incoming is not None else 481)
            return None
        try:
            dialog.receive_request(request)
            handler = _DIALOG_HANDLERS.get(request.method)
            if handler is None:
                raise NotImplementedMethod(f"{request.method} in a dialog")
            if request.method not in HANDLED[leg.peer]:
                # RFC 3261 §8.2.1: 405 lists what the leg's peer may send (Allow).
                raise MethodNotAllowed(
                    f"{request.method} in a {leg.peer.value} dialog",
                    headers=(("Allow", leg.allow),),
                )
            return await handler(self, leg, incoming)
        except SipError as exc:
            if not incoming.final_sent:
                incoming.reject(exc)
        return None

    async def _bye_received(self, leg: Leg, incoming: IncomingRequest) -> CallInput | None:
        incoming.respond(200)
        leg.ended()
        leg.info("bye_received")
        if leg is self.bridge.a:
            return In.A_BYE
        if leg is self.bridge.b:
            return In.B_BYE
        return None  # a leg no longer bridged (the agent after a transfer) just ends

    async def _options(self, leg: Leg, incoming: IncomingRequest) -> None:
        incoming.respond(200, headers=(("Allow", leg.allow),))

    async def _refer(self, leg: Leg, incoming: IncomingRequest) -> None:
        """RFC 3515: a REFER from the agent asks for a transfer (``sbc/b2bua/transfer.py``)."""
        if self.state is CallState.TRANSFERRING:
            incoming.respond(491)  # one transfer at a time (RFC 3261 §14.2's spirit)
            return
        if leg.role is not Role.AGENT or self.origin.role is not Role.CALLER:
            # Only the agent of a call from the PBX can hand its caller back.
            incoming.respond(403)
            return
        if self.state is not CallState.CONNECTED:
            incoming.respond(491)  # not yet confirmed (the caller's ACK is awaited): try again
            return
        self.transfer = Transfer(self, leg, incoming)
        self._move(In.TRANSFER_ACCEPTED)
        self.spawn(self.transfer.run())

    async def _notify(self, leg: Leg, incoming: IncomingRequest) -> None:
        """A NOTIFY in a PBX dialog reports on sbc's REFER (RFC 3515 §2.4.4)."""
        if self.transfer is None or not self.transfer.notify_received(leg, incoming):
            incoming.respond(481)  # RFC 6665 §4.1.3: no such subscription

    async def _transfer_ended(self, fact: TransferEnded) -> bool:
        """A transfer's outcome; True while the call goes on."""
        agent = self.legs.get(Role.AGENT)
        if fact.human is not None and not fact.human.up:
            # The human hung up before the bridge could take it (a BYE that overtook the news).
            self._move(In.TRANSFER_FAILED)
            self.transfer = None
            await self._end(In.B_BYE, "pbx_bye")
            return False
        if fact.human is not None:
            self.legs[Role.HUMAN] = fact.human
            self.bridge.b = fact.human
            self._move(In.TRANSFERRED)
            if agent is not None:
                # The agent's RTP must stop now: rtpengine and pass-through cannot keep it from
                # the caller, and the final NOTIFY already told Retell (docs/architecture.md).
                self.spawn(hang_up_all([agent], 64 * self.config.t1 + 1))
            return True
        if fact.handed_over:
            self._move(In.HANDED_OVER, "transferred")
            self.transfer = None
            # RFC 5589 §6.1: the transferor ends its dialog once the transfer succeeded.
            await hang_up_all([self.origin], 64 * self.config.t1 + 1)
            if agent is not None:
                await self._serve_until_gone(agent)
            self._move(In.HUNG_UP)
            return False
        self._move(In.TRANSFER_FAILED)
        self.transfer = None
        if agent is not None and not agent.up:
            # The agent hung up while its transfer was tried: nobody is left for the caller.
            await self._end(In.B_BYE, "retell_bye")
            return False
        return True

    async def _serve_until_gone(self, agent: Leg) -> None:
        """Once the PBX took the caller (REFER mode), Retell hangs up itself about a second
        later (docs/peers.md): the talk loop is over, so its BYE is served here; sbc BYEs the
        agent only if it has not within AGENT_BYE_GRACE."""
        deadline = self._loop_time() + AGENT_BYE_GRACE
        while agent.up:
            fact = await self._next_fact(deadline)
            if fact is None:
                break
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)
        self._close()  # Retell's BYE may cross sbc's now
        await hang_up_all([agent], 64 * self.config.t1 + 1)

    # -- ending --------------------------------------------------------------------------------
    async def _hang_up(self, *legs: Leg) -> None:
        """BYE on each of ``legs`` that is up, all at once; bounded by 64*T1. The call ends
        after this: requests from now on are answered as they come (:meth:`_answer_closing`),
        and those already queued first."""
        self._close()
        await hang_up_all(list(legs), 64 * self.config.t1 + 1)
        if self.state is CallState.ENDING:
            self._move(In.HUNG_UP)

    async def _fail(self) -> None:
        """After a bug: tell leg a if it is still waiting, end what is up, whatever state."""
        self._answer_a_failure(500)
        with contextlib.suppress(ProtocolError):
            self._move(In.FAILED, "error")
        with contextlib.suppress(Exception):
            if self.state is CallState.CANCELLING:
                await self._cancel_b()
            else:
                if self.transfer is not None:
                    await self.transfer.abort()
                await self._hang_up(*self.all_legs)
        self.state = CallState.ENDED

    async def _release(self) -> None:
        tasks = self._tasks
        if tasks:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.absorber.cancel_waits()
        media = self.bridge.media
        if media is not None:
            try:
                await media.close()
            except Exception:
                self.log.exception("media_close_failed")

    # -- helpers -------------------------------------------------------------------------------
    def _move(self, what: CallInput, reason: str | None = None) -> None:
        state = TRANSITIONS.get((self.state, what))  # one lookup, not a test and an index
        if state is None:
            raise ProtocolError(f"call: {what.value} in state {self.state.value}")
        self.state = state
        if reason is not None and not self.end_reason:
            self.end_reason = reason

    def _next_fact(self, deadline: float) -> Coroutine[Any, Any, Fact | None]:
        """The next fact, or None once ``deadline`` (loop time) has passed: the queue's own
        coroutine, awaited by the flow (a coroutine of this method around it would be one
        more frame held by every call for as long as it waits)."""
        return self.facts.get(deadline)

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def dispose(self) -> None:
        """Drop the references that make an ended call a reference cycle (the call's own bound
        methods and closures, held by the call and its parts), so that reference counting
        frees it and all it holds (messages, SDP, legs, dialogs) as soon as the manager lets
        go, instead of the rare full garbage collection the service tunes for
        (``sbc.ops.cli.GC_THRESHOLD``): found by the soak (bench/soak.py), where ended calls
        piled up at about 20 KiB each between full collections. Only for a call whose
        :meth:`run` has returned."""
        self.facts.close()
        self.on_new_leg = _no_leg
        self.on_b_reached = _no_reach
        self.transfer = None
        self._tasks = None
        self.absorber.dispose()

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as one of the call's tasks (cancelled when the call ends)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        tasks = self._tasks
        if tasks is None:
            tasks = self._tasks = set()
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task


# sbc's address toward a peer is the same for every call: one immutable LocalAddress shared
# by all legs (bounded: a few per transport and route), not one per leg of each held call.
_local_address = functools.lru_cache(maxsize=64)(LocalAddress)

# The fields of leg a's INVITE kept once the call is up (Call._slim_a_invite): what the call
# reads later (canonical names: the parser's).
_A_INVITE_KEPT = frozenset({"Call-ID", "Allow"})
_ALLOW_FIELDS: dict[tuple[str, str], tuple[str, str]] = {}


def _shared_allow(field: tuple[str, str]) -> tuple[str, str]:
    """The first equal Allow field kept (a few PBXs, a few texts: at most 64 kept)."""
    found = _ALLOW_FIELDS.get(field)
    if found is not None:
        return found
    if len(_ALLOW_FIELDS) < 64:
        _ALLOW_FIELDS[field] = field
    return field


# In-dialog requests each leg's peer may send (messages.HANDLED), and who serves them. One
# table for all calls, not a dict of bound methods and closures per call (about 1.2 KiB each,
# and a reference cycle): each entry looks its server up on the call, so a subclass's
# override (RetellCall, a test's) still applies.
_DIALOG_HANDLERS: dict[str, DialogHandler] = {
    "BYE": lambda call, leg, incoming: call._bye_received(leg, incoming),
    "INVITE": lambda call, leg, incoming: call.absorber.reinvite(leg, incoming),
    "UPDATE": lambda call, leg, incoming: call.absorber.update(leg, incoming),
    "INFO": lambda call, leg, incoming: call.absorber.dtmf_info(leg, incoming),
    "OPTIONS": lambda call, leg, incoming: call._options(leg, incoming),
    "REFER": lambda call, leg, incoming: call._refer(leg, incoming),
    "NOTIFY": lambda call, leg, incoming: call._notify(leg, incoming),
}
