"""Round 9 (engine and transports): each cut gives what the code before it gave.

* The engine builds the Vias and requests of its per-message steps (``stamp_via``, ``_stamp``,
  ``_new_via``, ``_with_headers``) and the addresses of every request it sends
  (``target_of_uri``'s Target, ``Resolver.resolve_cached``'s Destination) by the classes'
  makers: no ``__init__`` runs (this fails on the code before), and what goes on the wire is
  what it was.
* The makers of Target and Destination give what the classes give.
* The loop timer still follows the transaction layer's earliest deadline now that ``_pump``
  enters ``_arm_timer`` only when that deadline moved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbc.net.addresses import (
    Destination,
    Target,
    TransportConfig,
    make_destination,
    make_target,
    target_of_uri,
)
from sbc.net.dns import Resolver
from sbc.net.engine import _BRANCH_STAND_IN, SipEngine, _with_headers, stamp_via
from sbc.net.handles import IncomingRequest
from sbc.sip.fields import Via
from sbc.sip.message import Request
from sbc.sip.parser import parse_message
from sbc.sip.uri import SipUri, parse_uri
from tests.unit.engine_sink import engine_without_sockets

PEER = ("192.0.2.7", 40000)

INVITE = (
    "INVITE sip:101@127.0.0.1:5060 SIP/2.0\r\n"
    "Via: SIP/2.0/UDP {sent_by};branch=z9hG4bK{branch}{rport}\r\n"
    "From: <sip:pbx@192.0.2.7>;tag=f1\r\n"
    "To: <sip:101@127.0.0.1>\r\n"
    "Call-ID: c{branch}@192.0.2.7\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:pbx@192.0.2.7:5060>\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)

BYE = (
    "BYE sip:retell@127.0.0.73:5090 SIP/2.0\r\n"
    "From: <sip:101@127.0.0.1>;tag=b1\r\n"
    "To: <sip:retell@127.0.0.73>;tag=r1\r\n"
    "Call-ID: r9@127.0.0.1\r\n"
    "CSeq: 2 BYE\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)


@pytest.fixture
def no_inits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The classes' ``__init__`` refuses to run (the code before this round called it)."""

    def refuse(self: object, *args: object) -> None:
        raise AssertionError(f"{type(self).__name__}.__init__ called on the hot path")

    for cls in (Via, Request, Target):
        monkeypatch.setattr(cls, "__init__", refuse)
    yield


def _invite(branch: str, sent_by: str = "192.0.2.7:5060", rport: bool = True) -> bytes:
    return INVITE.format(branch=branch, sent_by=sent_by, rport=";rport" if rport else "").encode()


