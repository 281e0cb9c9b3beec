"""The two legs of a bridged call as pure functions: no sockets, no clock, no randomness.

The A-leg is the PBX's INVITE to the registered extension; the B-leg is the INVITE this bridge
sends to Retell. The B-leg is built from scratch (topology hiding): new Call-ID, From tag and
CSeq, sbc's own Contact, and of the A-leg only the caller's number and display name, the
rendered X- headers and the session description (already rewritten by the media layer) go
across. No Via, Record-Route, Route, Contact, P-*, Remote-Party-ID or PBX-internal header is
copied. The Via is pushed by the transaction layer when the request is sent.

Toward Retell the bridge advertises only what the LiveKit stack accepts (PEERS.md): no INFO,
UPDATE, PRACK, MESSAGE or SUBSCRIBE in Allow, no ``timer`` or ``100rel`` in Supported.

Retell's responses are mapped to what the PBX is told by :func:`pbx_status_for_failure` and
:func:`pbx_provisional_for`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Network, IPv6Network
from urllib.parse import quote

from sbc.b2bua.numbers import NumberPlan, clean, normalise
from sbc.b2bua.templates import CallFacts, HeaderTemplates
from sbc.b2bua.transfer_rules import TransferConfig
from sbc.sip.digest import Credentials
from sbc.sip.errors import SipError
from sbc.sip.fields import parse_int_header, parse_params, quote_string
from sbc.sip.headers import Headers
from sbc.sip.message import SIP_VERSION, Request, make_request
from sbc.sip.quickinit import quick_init, quick_maker
from sbc.sip.uri import NameAddr, SipUri, TelUri, Uri, parse_name_addr, unescape


class Peer(Enum):
    PBX = "pbx"
    RETELL = "retell"

    # Members are singletons compared by identity: hash them by identity too (C), not by
    # Enum.__hash__ (a Python call per dict lookup: per-call tables and state machines).
    __hash__ = object.__hash__


# Methods each peer may send in one of its dialogs with sbc, and so what its Allow says
# (RFC 3261 §20.5). Retell's LiveKit stack answers INFO, UPDATE, PRACK, MESSAGE and SUBSCRIBE
# 405 (docs/peers.md): sbc advertises none of them to it. ACK and CANCEL belong to the INVITE.
HANDLED: dict[Peer, tuple[str, ...]] = {
    Peer.PBX: ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "INFO", "UPDATE", "NOTIFY"),
    Peer.RETELL: ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REFER"),
}
# Outside any dialog: a new call, OPTIONS, and 3CX's voicemail NOTIFY (docs/peers.md).
OUT_OF_DIALOG: tuple[str, ...] = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "NOTIFY")
# Toward the PBX sbc runs RFC 4028 session timers; toward Retell it supports nothing extra.
SUPPORTED: dict[Peer, str] = {Peer.PBX: "timer", Peer.RETELL: ""}


def allow_header(peer: Peer) -> str:
    return ", ".join(HANDLED[peer])


MAX_FORWARDS = 70

# RFC 4028 §4: Min-SE may not be below 90 s; it is the bridge's minimum too.
MIN_SESSION_EXPIRES = 90

# User part characters that need no escaping (RFC 3261 §25.1 unreserved / user-unreserved).
_USER_SAFE = "-_.!~*'()&=+$,;?/"


class SessionIntervalTooSmall(SipError):
    """RFC 4028 §6: Session-Expires below our Min-SE; answered 422 with Min-SE."""

    status = 422
    reason = "Session Interval Too Small"


@dataclass(frozen=True, slots=True)
class RetellTarget:
    """Where B-legs go: Retell's host, port and transport, and the imported E.164 number."""

    host: str
    port: int | None
    transport: str  # "udp", "tcp" or "tls"
    number: str

    @property
    def request_uri(self) -> SipUri:
        params: tuple[tuple[str, str | None], ...] = ()
        if self.transport != "udp":
            params = (("transport", self.transport),)
        scheme = "sips" if self.transport == "tls" else "sip"
        return SipUri(scheme, escape_user(self.number), None, self.host, self.port, params)

    @property
    def to_uri(self) -> SipUri:
        # PEERS.md: Retell matches the To user against the imported number as well.
        scheme = "sips" if self.transport == "tls" else "sip"
        return SipUri(scheme, escape_user(self.number), None, self.host)


