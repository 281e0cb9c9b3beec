"""Round 9 (observers and the call's edges): each cut gives what the code before it gave.

* ``clean()`` returns a plain number (ASCII digits, an optional leading ``+``) as it is: the
  same text the general way (unquote, strip, parameters, trunk prefix, separators) gives, for
  any text.
* ``HeaderTemplates.render`` works from a plan made at config load: the same headers and
  rejections as rendering each template and checking each value (``check_value``).
* ``Ladder.note`` finds CSeq, Via, To and the credentials with fewer scans: the same fields
  as the one-pass scan the summaries are tested against (``_fields_by_scan``).
* The INVITE to Retell, its call facts and the pass-through session's stamped SDPs are made
  by quick makers: equal to what the constructors make, of the same classes.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from sbc.b2bua import numbers
from sbc.b2bua.ladder import Ladder, _fields_by_scan
from sbc.b2bua.messages import (
    BridgeConfig,
    Caller,
    LegIds,
    LocalAddress,
    RetellTarget,
    build_b_invite,
    call_facts,
)
from sbc.b2bua.templates import (
    CallFacts,
    HeaderTemplates,
    Rejected,
    Rendered,
    check_value,
    compile_headers,
    render_template,
)
from sbc.media.base import ORIGIN_USERNAME, PassthroughSession
from sbc.net.addresses import Destination
from sbc.sdp.model import Origin, SessionDescription
from sbc.sdp.parser import parse_sdp
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import SipUri

# -- clean() ------------------------------------------------------------------------------------

_PARENS = re.compile(r"^(\+[0-9 ]+?)\s*\(0\)")


def _clean_general(number: str) -> str:
    """clean() as it was before its shortcut."""
    text = unquote(number).strip()
    text = text.split(";", 1)[0]
    match = _PARENS.match(text)
    if match is not None:
        text = match.group(1) + text[match.end() :]
    return text.translate(str.maketrans("", "", " -.()/\u00a0\t"))


_NUMBER_CHARS = "0123456789+ -.()/;%\u00a0\t2Fab\u0663\u00b2\n"


@given(
    st.text(alphabet=_NUMBER_CHARS, max_size=20) | st.from_regex(r"\+?[0-9]{0,16}", fullmatch=True)
)
def test_clean_gives_what_the_general_way_gives(number: str) -> None:
    assert numbers.clean(number) == _clean_general(number)
    assert numbers.normalise(number, numbers.NumberPlan("44")) == _normalise_general(number)


def _normalise_general(number: str) -> str:
    plan = numbers.NumberPlan("44")
    original = numbers.clean
    numbers.clean = _clean_general
    try:
        return numbers.normalise(number, plan)
    finally:
        numbers.clean = original


def test_a_plain_number_is_returned_as_it_is() -> None:
    number = "+442071234567"
    assert numbers.clean(number) is number
    assert numbers.clean("020 7123 4567") == "02071234567"  # the general way still runs


# -- X- header templates ------------------------------------------------------------------------

_VALUES = st.text(
    alphabet=st.sampled_from(["a", "1", "+", " ", "é", "\t", "\r", "{", "\x00", "\udc80"]),
    max_size=12,
) | st.text(alphabet="ab", min_size=1015, max_size=1030)
_TEMPLATE_TEXTS = st.sampled_from(
    [
        "{caller_number}",
        "{caller_name}",
        "{called}",
        "{pbx_call_id}",
        "{call_uuid}",
        "{now}",
        "n={caller_number};c={called}",
        "{header[X-Account]}",
        "plain",
        "{{{call_uuid}}}",
    ]
)
_HEADER_NAMES = st.sampled_from(["X-A", "X-Caller-Number", "X-Long-" + "h" * 40, "X-B"])


def _render_general(table: HeaderTemplates, facts: CallFacts) -> Rendered:
    """render() as specified: each template rendered, each value checked, then the PBX's
    X- headers allowed through."""
    headers: list[tuple[str, str]] = []
    rejected: list[Rejected] = []
    for template in table.templates:
        value = render_template(template, facts)
        reason = check_value(template.header, value)
        if reason is None:
            headers.append((template.header, value))
        else:
            rejected.append(Rejected(template.header, reason))
    taken = {t.header.lower() for t in table.templates}
    for name, value in facts.headers:
        key = name.lower()
        if key in taken or not key.startswith("x-") or not table._passes(key):
            continue
        reason = check_value(name, value)
        if reason is None:
            headers.append((name, value))
        else:
            rejected.append(Rejected(name, reason))
    return Rendered(tuple(headers), tuple(rejected))


@given(
    table=st.dictionaries(_HEADER_NAMES, _TEMPLATE_TEXTS, max_size=4),
    passthrough=st.sampled_from([(), ("X-*",), ("X-Account",)]),
    values=st.lists(_VALUES, min_size=5, max_size=5),
    account=st.one_of(st.none(), _VALUES.filter(lambda v: "\r" not in v)),
)
def test_render_gives_what_rendering_each_template_gives(
    table: dict[str, str], passthrough: tuple[str, ...], values: list[str], account: str | None
) -> None:
    templates = compile_headers(table, passthrough)
    items = [("Call-ID", "c@h")] + ([] if account is None else [("X-Account", account)])
    number, name, called, call_id, uuid = values
    facts = CallFacts(number, name, called, call_id, uuid, 1_700_000_000.25, Headers(items))
    assert templates.render(facts) == _render_general(templates, facts)


def test_the_plan_is_not_part_of_equality_or_repr() -> None:
    a = compile_headers({"X-A": "{called}"})
    b = compile_headers({"X-A": "{called}"})
    assert a == b and hash(a) == hash(b)
    assert "_plan" not in repr(a)


# -- the ladder's tap ---------------------------------------------------------------------------

_OPTIONAL = st.sampled_from(
    [
        ("CSeq", "1 INVITE"),
        ("CSeq", "2 BYE"),
        ("Via", "SIP/2.0/UDP h;branch=z9hG4bK1"),
        ("Via", "SIP/2.0/TCP g;branch=z9hG4bK2"),
        ("To", "<sip:b@h>;tag=t"),
        ("Authorization", 'Digest username="u"'),
        ("Proxy-Authorization", 'Digest username="p"'),
        ("From", "<sip:a@h>;tag=f"),
        ("Max-Forwards", "70"),
    ]
)


@given(items=st.lists(_OPTIONAL, max_size=8), response=st.booleans())
def test_note_keeps_what_the_one_pass_scan_finds(
    items: list[tuple[str, str]], response: bool
) -> None:
    headers = Headers([("Call-ID", "c@h"), *items])
    message: Request | Response = (
        Response(200, "OK", headers)
        if response
        else Request("BYE", SipUri("sip", "b", None, "h"), headers)
    )
    ladder = Ladder()
    ladder.note(
        "in", message, Destination("udp", "127.0.0.1", 5060), "l", leg="a", peer="pbx", at=1.0
    )
    call_id, cseq, via, to, credentials = _fields_by_scan(message)
    fields: Any = ladder._fields
    assert fields[0][4] == credentials
    assert (fields[3], fields[4]) == (call_id, cseq)
    assert ladder._idents is not None and ladder._idents[0] == hash((via, to))


# -- objects made by makers ---------------------------------------------------------------------


def test_the_invite_to_retell_is_what_the_constructors_make() -> None:
    config = BridgeConfig("101", RetellTarget("sip.retellai.com", None, "tcp", "+14155550100"))
    local = LocalAddress("198.51.100.7", 5080, "tcp")
    invite = build_b_invite(config, local, LegIds("b", "t"), Caller("+4420", "Al"), (), b"v=0\r\n")
    assert type(invite) is Request
    assert invite == Request("INVITE", invite.uri, invite.headers, b"v=0\r\n")
    assert invite.from_.uri == SipUri("sip", "+4420", None, "198.51.100.7")
    assert type(invite.from_.uri) is SipUri


def test_call_facts_are_what_the_constructor_makes() -> None:
    invite = Request("INVITE", SipUri("sip", "1", None, "h"), Headers([("Call-ID", "c@h")]))
    facts = call_facts(invite, Caller("+1", None), "101", "u", 5.0)
    assert type(facts) is CallFacts
    assert facts == CallFacts(
        caller_number="+1",
        caller_name="",
        called="101",
        pbx_call_id="c@h",
        call_uuid="u",
        now=5.0,
        headers=invite.headers,
    )


def test_the_stamped_sdps_are_what_the_constructors_make() -> None:
    sdp = parse_sdp(
        b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
        b"m=audio 4000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n"
    )
    session = PassthroughSession("c")
    offered = asyncio.run(session.offer("a", sdp))
    sdp = session.filter(sdp)
    origin = offered.origin
    assert type(offered) is SessionDescription and type(origin) is Origin
    assert origin == Origin(
        ORIGIN_USERNAME, origin.sess_id, int(origin.sess_id), "IN", "IP4", "10.0.0.1"
    )
    assert offered == SessionDescription(
        origin,
        sdp.session_name,
        sdp.connection,
        sdp.bandwidths,
        sdp.timings,
        sdp.attributes,
        sdp.media,
        sdp.version,
        sdp.extra_head,
        sdp.extra_tail,
    )
