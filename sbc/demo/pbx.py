"""The 3CX stand-in: registrar of one extension (3CX's 407 digest challenge) and the caller of
calls to it, with 3CX's INVITE as captured (PEERS.md).

It also plays the queues a transfer lands on: an INVITE from the extension to one of its
``queues`` numbers is challenged with 407 as 3CX challenges what an extension sends, its digest
checked with the extension's credentials, then answered (180, 200 with SDP); the queue sends a
tone of its own and keeps what it hears (:class:`QueueCall`). A REFER on a caller's dialog (a
blind transfer by the extension, ``[transfer] mode = "refer"``) is challenged the same way,
answered 202, and followed by NOTIFYs ``SIP/2.0 100 Trying`` and ``SIP/2.0 200 OK``."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from sbc.demo.peer import (
    audio_codecs,
    in_dialog_call,
    media_target,
    pcmu_answer,
    random_branch,
    random_tag,
    sip_engine,
    x_headers,
)
from sbc.demo.rtp_peer import RtpStream
from sbc.demo.tones import pcmu_tone
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest, OutgoingRequest
from sbc.sip.dialog import Dialog
from sbc.sip.digest import parse_authorization, verify_authorization
from sbc.sip.errors import SipError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import SipUri, Uri, parse_name_addr

__all__ = [
    "PBX_ALLOW",
    "PBX_USER_AGENT",
    "QUEUE_TONE_HZ",
    "REALM",
    "PbxCall",
    "PbxStandIn",
    "QueueCall",
    "ReferSeen",
    "RegistrarLog",
]

PBX_USER_AGENT = "3CXPhoneSystem 18.0.9.20 (20)"
REALM = "3CXPhoneSystem"
PBX_ALLOW = "INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE"
QUEUE_TONE_HZ = 880  # what a queue plays: neither the caller's 440 Hz nor Retell's 660 Hz


@dataclass
class RegistrarLog:
    """What the registrar saw: counts, the binding and when it was granted (loop time)."""

    requests: int = 0
    challenges: int = 0
    accepted: int = 0
    refused: int = 0
    removed: int = 0
    binding: Uri | None = None
    expires: int = 0
    registered_at: float | None = None
    user_agent: str = ""


@dataclass
class PbxCall:
    """One call 3CX placed to the extension, as 3CX saw it."""

    invite: Request
    rtp: RtpStream
    statuses: list[int] = field(default_factory=list)
    final: Response | None = None
    answered_at: float | None = None
    dialog: Dialog | None = None
    ack: Request | None = None
    record_route_echoed: bool = False
    bye_status: int | None = None  # the answer to the BYE 3CX sent
    bye_received: bool = False  # sbc hung up toward 3CX
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reinvites: int = 0  # re-INVITEs from sbc answered 200 (media moved)
    refer: ReferSeen | None = None  # a REFER sbc sent in this dialog (transfer by REFER)


@dataclass
class ReferSeen:
    """A REFER on a caller's dialog, as 3CX saw it: challenged, accepted, then NOTIFYs."""

    challenges: int = 0
    refused: int = 0
    accepted: Request | None = None  # the REFER answered 202
    username: str = ""  # of its digest
    notify_statuses: list[int] = field(default_factory=list)  # sbc's answers to the NOTIFYs
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the final NOTIFY was answered


@dataclass
class QueueCall:
    """One call sbc placed to a queue number (a transfer by INVITE), as the queue saw it."""

    number: str
    rtp: RtpStream
    invites: list[Request] = field(default_factory=list)  # every INVITE, the challenged first
    challenges: int = 0
    refused: int = 0
    username: str = ""  # of the accepted digest
    answer: Response | None = None
    dialog: Dialog | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    bye_received: bool = False  # sbc hung up toward the queue
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def invite(self) -> Request | None:
        """The INVITE the queue answered (the last one)."""
        return self.invites[-1] if self.answer is not None else None

    @property
    def x_headers(self) -> list[tuple[str, str]]:
        return x_headers(self.invites[-1]) if self.invites else []