@dataclass(frozen=True, slots=True)
class PbxTarget:
    """The PBX as the destination of calls sbc places (transfers): host, port, transport, and
    the SIP domain of the extension's AOR."""

    host: str
    port: int | None
    transport: str  # "udp", "tcp" or "tls"
    domain: str

    def uri(self, user: str) -> SipUri:
        params: tuple[tuple[str, str | None], ...] = ()
        if self.transport != "udp":
            params = (("transport", self.transport),)
        scheme = "sips" if self.transport == "tls" else "sip"
        return SipUri(scheme, escape_user(user), None, self.host, self.port, params)

    def aor(self, user: str) -> SipUri:
        scheme = "sips" if self.transport == "tls" else "sip"
        return SipUri(scheme, escape_user(user), None, self.domain)


@quick_init
@dataclass(frozen=True, slots=True)
class LocalAddress:
    """sbc's advertised address on one side (Contact, From host of the B-leg)."""

    host: str
    port: int
    transport: str
    user: str | None = None  # toward the PBX: the extension, as in the registered Contact

    @property
    def contact_uri(self) -> SipUri:
        params: tuple[tuple[str, str | None], ...] = ()
        if self.transport != "udp":
            params = (("transport", self.transport),)
        user = None if self.user is None else escape_user(self.user)
        return SipUri("sip", user, None, self.host, self.port, params)

    @property
    def contact(self) -> str:
        return _contact_of(self)


@functools.lru_cache(maxsize=64)
def _contact_of(local: LocalAddress) -> str:
    """The Contact text of ``local``: the same few addresses in every dialog-forming message of
    every call, built once each (``LocalAddress`` is frozen)."""
    return f"<{local.contact_uri}>"


@quick_init
@dataclass(frozen=True, slots=True)
class LegIds:
    """The dialog identifiers of a new leg (generated by the shell)."""

    call_id: str
    from_tag: str
    cseq: int = 1


@quick_init
@dataclass(frozen=True, slots=True)
class Caller:
    number: str  # normalised, "" when unknown
    display: str | None


def escape_user(user: str) -> str:
    """Escape ``user`` for the user part of a SIP URI (RFC 3261 §25.1)."""
    if _USER_UNESCAPED.fullmatch(user) is not None:
        return user  # what quote() returns for it, without encoding and decoding it
    return quote(user, safe=_USER_SAFE)


# The users quote() leaves as they are: only its always-safe characters and _USER_SAFE.
_USER_UNESCAPED = re.compile("[A-Za-z0-9_.~" + re.escape(_USER_SAFE) + "]*")


def uri_user(uri: Uri) -> str | None:
    """The user (or number) of a sip/sips/tel URI, escapes decoded; None when it has none."""
    if isinstance(uri, SipUri):
        return None if uri.user is None else unescape(uri.user)
    if isinstance(uri, TelUri):
        return uri.number
    return None


def caller_of(invite: Request, plan: NumberPlan) -> Caller:
    """The caller of the PBX's INVITE: From's number (normalised) and display name.

    When From hides the number (``anonymous``, no user part) and a P-Asserted-Identity is
    present, its number is taken instead (RFC 3325 §9.1).
    """
    from_ = invite.from_
    number = uri_user(from_.uri) or ""
    if not clean(number) or not any(map(str.isdigit, number)):
        pai = _asserted_identity(invite.headers)
        if pai is not None:
            asserted = uri_user(pai.uri)
            if asserted:
                number = asserted
    display = from_.display if from_.display else None
    return Caller(normalise(number, plan) if number else "", display)


def _asserted_identity(headers: Headers) -> NameAddr | None:
    for value in headers.values("P-Asserted-Identity"):
        try:
            return parse_name_addr(value)
        except SipError:
            continue
    return None


def call_facts(
    invite: Request, caller: Caller, called: str, call_uuid: str, now: float
) -> CallFacts:
    """What the header templates' variables stand for in this call."""
    return _make_call_facts(
        caller.number,  # caller_number
        caller.display or "",  # caller_name
        called,
        invite.call_id,  # pbx_call_id
        call_uuid,
        now,
        invite.headers,
    )