async def test_received_and_sent_requests_build_no_via_or_request_through_init(
    no_inits: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, sink = engine_without_sockets()
    incoming: list[IncomingRequest] = []
    engine.on_request = incoming.append
    # stamp_via's usual case (a valueless rport written last) and _stamp's (no rport, a
    # sent-by other than the source: received appended).
    engine.transports._datagram_received(_invite("1"), PEER)
    engine.transports._datagram_received(_invite("2", "pbx.example:5060", rport=False), PEER)
    assert [i.request.headers.get("Via") for i in incoming] == [
        "SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK1;rport=40000;received=192.0.2.7",
        "SIP/2.0/UDP pbx.example:5060;branch=z9hG4bK2;received=192.0.2.7",
    ]
    assert incoming[0].request.top_via.rport == 40000
    assert incoming[1].request.top_via.received == "192.0.2.7"
    for each in incoming:
        each.respond(486)
    answers = [d for d in sink.sent if d.startswith(b"SIP/2.0 486 ")]
    assert [d.split(b"\r\n", 2)[1] for d in answers] == [
        b"Via: SIP/2.0/UDP 192.0.2.7:5060;branch=z9hG4bK1;rport=40000;received=192.0.2.7",
        b"Via: SIP/2.0/UDP pbx.example:5060;branch=z9hG4bK2;received=192.0.2.7",
    ]
    # A request sent to a literal URI: Target, Destination, its Via and the copy with it.
    monkeypatch.setattr(Destination, "__init__", no_inits_destination)
    request = parse_message(BYE.encode())
    assert isinstance(request, Request)
    handle = engine.send_request(request)
    dest = handle.destination
    assert dest is not None and type(dest) is Destination
    assert (dest.transport, dest.host, dest.port, dest.local) == ("udp", "127.0.0.73", 5090, None)
    sent = sink.sent[-1].decode()
    assert sent.startswith("BYE sip:retell@127.0.0.73:5090 SIP/2.0\r\nVia: SIP/2.0/UDP ")
    via = handle.request.top_via
    assert (via.transport, via.host, via.port, via.params[-1]) == (
        "UDP",
        "127.0.0.1",
        5060,
        ("rport", None),
    )
    assert f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={via.branch};rport\r\n" in sent


def no_inits_destination(self: object, *args: object) -> None:
    raise AssertionError("Destination.__init__ called on the send path")


_HOSTS = st.sampled_from(["127.0.0.73", "192.0.2.7", "::1", "[2001:db8::5]", "retell.example"])
_PORTS = st.none() | st.integers(min_value=1, max_value=65535)
_TRANSPORTS = st.sampled_from(["udp", "tcp", "tls"])


@given(_HOSTS, _PORTS, _TRANSPORTS, st.none() | st.integers(0, 9), st.none() | st.text(max_size=5))
def test_the_address_makers_give_what_the_classes_give(
    host: str, port: int | None, transport: str, conn: int | None, local: str | None
) -> None:
    target = make_target(host, port, transport)
    assert type(target) is Target and target == Target(host, port, transport)
    assert hash(target) == hash(Target(host, port, transport))
    dest = make_destination(transport, host, port or 5060, conn, None, local)
    expected = Destination(transport, host, port or 5060, conn, None, local)
    assert type(dest) is Destination and dest == expected and str(dest) == str(expected)
    with pytest.raises(AttributeError):
        dest.host = "x"  # type: ignore[misc]


@given(_HOSTS, _PORTS, st.sampled_from(["", ";transport=TCP", ";transport=udp", ";lr"]))
def test_a_literal_uri_resolves_without_lookup_as_before(
    host: str, port: int | None, params: str
) -> None:
    scheme_host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    uri = parse_uri(f"sip:u@{scheme_host}{'' if port is None else f':{port}'}{params}")
    assert isinstance(uri, SipUri)
    target = target_of_uri(uri)
    transport = "tcp" if "TCP" in params else "udp"
    assert target == Target(scheme_host, port, transport)
    found = Resolver().resolve_cached(target)
    if host == "retell.example":
        assert found is None  # a name not in the cache: a lookup first, as before
        return
    literal = host.strip("[]")
    assert found == [Destination(transport, literal, port or 5060)]


async def test_the_loop_timer_follows_the_earliest_deadline() -> None:
    engine, sink = engine_without_sockets()
    engine._running = True  # (no sockets: the loop timer is armed as when started)
    loop = asyncio.get_running_loop()
    request = parse_message(BYE.encode())
    assert isinstance(request, Request)
    handle = engine.send_request(request)
    # Timer E (UDP, RFC 3261 §17.1.2.2): the loop timer is armed at the layer's deadline.
    deadline = engine.layer.next_deadline()
    assert deadline is not None and engine._timer_at == deadline
    assert engine._timer is not None and engine.stats.timer_arms == 1
    timer = engine._timer
    # A message that moves no deadline (a response not ours, dropped) leaves it alone.
    stray = BYE.replace("BYE sip:retell@127.0.0.73:5090", "SIP/2.0 200 OK", 1)
    stray = stray.replace("Max-Forwards", "Via: SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKx\r\nX", 1)
    engine.transports._datagram_received(stray.encode(), ("127.0.0.73", 5090))
    assert engine._timer is timer and engine.stats.timer_arms == 1
    # The answer moves the earliest deadline later (Timer K): the armed timer stays (it fires
    # early, finds nothing due and is armed again then), never late.
    via = handle.request.headers.get("Via")
    assert via is not None
    ok = stray.replace("SIP/2.0/UDP 203.0.113.9;branch=z9hG4bKx", via, 1)
    engine.transports._datagram_received(ok.encode(), ("127.0.0.73", 5090))
    assert handle.final is not None and handle.final.status == 200
    later = engine.layer.next_deadline()
    assert later is not None and later > deadline
    assert engine._timer is timer and engine._timer_at == deadline
    engine._timer.cancel()
    engine._timer_fired()
    assert engine._timer_at == later and engine.stats.timer_arms == 2
    assert engine._timer is not None and engine._timer is not timer
    engine._timer.cancel()
    assert sink.sent[0].startswith(b"BYE ")
    # An engine given its loop by hand (never started) reads the clock through _now.
    assert "_now" not in vars(engine) and abs(engine._now() - loop.time()) < 1.0


async def test_a_started_engine_reads_the_loops_clock() -> None:
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=0, tcp=False))
    await engine.start()
    try:
        loop = asyncio.get_running_loop()
        assert engine._now == loop.time  # the loop's own method: no frame of the engine's
        before = loop.time()
        assert before <= engine._now() <= loop.time()
    finally:
        await engine.stop()


def test_stamping_and_the_request_copy_are_the_class_objects() -> None:
    request = parse_message(_invite("3"))
    assert isinstance(request, Request)
    stamped = stamp_via(request, make_destination("udp", "192.0.2.7", 40000, None, None, None))
    assert type(stamped) is Request and type(stamped.top_via) is Via
    copy = _with_headers(stamped, stamped.headers)
    assert type(copy) is Request and copy == stamped


def test_the_large_request_rule_measures_a_via_as_long_as_a_real_one() -> None:
    # RFC 3261 §18.1.1's size check counts the Via each attempt writes; it measures one with a
    # stand-in branch (no random draw) that must be exactly as long.
    engine = SipEngine(TransportConfig(bind="127.0.0.1", port=5060))
    real = engine.make_via("udp")
    stand_in = engine.make_via("udp", branch=_BRANCH_STAND_IN)
    assert len(stand_in) == len(real)
    assert stand_in.startswith("SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK")
