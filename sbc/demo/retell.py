"""The Retell stand-in: Retell's SIP server (LiveKit) as captured (PEERS.md): rings, answers with
exactly one codec, talks once ACKed, answers BYE, and records every INVITE it received.

Its agent can also hand the caller back (PEERS.md, ``sip_refer`` transfers): :meth:`RetellStandIn.
refer` sends an in-dialog REFER with the target verbatim and without angle brackets
(``Refer-To: sip:sales@host``), maybe X- headers, no Referred-By, and is never retried; the
NOTIFYs that follow are answered 200 and recorded (sipfrag status, Subscription-State); after a
final ``SIP/2.0 200 OK`` the agent hangs up its leg about a second later, unless the other side
hung up first."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from sbc.demo.peer import (
    audio_codecs,
    in_dialog_call,
    media_target,
    pcmu_answer,
    random_branch,
    sip_engine,
    sipfrag_status,
    x_headers,
)
from sbc.demo.rtp_peer import RtpStream
from sbc.demo.tones import pcmu_tone
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest
from sbc.sip.dialog import Dialog
from sbc.sip.message import Request, Response

__all__ = ["BYE_AFTER_TRANSFER", "RETELL_USER_AGENT", "NotifySeen", "RetellCall", "RetellStandIn"]

RETELL_USER_AGENT = "LiveKit"
BYE_AFTER_TRANSFER = 1.0  # seconds from the NOTIFY of a successful transfer to Retell's BYE


@dataclass(frozen=True)
class NotifySeen:
    """One NOTIFY about the agent's REFER, as Retell read it (answered 200)."""

    status: int | None  # of the sipfrag's Status-Line; None without one
    sipfrag: str  # the body's first line (``SIP/2.0 200 OK``)
    subscription_state: str
    event: str
    content_type: str
    at: float  # loop time

    @property
    def final(self) -> bool:
        return (self.status is not None and self.status >= 200) or (
            self.subscription_state.partition(";")[0].strip().lower() == "terminated"
        )


@dataclass
class RetellCall:
    """One INVITE Retell received, and what became of it."""

    invite: Request
    transport: str
    rtp: RtpStream
    x_headers: list[tuple[str, str]]
    answer: Response | None = None
    dialog: Dialog | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    bye_received: bool = False
    bye_status: int | None = None  # the answer to a BYE Retell sent
    bye_sent_at: float | None = None  # loop time
    refused: int | None = None  # the status of a refusal
    refer: Request | None = None  # the REFER the agent sent
    refer_status: int | None = None  # and its answer
    refer_sent_at: float | None = None  # loop time
    refer_answered_at: float | None = None
    notifies: list[NotifySeen] = field(default_factory=list)
    transfer_done: asyncio.Event = field(default_factory=asyncio.Event)  # a final NOTIFY came

    @property
    def codecs(self) -> list[str]:
        return [] if self.answer is None else audio_codecs(self.answer.body)


