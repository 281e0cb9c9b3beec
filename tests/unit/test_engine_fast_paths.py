"""The engine's per-message fast paths give what its general code gives.

Via stamping of a top Via ending in one valueless ``rport`` (what SIPp and most phones send)
skips the regex and the parameter search; the pump takes a second round only when something
was queued during the first; ``make_via`` keeps the text before the branch per transport.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine, _stamp, stamp_via
from sbc.net.handles import IncomingRequest
from sbc.sip.errors import SipError
from sbc.sip.fields import parse_via
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from tests.unit.engine_sink import engine_without_sockets

OPTIONS = (
    b"OPTIONS sip:127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-%d;rport\r\n"
    b"From: <sip:sipp@127.0.0.1:5070>;tag=t%d\r\n"
    b"To: <sip:127.0.0.1:5060>\r\n"
    b"Call-ID: %d@127.0.0.1\r\n"
    b"CSeq: 1 OPTIONS\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def with_via(text: str) -> Request:
    message = parse_message(OPTIONS % (1, 1, 1))
    assert isinstance(message, Request)
    headers = message.headers.remove("Via").prepend("Via", text).add("Via", "SIP/2.0/UDP g")
    return dataclasses.replace(message, headers=headers)


def general(request: Request, source: Destination) -> Request:
    first = request.headers.get("Via")
    assert first is not None
    return _stamp(request, source, first, parse_via(first))


def assert_same_stamp(text: str, source: Destination) -> None:
    try:
        expected = general(with_via(text), source)
    except SipError:
        with pytest.raises(SipError):
            stamp_via(with_via(text), source)
        return
    got = stamp_via(with_via(text), source)
    assert got.headers.items() == expected.headers.items()
    assert got.method == expected.method and got.uri == expected.uri
    assert top_via_or_error(got) == top_via_or_error(expected)


def top_via_or_error(request: Request) -> object:
    """The top Via as remembered, checked against parsing its text; or the error's type."""
    try:
        via = request.top_via
    except SipError as exc:
        return type(exc)
    assert via == parse_via(request.headers.get("Via") or "")
    return via


@pytest.mark.parametrize(
    "text",
    [
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK1;rport",  # the fast path
        "SIP/2.0/UDP 192.0.2.7:40000;branch=z9hG4bK1;rport",  # sent-by equals the source
        "SIP/2.0/UDP h;rport",
        "SIP/2.0/UDP h;branch=z9hG4bK1;RPORT",
        "SIP/2.0/UDP h;branch=z9hG4bK1 ;rport",
        "SIP/2.0/UDP h;branch=z9hG4bK1;\trport",
        "SIP/2.0/UDP h;RPORT;branch=z9hG4bK1;rport",  # the first bare rport is filled
        "SIP/2.0/UDP h;rport=5;branch=z9hG4bK1;rport",  # rport has a value already
        "SIP/2.0/UDP h;branch=z9hG4bKrport;rport",  # 'rport' inside another value
        'SIP/2.0/UDP h;branch=z9hG4bK1;x="a;rport";rport',
        "SIP/2.0/UDP h;branch=z9hG4bK1;xrport",
        "SIP/2.0/UDP [2001:db8::1]:5060;branch=z9hG4bK1;rport",
        "SIP/2.0/UDP h;branch=z9hG4bK1",
    ],
)
@pytest.mark.parametrize(
    "source",
    [
        Destination("udp", "192.0.2.7", 40000),
        Destination("udp", "2001:db8::2", 5060),
        Destination("udp", "fe80::1%eth0", 1),
        Destination("udp", "192.0.2.7", 0),
        Destination("udp", "192.0.2.7", 70000),  # out of range: no parsed Via is made
        Destination("udp", "not an address", 5060),
    ],
)
def test_stamping_fast_path_equals_the_general_one(text: str, source: Destination) -> None:
    assert_same_stamp(text, source)


