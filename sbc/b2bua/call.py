"""One bridged call: the PBX leg (A, sbc is its UAS) and the Retell leg (B, sbc is its UAC).

:meth:`Call.run` is the whole life of a call and reads top to bottom: set up (offer to Retell,
relay its ringing, answer or refuse the PBX), talk (absorb the PBX's holds and refreshes, wait
for a BYE or a limit), hang up both legs, release the media. Everything that happens to the
call from outside (a response from Retell, CANCEL, ACK or an in-dialog request from either
side, shutdown) arrives as a fact on one queue, so the flow never races with itself. The
answers sbc gives itself inside the dialogs (holds, refreshes and the PBX's session timer, INFO
DTMF, 2xx repeated until ACKed) are the call's :class:`~sbc.b2bua.absorber.Absorber`.

``CallState`` is the call's one state enum; :data:`TRANSITIONS` is its state machine, keyed
``(state, input)``. A missing key is a bug in this module and raises ProtocolError.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from sbc.b2bua.absorber import Absorber
from sbc.b2bua.legs import (
    PBX_ALLOW,
    RETELL_ALLOW,
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
from sbc.media.base import LEGS, Leg, MediaBackend, MediaSession
from sbc.net.engine import ClientTransaction, IncomingRequest, SipEngine
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.dialog import Dialog, DialogState
from sbc.sip.digest import ClientAuth
from sbc.sip.errors import NotAcceptableHere, ProtocolError, SipError
from sbc.sip.fields import parse_via
from sbc.sip.ids import new_branch, new_call_id, new_cnonce, new_tag
from sbc.sip.message import Request, Response

log = structlog.get_logger(__name__)
HeaderList = tuple[tuple[str, str], ...]
RING_REPEAT = 60.0  # seconds between copies of the PBX's provisional response

__all__ = ["TRANSITIONS", "Call", "CallInput", "CallState"]


class CallState(Enum):
    INCOMING = "incoming"  # the PBX's INVITE is taken, the offer is being prepared
    CALLING = "calling"  # INVITE sent to Retell
    RINGING = "ringing"  # Retell rang; the PBX has been told
    CANCELLING = "cancelling"  # the PBX gave up (or answer_timeout): Retell is being cancelled
    ANSWERED = "answered"  # Retell answered, 200 sent to the PBX, its ACK awaited
    CONNECTED = "connected"
    ENDING = "ending"  # BYEs under way
    ENDED = "ended"


class CallInput(Enum):
    OFFER_SENT = "INVITE sent to Retell"
    REJECTED = "the PBX's INVITE refused locally"
    RETELL_RINGING = "1xx from Retell"
    RETELL_ANSWERED = "2xx from Retell"
    RETELL_REFUSED = "final failure from Retell (or none)"
    PBX_CANCEL = "CANCEL from the PBX"
    ANSWER_TIMEOUT = "answer_timeout reached"
    PBX_ACK = "ACK from the PBX"
    PBX_ACK_TIMEOUT = "no ACK from the PBX"
    PBX_BYE = "BYE from the PBX"
    RETELL_BYE = "BYE from Retell"
    LIMIT = "max_duration or session timer expired"
    SHUTDOWN = "bridge stopping"
    FAILED = "internal error"
    HUNG_UP = "both legs ended"


S = CallState
In = CallInput

TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (S.INCOMING, In.OFFER_SENT): S.CALLING,
    (S.INCOMING, In.REJECTED): S.ENDED,
    (S.INCOMING, In.FAILED): S.ENDED,
    (S.CALLING, In.RETELL_RINGING): S.RINGING,
    (S.CALLING, In.RETELL_ANSWERED): S.ANSWERED,
    (S.CALLING, In.RETELL_REFUSED): S.ENDED,
    (S.CALLING, In.PBX_CANCEL): S.CANCELLING,
    (S.CALLING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.CALLING, In.SHUTDOWN): S.CANCELLING,
    (S.CALLING, In.FAILED): S.CANCELLING,
    (S.RINGING, In.RETELL_RINGING): S.RINGING,
    (S.RINGING, In.RETELL_ANSWERED): S.ANSWERED,
    (S.RINGING, In.RETELL_REFUSED): S.ENDED,
    (S.RINGING, In.PBX_CANCEL): S.CANCELLING,
    (S.RINGING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.RINGING, In.SHUTDOWN): S.CANCELLING,
    (S.RINGING, In.FAILED): S.CANCELLING,
    (S.CANCELLING, In.RETELL_RINGING): S.CANCELLING,
    (S.CANCELLING, In.RETELL_REFUSED): S.ENDED,  # the 487 (or a failure that crossed it)
    (S.CANCELLING, In.RETELL_ANSWERED): S.ENDING,  # RFC 3261 §9.1 race: ACK, then BYE
    (S.CANCELLING, In.ANSWER_TIMEOUT): S.ENDED,  # no final answer to the CANCEL either
    (S.ANSWERED, In.PBX_ACK): S.CONNECTED,
    (S.ANSWERED, In.PBX_CANCEL): S.ENDING,  # the CANCEL came before the 200 could go
    (S.ANSWERED, In.PBX_ACK_TIMEOUT): S.ENDING,  # RFC 3261 §13.3.1.4: BYE without ACK
    (S.ANSWERED, In.PBX_BYE): S.ENDING,
    (S.ANSWERED, In.RETELL_BYE): S.ENDING,
    (S.ANSWERED, In.LIMIT): S.ENDING,
    (S.ANSWERED, In.SHUTDOWN): S.ENDING,
    (S.ANSWERED, In.FAILED): S.ENDING,
    (S.CONNECTED, In.PBX_BYE): S.ENDING,
    (S.CONNECTED, In.RETELL_BYE): S.ENDING,
    (S.CONNECTED, In.LIMIT): S.ENDING,
    (S.CONNECTED, In.SHUTDOWN): S.ENDING,
    (S.CONNECTED, In.FAILED): S.ENDING,
    (S.ENDING, In.HUNG_UP): S.ENDED,
    (S.ENDING, In.FAILED): S.ENDED,
}

# -- facts that reach a call from outside ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetellResponded:
    response: Response


@dataclass(frozen=True, slots=True)
class PbxCancelled:
    pass


@dataclass(frozen=True, slots=True)
class RequestArrived:
    leg: Leg
    incoming: IncomingRequest


@dataclass(frozen=True, slots=True)
class PbxAckSettled:
    """The retransmission of the 200 to the PBX's INVITE ended: ACKed or given up."""

    acked: bool


