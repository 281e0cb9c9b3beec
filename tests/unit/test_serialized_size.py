"""serialized_size(): the length serialize() would write, for the §18.1.1 size rule."""

from __future__ import annotations

import pytest

from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize, serialized_size
from sbc.sip.uri import parse_uri

INVITE = (
    b"INVITE sip:201@192.168.1.50:5060;transport=UDP SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.168.1.10:5060;branch=z9hG4bK-1;rport\r\n"
    b"From: <sip:10000@192.168.1.10>;tag=7b\r\n"
    b"To: <sip:201@192.168.1.50>\r\n"
    b"Call-ID: abc@192.168.1.10\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 13\r\n"
    b"\r\n"
    b"v=0\r\ns=-\r\nx=\xff"
)


def request(*fields: tuple[str, str], body: bytes = b"") -> Request:
    headers = Headers([("Call-ID", "c@h"), ("CSeq", "1 OPTIONS"), *fields])
    return Request("OPTIONS", parse_uri("sip:u@127.0.0.1"), headers, body=body)


@pytest.mark.parametrize(
    "message",
    [
        parse_message(INVITE),
        request(),
        request(body=b"abc"),
        request(("Content-Length", "99"), ("Content-Length", "1"), body=b"\x00\x01"),
        request(("Subject", "Zoë 中文"), ("X-Raw", "octet \udcff kept")),
        Response(200, "OK", Headers([("Call-ID", "c@h"), ("CSeq", "1 BYE")])),
        Response(183, "Sitzung läuft", Headers([("Content-Length", "0")]), body=b"v=0\r\n"),
    ],
)
def test_the_size_is_that_of_the_bytes_serialize_writes(message: Request | Response) -> None:
    assert serialized_size(message) == len(serialize(message))
