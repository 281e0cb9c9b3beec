"""The 3CX stand-in: registrar of one extension (3CX's 407 digest challenge) and the caller of
calls to it, with 3CX's INVITE as captured (PEERS.md)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from sbc.demo.peer import in_dialog_call, media_target, random_branch, random_tag, sip_engine
from sbc.demo.rtp_peer import RtpStream
from sbc.demo.tones import pcmu_tone
from sbc.net.engine import IncomingRequest, OutgoingRequest
from sbc.sip.dialog import Dialog
from sbc.sip.digest import parse_authorization, verify_authorization
from sbc.sip.errors import SipError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import Uri, parse_name_addr

__all__ = ["PBX_ALLOW", "PBX_USER_AGENT", "REALM", "PbxCall", "PbxStandIn", "RegistrarLog"]

PBX_USER_AGENT = "3CXPhoneSystem 18.0.9.20 (20)"
REALM = "3CXPhoneSystem"
PBX_ALLOW = "INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE"


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
    ) -> None:
        self.host = host
        self.port = port
        self.extension = extension
        self.auth_id = auth_id
        self.password = password
        self.expires = expires
        self.engine = sip_engine(host, port, PBX_USER_AGENT)
        self.engine.on_request = self._on_request
        self.engine.on_late_response = self._late_response
        self.registrar = RegistrarLog()
        self.registered = asyncio.Event()
        self.unregistered = asyncio.Event()
        self.calls: dict[str, PbxCall] = {}
        self._nonces: set[str] = set()

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        for call in self.calls.values():
            await call.rtp.close()
        await self.engine.stop()

    # -- registrar ------------------------------------------------------------------------------
    def _on_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.method == "REGISTER":
            self._register(incoming)
        elif request.to_tag is not None:
            self._in_dialog(incoming)
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

    def _challenge(self, incoming: IncomingRequest) -> None:
        nonce = secrets.token_hex(16)
        self._nonces.add(nonce)
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

    def _late_response(self, handle: OutgoingRequest, response: Response) -> None:
        """RFC 3261 §13.2.2.4: a retransmitted 2xx gets the same ACK again."""
        call = self.calls.get(response.call_id)
        if (
            call is not None
            and call.ack is not None
            and handle.destination is not None
            and 200 <= response.status < 300
        ):
            self.engine.send_stateless(call.ack, handle.destination)

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
        call = in_dialog_call(self.calls, incoming)
        if call is None:
            return
        if request.method in ("OPTIONS", "UPDATE"):
            incoming.respond(200)
        else:
            incoming.respond(405, headers=(("Allow", PBX_ALLOW),))
