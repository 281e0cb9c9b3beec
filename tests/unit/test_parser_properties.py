"""Property tests: round trips, chunking independence, and no exception but SipError."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbc.sip.errors import SipError
from sbc.sip.fields import Via, parse_cseq, parse_params, parse_via
from sbc.sip.headers import Headers, canonical_name
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.serializer import serialize
from sbc.sip.uri import NameAddr, SipUri, TelUri, parse_name_addr, parse_name_addr_list, parse_uri
from sbc.sip.validate import validate_request, validate_response

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALPHANUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
TOKEN_CHARS = ALPHANUM + "-.!%*_+`'~"
USER_CHARS = ALPHANUM + "-_.!~*'()&=+$,;?/"
PARAM_CHARS = ALPHANUM + "-_.!~*'()[]/:&+$"

tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12)
labels = st.text(ALPHANUM, min_size=1, max_size=8)
hostnames = st.lists(labels, min_size=1, max_size=3).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8).map(
    lambda g: "[" + ":".join(f"{x:x}" for x in g) + "]"
)
hosts = st.one_of(hostnames, ipv4, ipv6)
ports = st.one_of(st.none(), st.integers(0, 65535))
escapes = st.integers(0, 255).map(lambda b: f"%{b:02X}")
users = st.lists(st.one_of(st.sampled_from(USER_CHARS), escapes), min_size=1, max_size=10).map(
    "".join
)
uri_params = st.lists(
    st.tuples(
        st.text(PARAM_CHARS, min_size=1, max_size=8),
        st.one_of(st.none(), st.text(PARAM_CHARS, min_size=1, max_size=8)),
    ),
    max_size=3,
).map(tuple)

sip_uris = st.builds(
    SipUri,
    scheme=st.sampled_from(["sip", "sips"]),
    user=st.one_of(st.none(), users),
    password=st.none(),
    host=hosts,
    port=ports,
    params=uri_params,
    headers=st.just(()),
)
tel_uris = st.builds(
    TelUri,
    number=st.text("0123456789", min_size=1, max_size=12).map(lambda d: "+" + d),
    params=uri_params,
)

# Header values: any text without control characters, not starting or ending with LWS.
value_chars = st.characters(blacklist_categories=("Cs", "Cc"))
header_values = st.text(value_chars, max_size=30).map(lambda v: v.strip(" \t"))
header_names = tokens.filter(lambda n: canonical_name(n) != "Content-Length")
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)
bodies = st.binary(max_size=200)


def with_length(items: list[tuple[str, str]], body: bytes) -> Headers:
    return Headers([*items, ("Content-Length", str(len(body)))])


@st.composite
def requests(draw: st.DrawFn) -> Request:
    body = draw(bodies)
    return Request(
        method=draw(tokens),
        uri=draw(st.one_of(sip_uris, tel_uris)),
        headers=with_length(draw(header_lists), body),
        body=body,
    )


@st.composite
def responses(draw: st.DrawFn) -> Response:
    body = draw(bodies)
    return Response(
        status=draw(st.integers(100, 699)),
        reason=draw(st.text(value_chars, max_size=20)),
        headers=with_length(draw(header_lists), body),
        body=body,
    )


messages = st.one_of(requests(), responses())


@SETTINGS
@given(messages)
def test_round_trip(msg: Request | Response) -> None:
    assert parse_message(serialize(msg)) == msg


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_stream_chunking_does_not_matter(
    msgs: list[Request | Response], data: st.DataObject
) -> None:
    stream = b"".join(
        data.draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n"])) + serialize(m) for m in msgs
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    whole = StreamParser(max_message_size=1 << 20).feed(stream)
    parser = StreamParser(max_message_size=1 << 20)
    out: list[Request | Response] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out.extend(parser.feed(stream[start:cut]))
        start = cut
    assert whole == msgs
    assert out == msgs
    assert not parser.in_message and parser.buffered == 0


def _exercise(msg: Request | Response) -> None:
    """Read every field a caller might; only SipError may come out."""
    for getter in (
        lambda: msg.call_id,
        lambda: msg.cseq,
        lambda: msg.vias,
        lambda: msg.from_tag,
        lambda: msg.to_tag,
        lambda: serialize(msg),
    ):
        with contextlib.suppress(SipError):
            getter()
    try:
        if isinstance(msg, Request):
            validate_request(msg)
        else:
            validate_response(msg)
    except SipError:
        pass


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_only_raise_sip_errors(data: bytes) -> None:
    try:
        msg = parse_message(data)
    except SipError:
        pass
    else:
        _exercise(msg)
    try:
        for msg in StreamParser(max_message_size=256).feed(data):
            _exercise(msg)
    except SipError:
        pass


@SETTINGS
@given(messages, st.data())
def test_mutated_messages_only_raise_sip_errors(
    msg: Request | Response, data: st.DataObject
) -> None:
    raw = bytearray(serialize(msg))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from([*b' \t\r\n:;,<>"@%/\\=?\x00\xff', 65]))
        if op == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            if op == "delete":
                del raw[pos]
            else:
                raw[pos] = byte
    try:
        parsed = parse_message(bytes(raw))
    except SipError:
        pass
    else:
        _exercise(parsed)
    parser = StreamParser()
    try:
        for i in range(0, len(raw), 7):
            for m in parser.feed(bytes(raw[i : i + 7])):
                _exercise(m)
    except SipError:
        pass


@SETTINGS
@given(st.text(max_size=60))
def test_field_parsers_only_raise_parse_errors(text: str) -> None:
    for parse in (
        parse_uri,
        parse_name_addr,
        parse_name_addr_list,
        parse_via,
        parse_cseq,
        parse_params,
    ):
        with contextlib.suppress(SipError):
            parse(text)


@SETTINGS
@given(st.one_of(sip_uris, tel_uris))
def test_uri_round_trip(uri: SipUri | TelUri) -> None:
    assert parse_uri(str(uri)) == uri


header_params = st.lists(
    st.tuples(
        tokens.filter(lambda n: n.lower() not in ("rport", "ttl")),
        st.one_of(st.none(), tokens),
    ),
    max_size=3,
).map(tuple)
displays = st.one_of(st.none(), st.text(value_chars, max_size=15))


@SETTINGS
@given(
    st.builds(NameAddr, uri=st.one_of(sip_uris, tel_uris), display=displays, params=header_params)
)
def test_name_addr_round_trip(na: NameAddr) -> None:
    assert parse_name_addr(str(na)) == na


@SETTINGS
@given(
    st.builds(
        Via,
        transport=tokens.map(str.upper),
        host=hosts,
        port=ports,
        params=header_params,
    )
)
def test_via_round_trip(via: Via) -> None:
    assert parse_via(str(via)) == via
