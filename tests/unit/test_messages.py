"""B-leg INVITE building, response mapping and PBX-side headers (sbc.b2bua.messages)."""

from __future__ import annotations

import pytest

from sbc.b2bua.messages import (
    HANDLED,
    BridgeConfig,
    Caller,
    LegIds,
    LocalAddress,
    Peer,
    RetellTarget,
    SessionIntervalTooSmall,
    SessionTimer,
    allow_header,
    build_b_invite,
    call_facts,
    called_of,
    caller_of,
    escape_user,
    negotiate_session_timer,
    parse_dtmf_info,
    pbx_dialog_headers,
    pbx_provisional_for,
    pbx_status_for_failure,
    uri_user,
)
from sbc.b2bua.numbers import NumberPlan
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize
from sbc.sip.uri import AbsoluteUri, SipUri, TelUri, parse_uri

PLAN = NumberPlan(country_code="44", national_prefix="0", international_prefix="00")
TARGET = RetellTarget("sip.retellai.com", None, "tcp", "+14155550100")
LOCAL_RETELL = LocalAddress("198.51.100.7", 5080, "tcp")
LOCAL_PBX = LocalAddress("10.0.0.5", 5060, "udp")
SDP = b"v=0\r\no=- 1 1 IN IP4 198.51.100.7\r\ns=-\r\nc=IN IP4 198.51.100.7\r\nt=0 0\r\n"

A_INVITE_BYTES = (
    b"INVITE sip:101@10.0.0.5:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK-pbx-1;rport\r\n"
    b"Record-Route: <sip:10.0.0.1:5060;lr>\r\n"
    b"Record-Route: <sip:10.0.0.9;lr>\r\n"
    b"Max-Forwards: 69\r\n"
    b'From: "Alice Smith" <sip:020 7123 4567@10.0.0.1>;tag=pbxtag\r\n'
    b"To: <sip:101@10.0.0.1>\r\n"
    b"Call-ID: pbx-call-1@10.0.0.1\r\n"
    b"CSeq: 2 INVITE\r\n"
    b"Contact: <sip:6000@10.0.0.1:5060>\r\n"
    b"User-Agent: 3CXPhoneSystem 18.0.9.20 (20)\r\n"
    b"Supported: replaces, timer\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, REFER, INFO, UPDATE, NOTIFY\r\n"
    b"Session-Expires: 600\r\n"
    b"P-Asserted-Identity: <sip:02071234567@10.0.0.1>\r\n"
    b"Remote-Party-ID: <sip:02071234567@10.0.0.1>;party=calling\r\n"
    b"X-3CX-Internal: 1\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 0\r\n\r\n"
).replace(b"020 7123 4567", b"020-7123-4567")


def a_invite() -> Request:
    msg = parse_message(A_INVITE_BYTES)
    assert isinstance(msg, Request)
    return msg


def build(**overrides: object) -> Request:
    a = a_invite()
    target = overrides.pop("target", TARGET)
    user_agent = overrides.pop("user_agent", "sbc/0.1")
    kwargs: dict[str, object] = {
        "config": BridgeConfig("101", target, user_agent=user_agent),  # type: ignore[arg-type]
        "local": LOCAL_RETELL,
        "ids": LegIds("b-call-1", "btag", 1),
        "caller": caller_of(a, PLAN),
        "x_headers": (("X-Caller-Number", "+442071234567"), ("X-Call-UUID", "u-1")),
        "sdp": SDP,
    }
    kwargs.update(overrides)
    return build_b_invite(**kwargs)  # type: ignore[arg-type]


def test_call_facts_for_templates() -> None:
    a = a_invite()
    facts = call_facts(a, Caller("+442071234567", None), "101", "u-1", 5.0)
    assert (facts.caller_number, facts.caller_name, facts.called) == ("+442071234567", "", "101")
    assert (facts.pbx_call_id, facts.call_uuid, facts.now) == ("pbx-call-1@10.0.0.1", "u-1", 5.0)
    assert facts.headers is a.headers


def test_b_invite_targets_retell_number_over_tcp() -> None:
    b = build()
    assert str(b.uri) == "sip:+14155550100@sip.retellai.com;transport=tcp"
    assert str(b.to.uri) == "sip:+14155550100@sip.retellai.com"
    assert b.to_tag is None
    assert b.method == "INVITE"


