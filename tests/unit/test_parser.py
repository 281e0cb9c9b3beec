"""parse_message, StreamParser, serialize and validate_request/validate_response."""

from __future__ import annotations

import dataclasses

import pytest

from sbc.sip.errors import (
    BadExtension,
    BadRequest,
    MessageTooLarge,
    NotAcceptable,
    ParseError,
    SipError,
    TooManyHops,
    UnsupportedMediaType,
    VersionNotSupported,
)
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.serializer import serialize
from sbc.sip.uri import SipUri, parse_uri
from sbc.sip.validate import validate_request, validate_response

SDP = b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"

INVITE = (
    b"INVITE sip:bob@biloxi.example.com;transport=UDP SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@biloxi.example.com>\r\n'
    b'From: "Doe, Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: " + str(len(SDP)).encode() + b"\r\n"
    b"\r\n" + SDP
)

RESPONSE = (
    b"SIP/2.0 180 Ringing\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;received=192.0.2.1\r\n"
    b"To: <sip:bob@biloxi.example.com>;tag=a6c85cf\r\n"
    b"From: <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def request(data: bytes = INVITE) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def with_header(data: bytes, line: bytes) -> bytes:
    """Insert a header line right after the start line."""
    first, rest = data.split(b"\r\n", 1)
    return first + b"\r\n" + line + b"\r\n" + rest


def replace(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


# -- parse_message ----------------------------------------------------------------------------


def test_parse_invite() -> None:
    req = request()
    assert req.method == "INVITE" and req.version == "SIP/2.0"
    assert isinstance(req.uri, SipUri) and req.uri.transport == "udp"
    assert req.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert req.cseq.seq == 314159
    assert req.top_via.branch == "z9hG4bK776asdhds" and req.top_via.has_rport
    assert req.from_.display == "Doe, Alice" and req.from_tag == "1928301774"
    assert req.to_tag is None
    assert req.body == SDP


def test_parse_response() -> None:
    resp = parse_message(RESPONSE)
    assert isinstance(resp, Response)
    assert (resp.status, resp.reason) == (180, "Ringing")
    assert resp.is_provisional and not resp.is_final
    assert resp.to_tag == "a6c85cf"
    assert resp.top_via.received == "192.0.2.1"
    assert resp.body == b""


def test_leading_crlfs_skipped_and_trailing_octets_ignored() -> None:
    msg = parse_message(b"\r\n\r\n" + RESPONSE + b"garbage after the message")
    assert isinstance(msg, Response) and msg.body == b""


def test_missing_content_length_on_udp_takes_rest_of_datagram() -> None:
    data = replace(INVITE, b"Content-Length: " + str(len(SDP)).encode() + b"\r\n", b"")
    assert request(data).body == SDP


def test_agreeing_duplicate_content_lengths() -> None:
    data = with_header(INVITE, b"l: " + str(len(SDP)).encode())
    req = request(data)
    assert req.body == SDP and req.headers.count("Content-Length") == 2


def test_disagreeing_content_lengths_with_a_bad_value_still_reject() -> None:
    with pytest.raises(ParseError):
        parse_message(with_header(INVITE, b"Content-Length: abc"))


def test_header_folding_and_compact_names() -> None:
    data = replace(INVITE, b"CSeq: 314159 INVITE\r\n", b"CSeq: 314159\r\n\t INVITE\r\n")
    data = replace(data, b"Call-ID:", b"i :")
    req = request(data)
    assert req.headers.get("CSeq") == "314159 INVITE"
    assert req.call_id == "a84b4c76e66710@pc33.atlanta.example.com"


def test_folded_value_starting_empty() -> None:
    req = request(with_header(INVITE, b"Subject:\r\n   hello\r\n world"))
    assert req.headers.get("Subject") == "hello world"


def test_version_is_kept_for_validate() -> None:
    req = request(replace(INVITE, b" SIP/2.0\r\n", b" sip/3.1\r\n"))
    assert req.version == "SIP/3.1"
    with pytest.raises(VersionNotSupported):
        validate_request(req)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\n",  # no blank line
        b"INVITE sip:a@b\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0 \r\n\r\n",
        b"INV@ITE sip:a@b SIP/2.0\r\n\r\n",
        b"INVITE sip:a@b SIP/X\r\n\r\n",
        b"INVITE sip:a@b HTTP/1.1\r\n\r\n",
        b"INVITE <sip:a@b> SIP/2.0\r\n\r\n",
        b"SIP/2.0\r\n\r\n",
        b"SIP/2.0 20 OK\r\n\r\n",
        b"SIP/2.0 099 Odd\r\n\r\n",
        b"SIP/2.0 2x0 OK\r\n\r\n",
        b"SIP/2.0 1000 OK\r\n\r\n",
        b"SIP/2.0 700 Too High\r\n\r\n",
        b"SIP/2.0.1 200 OK\r\n\r\n",
        b"SIP/2.0 200 OK\r\n continuation first\r\n\r\n",
        b"SIP/2.0 200 OK\r\nNoColon\r\n\r\n",
        b"SIP/2.0 200 OK\r\nBad Name: x\r\n\r\n",
        b"SIP/2.0 200 OK\r\n: empty name\r\n\r\n",
        b"SIP/2.0 200 OK\r\nX: a\nY: b\r\n\r\n",
        b"SIP/2.0 200 OK\r\nX: a\rb\r\n\r\n",
        b"SIP/2.0 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"SIP/2.0 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"SIP/2.0 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
    ],
)
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(ParseError) as err:
        parse_message(data)
    assert err.value.status == 400


