from __future__ import annotations

import pytest

from sbc.sip.errors import ParseError
from sbc.sip.fields import (
    CSeq,
    Via,
    format_host_port,
    format_params,
    is_token,
    parse_cseq,
    parse_host_port,
    parse_int_header,
    parse_params,
    parse_via,
    quote_string,
    unquote_string,
)

# -- tokens and quoted strings -----------------------------------------------------------------


def test_is_token() -> None:
    assert is_token("INVITE")
    assert is_token("!interesting-Method0123456789_*+`.%indeed'~")
    assert not is_token("")
    assert not is_token("a b")
    assert not is_token("a,b")
    assert not is_token('"q"')


@pytest.mark.parametrize("text", ["", "plain", 'with "quotes"', "back\\slash", "Doe, John"])
def test_quote_round_trip(text: str) -> None:
    quoted = quote_string(text)
    assert quoted.startswith('"') and quoted.endswith('"')
    assert unquote_string(quoted) == text


def test_unquote_escapes() -> None:
    assert unquote_string('"J Rosenberg \\\\\\""') == 'J Rosenberg \\"'
    assert unquote_string('"a\\b"') == "ab"


@pytest.mark.parametrize(
    "text", ["", '"', "noquotes", '"open', 'x"', '"a"b"', '"a\\"', '"a\\"b"c"']
)
def test_unquote_malformed(text: str) -> None:
    with pytest.raises(ParseError):
        unquote_string(text)


# -- generic parameters -----------------------------------------------------------------------


def test_parse_params_with_lws() -> None:
    assert parse_params(" ;  tag    = 1918181833n ; lr ;q=0.33") == (
        ("tag", "1918181833n"),
        ("lr", None),
        ("q", "0.33"),
    )


def test_parse_params_quoted_value_with_escaped_quote_and_semicolon() -> None:
    assert parse_params(';a="x\\";y";b') == (("a", '"x\\";y"'), ("b", None))


def test_parse_params_loose_unquoted_values() -> None:
    assert parse_params(";tag=abc@host;x=a/b?c") == (("tag", "abc@host"), ("x", "a/b?c"))


def test_parse_params_without_leading_semicolon_and_empty() -> None:
    assert parse_params("a=1;b") == (("a", "1"), ("b", None))
    assert parse_params("   ") == ()
    assert parse_params("") == ()


def test_parse_params_quoted_and_ipv6_values() -> None:
    params = parse_params(';+sip.instance="<urn:uuid:a;b>";received=[2001:db8::9]')
    assert params == (("+sip.instance", '"<urn:uuid:a;b>"'), ("received", "[2001:db8::9]"))
    assert format_params(params) == ';+sip.instance="<urn:uuid:a;b>";received=[2001:db8::9]'


@pytest.mark.parametrize(
    "text",
    [";;", ";a=", ";=b", ";a b=c", ";a=b c", ';a="open', ';a="x"y', ";a=<b>", ";a,b"],
)
def test_parse_params_malformed(text: str) -> None:
    with pytest.raises(ParseError):
        parse_params(text)


def test_format_params_empty() -> None:
    assert format_params(()) == ""


# -- integers ---------------------------------------------------------------------------------


def test_parse_int_header() -> None:
    assert parse_int_header(" 0068 ", "Max-Forwards") == 68
    assert parse_int_header("0", "Expires") == 0
    assert parse_int_header("4294967295", "Expires") == 2**32 - 1
    assert parse_int_header("000000000000000000070", "Max-Forwards", 255) == 70


@pytest.mark.parametrize(
    ("value", "maximum"),
    [
        ("", 2**32 - 1),
        ("-1", 2**32 - 1),
        ("+1", 2**32 - 1),
        ("1.5", 2**32 - 1),
        ("12 34", 2**32 - 1),
        ("٣", 2**32 - 1),
        ("²", 2**32 - 1),
        ("4294967296", 2**32 - 1),
        ("1" * 200, 2**32 - 1),
        ("256", 255),
    ],
)
def test_parse_int_header_rejects(value: str, maximum: int) -> None:
    with pytest.raises(ParseError):
        parse_int_header(value, "X", maximum)