class PbxStandIn:
    """3CX on ``host:port``: registrar of one extension and the caller of calls to it."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        extension: str,
        auth_id: str,
        password: str,
        expires: int = 60,
        queues: Collection[str] = (),
        queue_ring: float = 0.2,
        queue_tone_hz: int = QUEUE_TONE_HZ,
    ) -> None:
        self.host = host
        self.port = port
        self.extension = extension
        self.auth_id = auth_id
        self.password = password
        self.expires = expires
        self.queues = frozenset(queues)
        self.queue_ring = queue_ring
        self.queue_frames = pcmu_tone(queue_tone_hz)
        self.engine = sip_engine(host, port, PBX_USER_AGENT)
        self.engine.on_request = self._on_request
        self.engine.on_ack = self._on_ack
        self.engine.on_late_response = self._late_response
        self.registrar = RegistrarLog()
        self.registered = asyncio.Event()
        self.unregistered = asyncio.Event()
        self.calls: dict[str, PbxCall] = {}
        self.queue_calls: dict[str, QueueCall] = {}  # by Call-ID, in arrival order
        self.queue_answered = asyncio.Event()  # a queue call was answered
        self._nonces: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for call in self.calls.values():
            await call.rtp.close()
        for queue in self.queue_calls.values():
            await queue.rtp.close()
        await self.engine.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- registrar ------------------------------------------------------------------------------
    def _on_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.method == "REGISTER":
            self._register(incoming)
        elif request.to_tag is not None:
            self._in_dialog(incoming)
        elif request.method == "INVITE":
            self._spawn(self._queue_invite(incoming))
        elif request.method == "NOTIFY":
            incoming.respond(200)
        else:
            incoming.respond(405, headers=(("Allow", PBX_ALLOW),))

    def _register(self, incoming: IncomingRequest) -> None:
        """RFC 3261 §10.3 with 3CX's challenge: 407, MD5, no qop, no opaque (PEERS.md)."""
        request = incoming.request
        log = self.registrar
        log.requests += 1
        log.user_agent = request.headers.get("User-Agent") or ""
        credentials = request.headers.get("Proxy-Authorization")
        if credentials is None:
            self._challenge(incoming)
            return
        try:
            auth = parse_authorization(credentials)
            contact = parse_name_addr(request.headers.get("Contact") or "")
        except SipError:
            log.refused += 1
            incoming.respond(400)
            return
        good = (
            auth.nonce in self._nonces
            and auth.username == self.auth_id
            and verify_authorization(
                auth,
                method="REGISTER",
                password=self.password,
                realm=REALM,
                uri=str(request.uri),
            )
        )
        if not good:
            log.refused += 1
            incoming.respond(403)
            return
        expires_text = contact.param("expires") or request.headers.get("Expires") or "3600"
        expires = min(int(expires_text), self.expires)
        if expires == 0:
            log.removed += 1
            log.binding = None
            incoming.respond(200)
            self.registered.clear()
            self.unregistered.set()
            return
        log.accepted += 1
        log.binding = contact.uri
        log.expires = expires
        if log.registered_at is None:
            log.registered_at = asyncio.get_running_loop().time()
        incoming.respond(
            200,
            headers=(
                ("Contact", f"<{contact.uri}>;expires={expires}"),
                ("Server", PBX_USER_AGENT),
            ),
        )
        self.registered.set()

    def _challenge(self, incoming: IncomingRequest, *, registrar: bool = True) -> None:
        nonce = secrets.token_hex(16)
        self._nonces.add(nonce)
        if registrar:
            self.registrar.challenges += 1
        incoming.respond(
            407,
            headers=(
                # As captured from 3CX: no space after the commas, no qop, no opaque.
                ("Proxy-Authenticate", f'Digest nonce="{nonce}",algorithm=MD5,realm="{REALM}"'),
                ("Server", PBX_USER_AGENT),
            ),
        )

    # -- calls ----------------------------------------------------------------------------------
    async def call(
        self,
        *,
        caller_number: str = "0201234567",
        caller_name: str = "Jane Doe",
        tone_hz: int = 440,
        frames: Sequence[bytes] | None = None,
    ) -> PbxCall:
        """Call the registered extension as 3CX does; returns once the INVITE has a final
        answer (ACKed when 2xx). Bound it with ``asyncio.timeout``. ``frames`` are the RTP
        payloads to send in turn (default: one second of a ``tone_hz`` tone)."""
        binding = self.registrar.binding
        if binding is None:
            raise RuntimeError("the extension is not registered")
        rtp = await RtpStream.open(self.host, frames or pcmu_tone(tone_hz))
        invite = self._invite(binding, caller_number, caller_name, rtp.local[1])
        call = PbxCall(invite, rtp)
        self.calls[invite.call_id] = call
        handle = self.engine.send_request(invite)
        async for response in handle:
            call.statuses.append(response.status)
        await self._answered(call, handle)
        return call

    def _invite(self, target: Uri, number: str, name: str, rtp_port: int) -> Request:
        me = f"{self.host}:{self.port}"
        session = str(secrets.randbelow(10**9))
        sdp = (
            "v=0\r\n"
            f"o=3cxPS {session} {session} IN IP4 {self.host}\r\n"
            "s=3cxPS Audio call\r\n"
            f"c=IN IP4 {self.host}\r\n"
            "t=0 0\r\n"
            f"m=audio {rtp_port} RTP/AVP 0 8 9 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:9 G722/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\n"
            "a=fmtp:101 0-15\r\n"
            "a=ptime:20\r\n"
            "a=sendrecv\r\n"
        ).encode()
        headers = Headers(
            [
                ("Max-Forwards", "70"),
                # 3CX's SBC record-routes; the 200 OK must echo it (PEERS.md).
                ("Record-Route", f"<sip:{me};lr>"),
                ("From", f'"{name}"<sip:{number}@{me}>;tag={random_tag()}'),
                ("To", f"<sip:{self.extension}@{me}>"),
                ("Call-ID", secrets.token_hex(16)),
                ("CSeq", "1 INVITE"),
                ("Contact", f"<sip:{number}@{me}>"),
                ("User-Agent", PBX_USER_AGENT),
                ("Allow", PBX_ALLOW),
                ("Supported", "replaces, timer"),
                ("Content-Type", "application/sdp"),
            ]
        )
        return Request("INVITE", target, headers, sdp)

    async def _answered(self, call: PbxCall, handle: OutgoingRequest) -> None:
        final = await handle
        call.final = final
        if not 200 <= final.status < 300:
            return
        call.answered_at = asyncio.get_running_loop().time()
        sent_rr = call.invite.headers.get_all("Record-Route")
        call.record_route_echoed = final.headers.get_all("Record-Route") == sent_rr
        # The Record-Route is 3CX's own: its UA part talks to sbc directly (no Route to itself).
        own = Response(final.status, final.reason, final.headers.remove("Record-Route"), final.body)
        call.dialog = Dialog.from_uac(handle.request, own)
        ack = call.dialog.create_request(
            "ACK",
            via=self.engine.make_via("udp"),
            branch=random_branch(),
            cseq=call.invite.cseq.seq,
        )
        call.ack = await self.engine.send_ack(ack)
        call.rtp.start(media_target(final.body))

    def _late_response(self, destination: Destination | None, response: Response) -> None:
        """RFC 3261 §13.2.2.4: a retransmitted 2xx gets the same ACK again."""
        call = self.calls.get(response.call_id)
        if (
            call is not None
            and call.ack is not None
            and destination is not None
            and 200 <= response.status < 300
        ):
            self.engine.send_stateless(call.ack, destination)

    async def hang_up(self, call: PbxCall) -> int:
        """Send BYE in the call's dialog; returns the status of the answer."""
        call.rtp.stop_sending()
        assert call.dialog is not None
        bye = call.dialog.create_request(
            "BYE",
            via=self.engine.make_via("udp"),
            branch=random_branch(),
            headers=(("User-Agent", PBX_USER_AGENT),),
        )
        response = await self.engine.send_request(bye)
        call.bye_status = response.status
        call.ended.set()
        return response.status

    def _in_dialog(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.call_id in self.queue_calls:
            self._queue_in_dialog(incoming)
            return
        call = in_dialog_call(self.calls, incoming)
        if call is None:
            return
        if request.method in ("OPTIONS", "UPDATE"):
            incoming.respond(200)
        elif request.method == "INVITE":
            self._reinvited(call, incoming)
        elif request.method == "REFER":
            self._referred(call, incoming)
        else:
            incoming.respond(405, headers=(("Allow", PBX_ALLOW),))

    def _reinvited(self, call: PbxCall, incoming: IncomingRequest) -> None:
        """sbc moves the caller's media (a transfer whose SDP changed): 200 with the caller's
        own SDP again, and its RTP goes where the new offer says."""
        request = incoming.request
        try:
            target = media_target(request.body) if request.body else None
        except ValueError:
            incoming.respond(488)
            return
        if target is not None:
            call.rtp.remote = target
        call.reinvites += 1
        incoming.respond(
            200,
            headers=(
                ("Contact", call.invite.headers.get("Contact") or f"<sip:{self.host}>"),
                ("Content-Type", "application/sdp"),
            ),
            body=call.invite.body,
        )

    def _verified(self, request: Request) -> str | None:
        """The digest username of ``request`` when its Proxy-Authorization is the extension's
        for a nonce this stand-in issued, else None."""
        credentials = request.headers.get("Proxy-Authorization")
        if credentials is None:
            return None
        try:
            auth = parse_authorization(credentials)
        except SipError:
            return None
        good = (
            auth.nonce in self._nonces
            and auth.username == self.auth_id
            and verify_authorization(
                auth,
                method=request.method,
                password=self.password,
                realm=REALM,
                uri=str(request.uri),
            )
        )
        return auth.username if good else None

    # -- transfers: REFER on a caller's dialog --------------------------------------------------
    def _referred(self, call: PbxCall, incoming: IncomingRequest) -> None:
        """3CX's blind transfer (PEERS.md): challenged, then 202 and NOTIFYs of the outcome."""
        request = incoming.request
        seen = call.refer if call.refer is not None else ReferSeen()
        call.refer = seen
        if request.headers.get("Proxy-Authorization") is None:
            seen.challenges += 1
            self._challenge(incoming, registrar=False)
            return
        username = self._verified(request)
        if username is None:
            seen.refused += 1
            incoming.respond(403)
            return
        seen.accepted = request
        seen.username = username
        incoming.respond(202, headers=(("Contact", f"<sip:{self.host}:{self.port}>"),))
        self._spawn(self._notify_refer(call, seen))

    async def _notify_refer(self, call: PbxCall, seen: ReferSeen) -> None:
        """NOTIFY ``SIP/2.0 100 Trying`` then ``SIP/2.0 200 OK`` (the queue took the caller)."""
        assert call.dialog is not None
        progress = (
            (b"SIP/2.0 100 Trying\r\n", "active;expires=60"),
            (b"SIP/2.0 200 OK\r\n", "terminated;reason=noresource"),
        )
        for body, state in progress:
            notify = call.dialog.create_request(
                "NOTIFY",
                via=self.engine.make_via("udp"),
                branch=random_branch(),
                headers=(
                    ("Contact", f"<sip:{self.host}:{self.port}>"),
                    ("Event", "refer"),
                    ("Subscription-State", state),
                    ("Content-Type", "message/sipfrag;version=2.0"),
                    ("User-Agent", PBX_USER_AGENT),
                ),
                body=body,
            )
            response = await self.engine.send_request(notify)
            seen.notify_statuses.append(response.status)
            await asyncio.sleep(self.queue_ring)
        seen.done.set()

    # -- transfers: the queue -------------------------------------------------------------------
    async def _queue_invite(self, incoming: IncomingRequest) -> None:
        """An INVITE from the extension to a queue: 407 first, then (digest good) 180 and 200
        with the queue's SDP; the queue talks once ACKed."""
        request = incoming.request
        to_uri = request.to.uri
        number = to_uri.user if isinstance(to_uri, SipUri) and to_uri.user else ""
        if number not in self.queues:
            incoming.respond(404)
            return
        queue = self.queue_calls.get(request.call_id)
        if queue is None:
            queue = QueueCall(number, await RtpStream.open(self.host, self.queue_frames))
            self.queue_calls[request.call_id] = queue
        queue.invites.append(request)
        if request.headers.get("Proxy-Authorization") is None:
            queue.challenges += 1
            self._challenge(incoming, registrar=False)
            return
        username = self._verified(request)
        from_uri = request.from_.uri
        extension = from_uri.user if isinstance(from_uri, SipUri) else None
        if username is None or extension != self.extension:
            queue.refused += 1
            incoming.respond(403)
            return
        queue.username = username
        offered = audio_codecs(request.body) if request.body else []
        if "PCMU" not in offered:
            queue.refused += 1
            incoming.respond(488)
            return
        contact = ("Contact", f"<sip:{number}@{self.host}:{self.port}>")
        incoming.respond(180, headers=(contact,))
        await asyncio.sleep(self.queue_ring)
        if incoming.final_sent:  # cancelled while ringing
            queue.ended.set()
            return
        queue.answer = incoming.respond(
            200,
            headers=(
                contact,
                ("Allow", PBX_ALLOW),
                ("Server", PBX_USER_AGENT),
                ("Content-Type", "application/sdp"),
            ),
            body=self._queue_sdp(queue.rtp.local[1], "telephone-event" in offered),
        )
        queue.dialog = Dialog.from_uas(request, queue.answer)
        queue.rtp.remote = media_target(request.body)
        self.queue_answered.set()

    def _queue_sdp(self, port: int, events: bool) -> bytes:
        return pcmu_answer(
            self.host, port, events=events, origin="3cxPS", name="3cxPS Audio call", fmtp="0-15"
        )

    def _on_ack(self, request: Request, source: Destination) -> None:
        queue = self.queue_calls.get(request.call_id)
        if queue is None or queue.acked.is_set() or queue.rtp.remote is None:
            return
        queue.acked.set()
        queue.rtp.start(queue.rtp.remote)  # the queue's music (a tone) starts

    def _queue_in_dialog(self, incoming: IncomingRequest) -> None:
        call = in_dialog_call(self.queue_calls, incoming)
        if call is None:
            return
        if incoming.request.method in ("OPTIONS", "UPDATE"):
            incoming.respond(200)
        else:
            incoming.respond(405, headers=(("Allow", PBX_ALLOW),))

    async def hang_up_queue(self, queue: QueueCall) -> int:
        """The queue's agent hangs up: BYE in the queue call's dialog; the answer's status."""
        queue.rtp.stop_sending()
        assert queue.dialog is not None
        bye = queue.dialog.create_request(
            "BYE",
            via=self.engine.make_via("udp"),
            branch=random_branch(),
            headers=(("User-Agent", PBX_USER_AGENT),),
        )
        response = await self.engine.send_request(bye)
        queue.ended.set()
        return response.status
