"""Round 9 of issue 12 (sip): structural cuts in the SIP and SDP core keep their behaviour.

* An SDP body whose lines all end in CRLF is cut into blocks by text (the session level, and
  each media section after its m= line) and the blocks that repeat from body to body are read
  from memos: what the line-by-line parser of round 8 (kept here as the reference) gives, the
  same errors included, with the memos cold or warm; the memos stay bounded.
* The parser and the serializer find a bare CR or LF in the lines joined (memchr) instead of
  counting line breaks (str.count, a character at a time): the same errors as the counts.
* A tagged From or To with a quoted display name (3CX's) is split in ``parse_address``
  itself: what ``parse_name_addr`` gives for the whole value, errors included.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbc.sdp import parser as sdp_parser
from sbc.sdp.model import (
    MEMO_MAX_TEXT,
    Attribute,
    Bandwidth,
    Connection,
    Line,
    MediaDescription,
    SdpError,
    SessionDescription,
    Timing,
)
from sbc.sdp.parser import (
    _TYPES,
    _attribute,
    _bandwidth,
    _connection,
    _lines,
    _make_media,
    _media,
    _origin,
    _parse_attribute,
    _parse_connection,
    _parse_timing,
    _shared_tuple,
    _split_line,
    _timing,
    make_session,
    parse_sdp,
)
from sbc.sip.errors import LimitExceeded, ParseError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response, parse_address
from sbc.sip.parser import ParseLimits, _Head
from sbc.sip.serializer import serialize
from sbc.sip.uri import parse_name_addr, parse_uri

# -- the reference: parse_sdp as round 8 left it (one pass over the lines) ---------------------


class _RefMedia:
    def __init__(self, line: tuple[str, int, str, tuple[str, ...], int | None]) -> None:
        self.line = line
        self.connection: Connection | None = None
        self.bandwidths: list[Bandwidth] = []
        self.attributes: list[Attribute] = []
        self.head: list[Line] = []
        self.tail: list[Line] = []
        self.past_head = False

    def add(self, kind: str, value: str) -> None:
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


def reference_parse_sdp(body: bytes | str) -> SessionDescription:
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SdpError("SDP body is not UTF-8") from exc
    lines = _lines(body)
    if len(lines) < 3:
        raise SdpError("SDP needs at least v=, o= and s= lines")
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
    current: _RefMedia | None = None
    past_head = False
    for raw in lines[3:]:
        kind = raw[0]
        if raw[1:2] == "=" and kind in _TYPES and "\r" not in raw and "\x00" not in raw:
            value = raw[2:]
        else:
            kind, value = _split_line(raw)
        if kind == "a" and current is not None:
            current.attributes.append(
                _attribute(value) if len(value) <= MEMO_MAX_TEXT else _parse_attribute(value)
            )
        elif kind == "m":
            if current is not None:
                media.append(current.build())
            current = _RefMedia(_media(value))
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
    return make_session(
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


# -- bodies: the bridge's peers', and lines of every kind in any order --------------------------

THREE_CX = (
    "v=0\r\no=3cxPS 297321271296 734282285057 IN IP4 192.168.1.10\r\ns=3cxPS Audio call\r\n"
    "c=IN IP4 192.168.1.10\r\nt=0 0\r\nm=audio 7078 RTP/AVP 0 8 9 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\na=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-11,16\r\na=sendrecv\r\n"
)
RETELL = (
    "v=0\r\no=- 3942342 3942343 IN IP4 10.20.30.40\r\ns=-\r\nc=IN IP4 10.20.30.40\r\nt=0 0\r\n"
    "m=audio 30000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na=sendrecv\r\n"
)

_LINES = st.sampled_from(
    [
        "v=0",
        "v=1",
        "o=- 1 2 IN IP4 192.0.2.1",
        "o=- 1 x IN IP4 192.0.2.1",
        "o=bad",
        "s=-",
        "s=",
        "i=info",
        "u=http://x",
        "e=a@b",
        "c=IN IP4 192.0.2.2",
        "c=IN IP4",
        "b=AS:64",
        "b=AS:x",
        "t=0 0",
        "t=1",
        "r=7d 1h 0 25h",
        "z=0 0",
        "k=clear:x",
        "a=sendrecv",
        "a=rtpmap:0 PCMU/8000",
        "a=ptime:20",
        "a=bad name",
        "m=audio 4000 RTP/AVP 0 8",
        "m=audio 4000/2 RTP/AVP 0",
        "m=video 5000 RTP/AVP 96",
        "m=audio 70000 RTP/AVP 0",
        "m=audio 4000 RTP/AVP 200",
        "m=image 6000 udptl t38",
        "m=audio",
        "x",
        "",
        "A=b",
        "a=nul\x00",
        "a=cr\r",
        "a=lf\nb=1",
        "a=lf\n",
        "\r",
        "a=" + "y" * 300,
        "c=IN IP4 " + "9" * 300,
    ]
)
_ENDS = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r\r\n", ""])


def _outcome(parse: object, body: bytes | str) -> object:
    try:
        return parse(body)  # type: ignore[operator]
    except SdpError as exc:
        return ("error", str(exc))


@st.composite
def bodies(draw: st.DrawFn) -> str:
    start = draw(st.sampled_from([["v=0", "o=- 1 2 IN IP4 192.0.2.1", "s=-"], []]))
    lines = start + draw(st.lists(_LINES, max_size=14))
    end = draw(_ENDS)
    sep = draw(st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"]))
    return sep.join(lines) + end


@settings(max_examples=400)
@given(bodies(), st.booleans(), st.booleans())
def test_parse_by_blocks_equals_the_line_parser(body: str, cold: bool, as_bytes: bool) -> None:
    if cold:
        sdp_parser._SESSION_BLOCKS.clear()
        sdp_parser._MEDIA_BLOCKS.clear()
    data: bytes | str = body.encode("utf-8", "surrogatepass") if as_bytes else body
    expected = _outcome(reference_parse_sdp, data)
    assert _outcome(parse_sdp, data) == expected
    # Again, the memos warm with whatever the first parse left in them.
    assert _outcome(parse_sdp, data) == expected


def test_the_peers_bodies_take_the_block_memos_and_equal_the_reference() -> None:
    sdp_parser._SESSION_BLOCKS.clear()
    sdp_parser._MEDIA_BLOCKS.clear()
    for body in (THREE_CX, RETELL):
        first = parse_sdp(body.encode())
        assert first == reference_parse_sdp(body.encode())
        # The next call's body: another session id and port, the same blocks.
        other = body.replace(" 7078 ", " 7080 ").replace(" 30000 ", " 30002 ")
        other = other.replace("297321271296", "297321271297").replace("3942342", "3942344")
        second = parse_sdp(other.encode())
        assert second == reference_parse_sdp(other.encode())
        assert second.media[0].port != first.media[0].port
        # Shared, not parsed again: the parts of the repeated blocks are the same objects.
        assert second.media[0].attributes is first.media[0].attributes
        assert second.connection is first.connection
        assert second.timings is first.timings
    assert len(sdp_parser._SESSION_BLOCKS) == 2
    assert len(sdp_parser._MEDIA_BLOCKS) == 2


_TOP = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\n"


def test_block_memos_are_bounded() -> None:
    sdp_parser._SESSION_BLOCKS.clear()
    sdp_parser._MEDIA_BLOCKS.clear()
    for i in range(sdp_parser._BLOCKS_MAX * 2 + 3):
        body = f"{_TOP}s=call {i}\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\na=x:{i}\r\n"
        assert parse_sdp(body) == reference_parse_sdp(body)
        assert len(sdp_parser._SESSION_BLOCKS) <= sdp_parser._BLOCKS_MAX
        assert len(sdp_parser._MEDIA_BLOCKS) <= sdp_parser._BLOCKS_MAX
    # A block longer than the bound is parsed every time, never remembered.
    sdp_parser._SESSION_BLOCKS.clear()
    sdp_parser._MEDIA_BLOCKS.clear()
    long_value = "y" * sdp_parser._BLOCK_MAX_TEXT
    body = f"{_TOP}s={long_value}\r\nm=audio 4000 RTP/AVP 0\r\na=x:{long_value}\r\n"
    assert parse_sdp(body) == reference_parse_sdp(body)
    assert not sdp_parser._SESSION_BLOCKS and not sdp_parser._MEDIA_BLOCKS


@pytest.mark.parametrize(
    "body",
    [
        # A bare LF, a bare CR or an empty line inside a block that is also in the memos
        # plain: the general parse reads the body (it splits at the LF, drops the empty line).
        THREE_CX.replace("a=sendrecv", "a=sendrecv\na=ptime:20"),
        THREE_CX.replace("a=sendrecv", "a=sendrecv\r\n\r\na=ptime:20"),
        THREE_CX.replace("t=0 0", "t=0 0\na=tool:x"),
        THREE_CX.replace("t=0 0", "t=0 0\r\n"),
        THREE_CX.replace("s=3cxPS", "\r\ns=3cxPS"),
        THREE_CX.replace(" RTP/AVP", "\n RTP/AVP"),
        THREE_CX.replace("o=3cxPS", "o=3cx\rPS"),
        THREE_CX.replace("IN IP4 192.168.1.10\r\ns=", "IN IP4\n192.168.1.10\r\ns="),
        THREE_CX.replace("a=sendrecv", "a=send\rrecv"),
        THREE_CX + "\r\n",
        THREE_CX + "m=",
        THREE_CX.replace("\r\n", "\n"),
    ],
)
def test_bodies_the_blocks_refuse_are_read_by_the_general_parse(body: str) -> None:
    parse_sdp(THREE_CX)  # the plain blocks in the memos
    assert _outcome(parse_sdp, body) == _outcome(reference_parse_sdp, body)
    assert _outcome(parse_sdp, body.encode()) == _outcome(reference_parse_sdp, body.encode())


def test_a_media_section_of_its_m_line_alone() -> None:
    body = (
        "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nm=audio 4000 RTP/AVP 0\r\nm=video 0 RTP/AVP 96"
    )
    parsed = parse_sdp(body)
    assert parsed == reference_parse_sdp(body)
    assert [m.media for m in parsed.media] == ["audio", "video"]


# -- From and To with a quoted display name ----------------------------------------------------


def _address_outcome(parse: object, text: str) -> object:
    try:
        return parse(text)  # type: ignore[operator]
    except ParseError as exc:
        return ("error", type(exc), str(exc))


@given(
    st.text(alphabet='ab 1+"\\<>;é\t', max_size=8),
    st.sampled_from(["", " ", "\t", "  "]),
    st.sampled_from(["<sip:a@b>", "<sip:a@b;lr>", "<sip:a@b>;x=1", "sip:a@b", "<sip:a@", ""]),
    st.sampled_from(["abc1", "x-y.z", "", "a b", "é"]),
    st.booleans(),
)
def test_quoted_display_names_parse_like_the_whole_value(
    display: str, space: str, uri: str, tag: str, closed: bool
) -> None:
    text = f'"{display}{space}' + ('"' if closed else "") + f"{space}{uri};tag={tag}"
    assert _address_outcome(parse_address, text) == _address_outcome(parse_name_addr, text)
    # Again with the memo warm.
    assert _address_outcome(parse_address, text) == _address_outcome(parse_name_addr, text)


def test_three_cx_from_keeps_its_display_name_and_tag() -> None:
    address = parse_address('"Alice Smith" <sip:4155550123@192.0.2.10:5060>;tag=17pbx')
    assert address.display == "Alice Smith"
    assert address.tag == "17pbx"
    assert address == parse_name_addr('"Alice Smith" <sip:4155550123@192.0.2.10:5060>;tag=17pbx')


# -- bare CR and LF found in the lines joined, not by counting -----------------------------------


def _reference_head(text: str, limits: ParseLimits) -> _Head:
    """The line checks of round 8 (str.count of CR and LF), then the head."""
    n_lf = text.count("\n")
    if n_lf > limits.max_headers:
        n_crlf = text.count("\r\n")
        if n_lf != n_crlf or text.count("\r") != n_crlf:
            raise ParseError("bare CR or LF in the header block")
        raise LimitExceeded(f"{n_crlf} header lines", limit="headers")
    n_crlf = len(text.split("\r\n")) - 1
    if n_lf != n_crlf or text.count("\r") != n_crlf:
        raise ParseError("bare CR or LF in the header block")
    return _Head(text, limits)


def _head_outcome(make: object, text: str, limits: ParseLimits) -> object:
    try:
        head = make(text, limits)  # type: ignore[operator]
    except ParseError as exc:
        return ("error", type(exc), str(exc), getattr(exc, "limit", None))
    return head.items, head.keys, head.content_lengths


_HEAD_PIECES = st.sampled_from(
    ["\r\n", "\r\n", "\r\n", "\r", "\n", "Via: SIP/2.0/UDP h;branch=z9hG4bK1", "To: <sip:a@b>", "X"]
)


@given(st.lists(_HEAD_PIECES, max_size=12), st.integers(0, 6))
def test_head_line_checks_equal_the_counting_checks(pieces: list[str], max_headers: int) -> None:
    text = "OPTIONS sip:a@b SIP/2.0" + "".join(pieces)
    limits = ParseLimits(max_headers=max_headers)
    assert _head_outcome(_Head, text, limits) == _head_outcome(_reference_head, text, limits)


def _reference_serialize(msg: Request | Response) -> bytes:
    """serialize as round 8 left it: the line breaks of the joined message counted."""
    if isinstance(msg, Request):
        lines = [f"{msg.method} {msg.uri} {msg.version}"]
    else:
        lines = [f"{msg.version} {msg.status:03d} {msg.reason}"]
    body = msg.body
    length_line = f"Content-Length: {len(body)}"
    placed = False
    for name, value in msg.headers.items():
        if name == "Content-Length":
            if not placed:
                lines.append(length_line)
                placed = True
            continue
        lines.append(f"{name}: {value}")
    if not placed:
        lines.append(length_line)
    lines += ["", ""]
    text = "\r\n".join(lines)
    n_breaks = len(lines) - 1
    if text.count("\n") != n_breaks or text.count("\r") != n_breaks:
        raise ValueError("CR or LF inside a start line, header name or header value")
    return text.encode("utf-8", "surrogateescape") + body


def _serialized(write: object, msg: Request | Response) -> object:
    try:
        return write(msg)  # type: ignore[operator]
    except ValueError as exc:
        return ("error", str(exc))


_VALUES = st.text(alphabet="ab \r\n:é", max_size=6)


@given(
    st.lists(st.tuples(st.sampled_from(["X-A", "Content-Length", "To", "X-\r"]), _VALUES)),
    st.sampled_from(["OK", "O\rK", "O\nK", ""]),
    st.binary(max_size=4),
)
def test_serialize_refuses_what_the_counting_check_refused(
    fields: list[tuple[str, str]], reason: str, body: bytes
) -> None:
    headers = Headers(fields)
    response = Response(200, reason, headers, body)
    assert _serialized(serialize, response) == _serialized(_reference_serialize, response)
    request = Request("OPTIONS", parse_uri("sip:a@b"), headers, body)
    assert _serialized(serialize, request) == _serialized(_reference_serialize, request)