@dataclass(frozen=True, slots=True)
class PbxLost:
    """Our session refresh toward the PBX was answered 408 or 481: its dialog is gone."""

    status: int


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    pass


Fact = RetellResponded | PbxCancelled | RequestArrived | PbxAckSettled | PbxLost | ShutdownRequested


class Call:
    """One call; the manager (:mod:`sbc.b2bua.calls`) creates it, feeds it and awaits ``run``."""

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
        self.incoming = incoming
        self.a_invite = incoming.request
        self.state = CallState.INCOMING
        self._wall = wall_clock
        self._random = random_bytes
        self.started = wall_clock()
        self.answered: float | None = None
        self.up = asyncio.Event()  # set once both legs are answered
        self.ended: float | None = None
        self.pbx_status: int | None = None
        self.retell_status: int | None = None
        self.end_reason = ""
        self.caller = caller_of(self.a_invite, config.number_plan)
        self.called = called_of(self.a_invite)
        # The B leg's identifiers are drawn now so the manager can route by them at once.
        self.b_ids = LegIds(new_call_id(random_bytes(12)), new_tag(random_bytes(8)), 1)
        assert incoming.local_tag is not None  # an INVITE without To tag always gets one
        self.a_tag = incoming.local_tag
        transport = incoming.source.transport
        self.pbx_local = LocalAddress(
            engine.config.via_host, engine.config.via_port(transport), transport, config.extension
        )
        self.retell_local = LocalAddress(
            engine.config.via_host,
            engine.config.via_port(config.retell.transport),
            config.retell.transport,
        )
        self.facts: asyncio.Queue[Fact] = asyncio.Queue()
        self.media: MediaSession | None = None
        self.pbx_dialog: Dialog | None = None
        self.retell_dialog: Dialog | None = None
        self._b_handle: ClientTransaction | None = None
        self._b_ack: Request | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._auth = (
            ClientAuth(config.pbx_credentials) if config.pbx_credentials is not None else None
        )
        self._last_relayed: tuple[int, bytes] | None = None
        self._last_provisional: Response | None = None
        self._ring_again_at = float("inf")
        self.log = log.bind(
            call_uuid=call_uuid, call_id=self.a_invite.call_id, retell_call_id=self.b_ids.call_id
        )
        # Holds, refreshes, INFO DTMF and the ACK waits of 2xx answers: see absorber.py.
        self.absorber = Absorber(
            config=config,
            pbx_local=self.pbx_local,
            retell_local=self.retell_local,
            media=lambda: self.media,
            spawn=self._spawn,
            log=self.log,
        )

    # -- keys the manager routes by ---------------------------------------------------------
    @property
    def pbx_key(self) -> tuple[str, str]:
        return self.a_invite.call_id, self.a_tag

    @property
    def retell_key(self) -> tuple[str, str]:
        return self.b_ids.call_id, self.b_ids.from_tag

    # -- input from the manager (never blocks) -------------------------------------------------
    def pbx_cancelled(self) -> None:
        self.facts.put_nowait(PbxCancelled())

    def request_arrived(self, leg: Leg, incoming: IncomingRequest) -> None:
        self.facts.put_nowait(RequestArrived(leg, incoming))

    def ack_arrived(self, leg: Leg, request: Request) -> None:
        """The ACK of a 2xx sbc sent on ``leg`` (copies of it are ignored)."""
        self.absorber.ack_arrived(leg, request)

    def retell_2xx_again(self, response: Response) -> None:
        """RFC 3261 §13.2.2.4: a retransmitted 2xx is ACKed again with the same ACK."""
        if self._b_ack is not None and 200 <= response.status < 300:
            self._spawn(self.engine.send_ack(self._b_ack))

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
        """Offer the call to Retell and wait for its answer; True when both legs are up."""
        try:
            min_se = self.config.min_session_expires
            self.absorber.timer = negotiate_session_timer(self.a_invite, min_se)
            if not self.a_invite.body:
                # 3CX always offers in the INVITE; a late offer is not bridged.
                raise NotAcceptableHere("INVITE without an SDP offer")
            offer = parse_sdp(self.a_invite.body)
            self.media = await self.media_backend.allocate(self.call_uuid)
            b_offer = serialize_sdp(await self.media.offer("pbx", offer))
        except SipError as exc:
            self.log.info("call_refused", status=exc.status, detail=exc.detail)
            self._answer_pbx_failure(exc.status, headers=exc.headers)
            self._move(In.REJECTED, f"refused:{exc.status}")
            return False
        rendered = self.config.headers.render(
            call_facts(self.a_invite, self.caller, self.called, self.call_uuid, self.started)
        )
        for rejected in rendered.rejected:
            self.log.warning("header_not_sent", header=rejected.header, reason=rejected.reason)
        invite = build_b_invite(
            self.config, self.retell_local, self.b_ids, self.caller, rendered.headers, b_offer
        )
        self.absorber.sdp_sent["retell"] = b_offer
        handle = self.engine.send_request(invite)
        self._b_handle = handle
        self._spawn(self._pump_retell(handle))
        self._move(In.OFFER_SENT)
        answer_by = self._loop_time() + self.config.answer_timeout
        while True:
            fact = await self._next_fact(min(answer_by, self._ring_again_at))
            if fact is None and self._loop_time() < answer_by:
                # RFC 3261 §13.3.1.1: a provisional response at least every minute, so that
                # proxies on the PBX side (Timer C) keep the transaction while Retell rings.
                assert self._last_provisional is not None
                self.incoming.send(self._last_provisional)
                self._ring_again_at = self._loop_time() + RING_REPEAT
                continue
            if fact is None:
                self.log.info("retell_answer_timeout", after=self.config.answer_timeout)
                self._answer_pbx_failure(TIMEOUT_STATUS)
                self._move(In.ANSWER_TIMEOUT, "answer_timeout")
                await self._cancel_retell()
                return False
            if isinstance(fact, RetellResponded):
                response = fact.response
                if response.status < 200:
                    await self._relay_provisional(response)
                    continue
                self.retell_status = response.status
                if response.status < 300:
                    return await self._answered(response)
                status = pbx_status_for_failure(response.status)
                self.log.info("retell_refused", status=response.status, pbx_status=status)
                self._answer_pbx_failure(status)
                self._move(In.RETELL_REFUSED, f"retell:{response.status}")
                return False
            if isinstance(fact, PbxCancelled):
                self.log.info("pbx_cancelled")
                self._answer_pbx_failure(487)
                self._move(In.PBX_CANCEL, "pbx_cancel")
                await self._cancel_retell()
                return False
            if isinstance(fact, ShutdownRequested):
                self._answer_pbx_failure(503)
                self._move(In.SHUTDOWN, "shutdown")
                await self._cancel_retell()
                return False
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)

    async def _answered(self, response: Response) -> bool:
        """Retell answered: ACK it, answer the PBX with its SDP, wait for the PBX's ACK."""
        assert self._b_handle is not None and self.media is not None
        self._move(In.RETELL_ANSWERED)
        self.answered = self._wall()
        self.retell_dialog = Dialog.from_uac(self._b_handle.request, response)
        await self._ack_retell(response)
        try:
            answer = await self.media.answer("retell", parse_sdp(response.body))
        except SipError as exc:
            # Retell's answer is unusable: nothing can be bridged.
            self.log.warning("retell_answer_unusable", detail=exc.detail)
            self._answer_pbx_failure(503)
            self._move(In.FAILED, "retell_sdp")
            await self._hang_up(("retell",))
            return False
        if self.incoming.cancelled:
            # RFC 3261 §9.2: the PBX's CANCEL beat the answer: 487 there, BYE to Retell.
            self._answer_pbx_failure(487)
            self._move(In.PBX_CANCEL, "pbx_cancel")
            await self._hang_up(("retell",))
            return False
        body = serialize_sdp(answer)
        ok = self.incoming.response(
            200,
            headers=pbx_dialog_headers(
                self.a_invite,
                self.pbx_local,
                user_agent=self.config.user_agent,
                timer=self.absorber.timer,
                has_body=True,
            ),
            body=body,
        )
        self.pbx_dialog = Dialog.from_uas(self.a_invite, ok)
        self.absorber.sdp_sent["pbx"] = body
        self.pbx_status = 200
        self.absorber.refreshed_at = self._loop_time()
        self._spawn(self._await_pbx_ack(ok))
        self.up.set()
        self.log.info("call_answered")
        return True

    async def _talk(self) -> None:
        """Both legs are up: serve in-dialog requests until a BYE or a limit."""
        assert self.answered is not None
        ends_at = self._loop_time() + self.config.max_duration
        while True:
            timer, refreshed_at = self.absorber.timer, self.absorber.refreshed_at
            refresh_at = timer.refresh_at(refreshed_at) if timer else float("inf")
            expires_at = timer.expires_at(refreshed_at) if timer else float("inf")
            silent_at = self._media_silent_at()
            fact = await self._next_fact(min(ends_at, expires_at, refresh_at, silent_at))
            now = self._loop_time()
            if fact is None and refresh_at <= now < ends_at:
                self.absorber.refreshed_at = now
                self._spawn(self._refresh_pbx())
                continue
            if fact is None and silent_at <= now < min(ends_at, expires_at):
                if self._media_silent_at() > now:
                    continue  # media came meanwhile
                self.log.info("media_timeout", after=self.config.media_timeout)
                self._move(In.LIMIT, "media_timeout")
                await self._hang_up(("pbx", "retell"))
                return
            if isinstance(fact, PbxLost):
                self.log.info("pbx_dialog_lost", status=fact.status)
                self._move(In.LIMIT, "pbx_lost")
                await self._hang_up(("retell",))
                return
            if fact is None:
                reason = "max_duration" if self._loop_time() >= ends_at else "session_expired"
                self.log.info("call_limit_reached", reason=reason)
                self._move(In.LIMIT, reason)
                await self._hang_up(("pbx", "retell"))
                return
            if isinstance(fact, PbxAckSettled):
                if fact.acked:
                    self._move(In.PBX_ACK)
                    continue
                self.log.warning("pbx_ack_missing")
                self._move(In.PBX_ACK_TIMEOUT, "pbx_no_ack")
                await self._hang_up(("pbx", "retell"))
                return
            if isinstance(fact, ShutdownRequested):
                self._move(In.SHUTDOWN, "shutdown")
                await self._hang_up(("pbx", "retell"))
                return
            if isinstance(fact, RequestArrived):
                ended = await self._serve(fact.leg, fact.incoming)
                if ended is not None:
                    self._move(ended, "pbx_bye" if ended is In.PBX_BYE else "retell_bye")
                    await self._hang_up(("retell",) if ended is In.PBX_BYE else ("pbx",))
                    return
            # A late RetellResponded or PbxCancelled changes nothing once answered.

    # -- Retell leg ----------------------------------------------------------------------------
    async def _pump_retell(self, handle: ClientTransaction) -> None:
        async for response in handle:
            self.facts.put_nowait(RetellResponded(response))

    async def _relay_provisional(self, response: Response) -> None:
        """180/183 from Retell to the PBX (SDP through the media layer), each kind once."""
        status = pbx_provisional_for(response.status)
        if status is None:
            return
        assert self.media is not None
        body = b""
        if response.body:
            try:
                body = serialize_sdp(await self.media.answer("retell", parse_sdp(response.body)))
            except SipError as exc:
                self.log.info("early_sdp_ignored", detail=exc.detail)
        if self._last_relayed == (status, body):
            return  # LiveKit repeats its 180 every second
        self._last_relayed = (status, body)
        self._move(In.RETELL_RINGING)
        if body:
            self.absorber.sdp_sent["pbx"] = body
        self._ring_again_at = self._loop_time() + RING_REPEAT
        self._last_provisional = self.incoming.respond(
            status,
            headers=pbx_dialog_headers(
                self.a_invite,
                self.pbx_local,
                user_agent=self.config.user_agent,
                has_body=bool(body),
            ),
            body=body,
        )

    async def _ack_retell(self, response: Response) -> None:
        assert self.retell_dialog is not None
        ack = self._in_dialog("retell", "ACK", cseq=response.cseq.seq)
        self._b_ack = await self.engine.send_ack(ack)

    async def _cancel_retell(self) -> None:
        """End the pending INVITE to Retell (RFC 3261 §9.1) and wait for its final response.

        The CANCEL goes only once a provisional response came; a 2xx that crosses it is ACKed
        and followed by a BYE. Bounded by 64*T1 (Timer B's length) in all cases.
        """
        handle = self._b_handle
        if handle is None:
            return
        cancel_sent = False
        deadline = self._loop_time() + 64 * self.config.t1
        while not handle.done:
            if not cancel_sent and any(r.status < 200 for r in handle.responses):
                self.engine.cancel(handle)
                cancel_sent = True
            fact = await self._next_fact(deadline)
            if fact is None:
                self.log.warning("retell_cancel_unanswered")
                self._move(In.ANSWER_TIMEOUT)
                return
            if isinstance(fact, RequestArrived):
                await self._serve(fact.leg, fact.incoming)
        final = await handle
        self.retell_status = final.status
        if final.status < 300:
            self.log.info("retell_answered_after_cancel")
            self._move(In.RETELL_ANSWERED)
            self.retell_dialog = Dialog.from_uac(handle.request, final)
            await self._ack_retell(final)
            await self._hang_up(("retell",))
            return
        self._move(In.RETELL_REFUSED)

    # -- PBX leg -------------------------------------------------------------------------------
    def _answer_pbx_failure(self, status: int, *, headers: HeaderList = ()) -> None:
        if self.incoming.final_sent:
            return
        self.pbx_status = status
        try:
            self.incoming.respond(status, headers=(*headers, ("Server", self.config.user_agent)))
        except SipError as exc:
            self.log.info("pbx_response_failed", status=status, detail=exc.detail)

    async def _await_pbx_ack(self, ok: Response) -> None:
        acked = await self.absorber.send_2xx("pbx", self.incoming, ok)
        self.facts.put_nowait(PbxAckSettled(acked))

    # -- in-dialog requests --------------------------------------------------------------------
    async def _serve(self, leg: Leg, incoming: IncomingRequest) -> CallInput | None:
        """Answer a request received in one of the call's dialogs; returns the input a BYE
        makes (the caller hangs up the other leg), else None."""
        request = incoming.request
        dialog = self.pbx_dialog if leg == "pbx" else self.retell_dialog
        if dialog is None:
            # RFC 3261 §12.2.2: nothing confirmed yet on that leg (an early UPDATE and such).
            incoming.respond(481 if leg == "retell" else 491)
            return None
        try:
            dialog.receive_request(request)
        except SipError as exc:
            incoming.reject(exc)
            return None
        method = request.method
        if method == "BYE":
            incoming.respond(200)
            dialog.terminate()
            self.log.info("bye_received", leg=leg)
            return In.PBX_BYE if leg == "pbx" else In.RETELL_BYE
        try:
            if method == "INVITE":
                await self.absorber.reinvite(leg, incoming)
            elif method == "UPDATE":
                await self.absorber.update(leg, incoming)
            elif method == "INFO":
                await self.absorber.dtmf_info(leg, incoming)
            elif method == "OPTIONS":
                allow = PBX_ALLOW if leg == "pbx" else RETELL_ALLOW
                incoming.respond(200, headers=(("Allow", allow),))
            else:
                incoming.respond(501)
        except SipError as exc:
            if not incoming.final_sent:
                incoming.reject(exc)
        return None

    def _media_silent_at(self) -> float:
        """When the call counts as dead for want of media: ``media_timeout`` after the last RTP
        from either leg (never when the media layer cannot see packets: pass-through)."""
        timeout = self.config.media_timeout
        if timeout is None or self.media is None:
            return float("inf")
        seen = [t for t in (self.media.last_activity(leg) for leg in LEGS) if t is not None]
        return max(seen) + timeout if seen else float("inf")

    async def _refresh_pbx(self) -> None:
        """RFC 4028 §7.4: sbc refreshes the PBX's session: UPDATE without SDP when the PBX
        allows it (RFC 3311), else a re-INVITE offering the SDP it already has."""
        timer = self.absorber.timer
        assert timer is not None
        headers = [("Contact", self.pbx_local.contact), *timer.refresh_headers]
        if "UPDATE" in (m.upper() for m in self.a_invite.headers.values("Allow")):
            request = self._in_dialog("pbx", "UPDATE", headers=tuple(headers))
        else:
            headers.append(("Content-Type", "application/sdp"))
            body = self.absorber.sdp_sent.get("pbx", b"")
            request = self._in_dialog("pbx", "INVITE", headers=tuple(headers), body=body)
        response = await self._request("pbx", request)
        self.log.info("session_refreshed", method=request.method, status=response.status)
        if request.method == "INVITE" and 200 <= response.status < 300:
            await self.engine.send_ack(self._in_dialog("pbx", "ACK", cseq=response.cseq.seq))
        if response.status in (408, 481):
            self.facts.put_nowait(PbxLost(response.status))

    # -- requests sbc sends in a dialog --------------------------------------------------------
    def _in_dialog(
        self,
        leg: Leg,
        method: str,
        *,
        cseq: int | None = None,
        headers: HeaderList = (),
        body: bytes = b"",
    ) -> Request:
        dialog = self.pbx_dialog if leg == "pbx" else self.retell_dialog
        assert dialog is not None
        transport = self.pbx_local.transport if leg == "pbx" else self.retell_local.transport
        via = parse_via(self.engine.make_via(transport))
        branch = new_branch(self._random(12))
        extra = headers
        if self.config.user_agent:
            extra = (*extra, ("User-Agent", self.config.user_agent))
        return dialog.create_request(
            method, via=via, branch=branch, cseq=cseq, headers=extra, body=body
        )

    async def _request(self, leg: Leg, request: Request) -> Response:
        """Send ``request`` in ``leg``'s dialog; answer 3CX's challenges (PEERS.md)."""
        dialog = self.pbx_dialog if leg == "pbx" else self.retell_dialog
        assert dialog is not None
        for _ in range(3):
            response = await self.engine.send_request(request)
            if response.status not in (401, 407) or leg != "pbx" or self._auth is None:
                break
            retry = self._auth.authorize(
                response, request, new_cnonce(self._random(8)), branch=new_branch(self._random(12))
            )
            if retry is None:
                self.log.warning("pbx_refused_credentials", method=request.method)
                break
            dialog.advance_local_cseq(retry.cseq.seq)
            request = retry
        dialog.update_from_response(response)
        return response

    async def _hang_up(self, legs: tuple[Leg, ...]) -> None:
        """BYE on each of ``legs`` that has a dialog, all at once; bounded by 64*T1."""

        async def bye(leg: Leg) -> None:
            dialog = self.pbx_dialog if leg == "pbx" else self.retell_dialog
            if dialog is None or dialog.state is DialogState.TERMINATED:
                return
            response = await self._request(leg, self._in_dialog(leg, "BYE"))
            dialog.terminate()
            self.log.info("bye_sent", leg=leg, status=response.status)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(64 * self.config.t1 + 1):
                await asyncio.gather(*(bye(leg) for leg in legs))
        if self.state is CallState.ENDING:
            self._move(In.HUNG_UP)

    async def _fail(self) -> None:
        """After a bug: tell the PBX if it is still waiting, end what is up, whatever state."""
        self._answer_pbx_failure(500)
        with contextlib.suppress(ProtocolError):
            self._move(In.FAILED, "error")
        with contextlib.suppress(Exception):
            if self.state is CallState.CANCELLING:
                await self._cancel_retell()
            else:
                await self._hang_up(("pbx", "retell"))
        self.state = CallState.ENDED

    async def _release(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.media is not None:
            try:
                await self.media.close()
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
