"""Semantic checks of a parsed message, raising the error a UAS answers with (RFC 3261 §8.2).

The parser checks framing only; these functions read the fields an element relies on (Via,
From, To, Call-ID, CSeq, Max-Forwards, Contact, Route...) and raise the :class:`SipError`
whose ``status`` (and ``headers``) the shell turns into the response. The order of the checks
follows RFC 3261 §8.2 (version, then header inspection, Request-URI, extensions, content).

Responses are only checked for being usable (RFC 3261 §18.1.2); whether the top Via's sent-by
is ours (RFC 4475 §3.3.10, broadcast Via) is the transaction layer's decision, since only it
knows the addresses it sent from.
"""

from __future__ import annotations

import re

from sbc.sip.errors import (
    BadExtension,
    BadRequest,
    NotAcceptable,
    ParseError,
    SipError,
    TooManyHops,
    UnsupportedMediaType,
    UnsupportedUriScheme,
    VersionNotSupported,
)
from sbc.sip.fields import is_token, parse_cseq, parse_int_header, parse_via
from sbc.sip.headers import Headers, split_list
from sbc.sip.message import (
    SIP_VERSION,
    Request,
    Response,
    _top_via,
    parse_address,
    parse_address_list,
)
from sbc.sip.uri import SipUri, is_wildcard_contact

DEFAULT_SUPPORTED: frozenset[str] = frozenset({"replaces", "timer"})
DEFAULT_ACCEPT: frozenset[str] = frozenset({"application/sdp"})
DEFAULT_URI_SCHEMES: frozenset[str] = frozenset({"sip", "sips"})

# RFC 3261 §8.1.1: every request carries these (names as written in errors, lookup keys).
_MANDATORY = (
    ("To", "to"),
    ("From", "from"),
    ("Call-ID", "call-id"),
    ("CSeq", "cseq"),
    ("Via", "via"),
)
# RFC 3261 §7.3.1 / RFC 4475 §3.3.8: fields that may appear at most once.
_SINGLE_VALUE = (
    ("From", "from"),
    ("To", "to"),
    ("Call-ID", "call-id"),
    ("CSeq", "cseq"),
    ("Max-Forwards", "max-forwards"),
    ("Content-Length", "content-length"),
    ("Content-Type", "content-type"),
)
# Of those, the ones whose one line must not hold a list either.
_SINGLE_ELEMENT = frozenset({"from", "to", "content-type"})
_ADDRESS_LISTS = ("route", "record-route")
# RFC 3261 §20.17 / RFC 1123: Date uses GMT only (RFC 4475 §3.1.2.12).
_DATE_RE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
# RFC 3261 §8.2.2.3: Require is not checked on these (ACK cannot be answered; CANCEL has none).
_NO_REQUIRE_CHECK = frozenset({"ACK", "CANCEL"})

_MANDATORY_KEYS = frozenset(key for _, key in _MANDATORY)

# What _scan gives: the first field of each name by lookup key, the message's lookup keys and
# fields (for the names that repeat), and whether any name repeats.
_Scanned = tuple[dict[str, tuple[str, str]], tuple[str, ...], tuple[tuple[str, str], ...], bool]


def _scan(headers: Headers) -> _Scanned:
    """The fields by lookup key, built in C from the index the parser made (a Python pass
    over every field made a list per name read, a dozen containers a message, and the
    collector's thresholds count containers). A name that repeats (several Via or
    Record-Route lines) makes the first field of each name be found again."""
    keys = headers._keys or headers._lower_keys()
    items = headers._items
    first = dict(zip(keys, items, strict=True))
    if len(first) == len(keys):
        return first, keys, items, False
    return dict(zip(reversed(keys), reversed(items), strict=True)), keys, items, True


def _lines(scanned: _Scanned, key: str) -> list[str]:
    """Every line of the field ``key``, in order (as written, not split)."""
    first, keys, items, repeated = scanned
    entry = first.get(key)
    if entry is None:
        return []
    if repeated and keys.count(key) > 1:
        return [items[i][1] for i, k in enumerate(keys) if k == key]
    return [entry[1]]


def _check_single_values(scanned: _Scanned, error: type[SipError]) -> None:
    """RFC 3261 §7.3.1: the fields of _SINGLE_VALUE appear once, those of _SINGLE_ELEMENT
    hold one value. Only run when a name repeats or such a field holds a comma: nothing
    fails otherwise."""
    first, keys = scanned[0], scanned[1]
    for name, key in _SINGLE_VALUE:
        entry = first.get(key)
        if entry is None:
            continue
        if keys.count(key) > 1:
            raise error(f"several {name} header fields")
        value = entry[1]
        if key in _SINGLE_ELEMENT and "," in value and len(split_list(value)) > 1:
            raise error(f"several values in {name}")


