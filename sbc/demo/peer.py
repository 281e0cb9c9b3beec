"""What the 3CX and Retell stand-ins share: their engine, fresh tags and branches, reading the
SDP of the other side, and the first steps of answering a request inside a dialog."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Protocol, TypeVar

from sbc.demo.rtp_peer import RtpStream
from sbc.net.addresses import TransportConfig
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.sdp.parser import parse_sdp
from sbc.sip.dialog import Dialog
from sbc.sip.errors import SipError
from sbc.sip.ids import new_branch
from sbc.sip.message import Request

__all__ = [
    "PeerCall",
    "audio_codecs",
    "in_dialog_call",
    "media_target",
    "random_branch",
    "random_tag",
    "sip_engine",
    "sipfrag_status",
    "x_headers",
]

# RFC 3420 §2: a sipfrag's first line, here a Status-Line (RFC 3261 §7.2).
_STATUS_LINE = re.compile(rb"\s*SIP/2\.0[ \t]+([1-6][0-9]{2})\b", re.IGNORECASE)


class PeerCall(Protocol):
    """The part of a stand-in's call that in-dialog handling reads and ends."""

    dialog: Dialog | None
    rtp: RtpStream
    bye_received: bool
    ended: asyncio.Event


_CallT = TypeVar("_CallT", bound=PeerCall)


def pcmu_answer(host: str, port: int, *, events: bool, origin: str, name: str, fmtp: str) -> bytes:
    """An answer SDP with PCMU (and telephone-event when ``events``), in the style of the peer
    played: ``origin`` the o= user, ``name`` the s= line, ``fmtp`` its event range."""
    session = str(secrets.randbelow(10**9))
    lines = [
        "v=0",
        f"o={origin} {session} {session} IN IP4 {host}",
        f"s={name}",
        f"c=IN IP4 {host}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {'0 101' if events else '0'}",
        "a=rtpmap:0 PCMU/8000",
    ]
    if events:
        lines += ["a=rtpmap:101 telephone-event/8000", f"a=fmtp:101 {fmtp}"]
    lines += ["a=ptime:20", "a=sendrecv"]
    return ("\r\n".join(lines) + "\r\n").encode()


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


def sipfrag_status(body: bytes) -> int | None:
    """The status of a ``message/sipfrag`` body's Status-Line (``SIP/2.0 200 OK`` -> 200)."""
    match = _STATUS_LINE.match(body)
    return int(match[1]) if match is not None else None


def x_headers(request: Request) -> list[tuple[str, str]]:
    """The request's X- headers, in order."""
    return [(n, v) for n, v in request.headers.items() if n.lower().startswith("x-")]


def random_tag() -> str:
    return secrets.token_hex(8)


def random_branch() -> str:
    return new_branch(secrets.token_bytes(12))


def sip_engine(host: str, port: int, user_agent: str) -> SipEngine:
    return SipEngine(TransportConfig(bind=host, port=port, user_agent=user_agent))


def in_dialog_call(calls: dict[str, _CallT], incoming: IncomingRequest) -> _CallT | None:
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
