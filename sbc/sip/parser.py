"""Bytes to :class:`Request` / :class:`Response` (RFC 3261 §7, §18.3), without I/O.

:func:`parse_message` takes one UDP datagram; :class:`StreamParser` frames messages out of a
TCP or TLS byte stream by Content-Length. Only the start line (and the Request-URI) and the
header framing are checked here; header values stay text, interpreted on demand by the
accessors of :mod:`sbc.sip.message` and checked as a whole by :mod:`sbc.sip.validate`.

Errors: malformed input raises :class:`ParseError` (400) and nothing else. A request whose
SIP version is well-formed but not 2.0 parses (``Request.version`` holds it) so that the caller
can answer it; :func:`sbc.sip.validate.validate_request` then raises ``VersionNotSupported``
(505, RFC 4475 §3.1.2.16). Requests that frame correctly but carry malformed or semantically
wrong fields (a bad From, a CSeq overflow, a missing Call-ID...) also parse, so that the shell
holds a Request to answer 400 to; ``validate_request`` finds them.
A ``SIP/...`` start line that is not a valid version is malformed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from sbc.sip.errors import LimitExceeded, MessageTooLarge, ParseError
from sbc.sip.fields import COMMON_METHODS, parse_int_header
from sbc.sip.headers import Headers, canonical_name
from sbc.sip.message import SIP_VERSION, Request, Response, make_request, make_response
from sbc.sip.uri import Uri, parse_uri

Message = Request | Response

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_VERSION_RE = re.compile(r"SIP/[0-9]+\.[0-9]+", re.IGNORECASE)
_CRLF = b"\r\n"
_END_OF_HEAD = b"\r\n\r\n"

DEFAULT_MAX_MESSAGE_SIZE = 16384


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Parse-time limits against hostile messages (the sanity checks of Kamailio's kind).

    ``max_headers`` counts the lines of the header block (continuation lines included: the
    work is per line), ``max_via`` the Via entries (a field with commas holds several),
    ``max_uri_length`` the characters of the Request-URI. Over any of them the parser raises
    :class:`LimitExceeded` (a :class:`ParseError`) naming the limit. The defaults leave room
    for every well-formed RFC 4475 message (``longreq`` has 30 Via entries).
    """

    max_headers: int = 128
    max_via: int = 64
    max_uri_length: int = 1024


DEFAULT_LIMITS = ParseLimits()


class StreamMessageTooLarge(MessageTooLarge):
    """A stream message over the size limit whose head parsed: ``message`` is that head (with
    an empty body), so that the transport can answer a request 513 before it closes."""

    def __init__(self, detail: str = "", *, message: Request | Response | None = None) -> None:
        super().__init__(detail)
        self.message = message


# A peer sends many requests to the same Request-URI (every OPTIONS ping, every request of a
# dialog); the parsed URI is immutable, so a bounded memo by text shares it between them.
_parse_request_uri = lru_cache(maxsize=1024)(parse_uri)

# Raw header names as written (before the colon, trailing LWS included) mapped to their
# canonical spelling and its lower-cased lookup key (what ``Headers`` indexes by) once
# validated. Bounded so that hostile input cannot grow it forever.
_NAME_CACHE: dict[str, tuple[str, str]] = {}
_NAME_CACHE_LIMIT = 1024


# Whole header lines already read, with the field they gave and its lookup key: most lines of
# a peer's messages repeat verbatim from message to message (Max-Forwards, Allow, Supported,
# Contact, Content-Type, User-Agent, the CSeq of a dialog's requests...), and one dict lookup
# of the line replaces its partition, name lookup, strip and pair (the head loop was the
# largest self time in the core). The fields that carry a value of their own in every message
# (Via branch, From and To tags, Call-ID) are not remembered: they would only push the
# repeating lines out. Bounded by count and line length; emptied when full, so that lines
# unique to a message (a caller's number, a peer's call id in an X- header) cannot keep the
# repeating ones out for long: those come back with the next message that carries them. At
# most 512 lines of 160 characters, their fields and keys: about 150 KiB at worst (a peer's
# repeating lines are a few dozen; 3,000 bench_core calls leave 20 entries, 8 KiB).
_LINES: dict[str, tuple[tuple[str, str], str]] = {}
_LINES_LIMIT = 512
_LINE_MAX = 160
_NOT_REMEMBERED = frozenset({"via", "from", "to", "call-id"})