_name = st.sampled_from(["branch", "rport", "RPORT", "received", "x", "maddr", "lr"])
_value = st.one_of(st.none(), st.sampled_from(["1", "z9hG4bKrport", "a.b", '"q;rport"']))


@given(
    st.lists(st.tuples(_name, _value), max_size=4),
    st.sampled_from([";rport", ";RPORT", " ;rport", ";rport=7", ""]),
    st.sampled_from(["192.0.2.7", "127.0.0.1", "::1", "10.0.0.1"]),
    st.integers(min_value=0, max_value=70000),
)
def test_stamping_fast_path_property(
    params: list[tuple[str, str | None]], ending: str, host: str, port: int
) -> None:
    text = "SIP/2.0/UDP 127.0.0.1:5070" + "".join(
        f";{n}" if v is None else f";{n}={v}" for n, v in params
    )
    assert_same_stamp(text + ending, Destination("udp", host, port))


# -- the pump ----------------------------------------------------------------------------------


async def test_what_a_handler_or_a_tap_sends_goes_out_in_the_same_pump() -> None:
    engine, sink = engine_without_sockets()
    peer = Destination("udp", "127.0.0.1", 5070)
    answered: list[IncomingRequest] = []

    def handler(incoming: IncomingRequest) -> None:
        answered.append(incoming)
        incoming.respond(200)  # inside the pump's dispatch: a second round sends it

    tapped: list[str] = []

    def tap(direction: str, message: Request | Response, dest: Destination) -> None:
        tapped.append(direction)
        if direction == "out" and isinstance(message, Response) and len(tapped) < 4:
            # Queued while the pump transmits: it must not wait for the next message.
            engine.send_stateless(dataclasses.replace(message, reason="Again"), peer)

    engine.on_request = handler
    engine.on_message = tap
    engine.answer_options = False
    engine.transports._datagram_received(OPTIONS % (2, 2, 2), ("127.0.0.1", 5070))
    assert len(answered) == 1
    assert [data.split(b"\r\n", 1)[0] for data in sink.sent] == [
        b"SIP/2.0 200 OK",
        b"SIP/2.0 200 Again",
        b"SIP/2.0 200 Again",
    ]
    assert engine.layer.datagrams_to_send() == [] and engine.layer.events() == []
    assert not engine._pumping


async def test_answers_and_counts_after_a_quiet_round() -> None:
    engine, sink = engine_without_sockets()
    for i in range(3):
        engine.transports._datagram_received(OPTIONS % (i, i, i), ("127.0.0.1", 5070))
    assert len(sink.sent) == 3 and all(d.startswith(b"SIP/2.0 200 OK") for d in sink.sent)
    assert engine.transactions_by_source == {}  # each first final answer counted down
    assert engine.stats.messages == {("in", "OPTIONS", "udp"): 3, ("out", 200, "udp"): 3}


# -- make_via ---------------------------------------------------------------------------------


def test_make_via_per_transport_and_config() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=5060, tls_port=5061))
    shape = r"SIP/2.0/%s %s;branch=z9hG4bK[0-9a-f]{24};rport"
    assert re.fullmatch(shape % ("UDP", r"127\.0\.0\.1:5060"), engine.make_via("udp"))
    assert re.fullmatch(shape % ("TCP", r"127\.0\.0\.1:5060"), engine.make_via("tcp"))
    assert re.fullmatch(shape % ("TLS", r"127\.0\.0\.1:5061"), engine.make_via("tls"))
    assert engine.make_via("udp") != engine.make_via("udp")
    engine.config = dataclasses.replace(
        engine.config, advertised_address="2001:db8::5", advertised_port=5080
    )
    assert re.fullmatch(shape % ("UDP", r"\[2001:db8::5\]:5080"), engine.make_via("udp"))
    assert parse_via(engine.make_via("tcp")).port == 5080


# -- the engine's one loop timer ----------------------------------------------------------------

