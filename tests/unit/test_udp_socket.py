"""A UDP socket of its own for one peer (``TransportConfig.udp_sockets``, ``[retell]
local_udp_port``): requests sent with its name leave from it and their Via names its port, the
responses read from it complete their transactions, requests that arrive there are answered
from it, and everything sent without the name is as before (the SIP port's socket and Via).

No sockets: the engine's datagram endpoints are sinks that record what was sent where, and
datagrams are handed to the transports as the loop would.
"""

from __future__ import annotations

import asyncio

from sbc.net.addresses import Destination, TransportConfig
from sbc.net.engine import SipEngine
from sbc.net.transport import Transports
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

SIP_PORT = 5060
RETELL_PORT = 5062  # the named socket's bound port, as Transports.start records it
RETELL = Destination("udp", "127.0.0.23", 5080)
PBX = Destination("udp", "127.0.0.21", 5070)


class _Sink:
    """A datagram endpoint that records what was sent, and to where."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sent.append((data, address))

    def close(self) -> None:
        pass


def engine_with_sinks() -> tuple[SipEngine, _Sink, _Sink]:
    config = TransportConfig(bind="127.0.0.22", port=SIP_PORT, udp_sockets=(("retell", 0),))
    engine = SipEngine(config)
    engine._loop = asyncio.get_running_loop()
    main, named = _Sink(), _Sink()
    engine.transports._udp = main  # type: ignore[assignment]
    engine.transports._udp_named["retell"] = named  # type: ignore[assignment]
    engine.transports.udp_named_addresses["retell"] = ("127.0.0.22", RETELL_PORT)
    return engine, main, named


def options(to: Destination) -> Request:
    text = (
        f"OPTIONS sip:{to.host}:{to.port} SIP/2.0\r\n"
        "From: <sip:sbc@127.0.0.22>;tag=a1\r\n"
        f"To: <sip:{to.host}:{to.port}>\r\n"
        "Call-ID: udpsock-1@127.0.0.22\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(text.encode())
    assert isinstance(message, Request)
    return message


def answer(sent: bytes, status: int = 200) -> bytes:
    """The peer's answer to ``sent``: its Via, From, To (with a tag), Call-ID and CSeq."""
    request = parse_message(sent)
    assert isinstance(request, Request)
    h = request.headers
    lines = [f"SIP/2.0 {status} OK"]
    lines += [f"Via: {v}" for v in h.values("Via")]
    lines += [f"From: {h.get('From')}", f"To: {h.get('To')};tag=b1"]
    lines += [f"Call-ID: {h.get('Call-ID')}", f"CSeq: {h.get('CSeq')}", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def top_via(data: bytes) -> str:
    message = parse_message(data)
    return message.headers.get("Via") or ""


async def test_a_request_named_for_the_socket_leaves_from_it_and_its_via_names_it() -> None:
    engine, main, named = engine_with_sinks()
    handle = engine.send_request(options(RETELL), RETELL, "retell")
    assert main.sent == []
    ((data, address),) = named.sent
    assert address == RETELL.address
    assert top_via(data).startswith(f"SIP/2.0/UDP 127.0.0.22:{RETELL_PORT};branch=z9hG4bK")
    assert handle.destination is not None and handle.destination.local == "retell"
    # The answer read from that socket completes the transaction.
    engine.transports._datagram_received(answer(data), RETELL.address, local="retell")
    assert handle.final is not None and handle.final.status == 200
    assert handle.local_failure is None
    assert engine.table_sizes()["engine_pending"] == 0


async def test_retransmissions_and_cancel_leave_from_the_same_socket() -> None:
    engine, main, named = engine_with_sinks()
    invite = options(RETELL)
    invite = Request(
        "INVITE",
        invite.uri,
        invite.headers.remove("CSeq").add("CSeq", "1 INVITE").add("Contact", "<sip:a@b>"),
        b"",
    )
    handle = engine.send_request(invite, RETELL, "retell")
    engine.cancel(handle)
    methods = [parse_message(d).method for d, _ in named.sent]  # type: ignore[union-attr]
    assert methods == ["INVITE", "CANCEL"] and main.sent == []
    # The CANCEL copies the INVITE's Via (RFC 3261 §9.1): the same port, the same socket.
    assert top_via(named.sent[0][0]) == top_via(named.sent[1][0])
    # Timer A, as the loop would fire it after T1: the INVITE again, from the named socket.
    engine.layer.handle_timer(engine._now() + 0.6)
    engine._pump()
    assert [parse_message(d).method for d, _ in named.sent].count("INVITE") == 2  # type: ignore[union-attr]
    assert main.sent == []


async def test_without_the_name_the_sip_port_is_used_as_before() -> None:
    engine, main, named = engine_with_sinks()
    handle = engine.send_request(options(PBX), PBX)
    ((data, _),) = main.sent
    assert top_via(data).startswith(f"SIP/2.0/UDP 127.0.0.22:{SIP_PORT};branch=")
    assert handle.destination == PBX
    # A name with no socket (the PBX legs ask for "pbx") is the SIP port too.
    engine.send_request(options(PBX), PBX, "pbx")
    assert len(main.sent) == 2 and named.sent == []
    assert top_via(main.sent[1][0]).startswith(f"SIP/2.0/UDP 127.0.0.22:{SIP_PORT};")
    assert engine.make_via("udp", "pbx").startswith(f"SIP/2.0/UDP 127.0.0.22:{SIP_PORT};")
    # Streams are not UDP sockets: the name changes neither the Via nor the destination.
    assert engine.make_via("tcp", "retell").startswith(f"SIP/2.0/TCP 127.0.0.22:{SIP_PORT};")
    tcp = Destination("tcp", "127.0.0.23", 5080)
    assert engine._from_socket(tcp, "retell") is tcp
    assert engine.make_via("udp", "retell").startswith(f"SIP/2.0/UDP 127.0.0.22:{RETELL_PORT};")


async def test_a_request_arriving_at_the_socket_is_answered_from_it() -> None:
    engine, main, named = engine_with_sinks()
    request = (
        b"OPTIONS sip:127.0.0.22:5062 SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.23:5080;branch=z9hG4bK-r1;rport\r\n"
        b"From: <sip:retell@127.0.0.23>;tag=r1\r\n"
        b"To: <sip:127.0.0.22>\r\n"
        b"Call-ID: r1@127.0.0.23\r\n"
        b"CSeq: 1 OPTIONS\r\n"
        b"Max-Forwards: 70\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    engine.transports._datagram_received(request, RETELL.address, local="retell")
    ((data, address),) = named.sent
    assert data.startswith(b"SIP/2.0 200 ") and address == RETELL.address
    assert main.sent == []
    # The same request at the SIP port is answered from the SIP port.
    engine.transports._datagram_received(request.replace(b"-r1", b"-r2"), RETELL.address)
    assert len(main.sent) == 1 and main.sent[0][0].startswith(b"SIP/2.0 200 ")
    # A response without rport goes where its Via says, from the socket it came in on.
    no_rport = answer(request.replace(b";rport", b"").replace(b"5080;", b"5099;"))
    response = parse_message(no_rport)
    assert isinstance(response, Response)
    source = Destination("udp", "127.0.0.23", 5080, None, None, "retell")
    via = engine._response_destination(source, response)
    assert (via.port, via.local) == (5099, "retell")


async def test_the_socket_keeps_its_sources_apart() -> None:
    seen: list[Destination] = []
    transports = Transports(
        TransportConfig(bind="127.0.0.22", port=SIP_PORT),
        lambda message, source: seen.append(source),
        lambda dest, messages, reason: None,
    )
    data = answer(
        b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.22:5062;branch=z9hG4bK1\r\n"
        b"From: <sip:a@b>;tag=1\r\nTo: <sip:x>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    transports._datagram_received(data, RETELL.address, local="retell")
    transports._datagram_received(data, RETELL.address)
    transports._datagram_received(data, RETELL.address, local="retell")
    assert [s.local for s in seen] == ["retell", None, "retell"]
    assert seen[0] is seen[2]  # one Destination per (socket, peer), shared
    # Sending to a name whose socket is not open fails as UDP disabled would (no socket).
    failed: list[str] = []
    transports._on_send_failure = lambda dest, messages, reason: failed.append(reason)
    transports._udp = _Sink()  # type: ignore[assignment]
    transports.send(
        Destination("udp", "127.0.0.23", 5080, None, None, "retell"), parse_message(data)
    )
    assert failed == ["udp disabled"]
