from __future__ import annotations

import dataclasses

import pytest

from sbc.sip.errors import ParseError
from sbc.sip.uri import (
    AbsoluteUri,
    NameAddr,
    SipUri,
    TelUri,
    is_wildcard_contact,
    parse_name_addr,
    parse_name_addr_list,
    parse_uri,
    unescape,
    uri_equal,
)


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


# -- SipUri ------------------------------------------------------------------------------------


def test_full_sip_uri_components() -> None:
    uri = sip("sips:alice:secret@Example.COM:5061;transport=tcp;lr?Subject=hi&Priority=urgent")
    assert uri.scheme == "sips" and uri.is_secure
    assert (uri.user, uri.password) == ("alice", "secret")
    assert uri.host == "Example.COM" and uri.port == 5061
    assert uri.params == (("transport", "tcp"), ("lr", None))
    assert uri.headers == (("Subject", "hi"), ("Priority", "urgent"))
    assert uri.host_port == ("Example.COM", 5061)
    assert (
        str(uri) == "sips:alice:secret@Example.COM:5061;transport=tcp;lr?Subject=hi&Priority=urgent"
    )


def test_scheme_is_case_insensitive_and_lowered() -> None:
    uri = sip("SIP:bob@example.com")
    assert uri.scheme == "sip" and not uri.is_secure
    assert str(uri) == "sip:bob@example.com"


def test_host_only() -> None:
    uri = sip("sip:example.com")
    assert uri.user is None and uri.password is None and uri.port is None
    assert str(uri) == "sip:example.com"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("sip:alice@[2001:db8::1]:5070", "[2001:db8::1]", 5070),
        ("sip:[::1]", "[::1]", None),
        ("sip:bob@[fe80::1%25eth0];transport=udp", "[fe80::1%25eth0]", None),
        ("sip:192.0.2.4:5060", "192.0.2.4", 5060),
    ],
)
def test_ip_hosts(text: str, host: str, port: int | None) -> None:
    uri = sip(text)
    assert (uri.host, uri.port) == (host, port)
    assert str(uri) == text


def test_transport_is_lower_cased() -> None:
    # SIPp writes transport=UDP; RFC 3261 §19.1.4 compares it case-insensitively.
    uri = sip("sip:sipp@127.0.0.1:5060;Transport=UDP")
    assert uri.transport == "udp"
    assert uri.param("TRANSPORT") == "UDP"
    assert sip("sip:a@b").transport is None


def test_param_helpers() -> None:
    uri = sip("sip:a@b;lr;foo=1")
    assert uri.has_param("LR") and uri.param("lr") is None
    assert not uri.has_param("bar")
    assert uri.param("bar") is None
    assert str(uri.with_param("foo", "2")) == "sip:a@b;lr;foo=2"
    assert str(uri.with_param("transport", "tcp")) == "sip:a@b;lr;foo=1;transport=tcp"
    assert str(uri.with_params(transport="tls", foo=None)) == "sip:a@b;lr;foo;transport=tls"
    assert str(uri.without_param("LR")) == "sip:a@b;foo=1"
    assert str(dataclasses.replace(uri, port=5080)) == "sip:a@b:5080;lr;foo=1"


def test_escaped_user_kept_as_written() -> None:
    uri = sip("sip:%61lice%20x@example.com")
    assert uri.user == "%61lice%20x"
    assert unescape(uri.user) == "alice x"
    assert str(uri) == "sip:%61lice%20x@example.com"


def test_unescape_leaves_plain_and_invalid_escapes() -> None:
    assert unescape("plain") == "plain"
    assert unescape("100%zz") == "100%zz"
    assert unescape("%e2%82%ac") == "€"