INVITE = (
    "INVITE sip:101@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK{n};rport\r\n"
    "From: <sip:pbx@192.0.2.7>;tag=f{n}\r\n"
    "To: <sip:101@127.0.0.1>\r\n"
    "Call-ID: {n}@192.0.2.7\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:pbx@192.0.2.7:5060>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)


async def test_a_deadline_that_moves_later_keeps_the_loop_timer() -> None:
    """Each INVITE arms its 200 ms Trying timer and its answer disarms it: the loop timer is
    armed once for all of them, never after the layer's next deadline, and an early wake-up
    re-arms it for what is due next (Timer L here ends every transaction on time)."""
    engine, sink = engine_without_sockets()
    engine.config = dataclasses.replace(engine.config, t1=0.01, t2=0.04)
    engine.layer.config = dataclasses.replace(engine.layer.config, t1=0.01, t2=0.04)
    engine._running = True
    waiting: list[IncomingRequest] = []
    engine.on_request = waiting.append
    contact = (("Contact", "<sip:101@127.0.0.1:5060>"),)
    for n in range(21):
        # As in a bridge: each INVITE is answered after the next one came in (the far leg
        # answers later), so its Trying timer is armed in the layer, then disarmed.
        if n < 20:
            engine.transports._datagram_received(INVITE.format(n=n).encode(), ("192.0.2.7", 5060))
        if n:
            waiting[n - 1].respond(200, headers=contact)
        deadline = engine.layer.next_deadline()
        assert engine._timer_at is not None and deadline is not None
        assert engine._timer_at <= deadline
    assert len(sink.sent) == 20 and engine.stats.timer_arms == 1
    drained = asyncio.Event()
    terminated = engine._terminated

    def on_terminated(key: str) -> None:
        terminated(key)
        if not len(engine.layer):
            drained.set()

    engine._terminated = on_terminated  # type: ignore[method-assign]
    # Timer L is 64 * T1 = 0.64 s; the bound is generous for a loaded machine.
    await asyncio.wait_for(drained.wait(), 10.0)
    # No ACK came: Timer L ended each INVITE's transaction, and nothing is armed any more.
    assert all(data.startswith(b"SIP/2.0 200 ") for data in sink.sent)
    assert engine.layer.next_deadline() is None
    assert 2 <= engine.stats.timer_arms <= 20


@pytest.mark.parametrize(
    "config",
    [
        TransportConfig(bind="127.0.0.1", port=5060, tls_port=5061),
        TransportConfig(bind="::1", port=5070),
        TransportConfig(bind="0.0.0.0", advertised_address="sbc.example.com", advertised_port=5080),
        TransportConfig(bind="0.0.0.0", advertised_address="2001:db8::5"),
        TransportConfig(bind="0.0.0.0", advertised_address="bad host!"),
    ],
)
def test_the_via_sent_is_what_parsing_its_text_gives(config: TransportConfig) -> None:
    engine = SipEngine(config)
    for transport in ("udp", "tcp", "tls"):
        text, via = engine._new_via(transport)
        try:
            parsed = parse_via(text)
        except SipError:
            assert via is None  # then the layer parses (and refuses) it as before
            continue
        assert via == parsed
        assert text.startswith(f"SIP/2.0/{transport.upper()} ")


async def test_a_request_sent_carries_its_parsed_via() -> None:
    engine, _ = engine_without_sockets()
    engine._running = True
    message = parse_message(OPTIONS % (3, 3, 3))
    assert isinstance(message, Request)
    handle = engine.send_request(
        dataclasses.replace(message, headers=message.headers.remove("Via")),
        Destination("udp", "127.0.0.1", 5070),
    )
    sent = handle.request
    text = sent.headers.get("Via")
    assert text is not None and sent.top_via == parse_via(text)
    assert engine._branch_keys == {(sent.top_via.branch, "OPTIONS"): handle.key}