# -- host and port ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", None)),
        ("example.com:5060", ("example.com", 5060)),
        ("192.0.2.1:0", ("192.0.2.1", 0)),
        ("[::1]", ("[::1]", None)),
        ("[2001:db8::1]:5061", ("[2001:db8::1]", 5061)),
        ("my_host", ("my_host", None)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_host_port(text) == expected
    assert format_host_port(*expected) == text


@pytest.mark.parametrize(
    "text",
    ["", ":5060", "a:", "a:b", "a:65536", "a:000001", "[::1", "[::1]5060", "[xyz]", "a b", "-a"],
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ParseError):
        parse_host_port(text)


# -- Via --------------------------------------------------------------------------------------


def test_via_ordinary() -> None:
    via = parse_via("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport")
    assert via == Via("UDP", "10.0.0.1", 5060, (("branch", "z9hG4bK776asdhds"), ("rport", None)))
    assert via.branch == "z9hG4bK776asdhds"
    assert via.has_rport and via.rport is None
    assert via.received is None and via.maddr is None and via.ttl is None
    assert via.sent_by == ("10.0.0.1", 5060)
    assert str(via) == "SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport"


def test_via_with_lws_everywhere() -> None:
    # RFC 4475 §3.1.1.1 (wsinv), after unfolding.
    via = parse_via("SIP  /   2.0 /UDP     192.0.2.2;branch=390skdjuw")
    assert (via.transport, via.host, via.port, via.branch) == (
        "UDP",
        "192.0.2.2",
        None,
        "390skdjuw",
    )
    via = parse_via("  sip  / 2.0  / tcp     spindle.example.com   ;  branch  =   z9hG4bK9ikj8  ")
    assert (via.transport, via.host, via.branch) == ("TCP", "spindle.example.com", "z9hG4bK9ikj8")
    assert str(via) == "SIP/2.0/TCP spindle.example.com;branch=z9hG4bK9ikj8"


def test_via_received_rport_ttl_maddr() -> None:
    via = parse_via(
        "SIP/2.0/UDP [2001:db8::1]:5070;received=192.0.2.7;rport=40000;ttl=16;maddr=224.2.0.1"
    )
    assert via.host == "[2001:db8::1]" and via.port == 5070
    assert via.received == "192.0.2.7"
    assert via.rport == 40000 and via.has_rport
    assert via.ttl == 16 and via.maddr == "224.2.0.1"


def test_via_param_changes() -> None:
    via = parse_via("SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport")
    changed = via.with_param("rport", "5062").with_param("received", "198.51.100.1")
    assert str(changed) == "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;rport=5062;received=198.51.100.1"
    assert str(changed.without_param("RPORT")) == (
        "SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKx;received=198.51.100.1"
    )
    assert not via.has_param("received") and via.param("BRANCH") == "z9hG4bKx"


def test_via_transport_upper_cased() -> None:
    assert parse_via("SIP/2.0/tls host").transport == "TLS"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "SIP/2.0/UDP",
        "SIP/2.0/UDP ",
        "SIP/2.0/UDP;branch=x",
        "SIP/3.0/UDP host",
        "HTTP/2.0/UDP host",
        "SIP/2.0 host",
        "SIP/2.0/U,DP host",
        "SIP/2.0/UDP host:port",
        "SIP/2.0/UDP 192.0.2.15;;,;,,",
        "SIP/2.0/UDP host;rport=abc",
        "SIP/2.0/UDP host;rport=70000",
        "SIP/2.0/UDP host;ttl=256",
        "SIP/2.0/UDP host;branch=",
    ],
)
def test_via_malformed(text: str) -> None:
    with pytest.raises(ParseError):
        parse_via(text)


# -- CSeq -------------------------------------------------------------------------------------


def test_cseq() -> None:
    assert parse_cseq("0009 INVITE") == CSeq(9, "INVITE")
    assert parse_cseq("  1\t BYE ") == CSeq(1, "BYE")
    assert str(CSeq(101, "REGISTER")) == "101 REGISTER"
    assert parse_cseq(f"{2**31 - 1} ACK").seq == 2**31 - 1


@pytest.mark.parametrize(
    "text",
    ["", "1", "INVITE", "1 INVITE x", "-1 INVITE", f"{2**31} INVITE", "1 IN,VITE", "x INVITE"],
)
def test_cseq_malformed(text: str) -> None:
    with pytest.raises(ParseError):
        parse_cseq(text)
