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

# RFC 3261 §8.1.1: every request carries these.
_MANDATORY = ("To", "From", "Call-ID", "CSeq", "Via")
# RFC 3261 §7.3.1 / RFC 4475 §3.3.8: fields that may appear at most once.
_SINGLE_VALUE = (
    "From",
    "To",
    "Call-ID",
    "CSeq",
    "Max-Forwards",
    "Content-Length",
    "Content-Type",
)
# Of those, the ones whose one line must not hold a list either.
_SINGLE_ELEMENT = frozenset({"From", "To", "Content-Type"})
_ADDRESS_LISTS = ("Route", "Record-Route")
# RFC 3261 §20.17 / RFC 1123: Date uses GMT only (RFC 4475 §3.1.2.12).
_DATE_RE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)
# RFC 3261 §8.2.2.3: Require is not checked on these (ACK cannot be answered; CANCEL has none).
_NO_REQUIRE_CHECK = frozenset({"ACK", "CANCEL"})
# The fields read below, by their canonical spelling (the one Headers stores them under).
_READ = frozenset(
    {
        *_MANDATORY,
        *_SINGLE_VALUE,
        *_ADDRESS_LISTS,
        "Contact",
        "Date",
        "Expires",
        "Proxy-Require",
        "Require",
    }
)


_MANDATORY_SET = frozenset(_MANDATORY)
_SINGLE_VALUE_SET = frozenset(_SINGLE_VALUE)


def _scan(headers: Headers) -> tuple[dict[str, list[str]], bool]:
    """The lines of the fields in ``_READ``, by name, in one pass over the fields, and
    whether a single-value field may be repeated or hold a list (see _check_single_values)."""
    lines: dict[str, list[str]] = {}
    suspect = False
    for name, value in headers._items:  # what items() returns, without the call
        if name in _READ:
            seen = lines.get(name)
            if seen is None:
                lines[name] = [value]
                if "," in value and name in _SINGLE_ELEMENT:
                    suspect = True
            else:
                seen.append(value)
                if name in _SINGLE_VALUE_SET:
                    suspect = True
    return lines, suspect


def _check_single_values(lines: dict[str, list[str]], error: type[SipError]) -> None:
    """RFC 3261 §7.3.1: the fields of _SINGLE_VALUE appear once, those of _SINGLE_ELEMENT
    hold one value. Only run when _scan saw a repeat or a comma: nothing fails otherwise."""
    for name in _SINGLE_VALUE:
        values = lines.get(name)
        if values is None:
            continue
        if len(values) > 1:
            raise error(f"several {name} header fields")
        if name in _SINGLE_ELEMENT and "," in values[0] and len(split_list(values[0])) > 1:
            raise error(f"several values in {name}")


def _check_common(
    message: Request | Response,
    scanned: tuple[dict[str, list[str]], bool],
    error: type[SipError],
) -> None:
    """Fields shared by requests and responses; ParseError from the field parsers is 400.

    ``scanned`` is ``_scan(message.headers)``. The top Via, From, To and CSeq are read
    through the message's accessors, which remember what they parsed for the layers after
    this one.
    """
    lines, suspect = scanned
    if not lines.keys() >= _MANDATORY_SET:
        missing = [name for name in _MANDATORY if name not in lines]
        raise error(f"missing {missing[0]}")
    if suspect:
        _check_single_values(lines, error)
    # The accessors' memo (Headers.cached's dictionary) filled here from the lines the scan
    # found: what message.top_via, .from_, .to and .cseq compute on a miss (the first line of
    # each field, parsed), without the four calls of cached() and the accessor helpers and
    # header lookups behind them (about a dozen Python calls a message). A value an earlier
    # layer parsed (the engine's stamped top Via) is kept; a parse that raises leaves nothing.
    headers = message.headers
    cache = headers._cache
    if cache is None:
        cache = headers._cache = {}
    via_lines = lines["Via"]
    if len(via_lines) == 1 and "," not in via_lines[0]:
        top = via_lines[0].strip()
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
        cache["from"] = parse_address(lines["From"][0])
    if "to" not in cache:
        cache["to"] = parse_address(lines["To"][0])
    call_id = lines["Call-ID"][0]
    # RFC 3261 §25.1: callid = word ["@" word]; no whitespace.
    if not call_id or len(call_id.split()) != 1:
        raise error("bad Call-ID")
    if "cseq" not in cache:
        cache["cseq"] = parse_cseq(lines["CSeq"][0])
    content_length = lines.get("Content-Length")
    if content_length is not None:
        parse_int_header(content_length[0], "Content-Length")
    for name in _ADDRESS_LISTS:
        for value in lines.get(name, ()):
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
    lines = scanned[0]
    try:
        _check_common(req, scanned, BadRequest)
        max_forwards_lines = lines.get("Max-Forwards")
        if max_forwards_lines is None:
            if require_max_forwards:
                raise BadRequest("missing Max-Forwards")
            max_forwards = None
        else:
            max_forwards = parse_int_header(max_forwards_lines[0], "Max-Forwards", 255)
        cseq = req.cseq
        expires = lines.get("Expires")
        if expires is not None:
            parse_int_header(expires[0], "Expires")
        if check_date and "Date" in lines:
            date = lines["Date"][0]
            if _DATE_RE.fullmatch(date) is None:
                raise BadRequest(f"bad Date {date!r}")
        contacts = lines.get("Contact", ())
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
        names = ("Require", "Proxy-Require") if check_proxy_require else ("Require",)
        wanted = [tag for name in names for line in lines.get(name, ()) for tag in split_list(line)]
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