def test_b_invite_from_is_e164_caller_on_sbc_address_with_display() -> None:
    b = build()
    assert b.from_.display == "Alice Smith"
    assert str(b.from_.uri) == "sip:+442071234567@198.51.100.7"
    assert b.from_tag == "btag"


def test_b_invite_is_a_new_dialog() -> None:
    b = build(ids=LegIds("b-call-9", "t9", 7))
    assert b.call_id == "b-call-9"
    assert b.cseq.seq == 7 and b.cseq.method == "INVITE"
    assert b.headers.get("Contact") == "<sip:198.51.100.7:5080;transport=tcp>"
    assert b.headers.get("Max-Forwards") == "70"


def test_b_invite_copies_nothing_of_the_pbx_leg() -> None:
    b = build()
    names = [name for name, _ in b.headers]
    assert names == [
        "Max-Forwards",
        "From",
        "To",
        "Call-ID",
        "CSeq",
        "Contact",
        "Allow",
        "User-Agent",
        "X-Caller-Number",
        "X-Call-UUID",
        "Content-Type",
    ]
    wire = serialize(b)
    for leak in (b"10.0.0.1", b"10.0.0.9", b"pbxtag", b"pbx-call-1", b"z9hG4bK-pbx", b"3CX"):
        assert leak not in wire
    assert b"Via:" not in wire  # pushed by the transaction layer
    assert wire.endswith(SDP)
    assert b"Content-Length: %d\r\n" % len(SDP) in wire


def test_b_invite_advertises_only_what_retell_takes() -> None:
    b = build()
    allow = {m.strip() for m in (b.headers.get("Allow") or "").split(",")}
    assert allow.isdisjoint({"INFO", "UPDATE", "PRACK", "MESSAGE", "SUBSCRIBE"})
    assert "Supported" not in b.headers
    assert "Require" not in b.headers
    assert "Session-Expires" not in b.headers
    assert allow == set(HANDLED[Peer.RETELL])


def test_b_invite_without_sdp_user_agent_or_caller() -> None:
    b = build(sdp=b"", user_agent="", caller=Caller("", None), x_headers=())
    assert "Content-Type" not in b.headers
    assert "User-Agent" not in b.headers
    assert str(b.from_) == "<sip:anonymous@198.51.100.7>;tag=btag"


def test_b_invite_udp_and_tls_targets() -> None:
    udp = build(target=RetellTarget("127.0.0.3", 5062, "udp", "+15550001"))
    assert str(udp.uri) == "sip:+15550001@127.0.0.3:5062"
    tls = build(
        target=RetellTarget("sip.retellai.com", 5061, "tls", "+15550001"),
        local=LocalAddress("192.0.2.1", 5061, "tls"),
    )
    assert str(tls.uri) == "sips:+15550001@sip.retellai.com:5061;transport=tls"
    assert str(tls.from_.uri).startswith("sips:")
    assert LocalAddress("192.0.2.1", 5060, "udp").contact == "<sip:192.0.2.1:5060>"


def test_escape_user_keeps_e164_and_escapes_the_rest() -> None:
    assert escape_user("+14155550100") == "+14155550100"
    assert escape_user("a b@c") == "a%20b%40c"
    b = build(caller=Caller("odd user", '"Q" Name'))
    assert str(b.from_.uri) == "sip:odd%20user@198.51.100.7"
    assert b.headers.get("From") == '"\\"Q\\" Name" <sip:odd%20user@198.51.100.7>;tag=btag'
    # Round trip through the parser keeps the display name.
    parsed = parse_message(serialize(b))
    assert isinstance(parsed, Request)
    assert parsed.from_.display == '"Q" Name'


def test_caller_of_uses_from_and_normalises() -> None:
    caller = caller_of(a_invite(), PLAN)
    assert caller == Caller("+442071234567", "Alice Smith")


def _invite_with(from_: str, extra: tuple[tuple[str, str], ...] = ()) -> Request:
    headers = Headers(
        [
            ("From", from_),
            ("To", "<sip:101@pbx>"),
            ("Call-ID", "c"),
            ("CSeq", "1 INVITE"),
            *extra,
        ]
    )
    return Request("INVITE", parse_uri("sip:101@10.0.0.5"), headers)