def _check_common(message: Request | Response, scanned: _Scanned, error: type[SipError]) -> None:
    """Fields shared by requests and responses; ParseError from the field parsers is 400.

    ``scanned`` is ``_scan(message.headers)``. The top Via, From, To and CSeq parsed here are
    remembered in the message's memo for the layers after this one.
    """
    first, keys, _, repeated = scanned
    if not first.keys() >= _MANDATORY_KEYS:
        missing = [name for name, key in _MANDATORY if key not in first]
        raise error(f"missing {missing[0]}")
    from_text = first["from"][1]
    to_text = first["to"][1]
    content_type = first.get("content-type")
    if (
        repeated
        or "," in from_text
        or "," in to_text
        or (content_type is not None and "," in content_type[1])
    ):
        _check_single_values(scanned, error)
    # The accessors' memo (Headers.cached's dictionary) filled here from the lines the scan
    # found: what message.top_via, .from_, .to and .cseq compute on a miss (the first line of
    # each field, parsed), without the four calls of cached() and the accessor helpers and
    # header lookups behind them (about a dozen Python calls a message). A value an earlier
    # layer parsed (the engine's stamped top Via) is kept; a parse that raises leaves nothing.
    headers = message.headers
    cache = headers._cache
    if cache is None:
        cache = headers._cache = {}
    via = first["via"][1]
    if "," not in via and not (repeated and keys.count("via") > 1):
        top = via.strip()
        if not top:
            raise error("empty Via")
        if "top_via" not in cache:
            cache["top_via"] = parse_via(top)
    else:
        vias = headers.values("Via")
        if not vias:
            raise error("empty Via")
        headers.cached("top_via", _top_via)  # parses vias[0] (and remembers it)
        for value in vias[1:]:
            parse_via(value)
    if "from" not in cache:
        cache["from"] = parse_address(from_text)
    if "to" not in cache:
        cache["to"] = parse_address(to_text)
    call_id = first["call-id"][1]
    # RFC 3261 §25.1: callid = word ["@" word]; no whitespace.
    if not call_id or len(call_id.split()) != 1:
        raise error("bad Call-ID")
    if "cseq" not in cache:
        cache["cseq"] = parse_cseq(first["cseq"][1])
    content_length = first.get("content-length")
    if content_length is not None:
        parse_int_header(content_length[1], "Content-Length")
    for key in _ADDRESS_LISTS:
        if key in first:
            for value in _lines(scanned, key):
                parse_address_list(value)


def _media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip(" \t").lower()


# Content-Type texts found well-formed, with their media type: nearly every body a peer sends
# is "application/sdp". Bounded so that hostile input cannot grow it forever.
_MEDIA_TYPES: dict[str, str] = {}


def _valid_media_type(content_type: str) -> str:
    """The media type of a Content-Type value (lower-cased); BadRequest when malformed."""
    known = _MEDIA_TYPES.get(content_type)
    if known is not None:
        return known
    media_type = _media_type(content_type)
    if "/" not in media_type or not all(is_token(p) for p in media_type.split("/")):
        raise BadRequest(f"bad Content-Type {content_type!r}")
    if len(_MEDIA_TYPES) < 256 and len(content_type) <= 128:
        _MEDIA_TYPES[content_type] = media_type
    return media_type


def _accepts(accept_values: list[str], media_type: str) -> bool:
    major = media_type.partition("/")[0]
    for value in accept_values:
        offered = _media_type(value)
        if offered in (media_type, "*/*", f"{major}/*"):
            return True
    return False


