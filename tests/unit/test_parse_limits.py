"""Parse-time limits (ParseLimits): header lines, Via entries, Request-URI length, and the head
kept for a 513 when a stream message is too large."""

from __future__ import annotations

from pathlib import Path

import pytest

from sbc.sip.errors import LimitExceeded, MessageTooLarge, ParseError
from sbc.sip.message import Request
from sbc.sip.parser import (
    DEFAULT_LIMITS,
    ParseLimits,
    StreamMessageTooLarge,
    StreamParser,
    parse_message,
)

FIXTURES = Path(__file__).resolve().parents[2] / "sip-fixtures" / "rfc4475"


def request(*, uri: str = "sip:bob@example.com", vias: int = 1, extra: int = 0) -> bytes:
    lines = [f"OPTIONS {uri} SIP/2.0"]
    lines += [f"Via: SIP/2.0/UDP 192.0.2.{i % 250 + 1};branch=z9hG4bK{i}" for i in range(vias)]
    lines += [f"X-Filler-{i}: {i}" for i in range(extra)]
    lines += [
        "From: <sip:a@example.com>;tag=1",
        "To: <sip:bob@example.com>",
        "Call-ID: limits",
        "CSeq: 1 OPTIONS",
        "Max-Forwards: 70",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def header_lines(data: bytes) -> int:
    return data.split(b"\r\n\r\n")[0].count(b"\r\n")


def test_limits_exactly_at_the_edge_parse() -> None:
    limits = ParseLimits(max_headers=20, max_via=3, max_uri_length=30)
    data = request(uri="sip:" + "b" * 26, vias=3, extra=20 - 3 - 6)
    assert header_lines(data) == 20
    message = parse_message(data, limits)
    assert isinstance(message, Request)
    assert len(message.headers.values("Via")) == 3
    assert StreamParser(limits=limits).feed(data)[0] == message


@pytest.mark.parametrize(
    ("data", "limit"),
    [
        (request(extra=20 - 6), "headers"),
        (request(vias=4), "via"),
        (request(uri="sip:" + "b" * 27), "uri"),
    ],
)
def test_one_over_a_limit_is_refused_and_named(data: bytes, limit: str) -> None:
    limits = ParseLimits(max_headers=20, max_via=3, max_uri_length=30)
    with pytest.raises(LimitExceeded) as err:
        parse_message(data, limits)
    assert err.value.limit == limit
    assert err.value.status == 400
    assert isinstance(err.value, ParseError)  # the parser's own error type, nothing else
    stream = StreamParser(limits=limits)
    with pytest.raises(LimitExceeded):
        stream.feed(data)
    with pytest.raises(ParseError):  # the stream stays unusable: the transport closes it
        stream.feed(b"\r\n")


def test_via_entries_in_one_field_count_each() -> None:
    data = request(vias=1).replace(
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK0",
        b"Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK0, SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK1",
    )
    assert isinstance(parse_message(data, ParseLimits(max_via=2)), Request)
    with pytest.raises(LimitExceeded) as err:
        parse_message(data, ParseLimits(max_via=1))
    assert err.value.limit == "via"


def test_continuation_lines_count_as_header_lines() -> None:
    data = request().replace(b"Call-ID: limits\r\n", b"Call-ID:\r\n limits\r\n")
    lines = header_lines(data)
    assert isinstance(parse_message(data, ParseLimits(max_headers=lines)), Request)
    with pytest.raises(LimitExceeded):
        parse_message(data, ParseLimits(max_headers=lines - 1))


def test_defaults_accept_every_well_formed_rfc4475_message() -> None:
    # longreq.dat is the longest of them (30 Via entries); none may trip a default limit.
    tripped = []
    for path in sorted(FIXTURES.glob("*.dat")):
        try:
            parse_message(path.read_bytes(), DEFAULT_LIMITS)
        except LimitExceeded as exc:
            tripped.append((path.name, exc.limit))
        except ParseError:
            pass  # malformed on purpose; not a limit
    assert tripped == []
    assert ParseLimits(max_headers=128, max_via=64, max_uri_length=1024) == DEFAULT_LIMITS


def test_stream_message_too_large_keeps_the_parsed_head() -> None:
    data = request().replace(b"Content-Length: 0", b"Content-Length: 5000")
    stream = StreamParser(max_message_size=2048)
    with pytest.raises(StreamMessageTooLarge) as err:
        stream.feed(data)
    head = err.value.message
    assert isinstance(head, Request)
    assert head.method == "OPTIONS"
    assert head.headers.get("Call-ID") == "limits"
    assert head.body == b""
    assert err.value.status == 513


def test_stream_head_too_large_has_no_head() -> None:
    stream = StreamParser(max_message_size=1024)
    with pytest.raises(MessageTooLarge) as err:
        stream.feed(b"OPTIONS sip:a@b SIP/2.0\r\nX: " + b"y" * 2000)
    assert not isinstance(err.value, StreamMessageTooLarge)


def test_commas_outside_via_do_not_count_as_via_entries() -> None:
    # Lines plus commas exceed the limit, so the Via entries are counted exactly: one.
    data = request(extra=0).replace(
        b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nAllow: " + b"A, " * 30 + b"B\r\n"
    )
    assert isinstance(parse_message(data, ParseLimits(max_via=2)), Request)
