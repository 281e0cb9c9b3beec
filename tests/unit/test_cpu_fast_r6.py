"""Fast paths of round 6 of issue 12 (cpu), each compared with the general code it stands in
for: the tags read inline, the transaction layer's next deadline."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.sip.errors import SipError
from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.uri import parse_uri

_ADDRESS = st.sampled_from(
    [
        "<sip:a@h>;tag=1",
        "<sip:a@h>;TAG=Up",
        "<sip:a@h>;Tag=",
        '"A" <sip:a@h>;x=1;tag=2;tag=3',
        "sip:a@h;tag=4",
        "<sip:a@h;tag=uri-only>",
        "<sip:a@h>",
        "<sip:a@h>;tagx=5",
        "not an address <",
        "",
    ]
)


def _read(read: Any) -> tuple[str, object]:
    try:
        return ("ok", read())
    except SipError as exc:
        return ("error", (type(exc), exc.detail))


@given(
    st.lists(st.tuples(st.sampled_from(["From", "f", "To", "t", "X"]), _ADDRESS), max_size=4),
    st.booleans(),
    st.booleans(),
)
def test_the_tags_read_inline_are_the_addresses_tags(
    pairs: list[tuple[str, str]], response: bool, first_parsed: bool
) -> None:
    """from_tag and to_tag read the memo and the parameters themselves: the same tag (or the
    same error) as the parsed address's ``tag``, before and after the address is parsed."""

    def message() -> Request | Response:
        headers = Headers(pairs)
        if response:
            return Response(200, "OK", headers)
        return Request("BYE", parse_uri("sip:u@h"), headers)

    for tag_name, address_name in (("from_tag", "from_"), ("to_tag", "to")):
        fresh, parsed, reference = message(), message(), message()
        if first_parsed:
            _read(lambda m=parsed, n=address_name: getattr(m, n))  # the memo is filled
        want = _read(lambda m=reference, n=address_name: getattr(m, n).tag)
        assert _read(lambda m=fresh, n=tag_name: getattr(m, n)) == want
        assert _read(lambda m=parsed, n=tag_name: getattr(m, n)) == want