def validate_request(
    req: Request,
    *,
    supported: frozenset[str] = DEFAULT_SUPPORTED,
    accept: frozenset[str] = DEFAULT_ACCEPT,
    uri_schemes: frozenset[str] = DEFAULT_URI_SCHEMES,
    allow_zero_max_forwards: bool | frozenset[str] = frozenset({"OPTIONS", "REGISTER"}),
    require_max_forwards: bool = True,
    check_proxy_require: bool = False,
    check_date: bool = True,
) -> None:
    """Raise the SipError a UAS answers ``req`` with, or return when it may be processed.

    ``supported``: option tags this element implements (Require check, 420 + Unsupported).
    ``accept``: body media types understood (415 + Accept). ``uri_schemes``: Request-URI
    schemes served (416). ``allow_zero_max_forwards``: True processes Max-Forwards 0 (a pure
    UAS may, RFC 4475 §3.3.11), False answers it 483, a set of methods processes it for those
    only (default OPTIONS and REGISTER, which the element answers itself, RFC 3261 §16.3).
    ``require_max_forwards``: RFC 3261 §8.1.1 makes Max-Forwards mandatory, RFC 2543 peers
    omit it (RFC 4475 §3.4.1). ``check_proxy_require``: also refuse unknown Proxy-Require
    tags (a proxy's duty, RFC 3261 §16.3; a B2BUA is a UAS and may ignore them).
    ``check_date``: refuse a Date not in RFC 1123 GMT form (RFC 4475 §3.1.2.12); an element
    that never reads Date may skip it.

    ACK cannot be answered (RFC 3261 §17.2.3): the caller drops an ACK that fails here.
    """
    headers = req.headers
    # RFC 3261 §8.2 and RFC 4475 §3.1.2.16: an unknown version is answered 505 first.
    if req.version != SIP_VERSION:
        raise VersionNotSupported(f"SIP version {req.version} not supported")
    method = req.method
    scanned = _scan(headers)
    first = scanned[0]
    try:
        _check_common(req, scanned, BadRequest)
        max_forwards_field = first.get("max-forwards")
        if max_forwards_field is None:
            if require_max_forwards:
                raise BadRequest("missing Max-Forwards")
            max_forwards = None
        else:
            max_forwards = parse_int_header(max_forwards_field[1], "Max-Forwards", 255)
        cseq = req.cseq
        expires = first.get("expires")
        if expires is not None:
            parse_int_header(expires[1], "Expires")
        if check_date and "date" in first:
            date = first["date"][1]
            if _DATE_RE.fullmatch(date) is None:
                raise BadRequest(f"bad Date {date!r}")
        contacts = _lines(scanned, "contact") if "contact" in first else ()
        for value in contacts:
            if is_wildcard_contact(value):
                # RFC 3261 §10.3 step 6: '*' only in REGISTER, alone, with Expires: 0.
                if method != "REGISTER" or len(contacts) != 1:
                    raise BadRequest("Contact: * outside a REGISTER")
                continue
            for contact in parse_address_list(value):
                contact_expires = contact.param("expires")
                if contact_expires is not None:
                    parse_int_header(contact_expires, "Contact expires")
    except ParseError as exc:
        raise BadRequest(exc.detail) from exc
    # RFC 3261 §8.1.1.5 / RFC 4475 §3.1.2.17: the CSeq method matches the request method.
    if cseq.method != method:
        raise BadRequest(f"CSeq method {cseq.method} does not match {method}")
    # RFC 3261 §8.2.2.1: unknown Request-URI scheme is 416.
    uri = req.uri
    scheme = uri.scheme
    if scheme not in uri_schemes:
        raise UnsupportedUriScheme(f"Request-URI scheme {scheme!r} not supported")
    # RFC 3261 §19.1.5: header components are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
    if isinstance(uri, SipUri) and uri.headers:
        raise BadRequest("header components in the Request-URI")
    # RFC 3261 §16.3 step 3 (applied by a B2BUA before forwarding).
    if max_forwards == 0:
        if isinstance(allow_zero_max_forwards, bool):
            allowed = allow_zero_max_forwards
        else:
            allowed = method in allow_zero_max_forwards
        if not allowed:
            raise TooManyHops("Max-Forwards is 0")
    # RFC 3261 §8.2.2.3: option tags in Require that this element does not support.
    if method not in _NO_REQUIRE_CHECK:
        names = ("require", "proxy-require") if check_proxy_require else ("require",)
        wanted = [
            tag
            for name in names
            if name in first
            for line in _lines(scanned, name)
            for tag in split_list(line)
        ]
        if wanted:
            known = {tag.lower() for tag in supported}
            unsupported = [tag for tag in wanted if tag.lower() not in known]
            if unsupported:
                raise BadExtension(
                    "unsupported extensions: " + ", ".join(unsupported),
                    headers=(("Unsupported", ", ".join(unsupported)),),
                )
    if req.body or method == "INVITE":
        _check_content(req, accept)


def _accept_header(accept: frozenset[str]) -> tuple[tuple[str, str]]:
    return (("Accept", ", ".join(sorted(accept))),)


def _check_content(req: Request, accept: frozenset[str]) -> None:
    headers = req.headers
    if req.body:
        content_type = headers.get("Content-Type")
        # RFC 3261 §20.15: a body MUST come with its Content-Type.
        if content_type is None:
            raise BadRequest("body without Content-Type")
        media_type = _valid_media_type(content_type)
        # RFC 3261 §8.2.3: unsupported body type is 415 with Accept.
        if media_type not in accept and media_type not in {a.lower() for a in accept}:
            raise UnsupportedMediaType(
                f"Content-Type {media_type} not accepted", headers=_accept_header(accept)
            )
        for encoding in headers.values("Content-Encoding"):
            if encoding.lower() != "identity":
                raise UnsupportedMediaType(
                    f"Content-Encoding {encoding} not supported",
                    headers=(*_accept_header(accept), ("Accept-Encoding", "identity")),
                )
    # RFC 3261 §20.1 / RFC 4475 §3.3.15: the answer to an INVITE carries SDP; an Accept that
    # rules it out cannot be satisfied.
    if req.method == "INVITE" and "Accept" in headers:
        accepted = headers.values("Accept")
        if accepted and not _accepts(accepted, "application/sdp"):
            raise NotAcceptable(
                "Accept does not allow application/sdp", headers=_accept_header(accept)
            )


def validate_response(resp: Response) -> None:
    """Raise :class:`ParseError` when ``resp`` must be dropped (RFC 3261 §18.1.2).

    Covers a version other than 2.0, missing or repeated single-value fields and malformed
    Via/From/To/CSeq (RFC 4475 §3.1.2.5). The sent-by check of the top Via (RFC 4475 §3.3.10)
    is left to the transaction layer.
    """
    if resp.version != SIP_VERSION:
        raise ParseError(f"response with SIP version {resp.version}")
    _check_common(resp, _scan(resp.headers), ParseError)
