"""Local stand-ins of 3CX and Retell: the far ends of the bridge for ``sbc demo`` and the tests.

They are test doubles that ship with sbc, built on its own engine and SIP core, and small on
purpose. What they do on the wire follows the captures and notes in PEERS.md:

* :class:`PbxStandIn` is 3CX: a registrar that challenges REGISTER with ``407`` (``realm=
  "3CXPhoneSystem"``, MD5, no qop, as a real 3CX v11 did) and checks the digest, and a caller
  that sends 3CX's INVITE (its User-Agent, ``o=3cxPS`` SDP with PCMU/PCMA/G722 and
  telephone-event 101, a ``Record-Route``) to the registered Contact;
* :class:`RetellStandIn` is Retell's SIP server (LiveKit): it answers an INVITE with 180 then 200
  and an SDP with exactly one codec (plus telephone-event), and records what it received;
* :class:`RtpStream` is one side's audio: a tone as PCMU in 20 ms packets, RFC 4733 DTMF on
  demand, every packet sent and received kept for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sbc.media.rtp import RtpFormatError, RtpHeader, RtpPacket, build_rtp, dtmf_packets, parse_rtp
from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import ClientTransaction, IncomingRequest, SipEngine
from sbc.sdp.parser import parse_sdp
from sbc.sip.dialog import Dialog
from sbc.sip.digest import parse_authorization, verify_authorization
from sbc.sip.errors import SipError
from sbc.sip.headers import Headers
from sbc.sip.ids import new_branch
from sbc.sip.message import Request, Response
from sbc.sip.uri import Uri, parse_name_addr

__all__ = [
    "PBX_USER_AGENT",
    "REALM",
    "PbxCall",
    "PbxStandIn",
    "RetellCall",
    "RetellStandIn",
    "RtpStream",
    "pcmu_tone",
]

PBX_USER_AGENT = "3CXPhoneSystem 18.0.9.20 (20)"
RETELL_USER_AGENT = "LiveKit"
REALM = "3CXPhoneSystem"
PCMU = 0
TELEPHONE_EVENT = 101
SAMPLE_RATE = 8000
PACKET_MS = 20
SAMPLES_PER_PACKET = SAMPLE_RATE * PACKET_MS // 1000
PBX_ALLOW = "INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE"


# -- audio --------------------------------------------------------------------------------------


def ulaw(sample: int) -> int:
    """One 16-bit linear sample as G.711 mu-law (ITU-T G.711; the 14-bit segment search of
    the classic reference implementation, so the bytes match other encoders)."""
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 0x21
    segment = max(0, value.bit_length() - 6)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def pcmu_tone(frequency: int, amplitude: int = 8000) -> list[bytes]:
    """One second of a sine tone as 20 ms PCMU payloads (whole periods when 8000/f is one)."""
    samples = bytes(
        ulaw(round(amplitude * math.sin(2 * math.pi * frequency * n / SAMPLE_RATE)))
        for n in range(SAMPLE_RATE)
    )
    step = SAMPLES_PER_PACKET
    return [samples[i : i + step] for i in range(0, SAMPLE_RATE, step)]


class RtpStream(asyncio.DatagramProtocol):
    """One party's RTP on one UDP socket: sends a tone to ``remote`` every 20 ms (from the
    socket it receives on, RFC 4961 symmetric RTP) and keeps every packet it sent and got."""

    def __init__(self, frames: Sequence[bytes], payload_type: int = PCMU) -> None:
        self.frames = list(frames)
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32)
        self._sequence = secrets.randbelow(1 << 16)
        self._timestamp = secrets.randbits(32)
        self.sent: list[RtpPacket] = []
        self.received: list[RtpPacket] = []
        self.not_rtp = 0
        self.sources: set[tuple[str, int]] = set()
        self.remote: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: deque[bytes] = deque()  # DTMF packets go out before the next frame
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def open(cls, host: str, frames: Sequence[bytes]) -> RtpStream:
        stream = cls(frames)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: stream, local_addr=(host, 0))
        return stream

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    # -- asyncio.DatagramProtocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sources.add((str(addr[0]), int(addr[1])))
        try:
            self.received.append(parse_rtp(data))
        except RtpFormatError:
            self.not_rtp += 1
        self._changed.set()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the far end is not up yet

    # -- sending --------------------------------------------------------------------------------
    def start(self, remote: tuple[str, int]) -> None:
        """Send to ``remote`` every 20 ms until :meth:`stop_sending`."""
        self.remote = remote
        if self._task is None:
            self._task = asyncio.ensure_future(self._send_loop())

    def send_dtmf(self, digit: str) -> None:
        """Queue ``digit`` as RFC 4733 telephone-event packets (same SSRC and sequence space)."""
        packets = dtmf_packets(
            digit,
            payload_type=TELEPHONE_EVENT,
            ssrc=self.ssrc,
            first_sequence=self._sequence,
            timestamp=self._timestamp,
        )
        self._sequence = (self._sequence + len(packets)) & 0xFFFF
        self._pending.extend(packets)

    def stop_sending(self) -> None:
        """Send nothing more (the task is cancelled while it waits for its next tick)."""
        if self._task is not None:
            self._task.cancel()

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        index = 0
        next_at = loop.time()
        while True:
            if self._pending:
                data = self._pending.popleft()
            else:
                header = RtpHeader(self.payload_type, self._sequence, self._timestamp, self.ssrc)
                data = build_rtp(header, self.frames[index % len(self.frames)])
                self._sequence = (self._sequence + 1) & 0xFFFF
                index += 1
            # RFC 4733 §2.5.1: audio time goes on during an event; its packets keep their start.
            self._timestamp = (self._timestamp + SAMPLES_PER_PACKET) & 0xFFFFFFFF
            if self.transport is not None and self.remote is not None:
                self.transport.sendto(data, self.remote)
                self.sent.append(parse_rtp(data))
            next_at += PACKET_MS / 1000
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    # -- results --------------------------------------------------------------------------------
    async def wait_received(self, count: int) -> None:
        """Return once ``count`` packets have arrived (bound it with ``asyncio.timeout``)."""
        while len(self.received) < count:
            self._changed.clear()
            await self._changed.wait()

    def events_received(self) -> list[RtpPacket]:
        return [p for p in self.received if p.header.payload_type == TELEPHONE_EVENT]

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def same_packets(sent: Sequence[RtpPacket], received: Sequence[RtpPacket]) -> bool:
    """The same packets in the same order: sequence numbers, payload types and payload bytes."""
    return [(p.header.sequence, p.header.payload_type, p.payload) for p in sent] == [
        (p.header.sequence, p.header.payload_type, p.payload) for p in received
    ]


def media_target(body: bytes) -> tuple[str, int]:
    """The (address, port) the first audio stream of an SDP body asks RTP to be sent to."""
    sd = parse_sdp(body)
    audio = sd.audio()
    if audio is None:
        raise ValueError("SDP without an active audio stream")
    connection = sd.connection_for(audio)
    if connection is None:
        raise ValueError("SDP without a connection address for audio")
    return connection.address.split("/")[0], audio.port


def audio_codecs(body: bytes) -> list[str]:
    """Encoding names of the first audio stream, in order (``telephone-event`` included)."""
    audio = parse_sdp(body).audio()
    return [] if audio is None else [rm.encoding for rm in audio.codecs()]


def _token() -> str:
    return secrets.token_hex(8)


def _branch() -> str:
    return new_branch(secrets.token_bytes(12))


def _engine(host: str, port: int, user_agent: str) -> SipEngine:
    return SipEngine(TransportConfig(bind=host, port=port, user_agent=user_agent))


_CallT = TypeVar("_CallT", "PbxCall", "RetellCall")


def _in_dialog_call(calls: dict[str, _CallT], incoming: IncomingRequest) -> _CallT | None:
    """The call to answer an in-dialog request, or None if answered here: 481 without a dialog,
    the dialog's refusal (RFC 3261 §12.2.2), or 200 to a BYE, which ends the call."""
    request = incoming.request
    call = calls.get(request.call_id)
    if call is None or call.dialog is None:
        incoming.respond(481)
        return None
    try:
        call.dialog.receive_request(request)
    except SipError as exc:
        incoming.reject(exc)
        return None
    if request.method == "BYE":
        incoming.respond(200)
        call.bye_received = True
        call.ended.set()
        call.rtp.stop_sending()
        return None
    return call