def test_user_with_semicolon_and_question_mark() -> None:
    uri = sip("sip:user;par=u%40example.net@example.com;x")
    assert uri.user == "user;par=u%40example.net" and uri.params == (("x", None),)


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:@example.com",
        "sip:a b@example.com",
        "sip:alice@",
        "sip:alice@exa mple.com",
        "sip:alice@example.com:abc",
        "sip:alice@example.com:99999",
        "sip:alice@example.com:123456",
        "sip:alice@[2001:db8::1",
        "sip:alice@[zz]",
        "sip:alice@[::1]x",
        "sip:alice@-bad.com",
        "sip:alice@example.com;",
        "sip:alice@example.com;a=",
        "sip:alice@example.com;a=b c",
        "sip:alice@example.com;a<b",
        "sip:alice@example.com?",
        "sip:alice@example.com?novalue",
        "sip:alice@example.com?h=<x>",
        "sip:al<ice@example.com",
        "sip:alice:pa:ss@example.com",
        "<sip:alice@example.com>",
        "nocolon",
        ":nothing",
        "1abc:foo",
        "http:",
        " sip:alice@example.com",
    ],
)
def test_malformed_uris(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


# -- tel and other schemes --------------------------------------------------------------------


def test_tel_uri_global() -> None:
    uri = parse_uri("tel:+1-201-555-0123;ext=1234")
    assert isinstance(uri, TelUri)
    assert uri.number == "+1-201-555-0123" and uri.is_global and uri.scheme == "tel"
    assert uri.param("EXT") == "1234" and uri.has_param("ext") and not uri.has_param("isub")
    assert str(uri) == "tel:+1-201-555-0123;ext=1234"


def test_tel_uri_local_with_context() -> None:
    uri = parse_uri("TEL:7042;phone-context=example.com")
    assert isinstance(uri, TelUri)
    assert not uri.is_global and uri.param("phone-context") == "example.com"
    assert str(uri) == "tel:7042;phone-context=example.com"


@pytest.mark.parametrize("text", ["tel:", "tel:+", "tel:+1-x", "tel:--", "tel:123;"])
def test_malformed_tel(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


def test_absolute_uri_kept_verbatim() -> None:
    uri = parse_uri("urn:service:sos")
    assert isinstance(uri, AbsoluteUri)
    assert uri.scheme == "urn" and str(uri) == "urn:service:sos"
    assert parse_uri("HTTP://example.com/x").scheme == "http"


# -- comparison (RFC 3261 §19.1.4) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
        ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;newparam=5"),
        (
            "sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
            "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com",
        ),
        (
            "sip:alice@atlanta.com?subject=project%20x&priority=urgent",
            "sip:alice@atlanta.com?priority=urgent&subject=project%20x",
        ),
        ("tel:+1-201-555-0123", "tel:+12015550123"),
        ("urn:x:y", "URN:x:y"),
    ],
)
def test_equal_uris(a: str, b: str) -> None:
    assert uri_equal(parse_uri(a), parse_uri(b))
    assert uri_equal(parse_uri(b), parse_uri(a))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
        ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
        ("sip:bob@biloxi.com", "sips:bob@biloxi.com"),
        ("sip:bob@biloxi.com", "sip:biloxi.com"),
        ("sip:bob:pw@biloxi.com", "sip:bob@biloxi.com"),
        ("sip:bob:pw@biloxi.com", "sip:bob:PW@biloxi.com"),
        ("sip:bob@biloxi.com;foo=1", "sip:bob@biloxi.com;foo=2"),
        ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
        ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
        ("tel:+12015550123", "tel:+12015550124"),
        ("tel:+12015550123;ext=1", "tel:+12015550123"),
        ("urn:x:y", "urn:x:Y"),
        ("sip:bob@biloxi.com", "tel:+12015550123"),
    ],
)
def test_different_uris(a: str, b: str) -> None:
    assert not uri_equal(parse_uri(a), parse_uri(b))


# -- name-addr ---------------------------------------------------------------------------------


def test_name_addr_with_quoted_display_escapes_and_comma() -> None:
    na = parse_name_addr('"Doe, \\"JD\\" John" <sip:jd@example.com>;tag=abc;expires=60')
    assert na.display == 'Doe, "JD" John'
    assert na.tag == "abc" and na.param("EXPIRES") == "60" and na.has_param("expires")
    assert str(na) == '"Doe, \\"JD\\" John" <sip:jd@example.com>;tag=abc;expires=60'


