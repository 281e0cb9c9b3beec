"""Transfers back to the PBX, asked for by the agent with a REFER (RFC 3515).

Retell's REFER arrives on the agent leg (``docs/peers.md``: ``Refer-To`` a sip/tel URI or a
bare number, often without angle brackets, maybe X- headers, no Referred-By; never challenged,
as Retell does not retry). sbc answers 202, reports ``SIP/2.0 100 Trying`` in a NOTIFY, then
the outcome in a final NOTIFY (``Subscription-State: terminated``), always before the agent
leg is hung up. The target goes through :mod:`sbc.b2bua.transfer_rules` (names, ``allow``):
anything else fails with a ``403`` sipfrag and the caller stays with the agent.

Two ways to reach the PBX (``[transfer] mode``):

* ``refer``: a REFER on the caller's leg (``Refer-To: <sip:NUMBER@PBX>``, ``Referred-By`` the
  extension; 3CX's challenge answered with the extension's credentials). 3CX's NOTIFYs give
  the outcome; on success the PBX has the caller and sbc ends both of its legs.
* ``invite``: sbc calls the target from the extension (a third leg, the *human*), with the
  caller's identity and the call's X- headers plus the REFER's; once the human answers, the
  bridge's side b is re-pointed to it (inside the relay, or with a re-INVITE of the caller
  when the SDP it has must change) and the agent leg ends. Busy, refusing or silent for
  ``ring_timeout``: the failure is reported and the caller stays with the agent.

A :class:`Transfer` is one such attempt; it runs as one of the call's tasks and reports back
with a :class:`~sbc.b2bua.callstate.TransferEnded` fact.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sbc.b2bua.callstate import TransferEnded
from sbc.b2bua.leg import Leg, Role, glare_wait
from sbc.b2bua.messages import LegIds, build_pbx_invite
from sbc.b2bua.transfer_rules import (
    ReferProgress,
    parse_refer_to,
    refer_notify,
    refer_progress,
    refer_request_headers,
    resolve_target,
)
from sbc.net.engine import IncomingRequest
from sbc.sdp.parser import parse_sdp, serialize_sdp
from sbc.sip.errors import BadRequest, SipError
from sbc.sip.ids import new_call_id
from sbc.sip.message import Response

if TYPE_CHECKING:
    from sbc.b2bua.call import Call

__all__ = ["Transfer", "TransferRecord"]


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """What one transfer leaves in the call's record (logs, metrics, call records)."""

    target: str  # the PBX number ("" when the REFER named nothing usable)
    mode: str  # "refer" or "invite"
    outcome: str  # "transferred", "refused", "failed", "aborted"
    status: int  # the final status reported to the agent
    answer_after: float | None  # seconds from the REFER to success: the human's answer
    # (invite mode) or the PBX's NOTIFY 200 (refer mode)