def test_caller_of_anonymous_falls_back_to_asserted_identity() -> None:
    pai = (("P-Asserted-Identity", "garbage, <tel:+44-20-7123-4567>"),)
    req = _invite_with('"Anonymous" <sip:anonymous@anonymous.invalid>;tag=1', pai)
    assert caller_of(req, PLAN) == Caller("+442071234567", "Anonymous")
    no_pai = _invite_with("<sip:anonymous@anonymous.invalid>;tag=1")
    assert caller_of(no_pai, PLAN) == Caller("anonymous", None)
    no_user = _invite_with("<sip:pbx.example.com>;tag=1")
    assert caller_of(no_user, PLAN) == Caller("", None)
    bad_pai = _invite_with("<sip:pbx.example.com>;tag=1", (("P-Asserted-Identity", "<urn:x:y>"),))
    assert caller_of(bad_pai, PLAN) == Caller("", None)


def test_caller_of_tel_uri_and_extension() -> None:
    tel = _invite_with('"" <tel:+1-415-555-0100>;tag=1')
    assert caller_of(tel, PLAN) == Caller("+14155550100", None)
    ext = _invite_with("<sip:102@pbx>;tag=1")
    assert caller_of(ext, PLAN) == Caller("102", None)


def test_called_of_prefers_to_user() -> None:
    assert called_of(a_invite()) == "101"
    req = Request(
        "INVITE",
        parse_uri("sip:6000@10.0.0.5"),
        Headers([("To", "<sip:pbx.example.com>")]),
    )
    assert called_of(req) == "6000"
    req = Request("INVITE", parse_uri("sip:10.0.0.5"), Headers([("To", "<sip:pbx>")]))
    assert called_of(req) == ""


def test_uri_user() -> None:
    assert uri_user(SipUri("sip", "a%20b", None, "h")) == "a b"
    assert uri_user(SipUri("sip", None, None, "h")) is None
    assert uri_user(TelUri("+1555")) == "+1555"
    assert uri_user(AbsoluteUri("urn", "urn:x")) is None


@pytest.mark.parametrize(
    ("retell", "pbx"),
    [
        (486, 486),
        (603, 603),
        (600, 600),
        (404, 480),
        (480, 480),
        (408, 480),
        (487, 487),
        (488, 488),
        (606, 488),
        (604, 480),
        (500, 503),
        (502, 503),
        (503, 503),
        (504, 503),
        (302, 480),
        (401, 480),
        (407, 480),
        (403, 480),
        (499, 480),
        (699, 480),
    ],
)
def test_failure_mapping(retell: int, pbx: int) -> None:
    assert pbx_status_for_failure(retell) == pbx


@pytest.mark.parametrize(
    ("retell", "pbx"),
    [(100, None), (180, 180), (181, 180), (182, 180), (183, 183), (199, None)],
)
def test_provisional_mapping(retell: int, pbx: int | None) -> None:
    assert pbx_provisional_for(retell) == pbx


def test_session_timer_negotiation() -> None:
    assert negotiate_session_timer(a_invite()) == SessionTimer(600, "uac")
    with_uas = _invite_with(
        "<sip:1@p>;tag=1", (("Session-Expires", "1800;refresher=UAS"), ("Supported", "timer"))
    )
    assert negotiate_session_timer(with_uas) == SessionTimer(1800, "uas")
    # RFC 4028 §9: a UAC that does not support timer cannot refresh.
    no_timer = _invite_with("<sip:1@p>;tag=1", (("Session-Expires", "900;refresher=uac"),))
    assert negotiate_session_timer(no_timer) == SessionTimer(900, "uas")
    odd = _invite_with(
        "<sip:1@p>;tag=1", (("Session-Expires", "900;refresher=x;foo"), ("Supported", "timer"))
    )
    assert negotiate_session_timer(odd) == SessionTimer(900, "uac")
    assert negotiate_session_timer(_invite_with("<sip:1@p>;tag=1")) is None


def test_session_timer_too_small_is_422_with_min_se() -> None:
    req = _invite_with("<sip:1@p>;tag=1", (("Session-Expires", "60"), ("Supported", "timer")))
    with pytest.raises(SessionIntervalTooSmall) as info:
        negotiate_session_timer(req)
    assert info.value.status == 422
    assert info.value.headers == (("Min-SE", "90"),)
    assert negotiate_session_timer(req, min_se=60) == SessionTimer(60, "uac")


