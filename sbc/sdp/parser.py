"""Parse and serialize SDP bodies (RFC 8866 §5, §9).

``parse_sdp`` raises :class:`SdpError` (and nothing else) on malformed input. It accepts LF-only
line ends and ignores blank lines; ``serialize_sdp`` writes CRLF. Lines of types the model does
not type are kept in order (RFC 8866 §5: unknown types are ignored, not rejected).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

from sbc.sdp.model import (
    MEMO_MAX_TEXT,
    Attribute,
    Bandwidth,
    Connection,
    Line,
    MediaDescription,
    Origin,
    SdpError,
    SessionDescription,
    Timing,
)
from sbc.sip.quickinit import quick_maker

_TYPES = frozenset("abcdefghijklmnopqrstuvwxyz")
T = TypeVar("T")

# The parts of every body parsed (two a call), made with every field given (see quick_maker).
_make_origin: Callable[[str, str, int, str, str, str], Origin] = quick_maker(Origin)
_make_media: Callable[..., MediaDescription] = quick_maker(MediaDescription)
_make_session: Callable[..., SessionDescription] = quick_maker(SessionDescription)


def _split_line(raw: str) -> tuple[str, str]:
    # RFC 8866 §5: <type>=<value>, type is exactly one case-significant letter, no spaces.
    if len(raw) < 2 or raw[1] != "=" or raw[0] not in _TYPES:
        raise SdpError(f"malformed SDP line {raw[:40]!r}")
    if "\r" in raw or "\x00" in raw:
        raise SdpError("CR or NUL inside an SDP line")
    return raw[0], raw[2:]


def _int(text: str, what: str, *, upper: int | None = None) -> int:
    if not text.isascii() or not text.isdigit():
        raise SdpError(f"{what} is not a number: {text[:20]!r}")
    value = int(text)
    if upper is not None and value > upper:
        raise SdpError(f"{what} out of range: {value}")
    return value


def _origin(value: str) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpError("o= needs 6 fields")
    version = _int(parts[2], "o= sess-version")
    if len(value) > MEMO_MAX_TEXT:
        return _make_origin(parts[0], parts[1], version, parts[3], parts[4], parts[5])
    # A peer's username, network and address types and address are the same call after
    # call (only the session id and version change): one string each for every held call.
    username, nettype, addrtype, address = _origin_texts(parts[0], parts[3], parts[4], parts[5])
    return _make_origin(username, parts[1], version, nettype, addrtype, address)


def _texts(*texts: str) -> tuple[str, ...]:
    return texts


def _parse_connection(value: str) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpError("c= needs 3 fields")
    return Connection(parts[0], parts[1], parts[2])


def _bandwidth(value: str) -> Bandwidth:
    bwtype, sep, amount = value.partition(":")
    if not sep or not bwtype or " " in bwtype:
        raise SdpError("malformed b= line")
    return Bandwidth(bwtype, _int(amount, "b= bandwidth"))


def _parse_timing(value: str) -> Timing:
    parts = value.split()
    if len(parts) != 2:
        raise SdpError("t= needs 2 fields")
    return Timing(_int(parts[0], "t= start"), _int(parts[1], "t= stop"))


def _parse_attribute(value: str) -> Attribute:
    name, sep, rest = value.partition(":")
    if not name or " " in name:
        raise SdpError("malformed a= line")
    return (name, rest if sep else None)


# A peer writes the same a= and c= lines call after call (its codecs, ptime, direction, its
# media address): the parsed values are immutable, so each text's is shared by every SDP
# that has it, instead of a tuple and strings per line held by each call's media session
# (issue 12, memory per held call). Bounded; a text that does not parse raises every time.
# Only texts up to MEMO_MAX_TEXT go through the memos (callers check; longer ones are parsed
# each time), so that their entries stay small.
_attribute = lru_cache(maxsize=1024)(_parse_attribute)
# c= and t= lines repeat from body to body (a peer's address, "0 0"): their values are
# immutable, so bounded memos by text share them; errors are raised every time.
_connection = lru_cache(maxsize=256)(_parse_connection)
_timing = lru_cache(maxsize=256)(_parse_timing)
# The parts of o= and m= lines that repeat (see _origin, _media), shared the same way.
_origin_texts = lru_cache(maxsize=256)(_texts)
# A media section's attributes, and a body's timings, as a whole: the same tuple of (shared)
# values call after call. Bounded: cleared whole when full.
_TUPLES: dict[tuple[object, ...], tuple[object, ...]] = {}
_TUPLES_MAX = 512


def _shared_tuple(items: list[T]) -> tuple[T, ...]:
    """``tuple(items)``, the one already made for equal items when there is one."""
    made = tuple(items)
    found = _TUPLES.get(made)
    if found is not None:
        return found  # type: ignore[return-value]
    if len(_TUPLES) >= _TUPLES_MAX:
        _TUPLES.clear()
    _TUPLES[made] = made
    return made


_MediaLine = tuple[str, int, str, tuple[str, ...], int | None]
_MEDIA_FIELDS_ERROR = "m= needs media, port, proto and at least one format"


def _media(value: str) -> _MediaLine:
    """The fields of an ``m=`` line: media, port, proto, formats and port count."""
    parts = value.split(maxsplit=2)
    if len(parts) < 3:
        # RFC 8866 §5.14: m=<media> <port> <proto> 1*(<fmt>)
        raise SdpError(_MEDIA_FIELDS_ERROR)
    port_text, slash, count_text = parts[1].partition("/")
    port = _int(port_text, "m= port", upper=65535)
    count = _int(count_text, "m= port count") if slash else None
    # The media, proto and formats repeat call after call (the port does not): one tuple of
    # formats and one string each, shared by every held call's session.
    media, proto, formats = (
        _media_kind(parts[0], parts[2])
        if len(value) <= MEMO_MAX_TEXT
        else _parse_media_kind(parts[0], parts[2])
    )
    return media, port, proto, formats, count


def _parse_media_kind(media: str, rest: str) -> tuple[str, str, tuple[str, ...]]:
    """Media, proto and formats of an ``m=`` line, ``rest`` the part after its port."""
    fields = rest.split()
    if len(fields) < 2:
        raise SdpError(_MEDIA_FIELDS_ERROR)
    proto = fields[0]
    formats = tuple(fields[1:])
    if "RTP/" in proto.upper():  # MediaDescription.is_rtp
        # RFC 3551 §3: RTP payload types are 0-127.
        for fmt in formats:
            if not (fmt.isascii() and fmt.isdigit() and len(fmt) < 4 and int(fmt) <= 127):
                # The general check: raises, or accepts a long spelling such as "0101".
                _int(fmt, "RTP payload type", upper=127)
    return media, proto, formats


_media_kind = lru_cache(maxsize=256)(_parse_media_kind)


class _MediaBuilder:
    """The lines of one media section while it is read (a plain class: one is made per
    section of every body, and a dataclass with list defaults costs more to make)."""

    __slots__ = ("attributes", "bandwidths", "connection", "head", "line", "past_head", "tail")

    def __init__(self, line: _MediaLine) -> None:
        self.line = line
        self.connection: Connection | None = None
        self.bandwidths: list[Bandwidth] = []
        self.attributes: list[Attribute] = []
        self.head: list[Line] = []
        self.tail: list[Line] = []
        self.past_head = False

    def add(self, kind: str, value: str) -> None:
        """A line other than ``a=`` (parse_sdp appends those itself)."""
        if kind == "c":
            if self.connection is not None:
                raise SdpError("more than one c= line in a media section")
            self.connection = (
                _connection(value) if len(value) <= MEMO_MAX_TEXT else _parse_connection(value)
            )
            self.past_head = True
        elif kind == "b":
            self.bandwidths.append(_bandwidth(value))
            self.past_head = True
        elif kind in "vostrz":
            raise SdpError(f"{kind}= line inside a media section")
        elif self.past_head:
            self.tail.append((kind, value))
        else:
            self.head.append((kind, value))

    def build(self) -> MediaDescription:
        media, port, proto, formats, count = self.line
        return _make_media(
            media,
            port,
            proto,
            formats,
            count,
            self.connection,
            tuple(self.bandwidths),
            _shared_tuple(self.attributes),
            tuple(self.head),
            tuple(self.tail),
        )


def _lines(body: bytes | str) -> list[str]:
    if isinstance(body, bytes):
        try:
            # RFC 8866 §5: the default character set is UTF-8.
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError("SDP body is not UTF-8") from exc
    lines = body.split("\r\n")
    n_crlf = len(lines) - 1
    if n_crlf == body.count("\n") and n_crlf == body.count("\r"):
        # Every line ends in CRLF, as RFC 8866 writes them (every peer of the bridge): the
        # split gives what the general path below gives, and no line holds a CR.
        if lines[-1] == "":
            lines.pop()
        if "" not in lines:
            return lines
        return [line for line in lines if line]
    return _any_lines(body)


def _any_lines(body: str) -> list[str]:
    """The non-empty lines of ``body``, each without its LF or CRLF (RFC 8866 §5 tolerance)."""
    lines = [line[:-1] if line.endswith("\r") else line for line in body.split("\n")]
    return [line for line in lines if line]


def parse_sdp(body: bytes | str) -> SessionDescription:
    """Parse an SDP body; raise :class:`SdpError` when it is not a valid description."""
    lines = _lines(body)
    if len(lines) < 3:
        raise SdpError("SDP needs at least v=, o= and s= lines")
    # RFC 8866 §5: v=, o= and s= come first, in that order.
    kind, value = _split_line(lines[0])
    if kind != "v" or value != "0":
        raise SdpError("SDP must start with v=0")
    kind, value = _split_line(lines[1])
    if kind != "o":
        raise SdpError("second SDP line must be o=")
    origin = _origin(value)
    kind, session_name = _split_line(lines[2])
    if kind != "s":
        raise SdpError("third SDP line must be s=")

    connection: Connection | None = None
    bandwidths: list[Bandwidth] = []
    timings: list[Timing] = []
    attributes: list[Attribute] = []
    head: list[Line] = []
    tail: list[Line] = []
    media: list[MediaDescription] = []
    current: _MediaBuilder | None = None
    past_head = False

    for raw in lines[3:]:
        # _split_line, inlined for the usual line (a dozen lines per body).
        kind = raw[0]
        if raw[1:2] == "=" and kind in _TYPES and "\r" not in raw and "\x00" not in raw:
            value = raw[2:]
        else:
            kind, value = _split_line(raw)  # raises
        if kind == "a" and current is not None:
            # Most lines of a body are media-level attributes: the memo (a C-level lookup)
            # costs about what parsing the line costs, and each text's value is shared by
            # every held call's session instead of a tuple per line per call.
            current.attributes.append(
                _attribute(value) if len(value) <= MEMO_MAX_TEXT else _parse_attribute(value)
            )
        elif kind == "m":
            if current is not None:
                media.append(current.build())
            current = _MediaBuilder(_media(value))
        elif current is not None:
            current.add(kind, value)
        elif kind == "c":
            if connection is not None:
                raise SdpError("more than one session-level c= line")
            connection = (
                _connection(value) if len(value) <= MEMO_MAX_TEXT else _parse_connection(value)
            )
            past_head = True
        elif kind == "b":
            bandwidths.append(_bandwidth(value))
            past_head = True
        elif kind == "t":
            timings.append(_timing(value) if len(value) <= MEMO_MAX_TEXT else _parse_timing(value))
            past_head = True
        elif kind == "r":
            if not timings:
                raise SdpError("r= line before any t= line")
            last = timings[-1]
            timings[-1] = Timing(last.start, last.stop, (*last.repeats, value))
        elif kind == "a":
            attributes.append(
                _attribute(value) if len(value) <= MEMO_MAX_TEXT else _parse_attribute(value)
            )
        elif kind in "vos":
            raise SdpError(f"repeated {kind}= line")
        elif past_head:
            tail.append((kind, value))
        else:
            head.append((kind, value))
    if current is not None:
        media.append(current.build())

    # SessionDescription's fields in their order (origin, session_name, connection,
    # bandwidths, timings, attributes, media, version, extra_head, extra_tail).
    return _make_session(
        origin,
        session_name,
        connection,
        tuple(bandwidths),
        _shared_tuple(timings),
        tuple(attributes),
        tuple(media),
        0,
        tuple(head),
        tuple(tail),
    )


def _connection_line(conn: Connection) -> str:
    return f"c={conn.nettype} {conn.addrtype} {conn.address}"


def _media_lines(m: MediaDescription, out: list[str]) -> None:
    port = f"{m.port}" if m.port_count is None else f"{m.port}/{m.port_count}"
    out.append(f"m={m.media} {port} {m.proto} {' '.join(m.formats)}")
    for kind, value in m.extra_head:
        out.append(f"{kind}={value}")
    if m.connection is not None:
        out.append(_connection_line(m.connection))
    for b in m.bandwidths:
        out.append(f"b={b.bwtype}:{b.bandwidth}")
    for kind, value in m.extra_tail:
        out.append(f"{kind}={value}")
    # Loops, not generators fed to extend: a body has a dozen lines, and a generator's
    # set-up costs more than its few items.
    for name, attr in m.attributes:
        out.append(f"a={name}" if attr is None else f"a={name}:{attr}")


def serialize_sdp(sd: SessionDescription) -> bytes:
    """The SDP body of ``sd``, CRLF line ends (RFC 8866 §5), UTF-8."""
    o = sd.origin
    out = [
        f"v={sd.version}",
        f"o={o.username} {o.sess_id} {o.sess_version} {o.nettype} {o.addrtype} {o.address}",
        f"s={sd.session_name}",
    ]
    for kind, value in sd.extra_head:
        out.append(f"{kind}={value}")
    if sd.connection is not None:
        out.append(_connection_line(sd.connection))
    for b in sd.bandwidths:
        out.append(f"b={b.bwtype}:{b.bandwidth}")
    for t in sd.timings:
        out.append(f"t={t.start} {t.stop}")
        for r in t.repeats:
            out.append(f"r={r}")
    for kind, value in sd.extra_tail:
        out.append(f"{kind}={value}")
    for name, attr in sd.attributes:
        out.append(f"a={name}" if attr is None else f"a={name}:{attr}")
    for m in sd.media:
        _media_lines(m, out)
    out.append("")
    return "\r\n".join(out).encode("utf-8")
