"""Transfer building blocks (sbc.b2bua.transfer_rules): Refer-To as Retell writes it, target
rules (names, numbers, the allow pattern as the only gate), sipfrag NOTIFYs both ways."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua.transfer_rules import (
    DEFAULT_ALLOW,
    SIPFRAG_CONTENT_TYPE,
    ReferProgress,
    ReferTarget,
    TargetMap,
    TransferConfig,
    TransferRefused,
    is_sipfrag,
    notify_headers,
    parse_refer_to,
    refer_notify,
    refer_progress,
    refer_request_headers,
    resolve_target,
    sipfrag,
    sipfrag_status,
)
from sbc.ops.settings import TransferSettings
from sbc.sip.errors import BadRequest, Forbidden, SipError
from sbc.sip.headers import Headers
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.serializer import serialize
from sbc.sip.uri import SipUri, TelUri, parse_uri

TARGETS = {"sales": "800", "Support": "801", "EU-desk": "+442071234567"}
CONFIG = TransferConfig(targets=TARGETS)
EXTENSIONS_ONLY = TransferConfig(allow=re.compile(r"^8[0-9]{2}$"), targets={"sales": "800"})


# -- Refer-To ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "user", "scheme", "display", "headers"),
    [
        # Retell (PEERS.md): the target verbatim, no angle brackets, no Referred-By.
        ("tel:+14155550100", "+14155550100", "tel", None, ()),
        ("sip:sales@sip.retellai.com", "sales", "sip", None, ()),
        ("sip:+14155550100@sip.retellai.com;user=phone", "+14155550100", "sip", None, ()),
        ("800", "800", None, None, ()),
        ("+14155550100", "+14155550100", None, None, ()),
        ("*97", "*97", None, None, ()),
        ("#31#", "#31#", None, None, ()),
        ("  800\t", "800", None, None, ()),
        ("800;user=phone", "800", None, None, ()),
        ("+1 (415) 555-0100", "+1 (415) 555-0100", None, None, ()),
        (
            "sip:sales@sip.retellai.com?X-Transfer-Reason=test",
            "sales",
            "sip",
            None,
            (("X-Transfer-Reason", "test"),),
        ),
        (
            "sip:sales@h;transport=tcp?X-A=1&Replaces=abc%40h&x-b=two%20words",
            "sales",
            "sip",
            None,
            (("X-A", "1"), ("x-b", "two words")),
        ),
        ("tel:+1-415-555-0100", "+1-415-555-0100", "tel", None, ()),
        ("tel:+14155550100?X-A=1&Other=2", "+14155550100", "tel", None, (("X-A", "1"),)),
        ("tel:800;phone-context=pbx.example", "800", "tel", None, ()),
        ("SIP:Sales@PBX", "Sales", "sip", None, ()),
        ("sips:%2B14155550100@h", "+14155550100", "sips", None, ()),
        # addr-spec header parameters that are no URI parameters (RFC 3261 §20.10)
        ('sip:sales@h;foo="a b"', "sales", "sip", None, ()),
        # name-addr, as 3CX and most phones write it
        ("<sip:800@pbx>", "800", "sip", None, ()),
        ("<sip:800@pbx>;foo=bar", "800", "sip", None, ()),
        ("<800>", "800", None, None, ()),
        ("<tel:+14155550100>", "+14155550100", "tel", None, ()),
        ('"Sales Queue" <sip:sales@pbx>', "sales", "sip", "Sales Queue", ()),
        ('"Q \\"1\\""<sip:sales@pbx>', "sales", "sip", 'Q "1"', ()),
        ("Sales   Queue <sip:sales@pbx>", "sales", "sip", "Sales Queue", ()),
        ('"" <sip:sales@pbx>', "sales", "sip", "", ()),
        (
            "<sip:sales@sip.retellai.com?X-Transfer-Reason=test&X-Note=hello%20world>",
            "sales",
            "sip",
            None,
            (("X-Transfer-Reason", "test"), ("X-Note", "hello world")),
        ),
    ],
)
def test_refer_to_forms(
    value: str,
    user: str,
    scheme: str | None,
    display: str | None,
    headers: tuple[tuple[str, str], ...],
) -> None:
    target = parse_refer_to(value)
    assert target.user == user
    assert (target.uri.scheme if target.uri is not None else None) == scheme
    assert target.display == display
    assert target.headers == headers


def test_refer_to_keeps_the_parsed_uri() -> None:
    target = parse_refer_to("sip:+14155550100@sip.retellai.com;user=phone")
    assert isinstance(target.uri, SipUri)
    assert target.uri.host == "sip.retellai.com"
    assert target.uri.param("user") == "phone"
    assert parse_refer_to("tel:+14155550100").uri == TelUri("+14155550100")
    assert parse_refer_to("800") == ReferTarget("800")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "sales",  # a name must come in a sip URI
        "hello world",
        "+",
        "++800",
        "8+00",
        "800?X-A=1",
        "sip:pbx.example",  # no user part
        "sip:@pbx.example",
        "sip:800@ho st",
        "sip:800@h h;x=1",
        "sip:800@h;x=1;;",
        '<sip:800@h;foo="a b">',
        "mailto:sales@example.com",
        "http://example.com/queue",
        "tel:xyz",
        "tel:+14155550100?X-A",
        "tel:+14155550100?=1",
        "tel:+14155550100?X-A=1&",
        "<sip:800@pbx",
        "sip:800@pbx>",
        "<sip:800@pbx> junk",
        "<sip:800@pbx>;=bad",
        '"unterminated <sip:800@pbx>',
        '"Sales" sip:800@pbx',
        'a"b <sip:800@pbx>',
        "<<sip:800@pbx>>",
        "<>",
        "<sales>",
        "sip:800@h?X-A=a%0D%0AVia:%20SIP/2.0/UDP%20evil",  # header injection
        "sip:800@h?X-A=nul%00byte",
        "sip:800@h?X-B%20ad=1",
    ],
)
def test_garbage_refer_to_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_refer_to(value)
    assert raised.value.status == 400


def test_an_escaped_blank_user_is_refused_as_a_target() -> None:
    target = parse_refer_to("sip:%20@pbx.example")
    assert target.user == " "
    with pytest.raises(TransferRefused):
        resolve_target(CONFIG, target.user)


@given(st.text())
def test_parse_refer_to_raises_nothing_but_bad_request(value: str) -> None:
    try:
        target = parse_refer_to(value)
    except BadRequest:
        return
    assert target.user
    for name, header_value in target.headers:
        assert name.lower().startswith("x-")
        assert "\r" not in header_value and "\n" not in header_value


# -- target rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "number"),
    [
        ("sales", "800"),  # a name
        ("SALES", "800"),  # names are case-insensitive
        ("Support", "801"),
        ("support", "801"),
        ("eu-desk", "+442071234567"),
        (" sales ", "800"),
        ("800", "800"),  # a number
        ("802", "802"),
        ("*97", "*97"),
        ("+14155550100", "+14155550100"),
        ("+1 (415) 555-0100", "+14155550100"),  # RFC 3966 visual separators dropped
        ("+1-415-555-0100", "+14155550100"),
        ("1.800.555.0199", "18005550199"),
        # The default allow pattern lets any dialable number through: a deployment that
        # must not reach outside lines narrows [transfer] allow (see EXTENSIONS_ONLY).
        ("+19005551234", "+19005551234"),
    ],
)
def test_resolve_target(user: str, number: str) -> None:
    assert resolve_target(CONFIG, user) == number


@pytest.mark.parametrize(
    "user",
    [
        "marketing",  # neither a configured name nor a number
        "",
        "sales@example.com",
        "+1415x5550100",
        "8+00",
        "1" * 33,  # the default pattern stops at 32 characters
        "800;ext=1",
    ],
)
def test_refused_with_the_default_allow(user: str) -> None:
    with pytest.raises(TransferRefused) as raised:
        resolve_target(CONFIG, user)
    assert raised.value.status == 403
    assert raised.value.reason == "Forbidden"
    assert raised.value.target == user
    assert isinstance(raised.value, Forbidden) and isinstance(raised.value, SipError)


@pytest.mark.parametrize(
    ("user", "number"),
    [("sales", "800"), ("Sales", "800"), ("800", "800"), ("8-9-9", "899")],
)
def test_a_narrow_allow_admits_extensions(user: str, number: str) -> None:
    assert resolve_target(EXTENSIONS_ONLY, user) == number


@pytest.mark.parametrize(
    "user", ["+19005551234", "+14155550100", "900", "8000", "80", "*97", "support", "+800"]
)
def test_a_narrow_allow_refuses_outside_numbers(user: str) -> None:
    with pytest.raises(TransferRefused, match="transfer target"):
        resolve_target(EXTENSIONS_ONLY, user)


def test_an_exact_name_wins_over_a_case_insensitive_one() -> None:
    config = TransferConfig(targets={"Sales": "801", "sales": "800", "SALES": "802"})
    assert resolve_target(config, "sales") == "800"
    assert resolve_target(config, "Sales") == "801"
    assert resolve_target(config, "sAlEs") == "801"  # the first in configuration order


def test_from_retell_refer_to_to_pbx_number() -> None:
    for value, number in [
        ("sip:sales@sip.retellai.com", "800"),
        ("tel:+14155550100", "+14155550100"),
        ("sip:+1-415-555-0100@sip.retellai.com;user=phone", "+14155550100"),
        ("<sip:800@pbx>", "800"),
        ("800", "800"),
    ]:
        assert resolve_target(CONFIG, parse_refer_to(value).user) == number


# Allow patterns, and numbers that match them, for the properties below.
ALLOWS = [
    DEFAULT_ALLOW,
    re.compile(r"^8[0-9]{2}$"),
    re.compile(r"\+44[0-9]{10}"),
    re.compile(r"[0-9]{3,4}|\*[0-9]{2}"),
]


@st.composite
def configs(draw: st.DrawFn) -> TransferConfig:
    allow = draw(st.sampled_from(ALLOWS))
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(str.strip), max_size=5))
    targets = {name: draw(st.from_regex(allow, fullmatch=True)) for name in names}
    return TransferConfig(allow=allow, targets=targets)


@st.composite
def users(draw: st.DrawFn, config: TransferConfig) -> str:
    choices = [
        st.text(max_size=40),
        st.from_regex(r"\+?[0-9*#(). -]{1,40}", fullmatch=True),
        st.from_regex(r"\+?[0-9]{1,16}", fullmatch=True),
    ]
    if config.targets:
        name = st.sampled_from(sorted(config.targets))
        choices.append(name.map(str.upper))
        choices.append(name)
    return draw(st.one_of(choices))


@given(st.data())
def test_resolve_target_never_returns_a_number_outside_allow(data: st.DataObject) -> None:
    config = data.draw(configs())
    user = data.draw(users(config))
    try:
        number = resolve_target(config, user)
    except TransferRefused as refused:
        assert refused.status == 403
        return
    assert config.allow.fullmatch(number) is not None


@given(st.from_regex(r"\+?[0-9*#]{1,20}", fullmatch=True))
def test_refer_to_for_3cx_round_trips(number: str) -> None:
    refer_to = dict(refer_request_headers(number, "pbx.example", "101"))["Refer-To"]
    assert parse_refer_to(refer_to).user == number
    assert resolve_target(TransferConfig(), number) == number


# -- configuration -------------------------------------------------------------------------------


def test_config_defaults_match_the_settings() -> None:
    defaults = TransferSettings()
    config = TransferConfig()
    assert config.mode == defaults.mode == "refer"
    assert config.allow.pattern == defaults.allow.pattern
    assert dict(config.targets) == defaults.targets == {}
    assert config.ring_timeout == 30.0


def test_config_keeps_an_immutable_copy_of_the_targets() -> None:
    given_targets = {"sales": "800"}
    config = TransferConfig(mode="invite", targets=given_targets, ring_timeout=5.0)
    given_targets["evil"] = "+19005551234"
    assert isinstance(config.targets, TargetMap)
    assert dict(config.targets) == {"sales": "800"}
    assert config.targets == {"sales": "800"}
    assert hash(config) == hash(
        TransferConfig(mode="invite", targets={"sales": "800"}, ring_timeout=5.0)
    )
    assert config == TransferConfig(
        mode="invite", targets=TargetMap([("sales", "800")]), ring_timeout=5.0
    )


def test_target_map() -> None:
    targets = TargetMap([("sales", "800"), ("support", "801"), ("sales", "802")])
    assert list(targets) == ["sales", "support"]
    assert len(targets) == 2
    assert targets["sales"] == "802"  # the last of a repeated name counts
    assert targets.get("nobody") is None
    with pytest.raises(KeyError):
        targets["nobody"]
    assert repr(targets) == "TargetMap({'sales': '802', 'support': '801'})"
    assert hash(targets) == hash(TargetMap({"support": "801", "sales": "802"}))
    assert TargetMap() == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "transfer"}, "transfer mode"),
        ({"ring_timeout": 0.0}, "ring_timeout"),
        ({"ring_timeout": -1.0}, "ring_timeout"),
        ({"ring_timeout": math.nan}, "ring_timeout"),
        ({"targets": {"sales": "+19005551234"}, "allow": re.compile(r"8[0-9]{2}")}, "allow"),
        ({"targets": {"sales": "sip:800@pbx"}}, "allow"),
        ({"targets": {" ": "800"}}, "needs a name"),
    ],
)
def test_config_refuses_what_could_not_work(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransferConfig(**kwargs)  # type: ignore[arg-type]


# -- NOTIFY toward Retell ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "reason", "body"),
    [
        (100, None, b"SIP/2.0 100 Trying\r\n"),
        (180, None, b"SIP/2.0 180 Ringing\r\n"),
        (200, None, b"SIP/2.0 200 OK\r\n"),
        (202, None, b"SIP/2.0 202 Accepted\r\n"),
        (403, None, b"SIP/2.0 403 Forbidden\r\n"),
        (408, None, b"SIP/2.0 408 Request Timeout\r\n"),
        (480, None, b"SIP/2.0 480 Temporarily Unavailable\r\n"),
        (486, None, b"SIP/2.0 486 Busy Here\r\n"),
        (487, None, b"SIP/2.0 487 Request Terminated\r\n"),
        (503, None, b"SIP/2.0 503 Service Unavailable\r\n"),
        (603, None, b"SIP/2.0 603 Decline\r\n"),
        (499, None, b"SIP/2.0 499 Bad Request\r\n"),  # unknown code: its class's phrase
        (200, "Transferred", b"SIP/2.0 200 Transferred\r\n"),
        (486, "Très occupé", "SIP/2.0 486 Très occupé\r\n".encode()),
        (200, "", b"SIP/2.0 200 \r\n"),
    ],
)
def test_sipfrag_bytes(status: int, reason: str | None, body: bytes) -> None:
    assert sipfrag(status, reason) == body
    assert sipfrag_status(body) == status


@pytest.mark.parametrize(("status", "reason"), [(99, None), (700, None), (200, "OK\r\nX: y")])
def test_sipfrag_refuses_what_is_no_status_line(status: int, reason: str | None) -> None:
    with pytest.raises(ValueError):
        sipfrag(status, reason)


@pytest.mark.parametrize(
    ("final", "kwargs", "headers"),
    [
        (
            False,
            {},
            (
                ("Event", "refer"),
                ("Subscription-State", "active;expires=60"),
                ("Content-Type", "message/sipfrag;version=2.0"),
            ),
        ),
        (
            True,
            {},
            (
                ("Event", "refer"),
                ("Subscription-State", "terminated;reason=noresource"),
                ("Content-Type", "message/sipfrag;version=2.0"),
            ),
        ),
        (
            False,
            {"refer_cseq": 7, "expires": 120},
            (
                ("Event", "refer;id=7"),
                ("Subscription-State", "active;expires=120"),
                ("Content-Type", "message/sipfrag;version=2.0"),
            ),
        ),
        (
            True,
            {"refer_cseq": 2},
            (
                ("Event", "refer;id=2"),
                ("Subscription-State", "terminated;reason=noresource"),
                ("Content-Type", "message/sipfrag;version=2.0"),
            ),
        ),
    ],
)
def test_notify_headers(
    final: bool, kwargs: dict[str, int], headers: tuple[tuple[str, str], ...]
) -> None:
    assert notify_headers(final, **kwargs) == headers


@pytest.mark.parametrize("kwargs", [{"refer_cseq": -1}, {"refer_cseq": 2**31}, {"expires": -1}])
def test_notify_headers_refuse_bad_numbers(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        notify_headers(False, **kwargs)


def test_refer_notify_is_final_from_200_on() -> None:
    assert refer_notify(100) == (notify_headers(False), b"SIP/2.0 100 Trying\r\n")
    assert refer_notify(180, refer_cseq=3) == (
        notify_headers(False, refer_cseq=3),
        b"SIP/2.0 180 Ringing\r\n",
    )
    assert refer_notify(200) == (notify_headers(True), b"SIP/2.0 200 OK\r\n")
    assert refer_notify(403) == (notify_headers(True), b"SIP/2.0 403 Forbidden\r\n")
    assert SIPFRAG_CONTENT_TYPE == "message/sipfrag;version=2.0"


def test_a_notify_built_from_these_parts_reads_back() -> None:
    """What the bridge sends Retell is what the bridge reads from 3CX: serialise, parse, read."""
    for status, final in [(100, False), (200, True), (486, True)]:
        headers, body = refer_notify(status, refer_cseq=2)
        notify = Request(
            "NOTIFY",
            parse_uri("sip:retell@127.0.0.23:5060;transport=tcp"),
            Headers(
                [
                    ("Via", "SIP/2.0/TCP 127.0.0.22:5060;branch=z9hG4bK-1"),
                    ("Max-Forwards", "70"),
                    ("From", "<sip:+442071234567@127.0.0.22>;tag=b"),
                    ("To", "<sip:+14155550100@127.0.0.23>;tag=r"),
                    ("Call-ID", "c1"),
                    ("CSeq", "3 NOTIFY"),
                    *headers,
                ]
            ),
            body,
        )
        read = parse_message(serialize(notify))
        assert isinstance(read, Request)
        assert refer_progress(read) == ReferProgress(status, final, "2")


# -- REFER toward 3CX and its NOTIFYs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "port", "headers"),
    [
        (
            ("800", "127.0.0.21", "101"),
            None,
            (("Refer-To", "<sip:800@127.0.0.21>"), ("Referred-By", "<sip:101@127.0.0.21>")),
        ),
        (
            ("+442071234567", "pbx.example.com", "101"),
            5060,
            (
                ("Refer-To", "<sip:+442071234567@pbx.example.com:5060>"),
                ("Referred-By", "<sip:101@pbx.example.com>"),
            ),
        ),
        (
            ("*97#", "::1", "101"),
            None,
            (("Refer-To", "<sip:*97%23@[::1]>"), ("Referred-By", "<sip:101@[::1]>")),
        ),
        (
            ("800", "[::1]", "101"),
            None,
            (("Refer-To", "<sip:800@[::1]>"), ("Referred-By", "<sip:101@[::1]>")),
        ),
    ],
)
def test_refer_request_headers(
    args: tuple[str, str, str], port: int | None, headers: tuple[tuple[str, str], ...]
) -> None:
    assert refer_request_headers(*args, pbx_port=port) == headers


@pytest.mark.parametrize(
    "args", [("", "127.0.0.21", "101"), ("800", "", "101"), ("800", "127.0.0.21", "")]
)
def test_refer_request_headers_need_every_part(args: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError):
        refer_request_headers(*args)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"SIP/2.0 200 OK\r\n", 200),
        (b"SIP/2.0 100 Trying", 100),
        (b"SIP/2.0 180 Ringing\r\nContent-Length: 0\r\n\r\n", 180),  # trailing headers
        (b"SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/UDP x\r\nTo: <sip:800@pbx>;tag=1\r\n", 486),
        (b"\r\n\r\nSIP/2.0 603 Decline\r\n", 603),  # leading blank lines
        (b"sip/2.0 503 Service Unavailable\n", 503),  # lower case, bare LF
        (b"SIP/2.0 200\r\n", 200),  # no reason phrase
        (b"SIP/2.0  404   Not Found  \r\n", 404),
        ("SIP/2.0 200 OK\r\n", 200),  # already text
        (b"SIP/2.0 200 \xff\xfe\r\n", 200),  # reason not UTF-8
        (b"", None),
        (b"\r\n", None),
        (b"garbage", None),
        (b"INVITE sip:800@pbx SIP/2.0\r\n", None),  # a request line is no status
        (b"SIP/2.0 20 OK\r\n", None),
        (b"SIP/2.0 2000 OK\r\n", None),
        (b"SIP/2.0 099 Nothing\r\n", None),
        (b"SIP/2.0 700 Beyond\r\n", None),
        (b"SIP/3.0 200 OK\r\n", None),
        (b"SIP/2.0 200OK\r\n", None),
        (b"Content-Length: 0\r\nSIP/2.0 200 OK\r\n", None),
    ],
)
def test_sipfrag_status(body: bytes | str, status: int | None) -> None:
    assert sipfrag_status(body) == status


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("message/sipfrag;version=2.0", True),
        ("message/sipfrag", True),
        (" Message/SIPfrag ; version=2.0", True),
        ("application/sdp", False),
        ("message/sipfrag2", False),
        ("", False),
        (None, False),
    ],
)
def test_is_sipfrag(content_type: str | None, expected: bool) -> None:
    assert is_sipfrag(content_type) is expected


def notify_from_3cx(
    *headers: tuple[str, str], body: bytes = b"", method: str = "NOTIFY"
) -> Request:
    return Request(method, parse_uri("sip:101@127.0.0.22:5060"), Headers(headers), body)


@pytest.mark.parametrize(
    ("request_", "progress"),
    [
        (
            notify_from_3cx(
                ("Event", "refer"),
                ("Subscription-State", "active;expires=60"),
                ("Content-Type", "message/sipfrag;version=2.0"),
                body=b"SIP/2.0 100 Trying\r\n",
            ),
            ReferProgress(100, False),
        ),
        (
            notify_from_3cx(
                ("Event", "refer;id=3"),
                ("Subscription-State", "terminated;reason=noresource"),
                ("Content-Type", "message/sipfrag"),  # no version parameter
                body=b"SIP/2.0 200 OK\r\n",
            ),
            ReferProgress(200, True, "3"),
        ),
        (
            notify_from_3cx(
                ("Event", " Refer ; id=5 ; x=y"),
                ("Subscription-State", " Terminated"),
                body=b"SIP/2.0 486 Busy Here\r\n",  # no Content-Type: read as a sipfrag
            ),
            ReferProgress(486, True, "5"),
        ),
        (
            notify_from_3cx(
                ("Event", "refer"),
                ("Content-Type", "text/plain"),
                body=b"SIP/2.0 200 OK\r\n",
            ),
            ReferProgress(None, False),
        ),
        (
            notify_from_3cx(("Event", "refer;id"), body=b"garbage"),
            ReferProgress(None, False),
        ),
        (
            notify_from_3cx(("Event", "refer;id=a b"), ("Subscription-State", "terminated")),
            ReferProgress(None, True),
        ),
        (notify_from_3cx(("Event", "message-summary"), body=b"Messages-Waiting: yes"), None),
        (notify_from_3cx(("Content-Type", "message/sipfrag"), body=b"SIP/2.0 200 OK"), None),
        (notify_from_3cx(("Event", "refer"), body=b"SIP/2.0 200 OK", method="INFO"), None),
    ],
)
def test_refer_progress(request_: Request, progress: ReferProgress | None) -> None:
    assert refer_progress(request_) == progress


def test_refer_progress_from_the_wire_with_compact_event() -> None:
    wire = (
        b"NOTIFY sip:101@127.0.0.22:5060 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.21:5060;branch=z9hG4bK-n1\r\n"
        b"From: <sip:800@127.0.0.21>;tag=pbx\r\n"
        b"To: <sip:101@127.0.0.22>;tag=sbc\r\n"
        b"Call-ID: c2\r\n"
        b"CSeq: 2 NOTIFY\r\n"
        b"o: refer\r\n"
        b"Subscription-State: terminated;reason=noresource\r\n"
        b"c: message/sipfrag;version=2.0\r\n"
        b"Content-Length: 16\r\n"
        b"\r\n"
        b"SIP/2.0 200 OK\r\n"
    )
    read = parse_message(wire)
    assert isinstance(read, Request)
    assert refer_progress(read) == ReferProgress(200, True)


@pytest.mark.parametrize(
    ("progress", "final"),
    [
        (ReferProgress(100, False), False),
        (ReferProgress(180, False), False),
        (ReferProgress(None, False), False),
        (ReferProgress(200, False), True),
        (ReferProgress(603, False), True),
        (ReferProgress(None, True), True),
        (ReferProgress(100, True), True),
    ],
)
def test_refer_progress_final(progress: ReferProgress, final: bool) -> None:
    assert progress.final is final