def test_pbx_dialog_headers_echo_record_route_and_timer() -> None:
    a = a_invite()
    timer = negotiate_session_timer(a)
    headers = pbx_dialog_headers(a, LOCAL_PBX, user_agent="sbc/0.1", timer=timer, has_body=True)
    assert headers == (
        ("Record-Route", "<sip:10.0.0.1:5060;lr>"),
        ("Record-Route", "<sip:10.0.0.9;lr>"),
        ("Contact", "<sip:10.0.0.5:5060>"),
        ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY"),
        ("Supported", "timer"),
        ("Session-Expires", "600;refresher=uac"),
        ("Require", "timer"),
        ("Server", "sbc/0.1"),
        ("Content-Type", "application/sdp"),
    )


def test_pbx_dialog_headers_minimal_and_uas_refresher() -> None:
    req = _invite_with("<sip:1@p>;tag=1")
    assert pbx_dialog_headers(req, LOCAL_PBX) == (
        ("Contact", "<sip:10.0.0.5:5060>"),
        ("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, NOTIFY"),
        ("Supported", "timer"),
    )
    headers = pbx_dialog_headers(req, LOCAL_PBX, timer=SessionTimer(900, "uas"))
    assert ("Session-Expires", "900;refresher=uas") in headers
    assert all(name != "Require" for name, _ in headers)


def test_pbx_contact_carries_the_extension() -> None:
    local = LocalAddress("10.0.0.5", 5060, "udp", "101")
    assert local.contact == "<sip:101@10.0.0.5:5060>"
    assert LocalAddress("10.0.0.5", 5061, "tls", "a b").contact == (
        "<sip:a%20b@10.0.0.5:5061;transport=tls>"
    )


def test_display_name_is_always_quoted() -> None:
    b = build(caller=Caller("+15550001", "Alice Smith"))
    assert b.headers.get("From") == '"Alice Smith" <sip:+15550001@198.51.100.7>;tag=btag'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"Signal=5\r\nDuration=160\r\n", ("5", 160)),
        (b"Signal= *\nDuration= 250", ("*", 250)),
        (b"signal=a", ("A", 100)),
        (b"Signal=#\r\nDuration=99999", ("#", 5000)),
        (b"Signal=5\r\nDuration=long", ("5", 100)),
        (b"7", ("7", 100)),
        (b"x", None),
        (b"", None),
        (b"Signal=55\r\nDuration=100", None),
        (b"Duration=100", None),
    ],
)
def test_parse_dtmf_info(body: bytes, expected: tuple[str, int] | None) -> None:
    assert parse_dtmf_info(body) == expected


def test_session_timer_deadlines() -> None:
    uac = SessionTimer(600, "uac")
    assert uac.refresh_at(100.0) == float("inf")
    assert uac.expires_at(100.0) == 100.0 + 600 - 32
    short = SessionTimer(90, "uac")
    assert short.expires_at(0.0) == 90 - 30
    uas = SessionTimer(600, "uas")
    assert uas.refresh_at(100.0) == 400.0
    assert uas.expires_at(100.0) == float("inf")
    assert uas.refresh_headers == (
        ("Supported", "timer"),
        ("Session-Expires", "600;refresher=uac"),
    )


def test_require_timer_with_uas_refresher_when_pbx_supports_timer() -> None:
    req = _invite_with(
        "<sip:1@p>;tag=1", (("Session-Expires", "900;refresher=uas"), ("Supported", "timer"))
    )
    headers = pbx_dialog_headers(req, LOCAL_PBX, timer=negotiate_session_timer(req))
    assert ("Session-Expires", "900;refresher=uas") in headers
    assert ("Require", "timer") in headers


def test_allow_is_derived_from_the_handled_table() -> None:
    # One source of truth: what each peer may send in a dialog is what its Allow says.
    assert allow_header(Peer.PBX) == ", ".join(HANDLED[Peer.PBX])
    assert allow_header(Peer.RETELL) == ", ".join(HANDLED[Peer.RETELL])
    assert {"ACK", "CANCEL", "BYE", "INVITE"} <= set(HANDLED[Peer.RETELL])
