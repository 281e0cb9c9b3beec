"""Round 8 of issue 12 (sip): structural cuts in the core keep its behaviour.

* The parser's memo of whole header lines (``parser._LINES``): a head parsed with the memo
  warm gives what it gives with the memo empty (fields, lookup keys, Content-Length values,
  errors); repeated lines share their field; the memo stays bounded and never holds the
  fields that change with every message (Via, From, To, Call-ID).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip import parser
from sbc.sip.errors import ParseError
from sbc.sip.parser import _Head, parse_message

# -- parser: the memo of header lines ------------------------------------------------------

_LINES = st.sampled_from(
    [
        "Via: SIP/2.0/UDP h;branch=z9hG4bK1",
        "v:SIP/2.0/TCP h",
        "From: <sip:a@b>;tag=1",
        "t: <sip:c@d>",
        "i: abc",
        "Max-Forwards: 70",
        "max-forwards:70",
        "Content-Length: 0",
        "l: 12",
        "content-length :7",
        "CSeq: 1 INVITE",
        "X-Odd \t: a:b ",
        "Subject:",
        "Subject: x",
        "NoColon",
        "Bad Name: x",
        " continued",
        "\tmore: x",
        " ",
        "Allow: INVITE, ACK, BYE",
    ]
)


def _head_or_error(text: str) -> object:
    try:
        head = _Head(text)
    except ParseError as exc:
        return ("ParseError", str(exc))
    return (head.items, head.keys, head.content_lengths)


@given(st.lists(_LINES, max_size=7), st.lists(_LINES, max_size=7))
def test_a_head_parses_the_same_with_the_line_memo_warm(
    before: list[str], lines: list[str]
) -> None:
    text = "\r\n".join(["OPTIONS sip:a@b SIP/2.0", *lines])
    saved = parser._LINES
    try:
        parser._LINES = {}
        cold = _head_or_error(text)
        # Warm the memo with other heads' lines (and this one's), then parse again.
        _head_or_error("\r\n".join(["OPTIONS sip:a@b SIP/2.0", *before]))
        for line in lines:
            _head_or_error(f"OPTIONS sip:a@b SIP/2.0\r\n{line}")
        warm = _head_or_error(text)
        again = _head_or_error(text)
    finally:
        parser._LINES = saved
    assert warm == cold
    assert again == cold


def test_repeated_lines_share_their_field_and_changing_ones_are_not_kept() -> None:
    def invite(n: int) -> bytes:
        return (
            "INVITE sip:201@192.0.2.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK{n}\r\n"
            f"From: <sip:1@192.0.2.2>;tag={n}\r\n"
            "To: <sip:201@192.0.2.1>\r\n"
            f"Call-ID: {n}@192.0.2.2\r\n"
            "CSeq: 1 INVITE\r\n"
            "Max-Forwards: 70\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()

    first, second = parse_message(invite(1)), parse_message(invite(2))
    for a, b in zip(first.headers.items(), second.headers.items(), strict=True):
        if a[0] in ("CSeq", "Max-Forwards", "Content-Length"):
            assert a is b  # one field for both messages: the line was read once
        elif a[0] in ("Via", "From", "Call-ID"):
            assert a != b
    remembered = set(parser._LINES)
    assert "CSeq: 1 INVITE" in remembered and "Max-Forwards: 70" in remembered
    for line in remembered:
        assert not line.lower().startswith(("via:", "from:", "to:", "call-id:"))


def test_the_line_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parser, "_LINES", {})
    for n in range(parser._LINES_LIMIT * 3):
        parse_message(f"OPTIONS sip:a@b SIP/2.0\r\nX-Id: {n}\r\nCSeq: 1 OPTIONS\r\n\r\n".encode())
        assert len(parser._LINES) <= parser._LINES_LIMIT
    # Emptied when full, so a repeating line is back after the next message carrying it.
    assert "CSeq: 1 OPTIONS" in parser._LINES
    long_line = "X-Long: " + "a" * parser._LINE_MAX
    parse_message(f"OPTIONS sip:a@b SIP/2.0\r\n{long_line}\r\n\r\n".encode())
    assert long_line not in parser._LINES
