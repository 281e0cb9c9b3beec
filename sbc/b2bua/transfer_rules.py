"""Transfers asked for by Retell, as pure functions: no sockets, no clock, no randomness.

Retell's agent hands a caller back to a human with an in-dialog REFER (RFC 3515) on the Retell
leg. What happens to it here:

* :func:`parse_refer_to` reads the ``Refer-To`` value. Retell writes the target verbatim and
  without angle brackets (PEERS.md): ``tel:+14155550100``, ``sip:sales@sip.retellai.com``,
  ``sip:+14155550100@host;user=phone`` or a bare number; other senders use the ``name-addr``
  form of RFC 3261 §20.10. X- headers embedded in the URI (``?X-Foo=bar``, RFC 3261 §19.1.1)
  come back decoded.
* :func:`resolve_target` turns the target's user part into the PBX number to call, through the
  ``[transfer] targets`` names, and checks it against ``[transfer] allow``. **The allow pattern
  is the only gate**: a name never bypasses it (configured targets must match it as well,
  :class:`TransferConfig` refuses one that does not), so a REFER can never become a route to
  an arbitrary outside number (toll fraud). A refusal is :class:`TransferRefused` (403).
* Retell is told how the transfer goes with NOTIFYs of ``Event: refer`` carrying a
  ``message/sipfrag`` body (RFC 3515 §2.4.4-§2.4.7, RFC 3420): :func:`sipfrag`,
  :func:`notify_headers` and :func:`refer_notify` build them.
* In ``refer`` mode the bridge sends its own REFER to 3CX (:func:`refer_request_headers`) and
  relays 3CX's NOTIFYs, read with :func:`sipfrag_status` and :func:`refer_progress`.

Retell never retries a REFER answered 401/407 (PEERS.md): nothing here challenges anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast
from urllib.parse import quote

from sbc.sip.errors import BadRequest, Forbidden, ParseError
from sbc.sip.fields import is_token, parse_params, unquote_string
from sbc.sip.message import Request, reason_phrase
from sbc.sip.uri import NameAddr, SipUri, TelUri, Uri, parse_uri, unescape

TransferMode = Literal["refer", "invite"]
_T = TypeVar("_T")

# The default of ``[transfer] allow`` (sbc/ops/settings.py): dialable characters only.
DEFAULT_ALLOW = re.compile(r"^[0-9*#+]{1,32}$")

# RFC 3420 §2 / RFC 3515 §2.4.5: the body of a NOTIFY for a REFER's implicit subscription.
SIPFRAG_CONTENT_TYPE = "message/sipfrag;version=2.0"
# RFC 3515 §2.4.6 leaves the expiry to the notifier; one minute covers a ringing target that
# then answers or fails, and the final NOTIFY ends the subscription anyway.
DEFAULT_NOTIFY_EXPIRES = 60

_MAX_CSEQ = 2**31 - 1  # RFC 3261 §8.1.1.5

# RFC 3966 §5.1.1 visual separators (- . ( )), plus the blanks people type between digit groups.
_VISUAL_SEPARATORS = str.maketrans("", "", " \t-.()")
# What a number is once its separators are gone: digits, '*' and '#', one optional leading '+'.
_NUMBER_RE = re.compile(r"\+?[0-9*#]+")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:")
# name-addr (RFC 3261 §20.10): optional display name (quoted string or bare words), <URI>, tail.
_NAME_ADDR_RE = re.compile(
    r'(?P<display>"(?:[^"\\]|\\.)*"[ \t]*|[^<>"]*)<(?P<uri>[^<>]*)>(?P<tail>.*)', re.DOTALL
)
# RFC 3261 §7.2 Status-Line as the first line of a sipfrag (RFC 3420 §2); the version is
# compared case-insensitively (RFC 3261 §7.1) and the reason phrase may be missing.
_STATUS_LINE_RE = re.compile(r"SIP/2\.0[ \t]+([1-6][0-9]{2})(?:[ \t][^\r\n]*)?", re.IGNORECASE)
# Control characters other than HTAB (RFC 3261 §25.1 allows none in a header value).
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# User part characters that need no escaping (RFC 3261 §25.1 unreserved / user-unreserved).
_USER_SAFE = "-_.!~*'()&=+$,;?/"


# -- configuration ------------------------------------------------------------------------------


class TargetMap(Mapping[str, str]):
    """An immutable, hashable ``name -> PBX number`` mapping, in the order it was given."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        merged: dict[str, str] = {}
        for name, number in pairs:
            merged[name] = number
        self._items: tuple[tuple[str, str], ...] = tuple(merged.items())

    def __getitem__(self, name: str) -> str:
        for key, number in self._items:
            if key == name:
                return number
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items))

    def __repr__(self) -> str:
        return f"TargetMap({dict(self._items)!r})"


