"""One call: the caller's leg (the PBX's INVITE, sbc its UAS) bridged to the agent's leg (sbc's
INVITE to Retell, sbc its UAC). ``docs/architecture.md`` ("A call's legs") has the picture.

:meth:`Call.run` is the whole life of a call and reads top to bottom: set up (offer to the
agent, relay its ringing, answer or refuse the caller), talk (serve in-dialog requests, wait
for a BYE or a limit), hang up every leg, release the media. Each step is a small method below;
everything from outside arrives as a fact (``sbc/b2bua/callstate.py``) on one queue, so the
flow never races with itself. The answers sbc gives itself inside the dialogs (holds,
refreshes and the PBX's session timer, INFO DTMF, 2xx repeated until ACKed) are the call's
:class:`~sbc.b2bua.absorber.Absorber`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
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
)
from sbc.b2bua.leg import Bridge, Leg, LegState, Role, hang_up_all
from sbc.b2bua.messages import (
    HANDLED,
    TIMEOUT_STATUS,
    BridgeConfig,
    LegIds,
    LocalAddress,
    build_b_invite,
    call_facts,
    called_of,
    caller_of,
    negotiate_session_timer,
    pbx_dialog_headers,
    pbx_provisional_for,
    pbx_status_for_failure,
)
from sbc.media.base import SIDES, MediaBackend
from sbc.net.engine import IncomingRequest, OutgoingRequest, SipEngine
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.digest import ClientAuth
from sbc.sip.errors import (
    MethodNotAllowed,
    NotAcceptableHere,
    NotImplementedMethod,
    ProtocolError,
    SipError,
)
from sbc.sip.ids import new_call_id, new_tag
from sbc.sip.message import Request, Response

log = structlog.get_logger(__name__)
RING_REPEAT = 60.0  # seconds between copies of the caller's provisional response

__all__ = ["Call", "CallInput", "CallState"]

In = CallInput
DialogHandler = Callable[[Leg, IncomingRequest], Awaitable[CallInput | None]]


class Call:
    """One call; the manager (``sbc/b2bua/calls.py``) creates it, feeds it and awaits ``run``."""

    def __init__(
        self,
        incoming: IncomingRequest,
        *,
        config: BridgeConfig,
        engine: SipEngine,
        media: MediaBackend,
        call_uuid: str,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
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
        self.up = asyncio.Event()  # set once caller and agent are answered
        self.ended: float | None = None
        self.end_reason = ""
        self.caller = caller_of(self.a_invite, config.number_plan)
        self.called = called_of(self.a_invite)
        self.facts: asyncio.Queue[Fact] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_relayed: tuple[int, bytes] | None = None
        self._last_provisional: Response | None = None
        self._ring_again_at = float("inf")
        # The agent leg's identifiers are drawn now so the manager can route by them at once.
        agent_call_id = new_call_id(random_bytes(12))
        self.log = log.bind(
            call_uuid=call_uuid, call_id=self.a_invite.call_id, retell_call_id=agent_call_id
        )
        assert incoming.local_tag is not None  # an INVITE without To tag always gets one
        transport = incoming.source.transport
        caller = self._new_leg(
            Role.CALLER,
            LocalAddress(
                engine.config.via_host,
                engine.config.via_port(transport),
                transport,
                config.extension,
            ),
            self.a_invite.call_id,
            incoming.local_tag,
        )
        caller.incoming = incoming
        retell = config.retell.transport
        agent = self._new_leg(
            Role.AGENT,
            LocalAddress(engine.config.via_host, engine.config.via_port(retell), retell),
            agent_call_id,
            new_tag(random_bytes(8)),
        )
        self.legs: dict[Role, Leg] = {Role.CALLER: caller, Role.AGENT: agent}
        self.bridge = Bridge(caller, agent)
        # Holds, refreshes, INFO DTMF and the ACK waits of 2xx answers: see absorber.py.
        self.absorber = Absorber(
            config=config, bridge=lambda: self.bridge, spawn=self._spawn, log=self.log
        )
        # In-dialog requests each leg's peer may send (messages.HANDLED), and who serves them.
        self._handlers: dict[str, DialogHandler] = {
            "BYE": self._bye_received,
            "INVITE": self._absorbed(self.absorber.reinvite),
            "UPDATE": self._absorbed(self.absorber.update),
            "INFO": self._absorbed(self.absorber.dtmf_info),
            "OPTIONS": self._absorbed(self._options),
        }

    def _new_leg(self, role: Role, local: LocalAddress, call_id: str, local_tag: str) -> Leg:
        credentials = self.config.pbx_credentials
        return Leg(
            role,
            local=local,
            call_id=call_id,
            local_tag=local_tag,
            engine=self.engine,
            random_bytes=self._random,
            user_agent=self.config.user_agent,
            log=self.log,
            # 3CX challenges what an extension sends (docs/peers.md).
            auth=None if credentials is None else ClientAuth(credentials),
        )

    # -- the legs, by role ---------------------------------------------------------------------
    @property
    def caller_leg(self) -> Leg:
        return self.legs[Role.CALLER]

    @property
    def agent_leg(self) -> Leg:
        return self.legs[Role.AGENT]

    @property
    def incoming(self) -> IncomingRequest:
        incoming = self.caller_leg.incoming
        assert incoming is not None
        return incoming

    @property
    def pbx_status(self) -> int | None:
        """The final status sbc sent to the caller's INVITE."""
        return self.caller_leg.status

    @property
    def retell_status(self) -> int | None:
        """The final status the agent gave sbc's INVITE."""
        return self.agent_leg.status

    # -- input from the manager (never blocks) -------------------------------------------------
    def cancelled(self, leg: Leg) -> None:
        self.facts.put_nowait(Cancelled(leg))

    def request_arrived(self, leg: Leg, incoming: IncomingRequest) -> None:
        self.facts.put_nowait(RequestArrived(leg, incoming))

    def ack_arrived(self, leg: Leg, request: Request) -> None:
        """The ACK of a 2xx sbc sent on ``leg`` (copies of it are ignored)."""
        self.absorber.ack_arrived(leg, request)

    def response_again(self, leg: Leg, response: Response) -> None:
        """A copy of a 2xx to an INVITE sbc sent on ``leg``: ACKed again (RFC 3261 §13.2.2.4)."""
        self._spawn(leg.ack_again(response))

    def shutdown(self) -> None:
        self.facts.put_nowait(ShutdownRequested())

    # -- the flow ------------------------------------------------------------------------------
    async def run(self) -> None:
        self.log.info(
            "call_received",
            caller=self.caller.number,
            called=self.called,
            source=str(self.incoming.source),
        )
        try:
            if await self._set_up():
                await self._talk()
        except Exception:
            self.log.exception("call_failed", state=self.state.value)
            await self._fail()
        finally:
            await self._release()
        self.ended = self._wall()
        self.log.info(
            "call_ended",
            reason=self.end_reason or self.state.value,
            pbx_status=self.pbx_status,
            retell_status=self.retell_status,
            talked=None if self.answered is None else round(self.ended - self.answered, 3),
        )

    async def _set_up(self) -> bool:
        """Offer the call to the agent and wait for its answer; True when both legs are up."""
        offer = await self._prepare_offer()
        if offer is None:
            return False
        self._offer_agent(offer)
        return await self._await_agent()

    async def _prepare_offer(self) -> bytes | None:
        """Session timer, media allocation and the offer for the agent; None when refused."""
        caller = self.caller_leg
        try:
            caller.timer = negotiate_session_timer(self.a_invite, self.config.min_session_expires)
            if not self.a_invite.body:
                # 3CX always offers in the INVITE; a late offer is not bridged.
                raise NotAcceptableHere("INVITE without an SDP offer")
            offer = parse_sdp(self.a_invite.body)
            self.bridge.media = await self.media_backend.allocate(self.call_uuid)
            return serialize_sdp(await self.bridge.media.offer("a", offer))
        except SipError as exc:
            self.log.info("call_refused", status=exc.status, detail=exc.detail)
            self._answer_caller_failure(exc.status, headers=exc.headers)
            self._move(In.REJECTED, f"refused:{exc.status}")
            return None

    def _offer_agent(self, sdp: bytes) -> None:
        """The INVITE to Retell: X- headers rendered from the templates, nothing else copied."""
        agent = self.agent_leg
        rendered = self.config.headers.render(
            call_facts(self.a_invite, self.caller, self.called, self.call_uuid, self.started)
        )
        for rejected in rendered.rejected:
            self.log.warning("header_not_sent", header=rejected.header, reason=rejected.reason)
        ids = LegIds(agent.call_id, agent.local_tag)
        invite = build_b_invite(self.config, agent.local, ids, self.caller, rendered.headers, sdp)
        agent.sdp_sent = sdp
        agent.outgoing = self.engine.send_request(invite)
        self._spawn(self._pump(agent, agent.outgoing))
        self._move(In.OFFER_SENT)

    async def _await_agent(self) -> bool:
        """Relay the agent's ringing until it answers, refuses or ``answer_timeout``."""
        answer_by = self._loop_time() + self.config.answer_timeout
        while True:
            fact = await self._next_fact(min(answer_by, self._ring_again_at))
            if fact is None and self._loop_time() < answer_by:
                self._ring_again()
                continue
            if fact is None:
                self.log.info("retell_answer_timeout", after=self.config.answer_timeout)
                self._answer_caller_failure(TIMEOUT_STATUS)
                self._move(In.ANSWER_TIMEOUT, "answer_timeout")
                await self._cancel_agent()
                return False
            if isinstance(fact, InviteResponded):
                response = fact.response
                if response.status < 200:
                    await self._relay_provisional(response)
                    continue
                if response.status < 300:
                    return await self._agent_answered(response)
                self._agent_refused(response.status)
                return False
            if isinstance(fact, Cancelled):
                self.log.info("pbx_cancelled")
                self._answer_caller_failure(487)
                self._move(In.CALLER_CANCEL, "pbx_cancel")
                await self._cancel_agent()
                return False
            if isinstance(fact, ShutdownRequested):
                self._answer_caller_failure(503)
                self._move(In.SHUTDOWN, "shutdown")
                await self._cancel_agent()
                return False
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)

    def _ring_again(self) -> None:
        """RFC 3261 §13.3.1.1: a provisional response at least every minute, so that proxies
        on the PBX side (Timer C) keep the transaction while the agent rings."""
        assert self._last_provisional is not None
        self.incoming.send(self._last_provisional)
        self._ring_again_at = self._loop_time() + RING_REPEAT

    def _agent_refused(self, status: int) -> None:
        self.agent_leg.refused(status)
        pbx = pbx_status_for_failure(status)
        self.log.info("retell_refused", status=status, pbx_status=pbx)
        self._answer_caller_failure(pbx)
        self._move(In.AGENT_REFUSED, f"retell:{status}")

    async def _agent_answered(self, response: Response) -> bool:
        """The agent answered: ACK it, answer the caller with its SDP, wait for the ACK."""
        media = self.bridge.media
        assert media is not None
        self._move(In.AGENT_ANSWERED)
        self.answered = self._wall()
        await self.agent_leg.answered_as_uac(response)
        try:
            answer = await media.answer("b", parse_sdp(response.body))
        except SipError as exc:
            # The agent's answer is unusable: nothing can be bridged.
            self.log.warning("retell_answer_unusable", detail=exc.detail)
            self._answer_caller_failure(503)
            self._move(In.FAILED, "retell_sdp")
            await self._hang_up(self.agent_leg)
            return False
        if self.incoming.cancelled:
            # RFC 3261 §9.2: the caller's CANCEL beat the answer: 487 there, BYE to the agent.
            self._answer_caller_failure(487)
            self._move(In.CALLER_CANCEL, "pbx_cancel")
            await self._hang_up(self.agent_leg)
            return False
        self._answer_caller(serialize_sdp(answer))
        self.up.set()
        self.log.info("call_answered")
        return True

    def _answer_caller(self, body: bytes) -> None:
        """200 to the caller (repeated until its ACK, see Absorber.send_2xx)."""
        caller = self.caller_leg
        ok = self.incoming.response(
            200,
            headers=pbx_dialog_headers(
                self.a_invite,
                caller.local,
                user_agent=self.config.user_agent,
                timer=caller.timer,
                has_body=True,
            ),
            body=body,
        )
        caller.answered_as_uas(self.a_invite, ok)
        caller.sdp_sent = body
        caller.refreshed_at = self._loop_time()
        self._spawn(self._await_ack(caller, ok))

    async def _talk(self) -> None:
        """Both legs are up: serve in-dialog requests until a BYE or a limit."""
        ends_at = self._loop_time() + self.config.max_duration
        caller = self.caller_leg
        while True:
            timer = caller.timer
            refresh_at = timer.refresh_at(caller.refreshed_at) if timer else float("inf")
            expires_at = timer.expires_at(caller.refreshed_at) if timer else float("inf")
            silent_at = self._media_silent_at()
            fact = await self._next_fact(min(ends_at, expires_at, refresh_at, silent_at))
            now = self._loop_time()
            if fact is None and refresh_at <= now < ends_at:
                caller.refreshed_at = now
                self._spawn(self._refresh(caller))
                continue
            if fact is None and silent_at <= now < min(ends_at, expires_at):
                if self._media_silent_at() > now:
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
                self.log.info("pbx_dialog_lost", status=fact.status)
                fact.leg.ended()
                await self._end(In.LIMIT, "pbx_lost")
                return
            if isinstance(fact, AckSettled):
                if fact.acked:
                    self._move(In.CALLER_ACK)
                    continue
                self.log.warning("pbx_ack_missing")
                await self._end(In.CALLER_ACK_TIMEOUT, "pbx_no_ack")
                return
            if isinstance(fact, ShutdownRequested):
                await self._end(In.SHUTDOWN, "shutdown")
                return
            if isinstance(fact, RequestArrived):
                ended = await self._serve(fact.leg, fact.incoming)
                if ended is not None:
                    await self._end(ended, "pbx_bye" if ended is In.CALLER_BYE else "retell_bye")
                    return
            # A late InviteResponded or Cancelled changes nothing once answered.

    async def _end(self, what: CallInput, reason: str) -> None:
        """Move to ENDING for ``reason`` and hang up every leg still up."""
        self._move(what, reason)
        await self._hang_up(*self.legs.values())

    # -- the agent leg -------------------------------------------------------------------------
    async def _pump(self, leg: Leg, outgoing: OutgoingRequest) -> None:
        async for response in outgoing:
            self.facts.put_nowait(InviteResponded(leg, response))

    async def _relay_provisional(self, response: Response) -> None:
        """180/183 from the agent to the caller (SDP through the media layer), each once."""
        status = pbx_provisional_for(response.status)
        if status is None:
            return
        media = self.bridge.media
        assert media is not None
        body = b""
        if response.body:
            try:
                body = serialize_sdp(await media.answer("b", parse_sdp(response.body)))
            except SipError as exc:
                self.log.info("early_sdp_ignored", detail=exc.detail)
        if self._last_relayed == (status, body):
            return  # LiveKit repeats its 180 every second
        self._last_relayed = (status, body)
        self._move(In.AGENT_RINGING)
        caller = self.caller_leg
        if body:
            caller.sdp_sent = body
        caller.state = LegState.EARLY
        self._ring_again_at = self._loop_time() + RING_REPEAT
        self._last_provisional = self.incoming.respond(
            status,
            headers=pbx_dialog_headers(
                self.a_invite,
                caller.local,
                user_agent=self.config.user_agent,
                has_body=bool(body),
            ),
            body=body,
        )

    async def _cancel_agent(self) -> None:
        """End the pending INVITE to the agent (RFC 3261 §9.1) and wait for its final response.

        The CANCEL goes only once a provisional response came; a 2xx that crosses it is ACKed
        and followed by a BYE. Bounded by 64*T1 (Timer B's length) in all cases.
        """
        agent = self.agent_leg
        outgoing = agent.outgoing
        if outgoing is None:
            return
        cancel_sent = False
        deadline = self._loop_time() + 64 * self.config.t1
        while not outgoing.done:
            if not cancel_sent and any(r.status < 200 for r in outgoing.responses):
                self.engine.cancel(outgoing)
                cancel_sent = True
            fact = await self._next_fact(deadline)
            if fact is None:
                self.log.warning("retell_cancel_unanswered")
                agent.ended()
                self._move(In.ANSWER_TIMEOUT)
                return
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)
        final = await outgoing
        if final.status < 300:
            self.log.info("retell_answered_after_cancel")
            self._move(In.AGENT_ANSWERED)
            await agent.answered_as_uac(final)
            await self._hang_up(agent)
            return
        agent.refused(final.status)
        self._move(In.AGENT_REFUSED)

    # -- the caller leg ------------------------------------------------------------------------
    def _answer_caller_failure(
        self, status: int, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        incoming = self.incoming
        if incoming.final_sent:
            return
        self.caller_leg.refused(status)
        try:
            incoming.respond(status, headers=(*headers, ("Server", self.config.user_agent)))
        except SipError as exc:
            self.log.info("pbx_response_failed", status=status, detail=exc.detail)

    async def _await_ack(self, leg: Leg, ok: Response) -> None:
        assert leg.incoming is not None
        acked = await self.absorber.send_2xx(leg, leg.incoming, ok)
        self.facts.put_nowait(AckSettled(leg, acked))

    async def _refresh(self, leg: Leg) -> None:
        """RFC 4028 §7.4: sbc refreshes the PBX's session: UPDATE without SDP when the PBX
        allows it (RFC 3311), else a re-INVITE offering the SDP it already has."""
        timer = leg.timer
        assert timer is not None
        headers = [("Contact", leg.local.contact), *timer.refresh_headers]
        if "UPDATE" in (m.upper() for m in self.a_invite.headers.values("Allow")):
            request = leg.in_dialog("UPDATE", headers=tuple(headers))
        else:
            headers.append(("Content-Type", "application/sdp"))
            request = leg.in_dialog("INVITE", headers=tuple(headers), body=leg.sdp_sent)
        response = await leg.request(request)
        leg.log.info("session_refreshed", method=request.method, status=response.status)
        if request.method == "INVITE" and 200 <= response.status < 300:
            await self.engine.send_ack(leg.in_dialog("ACK", cseq=response.cseq.seq))
        if response.status in (408, 481):
            self.facts.put_nowait(DialogLost(leg, response.status))

    # -- in-dialog requests --------------------------------------------------------------------
    async def _serve(self, leg: Leg, incoming: IncomingRequest) -> CallInput | None:
        """Answer a request received in one of the call's dialogs; returns the input a BYE
        makes (the call then hangs up the other legs), else None."""
        request = incoming.request
        dialog = leg.dialog
        if dialog is None:
            # RFC 3261 §12.2.2: nothing confirmed yet on that leg (an early UPDATE and such).
            incoming.respond(491 if leg is self.caller_leg else 481)
            return None
        try:
            dialog.receive_request(request)
            handler = self._handlers.get(request.method)
            if handler is None:
                raise NotImplementedMethod(f"{request.method} in a dialog")
            if request.method not in HANDLED[leg.peer]:
                # RFC 3261 §8.2.1: 405 lists what the leg's peer may send (Allow).
                raise MethodNotAllowed(
                    f"{request.method} in a {leg.peer.value} dialog",
                    headers=(("Allow", leg.allow),),
                )
            return await handler(leg, incoming)
        except SipError as exc:
            if not incoming.final_sent:
                incoming.reject(exc)
        return None

    async def _bye_received(self, leg: Leg, incoming: IncomingRequest) -> CallInput:
        incoming.respond(200)
        leg.ended()
        leg.log.info("bye_received")
        return In.CALLER_BYE if leg.role is Role.CALLER else In.AGENT_BYE

    @staticmethod
    def _absorbed(
        serve: Callable[[Leg, IncomingRequest], Awaitable[None]],
    ) -> DialogHandler:
        async def handler(leg: Leg, incoming: IncomingRequest) -> None:
            await serve(leg, incoming)

        return handler

    async def _options(self, leg: Leg, incoming: IncomingRequest) -> None:
        incoming.respond(200, headers=(("Allow", leg.allow),))

    def _media_silent_at(self) -> float:
        """When the call counts as dead for want of media: ``media_timeout`` after the last RTP
        from either side (never when the media layer cannot see packets: pass-through)."""
        timeout = self.config.media_timeout
        media = self.bridge.media
        if timeout is None or media is None:
            return float("inf")
        seen = [t for t in (media.last_activity(side) for side in SIDES) if t is not None]
        return max(seen) + timeout if seen else float("inf")

    # -- ending --------------------------------------------------------------------------------
    async def _hang_up(self, *legs: Leg) -> None:
        """BYE on each of ``legs`` that is up, all at once; bounded by 64*T1."""
        await hang_up_all(list(legs), 64 * self.config.t1 + 1)
        if self.state is CallState.ENDING:
            self._move(In.HUNG_UP)

    async def _fail(self) -> None:
        """After a bug: tell the caller if it is still waiting, end what is up, whatever state."""
        self._answer_caller_failure(500)
        with contextlib.suppress(ProtocolError):
            self._move(In.FAILED, "error")
        with contextlib.suppress(Exception):
            if self.state is CallState.CANCELLING:
                await self._cancel_agent()
            else:
                await self._hang_up(*self.legs.values())
        self.state = CallState.ENDED

    async def _release(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        media = self.bridge.media
        if media is not None:
            try:
                await media.close()
            except Exception:
                self.log.exception("media_close_failed")

    # -- helpers -------------------------------------------------------------------------------
    def _move(self, what: CallInput, reason: str | None = None) -> None:
        key = (self.state, what)
        if key not in TRANSITIONS:
            raise ProtocolError(f"call: {what.value} in state {self.state.value}")
        self.state = TRANSITIONS[key]
        if reason is not None and not self.end_reason:
            self.end_reason = reason

    async def _next_fact(self, deadline: float) -> Fact | None:
        """The next fact, or None once ``deadline`` (loop time) has passed."""
        if deadline == float("inf"):
            return await self.facts.get()
        if deadline <= self._loop_time():
            return None
        try:
            async with asyncio.timeout_at(deadline):
                return await self.facts.get()
        except TimeoutError:
            return None

    def _loop_time(self) -> float:
        return asyncio.get_running_loop().time()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
