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
# make_origin and make_session are public: the media seam stamps its SDPs with them.
make_origin: Callable[[str, str, int, str, str, str], Origin] = quick_maker(Origin)
_make_media: Callable[..., MediaDescription] = quick_maker(MediaDescription)
make_session: Callable[..., SessionDescription] = quick_maker(SessionDescription)


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
        return make_origin(parts[0], parts[1], version, parts[3], parts[4], parts[5])
    # A peer's username, network and address types and address are the same call after
    # call (only the session id and version change): one string each for every held call.
    username, nettype, addrtype, address = _origin_texts(parts[0], parts[3], parts[4], parts[5])
    return make_origin(username, parts[1], version, nettype, addrtype, address)


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
    """The lines of one media section after its m= line while they are read (a plain class:
    a dataclass with list defaults costs more to make)."""

    __slots__ = ("attributes", "bandwidths", "connection", "head", "past_head", "tail")

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.bandwidths: list[Bandwidth] = []
        self.attributes: list[Attribute] = []
        self.head: list[Line] = []
        self.tail: list[Line] = []
        self.past_head = False

    def add(self, kind: str, value: str) -> None:
        """A line other than ``a=`` (_media_parts appends those itself)."""
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


def _lines(body: str) -> list[str]:
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


_SessionParts = tuple[
    str,
    Connection | None,
    tuple[Bandwidth, ...],
    tuple[Timing, ...],
    tuple[Attribute, ...],
    tuple[Line, ...],
    tuple[Line, ...],
]
_MediaParts = tuple[
    Connection | None,
    tuple[Bandwidth, ...],
    tuple[Attribute, ...],
    tuple[Line, ...],
    tuple[Line, ...],
]


def _session_parts(lines: list[str]) -> _SessionParts:
    """The session level of a body: ``lines`` from its s= line to the line before its first
    m= line (RFC 8866 §5: s= is the third line; v= and o= are read by the caller)."""
    kind, session_name = _split_line(lines[0])
    if kind != "s":
        raise SdpError("third SDP line must be s=")
    connection: Connection | None = None
    bandwidths: list[Bandwidth] = []
    timings: list[Timing] = []
    attributes: list[Attribute] = []
    head: list[Line] = []
    tail: list[Line] = []
    past_head = False
    for raw in lines[1:]:
        # _split_line, inlined for the usual line.
        kind = raw[0]
        if raw[1:2] == "=" and kind in _TYPES and "\r" not in raw and "\x00" not in raw:
            value = raw[2:]
        else:
            kind, value = _split_line(raw)  # raises
        if kind == "c":
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
    return (
        session_name,
        connection,
        tuple(bandwidths),
        _shared_tuple(timings),
        tuple(attributes),
        tuple(head),
        tuple(tail),
    )


def _media_parts(lines: list[str]) -> _MediaParts:
    """The lines of a media section after its m= line, read."""
    section = _MediaBuilder()
    attributes = section.attributes
    for raw in lines:
        kind = raw[0]
        if raw[1:2] == "=" and kind in _TYPES and "\r" not in raw and "\x00" not in raw:
            value = raw[2:]
        else:
            kind, value = _split_line(raw)  # raises
        if kind == "a":
            # Most lines of a body are media-level attributes: the memo (a C-level lookup)
            # costs about what parsing the line costs, and each text's value is shared by
            # every held call's session instead of a tuple per line per call.
            attributes.append(
                _attribute(value) if len(value) <= MEMO_MAX_TEXT else _parse_attribute(value)
            )
        else:
            section.add(kind, value)
    return (
        section.connection,
        tuple(section.bandwidths),
        _shared_tuple(attributes),
        tuple(section.head),
        tuple(section.tail),
    )


_NO_MEDIA_PARTS: _MediaParts = (None, (), (), (), ())

# A peer writes the same session level and the same media section after its m= line call
# after call: only the o= line (session id and version) and the m= line (the port) change.
# The parts read from such a block of text are immutable, so a memo by the block's text gives
# them with one dict lookup instead of a Python pass over its lines (two bodies a call, a
# dozen lines each). What makes a block plain (no empty line, no CR or LF left inside a
# line) is checked when its text is first read: a text found in a memo was found plain then.
# Bounded by text length and count; emptied when full, so that blocks seen once (a section
# with a per-call a=crypto key, say: then every body misses and is read line by line as
# before) cannot keep the repeating ones out for long. At most 32 blocks of 512 characters
# in each memo: 52 KiB with both full of 500-character blocks of 18 lines (tracemalloc;
# their parsed lines are shared with the memos of single lines); the bridge's two peers
# leave four entries.
_SESSION_BLOCKS: dict[str, _SessionParts] = {}
_MEDIA_BLOCKS: dict[str, _MediaParts] = {}
_BLOCKS_MAX = 32
_BLOCK_MAX_TEXT = 512