class Transfer:
    """One transfer of ``call``, asked for by ``refer`` on the agent's leg."""

    def __init__(self, call: Call, agent: Leg, refer: IncomingRequest) -> None:
        self.call = call
        self.agent = agent
        self.refer = refer
        self.config = call.config.transfer
        self.mode = self.config.mode
        self.target = ""
        self.record: TransferRecord | None = None
        self.human: Leg | None = None
        self._x_headers: tuple[tuple[str, str], ...] = ()  # the REFER's, for invite mode
        self._progress: asyncio.Queue[ReferProgress] = asyncio.Queue()
        self._responses: asyncio.Queue[Response] = asyncio.Queue()
        self._started = _now()
        self._final: int | None = None  # the outcome, once known (abort lets it be reported)
        self._task: asyncio.Task[None] | None = None
        self.log = call.log.bind(transfer_mode=self.mode)

    # -- the flow ------------------------------------------------------------------------------
    async def run(self) -> None:
        self._task = asyncio.current_task()
        ended = TransferEnded(500)
        try:
            number = self._accept()
            if number is None:
                if self.record is None:  # 202 sent, then the target was refused
                    await self._report(403, "refused")
                ended = TransferEnded(self.record.status if self.record else 403)
                return
            await self._notify(100)
            if self.mode == "refer":
                ended = await self._by_refer(number)
            else:
                ended = await self._by_invite(number)
        except asyncio.CancelledError:
            if self.record is None:
                self.record = TransferRecord(self.target, self.mode, "aborted", 487, None)
            raise
        except SipError as exc:
            self.log.warning("transfer_error", status=exc.status, detail=exc.detail)
            await self._report(exc.status)
            ended = TransferEnded(exc.status)
        finally:
            self._finish(ended)
            self.call.facts.put_nowait(ended)

    def _accept(self) -> str | None:
        """202 for the REFER (or 400 without a usable Refer-To), and the PBX number it names;
        None, with the 403 reported, when the target is not allowed."""
        refer_to = self.refer.request.headers.get("Refer-To")
        try:
            if refer_to is None:
                raise BadRequest("REFER without Refer-To")  # RFC 3515 §2.4.1
            target = parse_refer_to(refer_to)
        except SipError as exc:
            self.log.warning("transfer_refused", refer_to=refer_to, detail=exc.detail)
            self.refer.reject(exc)
            self.record = TransferRecord("", self.mode, "refused", exc.status, None)
            return None
        self.refer.respond(202, headers=(("Contact", self.agent.local.contact),))
        self._x_headers = tuple(
            (name, value)
            for name, value in (*self.refer.request.headers.items(), *target.headers)
            if name.lower().startswith("x-")
        )
        try:
            self.target = resolve_target(self.config, target.user)
        except SipError as exc:
            # Toll fraud guard: a transfer never goes to a number transfer.allow does not match.
            self.log.warning("transfer_refused", refer_to=refer_to, detail=exc.detail)
            self._final = exc.status
            return None
        self.log.info("transfer_requested", target=self.target, refer_to=refer_to)
        return self.target

    async def _by_refer(self, number: str) -> TransferEnded:
        """REFER the caller's leg to the PBX number and relay the PBX's outcome."""
        caller = self.call.origin
        pbx = self.call.config.pbx
        if caller.role is not Role.CALLER or pbx is None:
            await self._report(503)
            return TransferEnded(503)
        headers = (
            *refer_request_headers(number, pbx.host, self.call.config.extension, pbx_port=pbx.port),
            ("Contact", caller.local.contact),
        )
        response = await caller.request(caller.in_dialog("REFER", headers=headers))
        if response.status >= 300:
            self.log.info("pbx_refused_refer", status=response.status)
            await self._report(response.status)
            return TransferEnded(response.status)
        deadline = _now() + self.config.ring_timeout + 64 * self.call.config.t1
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    progress = await self._progress.get()
            except TimeoutError:
                self.log.warning("transfer_notify_missing")
                await self._report(408)
                return TransferEnded(408)
            if not progress.final:
                continue  # Retell wants one 100 and the outcome (docs/peers.md)
            status = progress.status if progress.status is not None else 500
            self._final = status
            await self._report(status)
            if 200 <= status < 300:
                return TransferEnded(status, handed_over=True)
            return TransferEnded(status)

    async def _by_invite(self, number: str) -> TransferEnded:
        """Call the PBX number from the extension; on answer, bridge the caller to it."""
        call = self.call
        pbx = call.config.pbx
        media = call.bridge.media
        if pbx is None or media is None:
            await self._report(503)
            return TransferEnded(503)
        offer = serialize_sdp(await media.transfer_offer())
        human = call.new_leg(Role.HUMAN, call._local(Role.HUMAN), new_call_id(call._random(12)))
        self.human = human
        call.add_leg(human)
        invite = build_pbx_invite(
            pbx,
            call.config.extension,
            human.local,
            LegIds(human.call_id, human.local_tag),
            number,
            call.caller,
            user_agent=call.config.user_agent,
            x_headers=(*call.x_headers, *self._x_headers),
            sdp=offer,
        )
        human.sdp_sent = offer
        call.spawn(human.send_invite(invite, self._responses.put_nowait))
        deadline = _now() + self.config.ring_timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    response = await self._responses.get()
            except TimeoutError:
                self.log.info("transfer_no_answer", after=self.config.ring_timeout)
                self._final = 408
                await self._cancel_human()
                await self._report(408)
                return TransferEnded(408)
            if response.status < 200:
                continue
            if response.status >= 300:
                human.refused(response.status)
                self._final = response.status
                await self._report(response.status)
                return TransferEnded(response.status)
            return await self._human_answered(human, response)

    async def _human_answered(self, human: Leg, response: Response) -> TransferEnded:
        media = self.call.bridge.media
        assert media is not None
        human.confirmed_as_uac(response)
        await human.send_ack(response)
        try:
            to_caller = await media.transfer_answer(parse_sdp(response.body))
            if to_caller is not None:
                await self._reoffer_caller(serialize_sdp(to_caller))
        except SipError as exc:
            self.log.warning("transfer_media_failed", status=exc.status, detail=exc.detail)
            self._final = exc.status
            await human.hang_up()
            await self._report(exc.status)
            return TransferEnded(exc.status)
        self._final = 200
        self.log.info("transfer_answered", after=round(_now() - self._started, 3))
        await self._report(200)
        return TransferEnded(200, human=human)

    async def _reoffer_caller(self, sdp: bytes) -> None:
        """The caller's media must move (pass-through, rtpengine, or another codec): re-INVITE
        its leg with the new SDP (once more after a 491, RFC 3261 §14.1)."""
        caller = self.call.origin
        headers = (("Contact", caller.local.contact), ("Content-Type", "application/sdp"))
        for attempt in range(2):
            request = caller.in_dialog("INVITE", headers=headers, body=sdp)
            response = await caller.request(request)
            if 200 <= response.status < 300:
                await caller.send_ack(response)
                caller.sdp_sent = sdp
                return
            if response.status != 491 or attempt:
                raise SipError(f"caller refused the re-INVITE: {response.status}")
            await asyncio.sleep(glare_wait(caller))

    async def _cancel_human(self) -> None:
        """End the human's unanswered INVITE (CANCEL once it rang; a 2xx that crosses it is
        ACKed and hung up), bounded by 64*T1."""
        human = self.human
        if human is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(64 * self.call.config.t1):
                cancelled = None
                while True:
                    outgoing = human.outgoing
                    if outgoing is not None and outgoing.done:
                        final = await outgoing
                        break
                    if (
                        outgoing is not None
                        and cancelled is not outgoing
                        and any(r.status < 200 for r in outgoing.responses)
                    ):
                        self.call.engine.cancel(outgoing)
                        cancelled = outgoing
                    await self._responses.get()
                if final.status < 300:
                    await human.answered_as_uac(final)
                    await human.hang_up()
        human.ended()

    # -- NOTIFYs -------------------------------------------------------------------------------
    def notify_received(self, leg: Leg, incoming: IncomingRequest) -> bool:
        """A NOTIFY on the caller's leg about sbc's REFER (refer mode); False when it is not."""
        progress = refer_progress(incoming.request)
        if self.mode != "refer" or leg is not self.call.origin or progress is None:
            return False
        incoming.respond(200)
        self._progress.put_nowait(progress)
        return True

    async def _notify(self, status: int) -> None:
        """NOTIFY the agent of ``status`` (RFC 3515 §2.4.4); final from 200 on."""
        agent = self.agent
        if not agent.up:
            return  # the agent hung up meanwhile: nobody to tell
        headers, body = refer_notify(status)
        request = agent.in_dialog(
            "NOTIFY", headers=(("Contact", agent.local.contact), *headers), body=body
        )
        response = await agent.request(request)
        if response.status >= 300:
            self.log.info("notify_refused", status=response.status, sipfrag=status)

    async def _report(self, status: int, outcome: str | None = None) -> None:
        """The final NOTIFY, once, and the record of the outcome."""
        if self.record is not None:
            return
        if outcome is None:
            outcome = "transferred" if 200 <= status < 300 else "failed"
        self.record = TransferRecord(
            self.target,
            self.mode,
            outcome,
            status,
            round(_now() - self._started, 3) if outcome == "transferred" else None,
        )
        await self._notify(status)

    def _finish(self, ended: TransferEnded) -> None:
        if self.record is None:
            self.record = TransferRecord(self.target, self.mode, "failed", ended.status, None)
        record = self.record
        self.call.transfers.append(record)
        self.log.info(
            "transfer_ended",
            target=record.target,
            outcome=record.outcome,
            status=record.status,
            answer_after=record.answer_after,
        )

    async def abort(self) -> None:
        """The call is ending (the caller hung up, a limit, shutdown): stop the transfer. An
        outcome already known is still reported; otherwise the human's INVITE is cancelled."""
        task = self._task
        if task is None or task.done() or task is asyncio.current_task():
            return
        if self._final is None:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(64 * self.call.config.t1 + 1):
                await asyncio.shield(task)
        if self._final is None:
            await self._cancel_human()


def _now() -> float:
    return asyncio.get_running_loop().time()