def test_name_addr_token_display_and_no_space() -> None:
    na = parse_name_addr("Alice   Smith<sip:alice@example.com>")
    assert na.display == "Alice Smith"
    assert str(na) == "Alice Smith <sip:alice@example.com>"


def test_name_addr_without_display() -> None:
    na = parse_name_addr("  <sip:alice@example.com;lr>  ")
    assert na.display is None and na.params == ()
    assert isinstance(na.uri, SipUri) and na.uri.has_param("lr")
    assert str(na) == "<sip:alice@example.com;lr>"


def test_empty_quoted_display_is_kept() -> None:
    na = parse_name_addr('"" <sip:a@b>')
    assert na.display == ""
    assert str(na) == '"" <sip:a@b>'


def test_addr_spec_params_belong_to_header() -> None:
    na = parse_name_addr("sip:alice@example.com;tag=x;user=phone")
    assert na.display is None
    assert na.params == (("tag", "x"), ("user", "phone"))
    assert isinstance(na.uri, SipUri) and na.uri.params == ()
    assert str(na) == "<sip:alice@example.com>;tag=x;user=phone"


def test_name_addr_with_tag_and_params() -> None:
    na = parse_name_addr("<sip:a@b>")
    assert na.tag is None
    tagged = na.with_tag("t1")
    assert tagged.tag == "t1" and str(tagged) == "<sip:a@b>;tag=t1"
    assert str(tagged.with_tag("t2")) == "<sip:a@b>;tag=t2"
    assert str(tagged.with_param("q", "0.5").without_param("TAG")) == "<sip:a@b>;q=0.5"
    assert str(na.with_uri(parse_uri("tel:+1234"))) == "<tel:+1234>"


def test_display_names_that_need_quotes() -> None:
    assert str(NameAddr(parse_uri("sip:a@b"), "Doe, John")) == '"Doe, John" <sip:a@b>'
    assert str(NameAddr(parse_uri("sip:a@b"), 'say "hi"')) == '"say \\"hi\\"" <sip:a@b>'
    assert str(NameAddr(parse_uri("sip:a@b"), "+14155550100")) == "+14155550100 <sip:a@b>"
    assert str(NameAddr(parse_uri("sip:a@b"), "a  b")) == '"a  b" <sip:a@b>'


def test_addr_spec_with_quoted_angle_bracket_in_param() -> None:
    na = parse_name_addr('sip:a@b;+sip.instance="<urn:uuid:1>";expires=60')
    assert na.display is None and str(na.uri) == "sip:a@b"
    assert na.param("+sip.instance") == '"<urn:uuid:1>"' and na.param("expires") == "60"


def test_quoted_param_value_with_semicolon() -> None:
    na = parse_name_addr('<sip:a@b>;+sip.instance="<urn:uuid:1;2>";reg-id=1')
    assert na.param("+sip.instance") == '"<urn:uuid:1;2>"'
    assert na.param("reg-id") == "1"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '"unterminated <sip:a@b>',
        '"Quoted" sip:a@b',
        "Bell, Alexander <sip:a@b>",
        "<sip:a@b",
        "< sip:a@b >",
        "<sip:a@b>;;",
        "<sip:a@b>junk",
        "sip:a@b?Route=x",
        "sip:a@b;tag=",
        "<nocolon>",
    ],
)
def test_malformed_name_addr(text: str) -> None:
    with pytest.raises(ParseError):
        parse_name_addr(text)


def test_name_addr_list_with_commas_in_quotes() -> None:
    items = parse_name_addr_list('"Doe, J" <sip:a@b>;q=0.5, <sip:c@d>,sip:e@f;expires=0')
    assert [str(i.uri) for i in items] == ["sip:a@b", "sip:c@d", "sip:e@f"]
    assert items[0].display == "Doe, J" and items[2].param("expires") == "0"


def test_name_addr_list_rejects_empty_and_star() -> None:
    with pytest.raises(ParseError):
        parse_name_addr_list(" , ")
    with pytest.raises(ParseError):
        parse_name_addr_list("*")
    assert is_wildcard_contact(" * ")
    assert not is_wildcard_contact("<sip:a@b>")