# The objects every call's INVITE to Retell is made of, made by quick makers (a slot store a
# field on a plain twin, docs/performance.md "Round 9: obs"): what the constructors give.
_make_call_facts: Callable[[str, str, str, str, str, float, Headers], CallFacts] = quick_maker(
    CallFacts
)
_make_sip_uri: Callable[..., SipUri] = quick_maker(SipUri)


def called_of(invite: Request) -> str:
    """The dialled extension or DID: To's user part, else the Request-URI's."""
    user = uri_user(invite.to.uri)
    if user:
        return user
    return uri_user(invite.uri) or ""


def build_b_invite(
    config: BridgeConfig,
    local: LocalAddress,
    ids: LegIds,
    caller: Caller,
    x_headers: tuple[tuple[str, str], ...] = (),
    sdp: bytes = b"",
) -> Request:
    """The INVITE to Retell (without Via: the transaction layer pushes it when sending).

    Of the PBX's INVITE only ``caller`` (see :func:`caller_of`), the rendered ``x_headers``
    and the media layer's ``sdp`` go across; nothing is copied verbatim.
    """
    target = config.retell
    user_agent = config.user_agent
    user = escape_user(caller.number) if caller.number else "anonymous"
    request_uri, scheme, to, contact = _b_invite_fixed(target, local)
    from_uri = _make_sip_uri(scheme, user, None, local.host, None, (), ())
    # The display name is always quoted: several peers mis-read unquoted multi-word names.
    display = "" if caller.display is None else quote_string(caller.display) + " "
    from_ = f"{display}<{from_uri}>;tag={ids.from_tag}"
    items: list[tuple[str, str]] = [
        ("Max-Forwards", _MAX_FORWARDS_TEXT),
        ("From", from_),
        ("To", to),
        ("Call-ID", ids.call_id),
        ("CSeq", f"{ids.cseq} INVITE"),
        ("Contact", contact),
        ("Allow", _ALLOW_RETELL),
    ]
    if user_agent:
        items.append(("User-Agent", user_agent))
    items.extend(x_headers)
    if sdp:
        items.append(("Content-Type", "application/sdp"))
    return make_request("INVITE", request_uri, Headers(items), sdp, SIP_VERSION)


# Header values that never change: built once, not per message (the tables are constants).
_MAX_FORWARDS_TEXT = str(MAX_FORWARDS)
_ALLOW_RETELL = allow_header(Peer.RETELL)
_ALLOW_PBX = allow_header(Peer.PBX)
_SUPPORTED_PBX = SUPPORTED[Peer.PBX]


@functools.lru_cache(maxsize=64)
def _b_invite_fixed(target: RetellTarget, local: LocalAddress) -> tuple[SipUri, str, str, str]:
    """What every INVITE to ``target`` from ``local`` shares: Request-URI, From's scheme, To
    and Contact. Built once per route and address instead of per call (a SipUri is frozen,
    so one object serves every request)."""
    scheme = "sips" if target.transport == "tls" else "sip"
    return target.request_uri, scheme, str(NameAddr(target.to_uri)), local.contact