def _header_name(raw: str) -> tuple[str, str]:
    """Canonical name and lookup key for a raw name not in ``_NAME_CACHE`` yet."""
    # RFC 3261 §7.3.1: LWS is allowed between the field name and the colon.
    name = raw.rstrip(" \t")
    if _TOKEN_RE.fullmatch(name) is None:
        raise ParseError(f"bad header field name {raw!r}")
    canonical = canonical_name(name)
    entry = (canonical, canonical.lower())
    if len(_NAME_CACHE) < _NAME_CACHE_LIMIT:
        _NAME_CACHE[raw] = entry
    return entry


def _version(text: str) -> str:
    """A version other than "SIP/2.0" (callers test for that first), checked."""
    if _VERSION_RE.fullmatch(text) is None:
        raise ParseError(f"bad SIP version {text!r}")
    return text.upper()


class _Head:
    """A parsed start line and header block, waiting for its body."""

    __slots__ = (
        "content_lengths",
        "items",
        "keys",
        "method",
        "reason",
        "status",
        "uri",
        "version",
    )

    def __init__(self, text: str, limits: ParseLimits = DEFAULT_LIMITS) -> None:
        # RFC 3261 §7: lines end in CRLF; a bare CR or LF is malformed (and an injection risk).
        # The lines split at CRLF are needed anyway; a CR or LF left in one of them is a
        # bare one. Looked for in the lines joined: str.count walks a string a character at a
        # time (about 3.5k instructions for each count of a 700-character head), while the
        # join copies it with memcpy and "in" finds a character with memchr, several times
        # less for the two checks. The head is at most the message size limit, so the split
        # of one with too many lines costs no more than the split of any other.
        lines = text.split("\r\n")
        joined = "".join(lines)
        if "\n" in joined or "\r" in joined:
            raise ParseError("bare CR or LF in the header block")
        n_crlf = len(lines) - 1
        if n_crlf > limits.max_headers:
            raise LimitExceeded(f"{n_crlf} header lines", limit="headers")
        start = lines[0]
        self.method: str = ""
        self.uri: Uri | None = None
        self.status: int = 0
        self.reason: str = ""
        self.version: str
        if start[:4].upper() == "SIP/":
            # RFC 3261 §7.2: Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
            parts = start.split(" ", 2)
            if len(parts) < 2:
                raise ParseError(f"bad status line {start!r}")
            version = parts[0]
            self.version = version if version == SIP_VERSION else _version(version)
            code = parts[1]
            # RFC 3261 §21: status codes run from 100 to 699 (RFC 4475 §3.1.2.19).
            if len(code) != 3 or not (code.isascii() and code.isdigit()) or code[0] not in "123456":
                raise ParseError(f"bad status code in {start!r}")
            self.status = int(code)
            self.reason = parts[2] if len(parts) == 3 else ""
        else:
            # RFC 3261 §7.1: Request-Line = Method SP Request-URI SP SIP-Version CRLF, with
            # exactly one SP between elements (RFC 4475 §3.1.2.8-§3.1.2.10).
            parts = start.split(" ")
            if len(parts) != 3:
                raise ParseError(f"bad request line {start!r}")
            method, uri_text, version = parts
            if len(uri_text) > limits.max_uri_length:
                raise LimitExceeded(f"Request-URI of {len(uri_text)} characters", limit="uri")
            if method not in COMMON_METHODS and _TOKEN_RE.fullmatch(method) is None:
                raise ParseError(f"bad method in {start!r}")
            self.method = method
            self.version = version if version == SIP_VERSION else _version(version)
            self.uri = _parse_request_uri(uri_text)
        items: list[tuple[str, str]] = []
        keys: list[str] = []
        names = _NAME_CACHE
        remembered = _LINES
        seen = remembered.get
        append, add_key = items.append, keys.append
        try:
            # Lines that continue a field (RFC 3261 §7.3.1) are rare: this loop does not look
            # for them. Such a line starts with LWS, so it has no colon or a name that is not
            # a token (never in the name cache): it raises, and the fields are read again by
            # the loop that joins continuation lines.
            for line in lines[1:]:
                known = seen(line)
                if known is not None:
                    item, key = known
                else:
                    raw, colon, value = line.partition(":")
                    if not colon:
                        raise ParseError(f"header line without colon: {line[:40]!r}")
                    name, key = names.get(raw) or _header_name(raw)
                    item = (name, value.strip(" \t"))
                    if len(line) <= _LINE_MAX and key not in _NOT_REMEMBERED:
                        if len(remembered) >= _LINES_LIMIT:
                            remembered.clear()
                        remembered[line] = (item, key)
                append(item)
                add_key(key)
        except ParseError:
            if "\r\n " not in text and "\r\n\t" not in text:
                raise
            items.clear()
            keys.clear()
            self._folded_fields(lines, items, keys)
        # Via entries are counted only when there may be more than one: commas separate
        # entries; one inside a quoted Via parameter over-counts, which only matters for a
        # message already at the limit.
        n_via = keys.count("via")
        if n_via:
            first_via = items[keys.index("via")][1]
            if n_via > 1 or "," in first_via or limits.max_via < 1:
                vias = sum(1 + value.count(",") for name, value in items if name == "Via")
                if vias > limits.max_via:
                    raise LimitExceeded(f"{vias} Via entries", limit="via")
        self.items = tuple(items)
        # The lookup keys, so that the message's Headers need not lower-case every name again.
        self.keys = tuple(keys)
        n = keys.count("content-length")
        if n == 1:
            self.content_lengths = [items[keys.index("content-length")][1]]
        else:
            self.content_lengths = [value for name, value in items if name == "Content-Length"]

    @staticmethod
    def _folded_fields(lines: list[str], items: list[tuple[str, str]], keys: list[str]) -> None:
        """The header fields of ``lines`` (after the start line) into ``items`` and ``keys``,
        continuation lines joined to the field they continue."""
        names = _NAME_CACHE
        for line in lines[1:]:
            first = line[:1]
            if first == " " or first == "\t":
                # RFC 3261 §7.3.1: a line starting with LWS continues the previous field;
                # the fold is replaced by a single space.
                if not items:
                    raise ParseError("continuation line before the first header field")
                name, value = items[-1]
                more = line.strip(" \t")
                items[-1] = (name, f"{value} {more}" if value and more else value or more)
                continue
            raw, colon, value = line.partition(":")
            if not colon:
                raise ParseError(f"header line without colon: {line[:40]!r}")
            name, key = names.get(raw) or _header_name(raw)
            items.append((name, value.strip(" \t")))
            keys.append(key)

    def body_length(self) -> int | None:
        """The declared body length; None when no Content-Length was given.

        Several Content-Length fields that agree count as one; disagreeing ones raise (a
        stream cannot be framed; for UDP the caller falls back, see :func:`parse_message`).
        """
        values = self.content_lengths
        if not values:
            return None
        first = parse_int_header(values[0], "Content-Length")
        for other in values[1:]:
            if parse_int_header(other, "Content-Length") != first:
                raise ParseError("conflicting Content-Length values")
        return first

    def build(self, body: bytes) -> Message:
        headers = Headers._trusted(self.items, self.keys)
        if self.uri is not None:
            return make_request(self.method, self.uri, headers, body, self.version)
        return make_response(self.status, self.reason, headers, body, self.version)