def test_utf8_and_binary_octets_survive_round_trip() -> None:
    data = with_header(RESPONSE, "Subject: caf\u00e9 \xff".encode("latin-1"))
    msg = parse_message(data)
    assert serialize(msg) == data


def test_header_name_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from sbc.sip import parser

    monkeypatch.setattr(parser, "_NAME_CACHE_LIMIT", 0)
    msg = parse_message(with_header(RESPONSE, b"X-Uncached-Name-1 : v"))
    assert msg.headers.get("X-Uncached-Name-1") == "v"
    assert "X-Uncached-Name-1 " not in parser._NAME_CACHE


# -- serialize --------------------------------------------------------------------------------


def test_serialize_round_trips_byte_for_byte() -> None:
    assert serialize(request()) == INVITE
    assert serialize(parse_message(RESPONSE)) == RESPONSE


def test_serialize_recomputes_content_length_in_place() -> None:
    req = dataclasses.replace(request(), body=b"v=0\r\n")
    out = serialize(req)
    assert b"\r\nContent-Length: 5\r\n\r\nv=0\r\n" in out
    lines = out.split(b"\r\n")
    assert lines.index(b"Content-Length: 5") == lines.index(b"Content-Type: application/sdp") + 1


def test_serialize_drops_extra_content_lengths_and_appends_missing() -> None:
    headers = Headers([("Content-Length", "7"), ("X-A", "1"), ("l", "9")])
    req = Request("OPTIONS", parse_uri("sip:a@b"), headers, b"abc")
    assert serialize(req) == b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 3\r\nX-A: 1\r\n\r\nabc"
    resp = Response(200, "OK", Headers([("v", "SIP/2.0/UDP h;branch=z9hG4bKx")]))
    assert serialize(resp) == (
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nContent-Length: 0\r\n\r\n"
    )


def test_serialize_empty_reason() -> None:
    assert serialize(Response(100)).startswith(b"SIP/2.0 100 \r\n")


@pytest.mark.parametrize(
    "headers",
    [
        Headers([("X-Evil", "a\r\nInjected: yes")]),
        Headers([("X-Evil", "a\nb")]),
        Headers([("X-Evil", "a\rb")]),
        Headers([("X-Ev\r\nil", "a")]),
    ],
)
def test_serialize_refuses_header_injection(headers: Headers) -> None:
    with pytest.raises(ValueError):
        serialize(Request("OPTIONS", parse_uri("sip:a@b"), headers))


# -- StreamParser -----------------------------------------------------------------------------


def test_stream_whole_messages() -> None:
    parser = StreamParser()
    out = parser.feed(INVITE + RESPONSE)
    assert out == [parse_message(INVITE), parse_message(RESPONSE)]
    assert parser.buffered == 0 and not parser.in_message


def test_stream_one_byte_at_a_time() -> None:
    parser = StreamParser()
    data = INVITE + b"\r\n" + RESPONSE
    out = []
    for i in range(len(data)):
        out.extend(parser.feed(data[i : i + 1]))
        if i == 10:
            assert parser.in_message and parser.buffered == 11
    assert out == [parse_message(INVITE), parse_message(RESPONSE)]
    assert not parser.in_message


def test_stream_partial_body_keeps_in_message() -> None:
    parser = StreamParser()
    assert parser.feed(INVITE[:-5]) == []
    assert parser.in_message and parser.buffered == len(INVITE) - 5
    assert parser.feed(INVITE[-5:]) == [parse_message(INVITE)]
    assert not parser.in_message