@dataclass(frozen=True, slots=True)
class TransferConfig:
    """``[transfer]`` as the call flow sees it (mapped from the settings by ``sbc.ops``).

    ``targets`` may be given as any mapping (or pairs); it is kept as a :class:`TargetMap`, so
    the config stays immutable and hashable. Every target number must match ``allow`` as a
    whole: the pattern is the one gate between a REFER and the PBX's outside lines.
    """

    mode: TransferMode = "refer"
    allow: re.Pattern[str] = DEFAULT_ALLOW
    targets: Mapping[str, str] = field(default_factory=TargetMap)
    ring_timeout: float = 30.0  # invite mode: how long the new call to the target may ring

    def __post_init__(self) -> None:
        if self.mode not in ("refer", "invite"):
            raise ValueError(f"transfer mode must be 'refer' or 'invite', not {self.mode!r}")
        if not self.ring_timeout > 0:  # also refuses NaN
            raise ValueError(f"ring_timeout must be positive, not {self.ring_timeout!r}")
        if not isinstance(self.targets, TargetMap):
            object.__setattr__(self, "targets", TargetMap(self.targets))
        for name, number in self.targets.items():
            if not name.strip():
                raise ValueError("a transfer target needs a name")
            if self.allow.fullmatch(number) is None:
                raise ValueError(
                    f"target {name!r} = {number!r} does not match allow {self.allow.pattern!r}"
                )


class TransferRefused(Forbidden):
    """The REFER names nothing the bridge may call: answered with a 403 sipfrag (Forbidden).

    ``target`` is the user part as Retell sent it, for the log line.
    """

    def __init__(self, detail: str, *, target: str) -> None:
        super().__init__(detail)
        self.target = target


# -- Refer-To -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReferTarget:
    """What a ``Refer-To`` names.

    ``user`` is the user part of a sip/sips URI (escapes decoded) or the number of a tel URI
    or of a bare number, as written (visual separators kept: :func:`resolve_target` drops
    them). ``uri`` is None for a bare number. ``headers`` are the X- headers embedded in the
    URI (``?X-Foo=bar``), names and values decoded; other embedded headers are dropped.
    """

    user: str
    uri: Uri | None = None
    display: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def parse_refer_to(value: str) -> ReferTarget:
    """Parse a ``Refer-To`` value (RFC 3515 §2.1) as Retell and others write it.

    Accepts ``name-addr`` (``"Sales" <sip:800@pbx?X-A=1>;p=1``) and the bare forms Retell
    sends: a sip/sips or tel URI without angle brackets (its ``;params`` read as URI
    parameters, a ``?`` header part allowed although RFC 3261 §20.10 would want brackets) or a
    bare number (digits, ``*``, ``#``, one leading ``+``, visual separators, ``;params``
    ignored). Raises :class:`BadRequest` for anything else: no user part, other URI schemes,
    malformed URIs, X- header values holding control characters.
    """
    text = value.strip(" \t")
    if not text:
        raise BadRequest("empty Refer-To")
    if "<" not in text and not text.startswith('"'):
        user, uri, headers = _target_of(text, bracketed=False)
        return ReferTarget(user, uri, None, headers)
    match = _NAME_ADDR_RE.fullmatch(text)
    if match is None:
        raise BadRequest(f"malformed Refer-To {value!r}")
    display = _display_of(match["display"], value)
    tail = match["tail"].strip(" \t")
    if tail:
        # Header parameters after '>' (RFC 3261 §20.10) mean nothing for a transfer target;
        # they only have to be well-formed.
        if not tail.startswith(";"):
            raise BadRequest(f"junk after '>' in Refer-To {value!r}")
        _checked(parse_params, tail, value)
    user, uri, headers = _target_of(match["uri"].strip(" \t"), bracketed=True)
    return ReferTarget(user, uri, display, headers)