def _decode(head: bytes | bytearray) -> str:
    # RFC 3261 §7.3.1: header values are UTF-8; undecodable octets survive a round trip.
    return head.decode("utf-8", "surrogateescape")


def parse_message(data: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> Message:
    """Parse one UDP datagram into a Request or Response.

    Leading CRLFs are skipped (RFC 3261 §7.5). The body is exactly Content-Length octets;
    octets beyond it are ignored (RFC 3261 §18.3, RFC 4475 §3.1.1.8). Without Content-Length,
    or with several that disagree (left to :mod:`sbc.sip.validate` to answer 400, RFC 4475
    §3.3.9), the body is the rest of the datagram. A Content-Length larger than the datagram
    is malformed (RFC 3261 §18.3, RFC 4475 §3.1.2.2).
    """
    start = 0
    while data.startswith(_CRLF, start):
        start += 2
    end = data.find(_END_OF_HEAD, start)
    if end < 0:
        raise ParseError("no empty line after the header fields")
    head = _Head(_decode(data[start:end]), limits)
    body_start = end + 4
    try:
        length = head.body_length()
    except ParseError:
        if len(head.content_lengths) < 2:
            raise
        length = None
        for value in head.content_lengths:
            parse_int_header(value, "Content-Length")
    if length is None:
        return head.build(data[body_start:])
    if body_start + length > len(data):
        raise ParseError("Content-Length larger than the datagram")
    return head.build(data[body_start : body_start + length])


class StreamParser:
    """Frames SIP messages out of a TCP/TLS byte stream (RFC 3261 §18.3).

    :meth:`feed` accepts any chunking and returns the messages completed by that chunk.
    Content-Length is mandatory on streams; a message larger than ``max_message_size`` raises
    :class:`MessageTooLarge` (513; :class:`StreamMessageTooLarge` with the head when the head
    parsed and only the declared body makes it too large), and one over ``limits`` raises
    :class:`LimitExceeded`. CRLFs between messages are skipped; each double CRLF is a
    keep-alive ping (RFC 5626 §4.4.1) that the transport answers with a single CRLF pong: see
    :attr:`pings_received` and :meth:`take_pongs`.

    After :meth:`feed` raised (ParseError or MessageTooLarge) the stream cannot be resynchronised
    and every further call raises again: the transport must close the connection.
    """

    __slots__ = (
        "_broken",
        "_buf",
        "_crlf_run",
        "_head",
        "_head_end",
        "_pongs_due",
        "_scan_from",
        "_total",
        "limits",
        "max_message_size",
        "pings_received",
    )

    def __init__(
        self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, limits: ParseLimits = DEFAULT_LIMITS
    ) -> None:
        self.max_message_size = max_message_size
        self.limits = limits
        self.pings_received = 0
        self._buf = bytearray()
        self._broken: ParseError | MessageTooLarge | None = None
        self._crlf_run = 0  # CRLFs seen since the last message or ping
        self._head: _Head | None = None
        self._head_end = 0
        self._total = 0
        self._scan_from = 0
        self._pongs_due = 0

    @property
    def buffered(self) -> int:
        """Octets received and not yet returned as part of a message."""
        return len(self._buf)

    @property
    def in_message(self) -> bool:
        """True while part of a message has been received (the transport's read deadline)."""
        return self._head is not None or (len(self._buf) > 0 and self._buf != b"\r")

    def take_pongs(self) -> int:
        """Number of CRLF pongs owed for pings received since the last call; resets it."""
        due = self._pongs_due
        self._pongs_due = 0
        return due

    def feed(self, data: bytes) -> list[Message]:
        if self._broken is not None:
            raise type(self._broken)(f"stream unusable after an earlier error: {self._broken}")
        self._buf += data
        out: list[Message] = []
        try:
            while True:
                msg = self._next()
                if msg is None:
                    return out
                out.append(msg)
        except (ParseError, MessageTooLarge) as exc:
            self._broken = exc
            raise

    def _skip_crlfs(self) -> None:
        buf = self._buf
        i = 0
        n = len(buf)
        while i + 1 < n and buf[i] == 13 and buf[i + 1] == 10:
            i += 2
            self._crlf_run += 1
            if self._crlf_run == 2:
                # RFC 5626 §4.4.1: CRLFCRLF is a ping, answered by a CRLF pong.
                self.pings_received += 1
                self._pongs_due += 1
                self._crlf_run = 0
        if i:
            del buf[:i]

    def _next(self) -> Message | None:
        buf = self._buf
        if self._head is None:
            self._skip_crlfs()
            if not buf or buf == b"\r":
                return None
            self._crlf_run = 0
            end = buf.find(_END_OF_HEAD, self._scan_from)
            if end < 0:
                if len(buf) > self.max_message_size:
                    raise MessageTooLarge("header block exceeds the message size limit")
                self._scan_from = max(0, len(buf) - 3)
                return None
            if end + 4 > self.max_message_size:
                raise MessageTooLarge("header block exceeds the message size limit")
            head = _Head(_decode(buf[:end]), self.limits)
            length = head.body_length()
            if length is None:
                # RFC 3261 §18.3: Content-Length MUST be used with stream transports.
                raise ParseError("missing Content-Length on a stream transport")
            total = end + 4 + length
            if total > self.max_message_size:
                raise StreamMessageTooLarge(
                    f"message of {total} octets exceeds the limit", message=head.build(b"")
                )
            self._head = head
            self._head_end = end + 4
            self._total = total
            self._scan_from = 0
        if len(buf) < self._total:
            return None
        body = bytes(buf[self._head_end : self._total])
        msg = self._head.build(body)
        del buf[: self._total]
        self._head = None
        # Offsets of a message are ints above 256 (a new object each): reset, rather than
        # kept until the next message on the connection, as the last of a burst would be
        # (docs/performance.md, Round 8b: idle).
        self._total = self._head_end = 0
        return msg
