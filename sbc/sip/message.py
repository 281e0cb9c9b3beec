"""SIP requests and responses (RFC 3261 §7) as frozen values.

Header values stay text until asked for: the accessors below (``vias``, ``cseq``, ``from_``...)
parse on first use and remember the result on the message's immutable ``Headers``. A B2BUA reads
a handful of fields of each message, so parsing all of them up front would cost more than it
saves; building a changed message is ``dataclasses.replace``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

from sbc.sip.errors import BadRequest, ParseError
from sbc.sip.fields import CSeq, Via, parse_cseq, parse_via
from sbc.sip.headers import Headers, split_list
from sbc.sip.quickinit import quick_init, quick_maker
from sbc.sip.uri import NameAddr, Uri, make_name_addr, parse_name_addr, parse_name_addr_list

SIP_VERSION = "SIP/2.0"

# RFC 3261 §21: default reason phrases for the status codes this project sends or logs.
REASONS: dict[int, str] = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    204: "No Notification",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    422: "Session Interval Too Small",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}


def reason_phrase(status: int) -> str:
    """The default reason phrase for ``status`` (class default when the code is unknown)."""
    if status in REASONS:
        return REASONS[status]
    return REASONS.get((status // 100) * 100, "Unknown")


# The values these parse recur from message to message: the To and Contact of every OPTIONS a
# peer sends, the From, To and Contact of every request in a dialog, the Request-URI of a peer.
# Their results are immutable, so a bounded memo by text gives the same values, shared; a text
# that does not parse raises every time (lru_cache keeps no exceptions).


_parse_address_text = lru_cache(maxsize=1024)(parse_name_addr)
# RFC 3261 §19.3: tag = token.
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")


def parse_address(text: str) -> NameAddr:
    """:func:`~sbc.sip.uri.parse_name_addr`, remembering the last 1024 texts.

    A From changes from call to call by its tag only: a value ending in ``;tag=<token>`` is
    parsed as the memoised text before the tag with the tag parameter appended, which is
    what parsing the whole value gives (the tag is the last header parameter either way). A
    quoted display name is split off first, so that the memo is by the ``<URI>`` text: 3CX
    puts the caller's number or name in the display name of its From, which then differs
    from call to call.
    """
    i = text.rfind(";tag=")
    if i >= 0:
        # The last ";tag=" ends the value with a token, or no ";tag=<token>" does: every
        # ";tag=" before it is followed by a ';', which no token holds.
        tag = text[i + 5 :]
        if tag and ((tag.isascii() and tag.isalnum()) or _TOKEN.fullmatch(tag) is not None):
            head = text[:i]
            display = None
            if head[:1] == '"':
                # Without a backslash, the first quote after the opening one closes the
                # display name and the name is the text between them (RFC 3261 §25.1
                # quoted-string). Inline rather than a helper: 3CX's From and To, five a call.
                close = head.find('"', 1)
                if close > 0 and "\\" not in head[1:close]:
                    rest = head[close + 1 :].lstrip(" \t")
                    if rest[:1] == "<":
                        display = head[1:close]
                        head = rest
            try:
                base = _parse_address_text(head)
            except ParseError:
                return _parse_address_text(text)
            params = base.params
            return make_name_addr(
                base.uri,
                base.display if display is None else display,
                (*params, ("tag", tag)) if params else (("tag", tag),),
            )
    return _parse_address_text(text)


@lru_cache(maxsize=256)
def parse_address_list(text: str) -> tuple[NameAddr, ...]:
    """:func:`~sbc.sip.uri.parse_name_addr_list` as a tuple, remembering the last 256 texts."""
    return tuple(parse_name_addr_list(text))


def _cseq(headers: Headers) -> CSeq:
    value = headers.get("CSeq")
    if value is None:
        raise BadRequest("missing CSeq")
    return parse_cseq(value)


def _vias(headers: Headers) -> tuple[Via, ...]:
    return tuple(parse_via(v) for v in headers.values("Via"))


def _top_via(headers: Headers) -> Via:
    keys = headers._keys or headers._lower_keys()
    if "via" in keys:
        first = headers._items[keys.index("via")][1]
        if "," not in first:
            # One element on the first Via line (every message but a proxied request's):
            # what split_list gives for it, without the list.
            stripped = first.strip()
            if stripped:
                return parse_via(stripped)
    return _top_via_of_lines(headers)


def _top_via_of_lines(headers: Headers) -> Via:
    lines = headers.get_all("Via")
    if lines:
        # Usually the first line holds the top Via; only an empty first line needs them all.
        first = split_list(lines[0])
        if first:
            return parse_via(first[0])
    values = headers.values("Via")
    if not values:
        raise BadRequest("missing Via")
    return parse_via(values[0])


def _from(headers: Headers) -> NameAddr:
    value = headers.get("From")
    if value is None:
        raise BadRequest("missing From")
    return parse_address(value)


def _to(headers: Headers) -> NameAddr:
    value = headers.get("To")
    if value is None:
        raise BadRequest("missing To")
    return parse_address(value)


class _Common:
    """Accessors shared by requests and responses; subclasses provide ``headers``.

    Parsed values are memoised on the (immutable) ``headers`` with :meth:`Headers.cached`, so
    the transport, the validator, the transaction layer and the TU parse the top Via, CSeq,
    From and To of a message once between them; errors are raised again on every access.
    """

    __slots__ = ()
    headers: Headers

    @property
    def call_id(self) -> str:
        # Headers.get("Call-ID") inline (ten reads a call: the call layer, dialogs): the
        # lookup keys read directly, a Python call less each.
        headers = self.headers
        keys = headers._keys or headers._lower_keys()
        if "call-id" in keys:
            return headers._items[keys.index("call-id")][1]
        raise BadRequest("missing Call-ID")

    # A memo hit is read here rather than through Headers.cached: each of these is read
    # several times per message (validation, transaction layer, dialogs), and a hit then
    # costs one call instead of two.
    @property
    def cseq(self) -> CSeq:
        cache = self.headers._cache
        if cache is not None and "cseq" in cache:
            return cache["cseq"]  # type: ignore[return-value]
        return self.headers.cached("cseq", _cseq)

    @property
    def vias(self) -> list[Via]:
        return list(self.headers.cached("vias", _vias))

    @property
    def top_via(self) -> Via:
        cache = self.headers._cache
        if cache is not None and "top_via" in cache:
            return cache["top_via"]  # type: ignore[return-value]
        return self.headers.cached("top_via", _top_via)

    @property
    def from_(self) -> NameAddr:
        cache = self.headers._cache
        if cache is not None and "from" in cache:
            return cache["from"]  # type: ignore[return-value]
        return self.headers.cached("from", _from)

    @property
    def to(self) -> NameAddr:
        cache = self.headers._cache
        if cache is not None and "to" in cache:
            return cache["to"]  # type: ignore[return-value]
        return self.headers.cached("to", _to)

    # The tags through one helper reading the memo and the tag parameter (the To tag is read
    # fourteen times a call: transactions, dialogs, the call manager): a Python call less each
    # than self.to.tag's property and NameAddr.tag. Inlining _tag into both properties again
    # saves one more call a read (~0.3 % of a call's instructions, round 6's review) for two
    # copies of the same logic: kept as one.
    @property
    def from_tag(self) -> str | None:
        return _tag(self.headers, "from", _from)

    @property
    def to_tag(self) -> str | None:
        return _tag(self.headers, "to", _to)


def _tag(headers: Headers, key: str, parse: Callable[[Headers], NameAddr]) -> str | None:
    """The tag parameter of the From or To (``key``), as ``NameAddr.tag`` reads it."""
    cache = headers._cache
    if cache is not None and key in cache:
        address: NameAddr = cache[key]  # type: ignore[assignment]
    else:
        address = headers.cached(key, parse)
    for name, value in address.params:
        if name == "tag" or name.lower() == "tag":
            return value
    return None


@quick_init
@dataclass(frozen=True, slots=True)
class Request(_Common):
    method: str
    uri: Uri
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION


@quick_init
@dataclass(frozen=True, slots=True)
class Response(_Common):
    status: int
    reason: str = ""
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""
    version: str = SIP_VERSION

    @property
    def is_provisional(self) -> bool:
        return self.status < 200

    @property
    def is_final(self) -> bool:
        return self.status >= 200


Message = Request | Response

# Request(...) and Response(...) with every field given, for the messages parsed and built on
# every call (see quick_maker).
make_request: Callable[[str, Uri, Headers, bytes, str], Request] = quick_maker(Request)
make_response: Callable[[int, str, Headers, bytes, str], Response] = quick_maker(Response)


_VIA_CACHE_KEYS = frozenset(("top_via", "vias"))  # what Headers.cached holds of the Via fields


def with_top_via(request: Request, text: str, parsed: Via | None = None) -> Request:
    """``request`` with its top Via element replaced by ``text`` (RFC 3261 §18.2.1 stamping).

    The old element goes as :meth:`Headers.remove_first` drops it and ``text`` is pushed as
    :meth:`Headers.prepend` pushes it. ``parsed``, when the caller already has it, must equal
    ``parse_via(text)``: it is remembered as the new message's ``top_via`` so that ``text`` is
    not parsed again.
    """
    old = request.headers
    keys = old._keys or old._lower_keys()
    i = keys.index("via") if "via" in keys else -1
    items = old._items
    if i >= 0 and "," not in items[i][1]:
        # The usual case, a line of one element: the fields remove_first() and prepend()
        # make (before the next Via line, else at the top), without their name lookups.
        rest, rest_keys = (*items[:i], *items[i + 1 :]), (*keys[:i], *keys[i + 1 :])
        j = rest_keys.index("via") if "via" in rest_keys else 0
        headers = Headers._trusted(
            (*rest[:j], ("Via", text), *rest[j:]), (*rest_keys[:j], "via", *rest_keys[j:])
        )
    else:
        headers = old.remove_first("Via").prepend("Via", text)
    # The fields other than Via are the same objects: what was parsed of them (To, From, CSeq:
    # the edge guard reads the To tag before stamping) stays parsed.
    kept = old._cache
    if kept:
        headers._cache = {k: v for k, v in kept.items() if k not in _VIA_CACHE_KEYS}
    if parsed is not None:
        # Written into the memo directly (what cached() would store): no lambda made and
        # called for every request received (the engine stamps each one).
        cache = headers._cache
        if cache is None:
            headers._cache = {"top_via": parsed}
        else:
            cache["top_via"] = parsed
    return make_request(request.method, request.uri, headers, request.body, request.version)