def build_pbx_invite(
    pbx: PbxTarget,
    extension: str,
    local: LocalAddress,
    ids: LegIds,
    number: str,
    caller: Caller,
    *,
    user_agent: str = "",
    x_headers: tuple[tuple[str, str], ...] = (),
    sdp: bytes = b"",
) -> Request:
    """An INVITE from the extension to ``number`` on the PBX (a transfer by INVITE, or a call
    Retell sent to sbc), without Via (pushed when sent).

    3CX takes calls from an extension only as that extension (docs/peers.md), so From is the
    extension's AOR; the caller's identity goes in the display name (what 3CX shows: the name,
    else the number) and in P-Asserted-Identity (RFC 3325) with the number.
    """
    display_text = caller.display or caller.number
    display = quote_string(display_text) + " " if display_text else ""
    from_ = f"{display}<{pbx.aor(extension)}>;tag={ids.from_tag}"
    items: list[tuple[str, str]] = [
        ("Max-Forwards", str(MAX_FORWARDS)),
        ("From", from_),
        ("To", str(NameAddr(pbx.aor(number)))),
        ("Call-ID", ids.call_id),
        ("CSeq", f"{ids.cseq} INVITE"),
        ("Contact", local.contact),
        ("Allow", allow_header(Peer.PBX)),
        # No Supported: timer: as the UAC here sbc runs no refreshes, so the PBX must not make
        # it the refresher (RFC 4028 §9: without it, a PBX that wants a timer refreshes itself).
    ]
    if caller.number:
        identity = SipUri(pbx.aor(extension).scheme, escape_user(caller.number), None, pbx.domain)
        items.append(("P-Asserted-Identity", f"{display}<{identity}>"))
    if user_agent:
        items.append(("User-Agent", user_agent))
    items.extend(x_headers)
    if sdp:
        items.append(("Content-Type", "application/sdp"))
    return Request("INVITE", pbx.uri(number), Headers(items), sdp)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything the bridge needs from the settings (mapped by ``sbc.b2bua.calls``)."""

    extension: str
    retell: RetellTarget
    trusted: tuple[IPv4Network | IPv6Network, ...] = ()  # where the PBX's INVITEs come from
    answer_timeout: float = 90.0
    max_concurrent: int = 100
    # Calls whose first INVITE came from one address; None: max_concurrent (the PBX's address
    # carries all of its calls).
    max_calls_per_source: int | None = None
    max_duration: float = 7200.0
    retry_after: int = 30
    number_plan: NumberPlan = field(default_factory=NumberPlan)
    headers: HeaderTemplates = field(default_factory=HeaderTemplates)
    user_agent: str = "sbc"
    pbx_credentials: Credentials | None = None  # 3CX challenges what sbc sends (peers.md)
    pbx: PbxTarget | None = None  # where calls sbc places to the PBX go (transfers)
    retell_credentials: Credentials | None = None  # answer Retell's challenges; check its calls
    retell_trusted: tuple[IPv4Network | IPv6Network, ...] = ()  # where Retell's calls come from
    transfer: TransferConfig = field(default_factory=TransferConfig)
    min_session_expires: int = 90
    media_timeout: float | None = None  # hang up when neither leg sent RTP this long
    t1: float = 0.5
    t2: float = 4.0
    # The route (settings' [[routes]] entry) these calls belong to: log lines, metrics, records.
    route: str = "default"
    # Calls of every route together (calls.max_concurrent); None: only max_concurrent counts.
    max_total: int | None = None


# -- responses from Retell, mapped for the PBX ------------------------------------------------

# Retell's final failure -> what the PBX is told. Missing codes fall back by class below.
_FAILURE_MAP: dict[int, int] = {
    404: 480,  # the number is not (yet) imported at Retell: try later, not "no such user"
    408: 480,
    480: 480,
    486: 486,
    487: 487,
    488: 488,
    600: 600,
    603: 603,
    604: 480,
    606: 488,
}
TIMEOUT_STATUS = 480  # Retell did not answer within answer_timeout


def pbx_status_for_failure(status: int) -> int:
    """The status the PBX gets when Retell answers the INVITE with ``status`` (>= 300)."""
    if status in _FAILURE_MAP:
        return _FAILURE_MAP[status]
    if status >= 500 and status < 600:
        return 503
    # 3xx (redirects are not followed), 401/407 that could not be answered, other 4xx.
    return 480


def pbx_provisional_for(status: int) -> int | None:
    """The provisional response the PBX gets for Retell's ``status`` (None: none is sent).

    100 is hop-by-hop (RFC 3261 §16.7) and the PBX already had one; 181/182 become 180.
    """
    if status == 183:
        return 183
    if 180 <= status <= 182:
        return 180
    return None


# -- headers of the bridge's responses to the PBX --------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionTimer:
    """RFC 4028 session timer agreed with the PBX: interval and who refreshes."""

    interval: int
    refresher: str  # "uac" (the PBX) or "uas" (the bridge)

    @property
    def header(self) -> str:
        return f"{self.interval};refresher={self.refresher}"

    @property
    def refresh_headers(self) -> tuple[tuple[str, str], ...]:
        """Of a refresh the bridge sends: it is the UAC of it and the refresher (§7.4)."""
        return (("Supported", "timer"), ("Session-Expires", f"{self.interval};refresher=uac"))

    def refresh_at(self, refreshed_at: float) -> float:
        """RFC 4028 §10: when the bridge refreshes (half the interval), if it is the refresher."""
        return refreshed_at + self.interval / 2 if self.refresher == "uas" else float("inf")

    def expires_at(self, refreshed_at: float) -> float:
        """RFC 4028 §10: when the bridge gives up on the PBX's refresh and sends BYE: expiry
        minus min(32 s, interval / 3); never when the bridge refreshes itself."""
        if self.refresher != "uac":
            return float("inf")
        return refreshed_at + self.interval - min(32.0, self.interval / 3)


def supports_timer(request: Request) -> bool:
    return "timer" in (v.lower() for v in request.headers.values("Supported"))


def negotiate_session_timer(
    invite: Request, min_se: int = MIN_SESSION_EXPIRES
) -> SessionTimer | None:
    """The session timer for the PBX leg, from the PBX's (re-)INVITE or UPDATE.

    RFC 4028 §9: with no Session-Expires in the request there is none unless the UAC supports
    ``timer`` (then the UAS may pick one; this bridge does not ask for one). A refresher
    named in the request is kept; else the PBX (``uac``) refreshes, as it supports timer.
    Raises :class:`SessionIntervalTooSmall` (422) below ``min_se`` (RFC 4028 §8.1).
    """
    value = invite.headers.get("Session-Expires")
    if value is None:
        return None
    delta, _, param_text = value.partition(";")
    interval = parse_int_header(delta, "Session-Expires")
    if interval < min_se:
        raise SessionIntervalTooSmall(
            f"Session-Expires {interval} below {min_se}", headers=(("Min-SE", str(min_se)),)
        )
    refresher = "uac"
    for name, param in parse_params(param_text):
        if name.lower() == "refresher" and param is not None and param.lower() in ("uac", "uas"):
            refresher = param.lower()
    if not supports_timer(invite):
        # RFC 4028 §9: a UAC without timer support cannot refresh; the UAS does.
        refresher = "uas"
    return SessionTimer(interval, refresher)


def pbx_dialog_headers(
    invite: Request,
    local: LocalAddress,
    *,
    user_agent: str = "",
    timer: SessionTimer | None = None,
    has_body: bool = False,
) -> tuple[tuple[str, str], ...]:
    """Headers of a dialog-forming response to the PBX (18x with tag, 2xx).

    RFC 3261 §12.1.1: the UAS copies every Record-Route of the request, in order (3CX's SBC
    depends on it, PEERS.md); Contact is sbc's own. RFC 4028 §9: a 2xx to a request with a
    session timer carries Session-Expires, and Require: timer when the UAC refreshes.
    """
    items = [("Record-Route", v) for v in invite.headers.get_all("Record-Route")]
    items.append(("Contact", local.contact))
    items.append(("Allow", _ALLOW_PBX))
    items.append(("Supported", _SUPPORTED_PBX))
    if timer is not None:
        items.append(("Session-Expires", timer.header))
        # RFC 4028 §9: Require: timer MUST go with refresher=uac, SHOULD with uas when the
        # UAC supports timer.
        if timer.refresher == "uac" or supports_timer(invite):
            items.append(("Require", "timer"))
    if user_agent:
        items.append(("Server", user_agent))
    if has_body:
        items.append(("Content-Type", "application/sdp"))
    return tuple(items)


# -- SIP INFO DTMF from the PBX ---------------------------------------------------------------

_DTMF_EVENTS = "0123456789*#ABCD"


def parse_dtmf_info(body: bytes) -> tuple[str, int] | None:
    """``(digit, duration in ms)`` of a SIP INFO DTMF body, None when it holds none.

    ``application/dtmf-relay`` (``Signal=5`` / ``Duration=160`` lines, as 3CX and most phones
    send) and the bare ``application/dtmf`` digit are read; the duration defaults to 100 ms.
    """
    text = body.decode("utf-8", "replace").strip()
    if len(text) == 1:
        return (text.upper(), 100) if text.upper() in _DTMF_EVENTS else None
    signal: str | None = None
    duration = 100
    for line in text.splitlines():
        name, _, value = line.partition("=")
        key = name.strip().lower()
        value = value.strip()
        if key == "signal" and len(value) == 1 and value.upper() in _DTMF_EVENTS:
            signal = value.upper()
        elif key == "duration" and value.isdigit():
            duration = min(int(value), 5000)
    return None if signal is None else (signal, duration)