def _display_of(text: str, whole: str) -> str | None:
    text = text.strip(" \t")
    if text.startswith('"'):
        return _checked(unquote_string, text, whole)
    return " ".join(text.split()) or None


def _target_of(
    text: str, *, bracketed: bool
) -> tuple[str, Uri | None, tuple[tuple[str, str], ...]]:
    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None:
        number = text.partition(";")[0].strip(" \t")
        if _NUMBER_RE.fullmatch(number.translate(_VISUAL_SEPARATORS)) is None:
            raise BadRequest(f"Refer-To {text!r} is neither a URI nor a number")
        return number, None, ()
    scheme = scheme_match.group()[:-1].lower()
    if scheme in ("sip", "sips"):
        sip = _sip_uri(text, bracketed)
        user = unescape(sip.user) if sip.user is not None else ""
        if not user:
            raise BadRequest(f"Refer-To {text!r} has no user part")
        return user, sip, _x_headers(sip.headers, text)
    if scheme == "tel":
        # RFC 3966 has no header part; one written anyway is read as a sip URI's would be.
        tel_text, qmark, header_text = text.partition("?")
        tel = cast(TelUri, _checked(parse_uri, tel_text, text))  # the scheme says tel
        headers = _x_headers(_split_uri_headers(header_text, text), text) if qmark else ()
        return tel.number, tel, headers
    raise BadRequest(f"Refer-To scheme {scheme!r} is not sip, sips or tel: {text!r}")


def _sip_uri(text: str, bracketed: bool) -> SipUri:
    try:
        uri = parse_uri(text)
    except ParseError as exc:
        if bracketed or ";" not in text:
            raise BadRequest(f"malformed Refer-To URI {text!r}: {exc.detail}") from exc
        # addr-spec form (RFC 3261 §20.10): what follows the first ';' may be header
        # parameters that are no URI parameters (quoted strings, blanks).
        uri_text, _, param_text = text.partition(";")
        uri = _checked(parse_uri, uri_text.rstrip(" \t"), text)
        _checked(parse_params, param_text, text)
    return cast(SipUri, uri)  # parse_uri gives a SipUri for the sip and sips schemes


def _split_uri_headers(text: str, whole: str) -> tuple[tuple[str, str], ...]:
    """``name=value&...`` of a URI's header part (RFC 3261 §19.1.1), kept as written."""
    out: list[tuple[str, str]] = []
    for item in text.split("&"):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise BadRequest(f"bad URI header {item!r} in Refer-To {whole!r}")
        out.append((name, value))
    return tuple(out)