def _plain_lines(text: str) -> list[str] | None:
    """The lines of ``text`` split at CRLF; None when one is empty or holds a CR or LF (the
    general parse reads those: it drops empty lines and also splits at a bare LF)."""
    lines = text.split("\r\n")
    # The lines joined: "in" finds a character with memchr (str.count would walk the text
    # a character at a time).
    joined = "".join(lines)
    if "\r" in joined or "\n" in joined or "" in lines:
        return None
    return lines


P = TypeVar("P", _SessionParts, _MediaParts)


def _block(memo: dict[str, P], text: str, read: Callable[[list[str]], P]) -> P | None:
    """What ``read`` gives for the lines of ``text`` (the session level from its s= line, or
    a media section's lines after its m= line), through ``memo``; None when it is not plain."""
    found = memo.get(text)
    if found is None:
        lines = _plain_lines(text)
        if lines is None:
            return None
        found = read(lines)
        if len(text) <= _BLOCK_MAX_TEXT:
            if len(memo) >= _BLOCKS_MAX:
                memo.clear()
            memo[text] = found
    return found


def _decoded(body: bytes | str) -> str:
    if isinstance(body, bytes):
        try:
            # RFC 8866 §5: the default character set is UTF-8.
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError("SDP body is not UTF-8") from exc
    return body


def parse_sdp(body: bytes | str) -> SessionDescription:
    """Parse an SDP body; raise :class:`SdpError` when it is not a valid description."""
    whole = _decoded(body)
    text = whole[:-2] if whole[-2:] == "\r\n" else whole
    if text[-2:] != "\r\n" and "\x00" not in text:
        try:
            parsed = _parse_blocks(text)
        except SdpError:
            parsed = None
        if parsed is not None:
            return parsed
    # Whatever the block path refuses is read again by the general path, which raises the
    # error it meets first.
    return _parse_lines(_lines(whole))


def _parse_blocks(text: str) -> SessionDescription | None:
    """``text`` (a body without its last CRLF, no NUL) parsed by blocks, or None when its
    lines are not all plain CRLF-ended ones (as RFC 8866 writes bodies: every peer of the
    bridge does). A media section starts at each "\r\nm=", which only a line starting with
    m= can hold; the session level and each section after its m= line are read from the
    memos above, so that only the o= and m= lines are parsed for each body."""
    chunks = text.split("\r\nm=")
    top = chunks[0].split("\r\n", 2)
    if len(top) != 3 or top[0] != "v=0" or top[2][:2] != "s=":
        return None
    o_line = top[1]
    if o_line[:2] != "o=" or "\r" in o_line or "\n" in o_line:
        return None
    origin = _origin(o_line[2:])
    session = _block(_SESSION_BLOCKS, top[2], _session_parts)
    if session is None:
        return None
    media = []
    for chunk in chunks[1:]:
        line, _, rest = chunk.partition("\r\n")
        if "\r" in line or "\n" in line:
            return None
        kind, port, proto, formats, count = _media(line)
        if rest:
            parts = _block(_MEDIA_BLOCKS, rest, _media_parts)
            if parts is None:
                return None
        else:
            parts = _NO_MEDIA_PARTS
        media.append(_make_media(kind, port, proto, formats, count, *parts))
    return _assembled(origin, session, media)


def _assembled(
    origin: Origin, session: _SessionParts, media: list[MediaDescription]
) -> SessionDescription:
    name, connection, bandwidths, timings, attributes, head, tail = session
    # SessionDescription's fields in their order (origin, session_name, connection,
    # bandwidths, timings, attributes, media, version, extra_head, extra_tail).
    return make_session(
        origin, name, connection, bandwidths, timings, attributes, tuple(media), 0, head, tail
    )


def _parse_lines(lines: list[str]) -> SessionDescription:
    """The general parse of a body's non-empty lines, each without its line end."""
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
    # The session level runs to the first m= line, each media section to the next.
    starts = [i for i, raw in enumerate(lines) if raw[:2] == "m=" and i > 2]
    ends = [*starts, len(lines)]
    session = _session_parts(lines[2 : ends[0]])
    media = []
    for start, end in zip(starts, ends[1:], strict=False):
        raw = lines[start]
        if "\r" in raw or "\x00" in raw:
            _split_line(raw)  # raises
        kind, port, proto, formats, count = _media(raw[2:])
        media.append(
            _make_media(kind, port, proto, formats, count, *_media_parts(lines[start + 1 : end]))
        )
    return _assembled(origin, session, media)


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
