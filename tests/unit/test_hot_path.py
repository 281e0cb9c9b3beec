"""The per-message fast paths: memoised accessors, header index, field parser fast paths,
Via stamping, build_response and the engine's cached OPTIONS answer.

Each fast path must give exactly what the general code gives; these tests compare the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine, stamp_via
from sbc.net.transport import _UDP_SOURCES_LIMIT, Transports
from sbc.sip.errors import BadRequest, ParseError, SipError
from sbc.sip.fields import Via, parse_int_header, parse_params, parse_via
from sbc.sip.headers import Headers
from sbc.sip.message import (
    Request,
    Response,
    parse_address,
    parse_address_list,
    with_top_via,
)
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize
from sbc.sip.server_transaction import build_response
from sbc.sip.timers import TimerConfig
from sbc.sip.transaction import ServerState, TransactionLayer
from sbc.sip.uri import parse_name_addr, parse_name_addr_list, parse_uri
from sbc.sip.validate import validate_request, validate_response

OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1-1-0;rport\r\n"
    b'From: "sipp" <sip:sipp@127.0.0.1:5070>;tag=1SIPpTag1\r\n'
    b"To: <sip:127.0.0.1:5060>\r\n"
    b"Call-ID: 1-1@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Contact: <sip:sipp@127.0.0.1:5070;transport=UDP>\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)
SOURCE = Destination("udp", "192.0.2.7", 40000)


def request(data: bytes = OPTIONS) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def with_via_lines(*lines: str) -> Request:
    req = request()
    headers = req.headers.remove("Via")
    for line in reversed(lines):
        headers = headers.prepend("Via", line)
    return dataclasses.replace(req, headers=headers)


# -- Headers: index and memo -----------------------------------------------------------------


def test_lookups_after_changes_match_a_fresh_headers() -> None:
    h = Headers([("v", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("To", "<sip:b@x>"), ("X-A", "1")])
    assert h.get("VIA") == "SIP/2.0/UDP a;branch=z9hG4bK1"  # builds the lower-case keys
    changed = (
        h.add("x-a", "2")
        .prepend("Via", "SIP/2.0/UDP b;branch=z9hG4bK2, SIP/2.0/UDP c;branch=z9hG4bK3")
        .prepend("Route", "<sip:r;lr>")
        .remove_first("Via")
        .remove_first("Via")
        .remove_first("Record-Route")
    )
    fresh = Headers(changed.items())
    for name in ("Via", "v", "To", "X-A", "Route", "Record-Route"):
        assert changed.get(name) == fresh.get(name)
        assert changed.get_all(name) == fresh.get_all(name)
        assert changed.values(name) == fresh.values(name)
        assert changed.count(name) == fresh.count(name)
        assert (name in changed) == (name in fresh)
    assert changed.items() == (
        ("Route", "<sip:r;lr>"),
        ("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"),
        ("To", "<sip:b@x>"),
        ("X-A", "1"),
        ("x-a", "2"),
    )
    assert changed.get_all("X-A") == ["1", "2"]
    assert changed.get("Contact", "none") == "none"
    assert changed.get_all("Contact") == []
    assert 3 not in changed


def test_headers_protocol_methods() -> None:
    h = Headers([("f", "<sip:a@x>;tag=1"), ("X-A", "1")])
    assert list(h) == [("From", "<sip:a@x>;tag=1"), ("X-A", "1")]
    assert len(h) == 2
    assert h == Headers(h.items())
    assert h != "not headers"
    assert hash(h) == hash(Headers(h.items()))
    assert repr(h) == "Headers([('From', '<sip:a@x>;tag=1'), ('X-A', '1')])"
    assert h.set("To", "<sip:b@x>").items()[-1] == ("To", "<sip:b@x>")
    assert h.set("x-a", "2").get_all("X-A") == ["2"]


def test_add_before_any_lookup_and_on_empty_headers() -> None:
    assert Headers().add("Via", "x").get("via") == "x"
    looked_up = Headers()
    assert looked_up.get("Via") is None
    assert looked_up.add("v", "y").get_all("Via") == ["y"]


def test_get_all_returns_a_copy() -> None:
    h = Headers([("Route", "<sip:a;lr>")])
    h.get_all("Route").append("junk")
    assert h.get_all("Route") == ["<sip:a;lr>"]


def test_cached_computes_once_and_not_on_errors() -> None:
    h = Headers([("CSeq", "1 INVITE")])
    calls: list[int] = []

    def compute(headers: Headers) -> str:
        calls.append(1)
        return headers.get("CSeq") or ""

    assert h.cached("k", compute) == "1 INVITE"
    assert h.cached("k", compute) == "1 INVITE"
    assert len(calls) == 1

    def failing(headers: Headers) -> str:
        calls.append(1)
        raise ParseError("no")

    for _ in range(2):
        with pytest.raises(ParseError):
            h.cached("bad", failing)
    assert len(calls) == 3
    h.forget_cached()
    assert h.cached("k", compute) == "1 INVITE"
    assert len(calls) == 4
    # A changed copy starts without the memo of its original.
    assert h.set("CSeq", "2 BYE").cached("k", compute) == "2 BYE"


def test_accessors_parse_once_per_message() -> None:
    req = request()
    assert req.top_via is req.top_via
    assert req.cseq is req.cseq
    assert req.from_ is req.from_
    assert req.to is req.to
    vias = req.vias
    vias.append(Via("UDP", "evil"))  # the caller's list, not the memo
    assert len(req.vias) == 1
    changed = dataclasses.replace(req, headers=req.headers.set("CSeq", "2 OPTIONS"))
    assert changed.cseq.seq == 2
    assert req.cseq.seq == 1


def test_top_via_skips_an_empty_first_line_like_values() -> None:
    req = with_via_lines("", "SIP/2.0/TCP b;branch=z9hG4bK2, SIP/2.0/UDP c")
    assert req.top_via == parse_via(req.headers.values("Via")[0])
    assert req.top_via.host == "b"
    with pytest.raises(BadRequest):
        _ = with_via_lines("").top_via


def test_accessor_errors_are_raised_every_time() -> None:
    req = dataclasses.replace(request(), headers=request().headers.set("To", "<sip:x"))
    for _ in range(2):
        with pytest.raises(ParseError):
            _ = req.to
    missing = dataclasses.replace(req, headers=req.headers.remove("To").remove("From"))
    with pytest.raises(BadRequest):
        _ = missing.to
    with pytest.raises(BadRequest):
        _ = missing.from_


def test_address_memos_give_the_parsers_values() -> None:
    text = '"Doe, J" <sip:j@x;transport=tcp>;tag=1'
    assert parse_address(text) == parse_name_addr(text)
    untagged = '"Doe, J" <sip:j@x;transport=tcp>;x=1'
    assert parse_address(untagged) is parse_address(untagged) == parse_name_addr(untagged)
    listing = "<sip:a@x>;expires=30, sip:b@y"
    assert parse_address_list(listing) == tuple(parse_name_addr_list(listing))
    with pytest.raises(ParseError):
        parse_address("<sip:a@x")
    with pytest.raises(ParseError):
        parse_address("<sip:a@x")


def _parse_outcome(parser: Any, text: str) -> object:
    try:
        return parser(text)
    except ParseError:
        return "ParseError"


@given(
    st.sampled_from(["", '"a b" ', '"x;tag=1" ', "Bob ", '"q\\"x" ', '"open ', "a<b ", " "]),
    st.sampled_from(["sip:a@b", "sip:a@b;transport=tcp", "tel:+123", "sip:a@b?h=1", "sip:"]),
    st.booleans(),
    st.lists(
        st.sampled_from([";x=1", ";y", ';q="a;b"', ";tag=o", "; z = 2", ";", ';r="']), max_size=3
    ),
    st.sampled_from(["", " ", ">", "<", '"', ";"]),
    st.sampled_from(["1", "abc", "x-y.z"]),
)
def test_address_with_tag_last_parses_like_the_whole_value(
    display: str, uri: str, angle: bool, params: list[str], junk: str, tag: str
) -> None:
    text = (f"{display}<{uri}>" if angle else uri) + "".join(params) + junk + f";tag={tag}"
    assert _parse_outcome(parse_address, text) == _parse_outcome(parse_name_addr, text)


# -- field parser fast paths -----------------------------------------------------------------

_token = st.text(alphabet="abcdefgXYZ0129-.!%*_+`'~", min_size=1, max_size=8)
_value = st.text(alphabet="abcXYZ019-.:@/=_[]", min_size=1, max_size=10)
_param = st.tuples(_token, st.none() | _value)


@given(st.lists(_param, min_size=1, max_size=5))
def test_params_fast_path_equals_general_path(params: list[tuple[str, str | None]]) -> None:
    items = [name if value is None else f"{name}={value}" for name, value in params]
    fast = parse_params(";".join(items))
    general = parse_params(" ; ".join(items))  # LWS: the fast path declines
    assert fast == general == tuple(params)


@given(
    st.sampled_from(["UDP", "tcp", "TLS", "SCTP"]),
    st.sampled_from(["pc33.example.com", "192.0.2.1", "h_1", "a.b."]),
    st.none() | st.integers(min_value=0, max_value=65535),
    st.lists(_param, max_size=4),
)
def test_via_fast_path_equals_general_path(
    transport: str, host: str, port: int | None, params: list[tuple[str, str | None]]
) -> None:
    hostport = host if port is None else f"{host}:{port}"
    lenient = [(n, v) for n, v in params if n.lower() not in ("rport", "ttl")]
    items = "".join(f";{n}" if v is None else f";{n}={v}" for n, v in lenient)
    fast = parse_via(f"SIP/2.0/{transport} {hostport}{items}")
    general = parse_via(f"SIP / 2.0 / {transport}  {hostport} {items.replace(';', ' ; ')}")
    assert fast == general
    assert fast == Via(transport.upper(), host, port, tuple(lenient))


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP host:65536;branch=z9hG4bK1",
        "SIP/2.0/UDP host:123456",
        "SIP/2.0/UDP host-;branch=z9hG4bK1",
        "SIP/2.0/UDP host;rport=70000",
        "SIP/2.0/UDP host;branch=z9hG4bK1;;x",
        "SIP/2.0/UDP host;branch=",
    ],
)
def test_via_fast_path_rejects_what_the_general_path_rejects(text: str) -> None:
    with pytest.raises(ParseError):
        parse_via(text)


def test_via_ipv6_and_quoted_params_take_the_general_path() -> None:
    via = parse_via('SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1;x="a;b"')
    assert via == Via("UDP", "[2001:db8::1]", 5060, (("branch", "z9hG4bK1"), ("x", '"a;b"')))


@pytest.mark.parametrize(
    ("text", "maximum", "expected"),
    [
        ("0", 255, 0),
        ("0068", 255, 68),
        ("255", 255, 255),
        ("999999999", 2**32 - 1, 999999999),
        ("0000000000070", 255, 70),
        ("4294967295", 2**32 - 1, 4294967295),
    ],
)
def test_int_header_values(text: str, maximum: int, expected: int) -> None:
    assert parse_int_header(text, "X", maximum) == expected


@pytest.mark.parametrize(
    ("text", "maximum"), [("256", 255), ("4294967296", 2**32 - 1), ("1" * 30, 2**32 - 1)]
)
def test_int_header_too_large(text: str, maximum: int) -> None:
    with pytest.raises(ParseError, match="too large"):
        parse_int_header(text, "X", maximum)


def test_request_uri_memo_shares_the_parse() -> None:
    first, second = request(), request(OPTIONS.replace(b"tag=1SIPpTag1", b"tag=2"))
    assert first.uri is second.uri
    assert first.uri == parse_uri("sip:127.0.0.1:5060")


# -- validation ------------------------------------------------------------------------------


def test_validate_checks_every_via_of_several() -> None:
    ok = with_via_lines("SIP/2.0/UDP a;branch=z9hG4bK1", "SIP/2.0/UDP b, SIP/2.0/TCP c")
    validate_request(ok)
    assert ok.top_via.host == "a"
    bad = with_via_lines("SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b:99999")
    with pytest.raises(BadRequest):
        validate_request(bad)
    for empty in (with_via_lines("  "), with_via_lines(",", " ")):
        with pytest.raises(BadRequest, match="empty Via"):
            validate_request(empty)


def test_validate_single_element_fields_with_commas() -> None:
    quoted = request().headers.set("From", '"Doe, J" <sip:j@x>;tag=1')
    validate_request(dataclasses.replace(request(), headers=quoted))
    two = request().headers.set("To", "<sip:a@x>, <sip:b@x>")
    with pytest.raises(BadRequest, match="several values in To"):
        validate_request(dataclasses.replace(request(), headers=two))


def test_validate_invite_without_body_checks_accept() -> None:
    invite = request(
        OPTIONS.replace(b"OPTIONS sip", b"INVITE sip").replace(b"1 OPTIONS", b"1 INVITE")
    )
    validate_request(invite)
    accepting = invite.headers.add("Accept", "application/sdp")
    validate_request(dataclasses.replace(invite, headers=accepting))
    refusing = invite.headers.add("Accept", "text/plain")
    with pytest.raises(SipError) as err:
        validate_request(dataclasses.replace(invite, headers=refusing))
    assert err.value.status == 406


def test_validate_require_and_date() -> None:
    req = request()
    with_require = req.headers.add("Require", "timer, foo")
    with pytest.raises(SipError) as err:
        validate_request(dataclasses.replace(req, headers=with_require))
    assert err.value.status == 420
    assert err.value.headers == (("Unsupported", "foo"),)
    validate_request(dataclasses.replace(req, headers=req.headers.add("Require", "timer")))
    bad_date = dataclasses.replace(req, headers=req.headers.add("Date", "yesterday"))
    with pytest.raises(BadRequest):
        validate_request(bad_date)
    validate_request(bad_date, check_date=False)


def test_validate_response_reads_fields_once() -> None:
    resp = build_response(stamp_via(request(), SOURCE), 200, to_tag="t")
    validate_response(resp)
    assert resp.top_via is resp.top_via
    bad = dataclasses.replace(resp, headers=resp.headers.add("CSeq", "2 OPTIONS"))
    with pytest.raises(ParseError, match="several CSeq"):
        validate_response(bad)


# -- stamping --------------------------------------------------------------------------------


def stamped_text(req: Request) -> str:
    text = req.headers.get("Via")
    assert text is not None
    return text


@pytest.mark.parametrize(
    ("via", "source", "expected"),
    [
        (
            "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport",
            SOURCE,
            "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport=40000;received=192.0.2.7",
        ),
        (
            "SIP/2.0/UDP h;RPORT ;branch=z9hG4bK1;rport",
            SOURCE,
            "SIP/2.0/UDP h;rport=40000 ;branch=z9hG4bK1;rport;received=192.0.2.7",
        ),
        (
            "SIP/2.0/UDP h;branch=z9hG4bK1",
            SOURCE,
            "SIP/2.0/UDP h;branch=z9hG4bK1;received=192.0.2.7",
        ),
        (
            'SIP/2.0/UDP h;branch=z9hG4bK1;x="q";rport',
            SOURCE,
            'SIP/2.0/UDP h;branch=z9hG4bK1;x="q";rport=40000;received=192.0.2.7',
        ),
        (
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1",
            Destination("udp", "2001:db8::2", 5060),
            "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1;received=2001:db8::2",
        ),
        (
            "SIP/2.0/UDP h;branch=z9hG4bK1;rport",
            Destination("udp", "192.0.2.7", 70000),
            "SIP/2.0/UDP h;branch=z9hG4bK1;rport=70000;received=192.0.2.7",
        ),
    ],
)
def test_stamped_via_is_what_parsing_the_text_gives(
    via: str, source: Destination, expected: str
) -> None:
    req = with_via_lines(via, "SIP/2.0/UDP other;branch=z9hG4bK9")
    stamped = stamp_via(req, source)
    assert stamped_text(stamped) == expected
    if source.port <= 65535:
        assert stamped.top_via == parse_via(expected)
    else:
        with pytest.raises(ParseError):
            _ = stamped.top_via
    assert stamped.headers.get_all("Via")[1] == "SIP/2.0/UDP other;branch=z9hG4bK9"


@given(
    st.lists(_param, max_size=3),
    st.booleans(),
    st.sampled_from(["192.0.2.7", "::1", "fe80::1%eth0", "10.0.0.1"]),
    st.integers(min_value=1, max_value=65535),
)
def test_stamping_equals_parsing_property(
    params: list[tuple[str, str | None]], bare_rport: bool, host: str, port: int
) -> None:
    params = [(n, v) for n, v in params if n.lower() not in ("rport", "ttl")]
    text = "SIP/2.0/UDP sender.example" + "".join(
        f";{n}" if v is None else f";{n}={v}" for n, v in params
    )
    if bare_rport:
        text += ";Rport"
    stamped = stamp_via(with_via_lines(text), Destination("udp", host, port))
    assert stamped.top_via == parse_via(stamped_text(stamped))


def test_stamping_keeps_a_request_from_its_sent_by_and_splits_lines() -> None:
    req = with_via_lines("SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK1")
    assert stamp_via(req, SOURCE) is req
    listed = with_via_lines("SIP/2.0/UDP h;branch=z9hG4bK1, SIP/2.0/UDP g;branch=z9hG4bK2")
    stamped = stamp_via(listed, SOURCE)
    assert stamped.headers.get_all("Via") == [
        "SIP/2.0/UDP h;branch=z9hG4bK1;received=192.0.2.7",
        "SIP/2.0/UDP g;branch=z9hG4bK2",
    ]
    padded = with_via_lines("SIP/2.0/UDP h;branch=z9hG4bK1 ")
    assert stamped_text(stamp_via(padded, SOURCE)).endswith(";received=192.0.2.7")
    with pytest.raises(BadRequest):
        stamp_via(with_via_lines(", "), SOURCE)


def test_with_top_via_is_remove_first_then_prepend() -> None:
    req = request()
    headers = req.headers.add("Via", "SIP/2.0/UDP later;branch=z9hG4bK2")
    req = dataclasses.replace(req, headers=headers)
    text = "SIP/2.0/UDP new;branch=z9hG4bK3"
    replaced = with_top_via(req, text)
    assert replaced.headers == req.headers.remove_first("Via").prepend("Via", text)
    assert replaced.top_via == parse_via(text)
    seeded = with_top_via(req, text, parse_via(text))
    assert seeded.top_via == parse_via(text)


def test_with_top_via_keeps_what_was_parsed_of_the_other_fields() -> None:
    req = request()
    to, cseq, old_via = req.to, req.cseq, req.top_via  # parsed and cached before stamping
    text = "SIP/2.0/UDP new;branch=z9hG4bK3"
    for replaced in (with_top_via(req, text), with_top_via(req, text, parse_via(text))):
        assert replaced.to is to and replaced.cseq is cseq  # not parsed again
        assert replaced.top_via == parse_via(text) != old_via  # the Via's own entry is not kept


@pytest.mark.parametrize(
    "fields",
    [
        [("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("Call-ID", "c")],
        [("Call-ID", "c"), ("Via", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("CSeq", "1 X")],
        [("Call-ID", "c"), ("v", "SIP/2.0/UDP a;branch=z9hG4bK1"), ("Via", "SIP/2.0/UDP b")],
        [("Call-ID", "c"), ("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b")],
        [("Call-ID", "c"), ("Via", "SIP/2.0/UDP a"), ("To", "t"), ("Via", "SIP/2.0/UDP b")],
        [("Call-ID", "c")],
    ],
)
def test_with_top_via_keeps_the_order_remove_first_then_prepend_gives(
    fields: list[tuple[str, str]],
) -> None:
    """The one-step path for a one-element Via line makes the same fields, in the same
    order (a lone Via moves to the top, as prepend() puts it), keys included."""
    req = dataclasses.replace(request(), headers=Headers(fields))
    text = "SIP/2.0/UDP new;branch=z9hG4bK3;received=192.0.2.7"
    expected = req.headers.remove_first("Via").prepend("Via", text)
    replaced = with_top_via(req, text)
    assert replaced.headers.items() == expected.items()
    assert replaced.headers.get_all("Via") == expected.get_all("Via")
    assert [replaced.headers.get(n) for n in ("call-id", "to", "cseq")] == [
        expected.get(n) for n in ("Call-ID", "To", "CSeq")
    ]


# -- responses and transactions --------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("<sip:127.0.0.1:5060>", "<sip:127.0.0.1:5060>;tag=t1"),
        ("sip:bob@x", "<sip:bob@x>;tag=t1"),
        ("Bob <sip:bob@x>;tag", "Bob <sip:bob@x>;tag=t1"),
        ("<sip:bob@x>;tag;foo=1", "<sip:bob@x>;tag=t1;foo=1"),
        ("<sip:bob@x>;tag=old", "<sip:bob@x>;tag=old"),
    ],
)
def test_response_to_tag(to: str, expected: str) -> None:
    req = dataclasses.replace(request(), headers=request().headers.set("To", to))
    resp = build_response(req, 200, to_tag="t1", headers=[("x-extra", "1")])
    assert resp.headers.get("To") == expected
    assert resp.headers.items()[-1] == ("x-extra", "1")
    assert build_response(req, 100, to_tag="t1").headers.get("To") == to


def test_completed_transaction_keeps_only_what_a_copy_needs() -> None:
    # A completed transaction waits 32 s (Timer J over UDP): it keeps the response a request
    # copy is answered with, not the request.
    layer = TransactionLayer()
    req = stamp_via(request(), SOURCE)
    validate_request(req)
    layer.receive(req, source=SOURCE, reliable=False, now=0.0)
    (event,) = layer.events()
    ok = build_response(req, 200, to_tag="t")
    layer.respond(event.key, ok, now=0.0)  # type: ignore[union-attr]
    assert layer.datagrams_to_send() == [(SOURCE, ok)]
    # Retired: a record of (deadline, key, state, source, the response's bytes), no request.
    record = layer._done[event.key]  # type: ignore[union-attr]
    assert record[2:] == (ServerState.COMPLETED, SOURCE, serialize(ok))
    assert event.key not in layer._servers  # type: ignore[union-attr]
    layer.receive(req, source=SOURCE, reliable=False, now=1.0)
    [(dest, again)] = layer.datagrams_to_send()
    assert (dest, serialize(again)) == (SOURCE, serialize(ok))
    assert layer.events() == []
    # Timer J still fires from the heap and ends the transaction (RFC 3261 §17.2.2).
    deadline = layer.next_deadline()
    assert deadline is not None
    assert deadline == pytest.approx(TimerConfig().t1 * 64)
    layer.handle_timer(deadline)
    assert len(layer) == 0
    assert layer.next_deadline() is None


# -- engine and transport ---------------------------------------------------------------------


class _Incoming:
    def __init__(self) -> None:
        self.answers: list[tuple[int, Any]] = []

    def respond(self, status: int, *, headers: Any) -> None:
        self.answers.append((status, headers))


def test_options_answer_follows_capability_changes() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=0))
    incoming = _Incoming()
    engine._answer_options(incoming)  # type: ignore[arg-type]
    engine._answer_options(incoming)  # type: ignore[arg-type]
    assert incoming.answers[0][1] is incoming.answers[1][1]
    engine.allow = ("INVITE", "BYE")
    engine.supported = frozenset({"timer"})
    engine._answer_options(incoming)  # type: ignore[arg-type]
    headers = dict(incoming.answers[2][1])
    assert headers["Allow"] == "INVITE, BYE"
    assert headers["Supported"] == "timer"


def test_response_destination_reads_the_first_via() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=0))
    req = stamp_via(request(), SOURCE)
    assert engine._response_destination(SOURCE, build_response(req, 200)) is SOURCE
    resp = build_response(with_via_lines("SIP/2.0/UDP 192.0.2.9:5080;branch=z9hG4bK1"), 200)
    moved = dataclasses.replace(resp, headers=Headers([("X-A", "1"), *resp.headers.items()]))
    assert engine._response_destination(SOURCE, moved) == Destination("udp", "192.0.2.9", 5080)
    no_via = dataclasses.replace(resp, headers=resp.headers.remove("Via"))
    assert engine._response_destination(SOURCE, no_via) is SOURCE


def test_udp_sources_are_shared_and_bounded() -> None:
    seen: list[Destination] = []
    transports = Transports(
        TransportConfig(bind="127.0.0.1", port=0),
        lambda message, source: seen.append(source),
        lambda dest, messages, reason: None,
    )
    transports._datagram_received(OPTIONS, ("192.0.2.1", 5060))
    transports._datagram_received(OPTIONS, ("192.0.2.1", 5060))
    assert seen[0] is seen[1] == Destination("udp", "192.0.2.1", 5060)
    for port in range(_UDP_SOURCES_LIMIT + 1):
        transports._datagram_received(OPTIONS, ("192.0.2.2", port))
    assert len(transports._udp_sources) <= _UDP_SOURCES_LIMIT
    assert seen[-1] == Destination("udp", "192.0.2.2", _UDP_SOURCES_LIMIT)


def test_responses_carry_canonical_names() -> None:
    resp = build_response(request(), 404, headers=(("v", "x"), ("retry-after", "5")))
    assert isinstance(resp, Response)
    assert [name for name, _ in resp.headers.items()][-2:] == ["Via", "Retry-After"]