def _x_headers(pairs: tuple[tuple[str, str], ...], whole: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for raw_name, raw_value in pairs:
        name = unescape(raw_name)
        if not name.lower().startswith("x-"):
            continue
        value = unescape(raw_value)
        # Decoded %0D%0A would split the header this value is later copied into.
        if not is_token(name) or _CONTROL_RE.search(value) is not None:
            raise BadRequest(f"bad X- header {name!r} in Refer-To {whole!r}")
        out.append((name, value))
    return tuple(out)


def _checked(parse: Callable[[str], _T], text: str, whole: str) -> _T:
    """``parse(text)``, its :class:`ParseError` turned into :class:`BadRequest` for ``whole``."""
    try:
        return parse(text)
    except ParseError as exc:
        raise BadRequest(f"malformed Refer-To {whole!r}: {exc.detail}") from exc


# -- target rules -------------------------------------------------------------------------------


def resolve_target(config: TransferConfig, user: str) -> str:
    """The PBX number a REFER to ``user`` (a :attr:`ReferTarget.user`) calls.

    ``user`` is looked up among the target names, exactly first, then case-insensitively
    (the first such name in configuration order wins); otherwise it is taken as a number: its
    visual separators (RFC 3966 §5.1.1 ``-``, ``.``, ``(``, ``)``, and blanks) are dropped and
    what is left must be digits, ``*`` and ``#`` with one optional leading ``+``. Either way the
    number must match ``config.allow`` as a whole, the only gate toward the PBX's lines;
    :class:`TransferRefused` (403) otherwise.
    """
    name = user.strip(" \t")
    number = _target_number(config.targets, name)
    if number is None:
        number = name.translate(_VISUAL_SEPARATORS)
        if _NUMBER_RE.fullmatch(number) is None:
            raise TransferRefused(
                f"transfer target {user!r} is neither a configured target nor a number",
                target=user,
            )
    if config.allow.fullmatch(number) is None:
        raise TransferRefused(
            f"transfer target {user!r} ({number}) does not match transfer.allow", target=user
        )
    return number


def _target_number(targets: Mapping[str, str], name: str) -> str | None:
    exact = targets.get(name)
    if exact is not None:
        return exact
    folded = name.casefold()
    for key, number in targets.items():
        if key.casefold() == folded:
            return number
    return None


# -- NOTIFY toward Retell (RFC 3515 §2.4.4-§2.4.7, RFC 3420) -----------------------------------


def sipfrag(status: int, reason: str | None = None) -> bytes:
    """A ``message/sipfrag`` body holding one Status-Line: ``SIP/2.0 200 OK\\r\\n``.

    RFC 3515 §2.4.5: the NOTIFYs of a REFER carry the status of the referred request, at
    least its Status-Line (RFC 3420 §2 allows a start line alone). ``reason`` defaults to the
    project's reason phrase for ``status``.
    """
    if not 100 <= status <= 699:
        raise ValueError(f"not a SIP status: {status!r}")
    phrase = reason_phrase(status) if reason is None else reason
    if any(ch in phrase for ch in "\r\n\x00"):
        raise ValueError(f"reason phrase with a line break: {phrase!r}")
    return f"SIP/2.0 {status} {phrase}\r\n".encode()


def notify_headers(
    final: bool, *, refer_cseq: int | None = None, expires: int = DEFAULT_NOTIFY_EXPIRES
) -> tuple[tuple[str, str], ...]:
    """Event, Subscription-State and Content-Type of a NOTIFY for a REFER (RFC 3515 §2.4.4).

    ``Event: refer`` gets ``;id=<CSeq of the REFER>`` when ``refer_cseq`` is given: RFC 3515
    §2.4.6 asks for it once a dialog has seen more than one REFER. Progress NOTIFYs keep the
    implicit subscription ``active;expires=<expires>``; the final one (a final status in the
    sipfrag) ends it with ``terminated;reason=noresource`` (RFC 3515 §2.4.7, RFC 6665 §4.1.3).
    """
    if refer_cseq is not None and not 0 <= refer_cseq <= _MAX_CSEQ:
        raise ValueError(f"not a CSeq number: {refer_cseq!r}")
    if expires < 0:
        raise ValueError(f"negative expires: {expires!r}")
    event = "refer" if refer_cseq is None else f"refer;id={refer_cseq}"
    state = "terminated;reason=noresource" if final else f"active;expires={expires}"
    return (
        ("Event", event),
        ("Subscription-State", state),
        ("Content-Type", SIPFRAG_CONTENT_TYPE),
    )


def refer_notify(
    status: int,
    reason: str | None = None,
    *,
    refer_cseq: int | None = None,
    expires: int = DEFAULT_NOTIFY_EXPIRES,
) -> tuple[tuple[tuple[str, str], ...], bytes]:
    """Headers and body of the NOTIFY reporting ``status``: final when ``status >= 200``."""
    body = sipfrag(status, reason)
    return notify_headers(status >= 200, refer_cseq=refer_cseq, expires=expires), body


# -- REFER toward 3CX and its NOTIFYs -----------------------------------------------------------


def refer_request_headers(
    number: str, pbx_host: str, extension: str, *, pbx_port: int | None = None
) -> tuple[tuple[str, str], ...]:
    """``Refer-To`` and ``Referred-By`` of the REFER the bridge sends 3CX in ``refer`` mode.

    ``Refer-To: <sip:NUMBER@PBXHOST>`` (3CX's own form for a blind transfer, PEERS.md) and
    ``Referred-By: <sip:EXTENSION@PBXHOST>`` (RFC 3892: the extension sbc registers as).
    ``number`` must already be resolved by :func:`resolve_target`; users are escaped.
    """
    if not number or not extension or not pbx_host:
        raise ValueError("refer_request_headers needs a number, a PBX host and an extension")
    host = f"[{pbx_host}]" if ":" in pbx_host and not pbx_host.startswith("[") else pbx_host
    refer_to = NameAddr(SipUri("sip", _escape_user(number), None, host, pbx_port))
    referred_by = NameAddr(SipUri("sip", _escape_user(extension), None, host))
    return (("Refer-To", str(refer_to)), ("Referred-By", str(referred_by)))


def _escape_user(user: str) -> str:
    return quote(user, safe=_USER_SAFE)


def sipfrag_status(body: bytes | str) -> int | None:
    """The status of a sipfrag body's Status-Line (``SIP/2.0 180 Ringing`` -> 180).

    Tolerant as a relay must be: leading blank lines, a missing reason phrase, lower-case
    ``sip/2.0`` and whatever header fields follow the first line are accepted. A body whose
    first line is no Status-Line (a Request-Line, garbage, nothing) gives None.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    line = text.lstrip("\r\n\t ").split("\n", 1)[0].rstrip("\r\t ")
    match = _STATUS_LINE_RE.fullmatch(line)
    return int(match.group(1)) if match is not None else None


def is_sipfrag(content_type: str | None) -> bool:
    """True for ``message/sipfrag`` with or without parameters (``;version=2.0``), any case."""
    if content_type is None:
        return False
    return content_type.partition(";")[0].strip(" \t").lower() == "message/sipfrag"


@dataclass(frozen=True, slots=True)
class ReferProgress:
    """What a NOTIFY of ``Event: refer`` reports.

    ``status`` is the sipfrag's status (None when the body holds none or is no sipfrag);
    ``terminated`` is ``Subscription-State: terminated``; ``event_id`` the ``id`` parameter
    of the Event header (RFC 3515 §2.4.6).
    """

    status: int | None
    terminated: bool
    event_id: str | None = None

    @property
    def final(self) -> bool:
        """The transfer's outcome is known: a final status, or the subscription has ended."""
        return self.terminated or (self.status is not None and self.status >= 200)


def refer_progress(notify: Request) -> ReferProgress | None:
    """Read a NOTIFY from 3CX about the bridge's REFER; None when it is no ``Event: refer``.

    A body is read as a sipfrag when Content-Type says ``message/sipfrag`` (the ``version``
    parameter optional) or when Content-Type is missing.
    """
    event = notify.headers.get("Event")
    if notify.method != "NOTIFY" or event is None:
        return None
    event_type, semi, param_text = event.partition(";")
    if event_type.strip(" \t").lower() != "refer":
        return None
    event_id: str | None = None
    if semi:
        try:
            params = parse_params(param_text)
        except ParseError:
            params = ()
        event_id = next((v for n, v in params if n.lower() == "id"), None)
    content_type = notify.headers.get("Content-Type")
    status: int | None = None
    if content_type is None or is_sipfrag(content_type):
        status = sipfrag_status(notify.body)
    state = notify.headers.get("Subscription-State") or ""
    terminated = state.partition(";")[0].strip(" \t").lower() == "terminated"
    return ReferProgress(status, terminated, event_id)