class RetellStandIn:
    """Retell's SIP server on ``host:port`` (UDP and TCP): rings, answers with one codec,
    sends a tone of its own once ACKed, answers BYE."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ring: float = 0.3,
        tone_hz: int = 660,
        frames: Sequence[bytes] | None = None,
        bye_after_transfer: float = BYE_AFTER_TRANSFER,
    ) -> None:
        self.host = host
        self.port = port
        self.ring = ring
        self.bye_after_transfer = bye_after_transfer
        self.frames = list(frames) if frames else pcmu_tone(tone_hz)
        self.engine = sip_engine(host, port, RETELL_USER_AGENT)
        self.engine.on_request = self._on_request
        self.engine.on_ack = self._on_ack
        self.calls: dict[str, RetellCall] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for call in self.calls.values():
            await call.rtp.close()
        await self.engine.stop()

    def _on_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.to_tag is not None:
            self._in_dialog(incoming)
        elif request.method == "INVITE":
            self._spawn(self._answer(incoming))
        else:
            incoming.respond(405, headers=(("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS"),))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, incoming: IncomingRequest) -> None:
        """LiveKit's way: 100, 180, then 200 with exactly one codec (PEERS.md)."""
        request = incoming.request
        rtp = await RtpStream.open(self.host, self.frames)
        call = RetellCall(request, incoming.source.transport, rtp, x_headers(request))
        self.calls[request.call_id] = call
        incoming.respond(100)
        params = ";transport=tcp" if call.transport == "tcp" else ""
        contact = ("Contact", f"<sip:{self.host}:{self.port}{params}>")
        incoming.respond(180, headers=(contact,))
        if self.ring > 0:
            await asyncio.sleep(self.ring)  # the agent joining
        if incoming.final_sent:  # cancelled while ringing (the engine answered 487)
            call.ended.set()
            return
        offered = audio_codecs(request.body) if request.body else []
        if "PCMU" not in offered:
            # The stand-in only synthesises G.711 mu-law; LiveKit itself prefers G.722.
            call.refused = 488
            incoming.respond(488)
            call.ended.set()
            return
        call.answer = incoming.respond(
            200,
            headers=(
                contact,
                ("Allow", "INVITE, ACK, CANCEL, BYE, REFER, NOTIFY"),
                ("Content-Type", "application/sdp"),
            ),
            body=self._sdp(rtp.local[1], "telephone-event" in offered),
        )
        call.dialog = Dialog.from_uas(request, call.answer)
        call.rtp.remote = media_target(request.body)

    def _sdp(self, port: int, events: bool) -> bytes:
        return pcmu_answer(
            self.host, port, events=events, origin="LiveKit", name="LiveKit", fmtp="0-16"
        )

    def _on_ack(self, request: Request, source: Destination) -> None:
        call = self.calls.get(request.call_id)
        if call is None or call.acked.is_set() or call.rtp.remote is None:
            return
        call.acked.set()
        call.rtp.start(call.rtp.remote)  # the agent starts talking

    def _in_dialog(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        call = in_dialog_call(self.calls, incoming)
        if call is None:
            return
        if request.method in ("INVITE", "OPTIONS"):
            # A re-INVITE is answered with the original SDP (PEERS.md).
            body = call.answer.body if call.answer is not None else b""
            ctype = (("Content-Type", "application/sdp"),) if body else ()
            incoming.respond(200, headers=ctype, body=body)
        elif request.method == "NOTIFY":
            self._notified(call, incoming)
        else:
            incoming.respond(405)  # INFO, UPDATE, PRACK, MESSAGE: as LiveKit

    def _notified(self, call: RetellCall, incoming: IncomingRequest) -> None:
        """A NOTIFY about the agent's REFER: 200, recorded; after a final ``SIP/2.0 200 OK``
        the agent hangs up about a second later (PEERS.md)."""
        request = incoming.request
        incoming.respond(200)
        seen = NotifySeen(
            sipfrag_status(request.body),
            request.body.decode("utf-8", "replace").strip().partition("\n")[0].strip(),
            request.headers.get("Subscription-State") or "",
            request.headers.get("Event") or "",
            request.headers.get("Content-Type") or "",
            asyncio.get_running_loop().time(),
        )
        call.notifies.append(seen)
        if not seen.final or call.transfer_done.is_set():
            return
        call.transfer_done.set()
        if seen.status == 200:
            self._spawn(self._leave_after_transfer(call))

    async def _leave_after_transfer(self, call: RetellCall) -> None:
        await asyncio.sleep(self.bye_after_transfer)
        if not call.ended.is_set():
            await self.hang_up(call)

    async def refer(
        self,
        call: RetellCall,
        target: str,
        *,
        host: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> int:
        """The agent transfers the call: an in-dialog REFER with ``Refer-To: sip:TARGET@HOST``
        (no angle brackets, no Referred-By, as Retell) and ``headers`` (its X- headers);
        returns the status of the answer. Retell does not retry after 401/407."""
        assert call.dialog is not None
        transport = "tcp" if call.transport == "tcp" else "udp"
        params = ";transport=tcp" if transport == "tcp" else ""
        refer = call.dialog.create_request(
            "REFER",
            via=self.engine.make_via(transport),
            branch=random_branch(),
            headers=(
                ("Contact", f"<sip:{self.host}:{self.port}{params}>"),
                ("Refer-To", f"sip:{target}@{host or self.host}"),
                *headers,
            ),
        )
        call.refer = refer
        loop = asyncio.get_running_loop()
        call.refer_sent_at = loop.time()
        response = await self.engine.send_request(refer)
        call.refer_answered_at = loop.time()
        call.refer_status = response.status
        return response.status

    async def hang_up(self, call: RetellCall) -> int:
        """The agent ends the call: BYE in the dialog; returns the status of the answer."""
        call.rtp.stop_sending()
        assert call.dialog is not None
        transport = "tcp" if call.transport == "tcp" else "udp"
        bye = call.dialog.create_request(
            "BYE", via=self.engine.make_via(transport), branch=random_branch()
        )
        call.bye_sent_at = asyncio.get_running_loop().time()
        response = await self.engine.send_request(bye)
        call.bye_status = response.status
        call.ended.set()
        return response.status