def test_stream_keepalive_pings() -> None:
    parser = StreamParser()
    assert parser.feed(b"\r\n\r\n") == []
    assert parser.pings_received == 1 and not parser.in_message
    assert parser.feed(b"\r") == []  # half of a CRLF: still no message under way
    assert not parser.in_message
    assert parser.feed(b"\n\r\n") == []
    assert parser.pings_received == 2
    assert parser.take_pongs() == 2 and parser.take_pongs() == 0
    # A single CRLF (a pong from the peer) is no ping.
    assert parser.feed(b"\r\n" + RESPONSE) == [parse_message(RESPONSE)]
    assert parser.pings_received == 2
    # The CRLF count restarts after a message.
    assert parser.feed(b"\r\n") == []
    assert parser.feed(b"\r\n") == []
    assert parser.pings_received == 3 and parser.take_pongs() == 1


def test_stream_requires_content_length() -> None:
    parser = StreamParser()
    data = replace(RESPONSE, b"Content-Length: 0\r\n", b"")
    with pytest.raises(ParseError):
        parser.feed(data)
    # After an error the stream is unusable.
    with pytest.raises(ParseError):
        parser.feed(RESPONSE)


def test_stream_message_too_large_in_headers() -> None:
    parser = StreamParser(max_message_size=100)
    with pytest.raises(MessageTooLarge) as err:
        parser.feed(b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: " + b"y" * 200)
    assert err.value.status == 513
    with pytest.raises(MessageTooLarge):
        parser.feed(b"\r\n\r\n")


def test_stream_message_too_large_whole_head_in_one_chunk() -> None:
    parser = StreamParser(max_message_size=100)
    with pytest.raises(MessageTooLarge):
        parser.feed(RESPONSE)


def test_stream_message_too_large_by_body() -> None:
    parser = StreamParser(max_message_size=len(INVITE) - 1)
    with pytest.raises(MessageTooLarge):
        parser.feed(INVITE[: INVITE.index(b"\r\n\r\n") + 4])


def test_stream_exact_size_limit_is_accepted() -> None:
    parser = StreamParser(max_message_size=len(INVITE))
    assert parser.feed(INVITE) == [parse_message(INVITE)]


# -- validate_request -------------------------------------------------------------------------


def test_valid_invite_passes() -> None:
    validate_request(request())


def status_of(data: bytes, **kwargs: object) -> int:
    with pytest.raises(SipError) as err:
        validate_request(request(data), **kwargs)  # type: ignore[arg-type]
    return err.value.status


@pytest.mark.parametrize(
    ("old", "new", "status"),
    [
        (b"Max-Forwards: 70\r\n", b"", 400),
        (b"Max-Forwards: 70", b"Max-Forwards: 256", 400),
        (b"Max-Forwards: 70", b"Max-Forwards: 0", 483),
        (b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com", b"Call-ID: a b", 400),
        (b"CSeq: 314159 INVITE", b"CSeq: 314159 BYE", 400),
        (b"CSeq: 314159 INVITE", b"CSeq: 2147483648 INVITE", 400),
        (b"To: ", b"To: <sip:x@y>, ", 400),
        (b"Via: SIP/2.0/UDP", b"Via: SIP/3.0/UDP", 400),
        (b"Content-Type: application/sdp", b"Content-Type: text/plain", 415),
        (b"Content-Type: application/sdp", b"Content-Type: garbage", 400),
        (b"Content-Type: application/sdp\r\n", b"", 400),
        (b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: *", 400),
        (b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: <sip:a@b>;expires=x", 400),
        (b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: <sip:a@b", 400),
        (b"INVITE sip:bob@biloxi.example.com;transport=UDP", b"INVITE tel:+123", 416),
        (b"INVITE sip:bob@biloxi.example.com;transport=UDP", b"INVITE sip:b@c?X=y", 400),
    ],
)
def test_validate_request_statuses(old: bytes, new: bytes, status: int) -> None:
    assert status_of(replace(INVITE, old, new)) == status


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"Route: <sip:p1@x;lr>, junk", 400),
        (b"Record-Route: <sip:p1@x;lr", 400),
        (b"Expires: 4294967296", 400),
        (b"Date: Sat, 13 Nov 2010 23:29:00 PST", 400),
        (b"Content-Length: 1", 400),
        (b"Content-Type: application/sdp", 400),
        (b"Content-Encoding: gzip", 415),
        (b"Accept: text/plain", 406),
        (b"Require: 100rel", 420),
        (b"Max-Forwards: 5", 400),
    ],
)
def test_validate_request_extra_header(line: bytes, status: int) -> None:
    assert status_of(with_header(INVITE, line)) == status


def test_validate_request_allows_well_formed_extras() -> None:
    for line in [
        b"Date: Sat, 13 Nov 2010 23:29:00 GMT",
        b"Accept: application/*",
        b"Accept: */*",
        b"Accept: application/sdp;level=1, text/plain",
        b"Require: Timer",
        b"Proxy-Require: foo",
        b"Content-Encoding: identity",
        b"Route: <sip:p1@x;lr>, <sip:p2@y;lr>",
        b"Expires: 0",
    ]:
        validate_request(request(with_header(INVITE, line)))


def test_require_reports_unsupported_tags() -> None:
    req = request(with_header(INVITE, b"Require: timer, 100rel, foo"))
    with pytest.raises(BadExtension) as err:
        validate_request(req)
    assert err.value.headers == (("Unsupported", "100rel, foo"),)
    validate_request(req, supported=frozenset({"timer", "100rel", "foo"}))


def test_proxy_require_checked_on_demand() -> None:
    req = request(with_header(INVITE, b"Proxy-Require: foo"))
    validate_request(req)
    with pytest.raises(BadExtension) as err:
        validate_request(req, check_proxy_require=True)
    assert err.value.headers == (("Unsupported", "foo"),)


def test_require_not_checked_on_ack() -> None:
    ack = replace(replace(INVITE, b"INVITE sip:", b"ACK sip:"), b"314159 INVITE", b"314159 ACK")
    validate_request(request(with_header(ack, b"Require: foo")))


def test_unsupported_encoding_names_accept_encoding() -> None:
    with pytest.raises(UnsupportedMediaType) as err:
        validate_request(request(with_header(INVITE, b"Content-Encoding: gzip")))
    assert err.value.headers == (("Accept", "application/sdp"), ("Accept-Encoding", "identity"))


def test_accept_set_is_an_argument() -> None:
    req = request(replace(INVITE, b"Content-Type: application/sdp", b"Content-Type: Text/Plain"))
    validate_request(req, accept=frozenset({"text/plain", "application/sdp"}))
    with pytest.raises(UnsupportedMediaType) as err:
        validate_request(req, accept=frozenset({"application/sdp", "multipart/mixed"}))
    assert err.value.headers == (("Accept", "application/sdp, multipart/mixed"),)


def test_406_carries_accept() -> None:
    with pytest.raises(NotAcceptable) as err:
        validate_request(request(with_header(INVITE, b"Accept: text/html")))
    assert err.value.headers == (("Accept", "application/sdp"),)


def test_zero_max_forwards_policy() -> None:
    req = request(replace(INVITE, b"Max-Forwards: 70", b"Max-Forwards: 0"))
    with pytest.raises(TooManyHops):
        validate_request(req)
    validate_request(req, allow_zero_max_forwards=True)
    validate_request(req, allow_zero_max_forwards=frozenset({"INVITE"}))
    with pytest.raises(TooManyHops):
        validate_request(req, allow_zero_max_forwards=False)


def test_register_wildcard_contact() -> None:
    register = (
        b"REGISTER sip:example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP h;branch=z9hG4bKr\r\n"
        b"Max-Forwards: 70\r\n"
        b"To: <sip:u@example.com>\r\n"
        b"From: <sip:u@example.com>;tag=1\r\n"
        b"Call-ID: r1\r\n"
        b"CSeq: 2 REGISTER\r\n"
        b"Contact: *\r\n"
        b"Expires: 0\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    validate_request(request(register))
    with pytest.raises(BadRequest):
        validate_request(request(with_header(register, b"Contact: <sip:u@h>")))


def test_missing_and_empty_mandatory_fields() -> None:
    for name in (b"To", b"From", b"Call-ID", b"CSeq", b"Via"):
        lines = [ln for ln in INVITE.split(b"\r\n") if not ln.startswith(name + b":")]
        with pytest.raises(BadRequest):
            validate_request(request(b"\r\n".join(lines)))
    with pytest.raises(BadRequest):
        via_line = INVITE.split(b"\r\n")[1]
        validate_request(request(replace(INVITE, via_line, b"Via: ,")))


def test_validate_request_accepts_missing_max_forwards_when_allowed() -> None:
    validate_request(
        request(replace(INVITE, b"Max-Forwards: 70\r\n", b"")), require_max_forwards=False
    )


# -- validate_response ------------------------------------------------------------------------


def test_validate_response() -> None:
    resp = parse_message(RESPONSE)
    assert isinstance(resp, Response)
    validate_response(resp)
    with pytest.raises(ParseError):
        validate_response(dataclasses.replace(resp, version="SIP/3.0"))
    with pytest.raises(ParseError):
        validate_response(dataclasses.replace(resp, headers=resp.headers.remove("Via")))
    with pytest.raises(ParseError):
        validate_response(dataclasses.replace(resp, headers=resp.headers.add("CSeq", "1 INVITE")))
    with pytest.raises(ParseError):
        validate_response(dataclasses.replace(resp, headers=resp.headers.set("From", "<sip:a")))