# -- 3CX ----------------------------------------------------------------------------------------


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
        self.engine = _engine(host, port, PBX_USER_AGENT)
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
                ("From", f'"{name}"<sip:{number}@{me}>;tag={_token()}'),
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

    async def _answered(self, call: PbxCall, handle: ClientTransaction) -> None:
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
            "ACK", via=self.engine.make_via("udp"), branch=_branch(), cseq=call.invite.cseq.seq
        )
        call.ack = await self.engine.send_ack(ack)
        call.rtp.start(media_target(final.body))

    def _late_response(self, handle: ClientTransaction, response: Response) -> None:
        """RFC 3261 §13.2.2.4: a retransmitted 2xx gets the same ACK again."""
        call = self.calls.get(response.call_id)
        if call is not None and call.ack is not None and 200 <= response.status < 300:
            self.engine.layer.send_stateless(call.ack, dest=handle.destination)

    async def hang_up(self, call: PbxCall) -> int:
        """Send BYE in the call's dialog; returns the status of the answer."""
        call.rtp.stop_sending()
        assert call.dialog is not None
        bye = call.dialog.create_request(
            "BYE",
            via=self.engine.make_via("udp"),
            branch=_branch(),
            headers=(("User-Agent", PBX_USER_AGENT),),
        )
        response = await self.engine.send_request(bye)
        call.bye_status = response.status
        call.ended.set()
        return response.status

    def _in_dialog(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        call = _in_dialog_call(self.calls, incoming)
        if call is None:
            return
        if request.method in ("OPTIONS", "UPDATE"):
            incoming.respond(200)
        else:
            incoming.respond(405, headers=(("Allow", PBX_ALLOW),))


# -- Retell -------------------------------------------------------------------------------------


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
    refused: int | None = None  # the status of a refusal

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
    ) -> None:
        self.host = host
        self.port = port
        self.ring = ring
        self.frames = list(frames) if frames else pcmu_tone(tone_hz)
        self.engine = _engine(host, port, RETELL_USER_AGENT)
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
            task = asyncio.ensure_future(self._answer(incoming))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            incoming.respond(405, headers=(("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS"),))

    async def _answer(self, incoming: IncomingRequest) -> None:
        """LiveKit's way: 100, 180, then 200 with exactly one codec (PEERS.md)."""
        request = incoming.request
        x_headers = [(n, v) for n, v in request.headers.items() if n.lower().startswith("x-")]
        rtp = await RtpStream.open(self.host, self.frames)
        call = RetellCall(request, incoming.source.transport, rtp, x_headers)
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
        session = str(secrets.randbelow(10**9))
        formats = "0 101" if events else "0"
        lines = [
            "v=0",
            f"o=LiveKit {session} {session} IN IP4 {self.host}",
            "s=LiveKit",
            f"c=IN IP4 {self.host}",
            "t=0 0",
            f"m=audio {port} RTP/AVP {formats}",
            "a=rtpmap:0 PCMU/8000",
        ]
        if events:
            lines += ["a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"]
        lines += ["a=ptime:20", "a=sendrecv"]
        return ("\r\n".join(lines) + "\r\n").encode()

    def _on_ack(self, request: Request, source: Destination) -> None:
        call = self.calls.get(request.call_id)
        if call is None or call.acked.is_set() or call.rtp.remote is None:
            return
        call.acked.set()
        call.rtp.start(call.rtp.remote)  # the agent starts talking

    def _in_dialog(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        call = _in_dialog_call(self.calls, incoming)
        if call is None:
            return
        if request.method in ("INVITE", "OPTIONS"):
            # A re-INVITE is answered with the original SDP (PEERS.md).
            body = call.answer.body if call.answer is not None else b""
            ctype = (("Content-Type", "application/sdp"),) if body else ()
            incoming.respond(200, headers=ctype, body=body)
        else:
            incoming.respond(405)  # INFO, UPDATE, PRACK, MESSAGE: as LiveKit

    async def hang_up(self, call: RetellCall) -> int:
        """The agent ends the call: BYE in the dialog; returns the status of the answer."""
        call.rtp.stop_sending()
        assert call.dialog is not None
        transport = "tcp" if call.transport == "tcp" else "udp"
        bye = call.dialog.create_request(
            "BYE", via=self.engine.make_via(transport), branch=_branch()
        )
        response = await self.engine.send_request(bye)
        call.bye_status = response.status
        call.ended.set()
        return response.status