def test_next_deadline_skips_the_timers_no_longer_armed() -> None:
    """next_deadline() inlines _armed(): the earliest timer still armed, stale heap entries
    dropped as it goes."""
    from sbc.net.addresses import Destination
    from sbc.sip.parser import parse_message
    from sbc.sip.transaction import TransactionLayer

    layer = TransactionLayer()
    source = Destination("udp", "127.0.0.1", 5070)
    invite = parse_message(
        b"INVITE sip:u@127.0.0.2 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1\r\n"
        b"From: <sip:a@h>;tag=1\r\nTo: <sip:u@h>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n"
        b"Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(invite, Request)
    layer.receive(invite, source=source, reliable=False, now=100.0)
    for event in layer.events():
        assert type(event).__name__ == "RequestReceived"
    first = layer.next_deadline()
    assert first is not None and first > 100.0  # the Trying timer of the INVITE
    reference = [
        deadline
        for deadline, token, key, name in sorted(layer._heap)
        if layer._armed(key, name, token) is not None
    ]
    assert first == reference[0]
    # Answered: the Trying timer is disarmed, its heap entry stale until next_deadline(); the
    # transaction is retired in Accepted, its Timer L a record's deadline.
    key = _key(layer)
    layer.respond(key, _ok(invite), now=100.01)
    layer.datagrams_to_send()
    after = layer.next_deadline()
    armed = [
        deadline
        for deadline, token, key, name in sorted(layer._heap)
        if layer._armed(key, name, token) is not None
    ]
    assert after == min([*armed, layer._done[key][0]]) == pytest.approx(100.01 + 32)
    assert not layer._heap or layer._armed(*_entry(layer._heap[0])) is not None


def _key(layer: Any) -> str:
    (key,) = list(layer._servers)
    return str(key)


def _entry(entry: tuple[float, int, str, str]) -> tuple[str, str, int]:
    return entry[2], entry[3], entry[1]


def _ok(invite: Request) -> Response:
    from sbc.sip.server_transaction import build_response

    return build_response(invite, 200, "OK", to_tag="x")


@given(st.binary(min_size=16, max_size=16))
def test_a_calls_uuid_is_uuid4s_text(data: bytes) -> None:
    """uuid4_text writes what ``str(uuid.uuid4())`` writes for the same random bytes."""
    import uuid

    from sbc.b2bua.calls import uuid4_text

    want = str(uuid.UUID(bytes=data, version=4))
    assert uuid4_text(lambda n: data[:n]) == want
    assert uuid.UUID(want).version == 4 and uuid.UUID(want).variant == uuid.RFC_4122


def test_the_call_manager_draws_a_fresh_uuid4_per_call() -> None:
    import uuid

    from sbc.b2bua.calls import uuid4_text

    drawn = {uuid4_text() for _ in range(100)}
    assert len(drawn) == 100
    assert all(uuid.UUID(text).version == 4 and str(uuid.UUID(text)) == text for text in drawn)


@given(
    st.lists(
        st.one_of(
            st.sampled_from(["v", "VIA", "x-a", "X-Caller-Number", "i", "Call-Id"]),
            st.text(max_size=6),
        ),
        max_size=8,
    )
)
def test_canonical_names_learned_are_the_names_canonical_name_gives(names: list[str]) -> None:
    """canonical_name() remembers a name that is its own spelling (bounded): every name still
    gets the spelling of the general rule (compact forms expanded, known names canonical)."""
    import sbc.sip.headers as headers_module

    exact = {name: name for name in headers_module._CANONICAL_NAMES}
    saved = dict(headers_module._EXACT), headers_module._EXACT_MAX
    try:
        headers_module._EXACT.clear()
        headers_module._EXACT.update(exact)
        headers_module._EXACT_MAX = len(exact) + 3  # room for three learned names
        for _ in range(2):
            for name in names:
                want = exact.get(name) or headers_module._CANONICAL.get(name.lower(), name)
                assert headers_module.canonical_name(name) == want
        assert len(headers_module._EXACT) <= len(exact) + 3
    finally:
        headers_module._EXACT.clear()
        headers_module._EXACT.update(saved[0])
        headers_module._EXACT_MAX = saved[1]


def _initial_by_match(t1: float, t4: float, timer: object, reliable: bool) -> float:
    """TimerConfig.initial() as it was written before round 6 (a match on the members)."""
    from sbc.sip.timers import TRYING_DELAY, Timer

    match timer:
        case Timer.A | Timer.E | Timer.G:
            return t1
        case Timer.B | Timer.F | Timer.H | Timer.L | Timer.M:
            return 64 * t1
        case Timer.D:
            return 0.0 if reliable else max(32.0, 64 * t1)
        case Timer.I | Timer.K:
            return 0.0 if reliable else t4
        case Timer.J:
            return 0.0 if reliable else 64 * t1
        case _:
            return TRYING_DELAY


@given(
    st.floats(0.001, 10),
    st.floats(0.001, 10),
    st.floats(0.001, 20),
    st.booleans(),
)
def test_a_timers_first_duration_is_the_matchs(
    t1: float, t2: float, t4: float, reliable: bool
) -> None:
    from sbc.sip.timers import Timer, TimerConfig

    config = TimerConfig(t1=t1, t2=t2, t4=t4)
    for timer in Timer:
        assert config.initial(timer, reliable=reliable) == _initial_by_match(
            t1, t4, timer, reliable
        ), timer


def test_an_origin_session_id_is_drawn_from_one_to_two_to_the_31st(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """_session_id() draws what randrange(1, 2**31) draws: never 0 (drawn again), up to
    2**31 - 1."""
    import random

    from sbc.media import base

    bits = iter([0, 0, 5, 2**31 - 1])
    monkeypatch.setattr(random, "getrandbits", lambda k: next(bits) if k == 31 else -1)
    assert base._session_id() == 5
    assert base._session_id() == 2**31 - 1
    monkeypatch.undo()
    drawn = {base._session_id() for _ in range(1000)}
    assert all(1 <= n < 2**31 for n in drawn) and len(drawn) > 990


_TEMPLATE_VALUES = st.one_of(
    st.sampled_from(["", "+441234", "Zoë", "a\tb", "x" * 1010, "x" * 1009, "é" * 600, "\u2028"]),
    st.text(max_size=12),
)


@given(_TEMPLATE_VALUES, _TEMPLATE_VALUES, st.sampled_from(["X-Called", "X-é", "X-" + "N" * 30]))
def test_rendered_headers_are_the_general_rendering(caller: str, name: str, header: str) -> None:
    """HeaderTemplates.render reads a one-variable template's value directly and skips
    check_value() for a value it would pass: the same headers and rejections as rendering
    each template and checking each value."""
    from sbc.b2bua.templates import (
        CallFacts,
        HeaderTemplates,
        Rejected,
        Template,
        Variable,
        check_value,
        compile_template,
        render_template,
    )

    facts = CallFacts(caller, name, "101", "c@h", "u", 1_795_000_000.0, Headers([]))
    templates = HeaderTemplates(
        (
            # (built directly: compile_template refuses a header name that is no token)
            Template(header, "{caller_number}", (Variable("caller_number"),)),
            compile_template("X-Caller-Name", "{caller_name}"),
            compile_template("X-Both", "<{caller_number}> {caller_name}"),
            compile_template("X-When", "{now}"),
        )
    )
    headers, rejected = [], []
    for template in templates.templates:
        value = render_template(template, facts)
        reason = check_value(template.header, value)
        if reason is None:
            headers.append((template.header, value))
        else:
            rejected.append(Rejected(template.header, reason))
    rendered = templates.render(facts)
    assert rendered.headers == tuple(headers)
    assert rendered.rejected == tuple(rejected)


_LADDER_NAMES = st.sampled_from(
    ["Call-ID", "i", "CSeq", "Via", "v", "To", "t", "Authorization", "Proxy-Authorization", "X"]
)
_LADDER_VALUES = st.sampled_from(["a", "b@h", "1 INVITE", "SIP/2.0/UDP h;branch=z9hG4bKx", "x, y"])


@given(
    st.lists(st.tuples(_LADDER_NAMES, _LADDER_VALUES), max_size=10),
    st.booleans(),
    st.one_of(st.none(), st.just("leg-call-id")),
)
def test_the_ladder_notes_the_fields_as_fields_reads_them(
    pairs: list[tuple[str, str]], response: bool, leg_call_id: str | None
) -> None:
    """Ladder.note reads Call-ID, CSeq, Via, To and the credential names inline: what it keeps
    is what _fields() (compared with the scan of every field in test_call_path_fast) gives."""
    from sbc.b2bua.ladder import Ladder, _fields
    from sbc.net.addresses import Destination

    headers = Headers(pairs)
    message: Request | Response
    if response:
        message = Response(200, "OK", headers)
    else:
        message = Request("BYE", parse_uri("sip:u@h"), headers)
    ladder = Ladder(10)
    peer = Destination("udp", "127.0.0.1", 5060)
    ladder.note(
        "in",
        message,
        peer,
        "udp:127.0.0.2:5060",
        leg="caller",
        peer="pbx",
        at=1.0,
        leg_call_id=leg_call_id,
    )
    call_id, cseq, via, to, credentials = _fields(message)
    assert ladder._fields is not None and ladder._idents is not None
    where, _, _, kept_call_id, kept_cseq, kept_peer = ladder._fields[-6:]
    assert kept_call_id == (leg_call_id if leg_call_id is not None else call_id)
    assert (kept_cseq, kept_peer) == (cseq, peer)
    assert where == ("in", "udp:127.0.0.2:5060", "caller", "pbx", credentials)
    assert ladder._idents[-1] == hash((via, to))
