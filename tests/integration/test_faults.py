"""Peer faults a real sbc survives, on loopback (issue 11, "Faults survived"): sbc is the app's
:class:`~sbc.ops.service.Service` in this process, between the 3CX stand-in
(:class:`~sbc.demo.pbx.PbxStandIn`: registrar and caller, UDP) and the Retell stand-in
(:class:`~sbc.demo.retell.RetellStandIn`, TCP), with relay media so that RTP ports are real.
Raw datagrams stand in for 3CX where a test needs messages no well-behaved peer sends (the same
INVITE a thousand times, a BYE or CANCEL outside any dialog).

Every test ends with the bridge empty: no call, no transaction, no RTP port in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from bridge_helpers import connected_call, demo_pbx, hang_up, pbx_stand_in
from peers import FakeDns, free_port

from sbc.demo.pbx import PbxCall, PbxStandIn
from sbc.demo.retell import RetellCall, RetellStandIn
from sbc.media.relay import RelayBackend
from sbc.net.dns import Resolver, make_resolver
from sbc.net.handles import IncomingRequest
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    RetellSettings,
    Settings,
    SipSettings,
    TransferSettings,
)
from sbc.sip.message import Response
from sbc.sip.parser import parse_message
from sbc.sip.registration import backoff_upper_bound

pytestmark = pytest.mark.integration

PBX = "127.0.0.161"
SBC = "127.0.0.162"
RETELL = "127.0.0.163"
DNS = "127.0.0.164"
EXTENSION = "101"
NUMBER = "+14155550100"
T1 = 0.1  # 64*T1 = 6.4 s: transactions end within the tests' bounds


@dataclass
class Rig:
    service: Service
    settings: Settings
    pbx: PbxStandIn
    retell: RetellStandIn

    @property
    def port(self) -> int:
        return self.settings.sip.port

    def leftovers(self) -> dict[str, int]:
        media = self.service.media
        return {
            "calls": self.service.bridge.active,
            "transactions": len(self.service.engine.layer),
            "rtp_ports": media.pool.in_use if isinstance(media, RelayBackend) else 0,
        }

    async def drained(self, limit: float = 20.0) -> None:
        """Calls ended, transactions gone on their timers, RTP ports back in the pool."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while any(self.leftovers().values()):
            if loop.time() > give_up:
                raise AssertionError(f"left after {limit} s: {self.leftovers()}")
            await asyncio.sleep(0.05)  # transaction timers have no event to wait for

    def record(self, index: int = -1) -> Any:
        return self.service.bridge.records[index]


def settings(
    *,
    t1: float = T1,
    retell_host: str = RETELL,
    register_expires: int = 300,
    backoff: float = 30.0,
    answer_timeout: float = 30.0,
    ring_timeout: float = 30.0,
) -> Settings:
    rtp_min = free_port(SBC) & ~1
    return Settings(
        sip=SipSettings(bind=SBC, port=free_port(SBC), t1=t1, t2=max(0.4, 4 * t1), t4=0.5),
        pbx=demo_pbx(
            PBX,
            EXTENSION,
            trusted=(f"{PBX}/32",),
            register_expires=register_expires,
            register_backoff_base=backoff,
            register_backoff_max=max(backoff, 60.0),
        ),
        retell=RetellSettings(
            host=retell_host,
            port=free_port(RETELL),
            transport="tcp",
            number=NUMBER,
            answer_timeout=answer_timeout,
        ),
        calls=CallsSettings(country_code="44"),
        transfer=TransferSettings(mode="refer", ring_timeout=ring_timeout),
        media=MediaSettings(mode="relay", rtp_port_min=rtp_min, rtp_port_max=rtp_min + 39),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
    )


@contextlib.asynccontextmanager
async def running_rig(
    values: Settings | None = None,
    *,
    ring: float = 0.1,
    pbx_expires: int = 60,
    resolver: Resolver | None = None,
    with_retell: bool = True,
) -> AsyncIterator[Rig]:
    values = values or settings()
    pbx = pbx_stand_in(values, expires=pbx_expires)
    retell = RetellStandIn(RETELL, values.retell.port, ring=ring)
    service = Service(values)
    if resolver is not None:
        service.engine.resolver = resolver
    await pbx.start()
    if with_retell:
        await retell.start()
    try:
        await service.start()
        async with asyncio.timeout(10):
            await pbx.registered.wait()
        yield Rig(service, values, pbx, retell)
    finally:
        await service.stop()
        if with_retell:
            await retell.stop()
        await pbx.stop()


# -- raw datagrams from the PBX's address --------------------------------------------------------

_ids = itertools.count(1)


class RawPbx(asyncio.DatagramProtocol):
    """A UDP socket on the PBX's address writing SIP by hand; keeps every response."""

    def __init__(self) -> None:
        self.responses: list[Response] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = parse_message(data)
        if isinstance(message, Response):
            self.responses.append(message)
            self.arrived.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, rig: Rig, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (SBC, rig.port))

    async def wait_for(self, predicate: Callable[[Response], bool], limit: float = 5.0) -> Response:
        async with asyncio.timeout(limit):
            while True:
                for response in self.responses:
                    if predicate(response):
                        return response
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def raw_pbx() -> AsyncIterator[RawPbx]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(RawPbx, local_addr=(PBX, 0))
    try:
        yield peer
    finally:
        transport.close()


def raw_request(
    method: str,
    port: int,
    sbc_port: int,
    *,
    call_id: str,
    branch: str,
    to_tag: str = "",
    cseq: int = 1,
    body: bytes = b"",
) -> bytes:
    head = (
        f"{method} sip:{EXTENSION}@{SBC}:{sbc_port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {PBX}:{port};branch={branch};rport\r\n"
        f'From: "Raw" <sip:02071234567@{PBX}>;tag=raw-{call_id}\r\n'
        f"To: <sip:{EXTENSION}@{SBC}>{to_tag}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"Contact: <sip:3cx@{PBX}:{port}>\r\n"
        "Max-Forwards: 70\r\n"
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def pbx_sdp(rtp_port: int) -> bytes:
    return (
        f"v=0\r\no=3cx 1 1 IN IP4 {PBX}\r\ns=call\r\nc=IN IP4 {PBX}\r\nt=0 0\r\n"
        f"m=audio {rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
    ).encode()


def invites_at_retell(rig: Rig) -> int:
    return sum(
        n for (d, m, _), n in rig.retell.engine.stats.messages.items() if (d, m) == ("in", "INVITE")
    )


# -- Retell's TCP connection reset mid-call ------------------------------------------------------


def reset_connections(standin: RetellStandIn) -> int:
    """Abort every TCP connection of the Retell stand-in with SO_LINGER 0: an RST, as when
    Retell's server or a middlebox drops the flow."""
    count = 0
    for conn in list(standin.engine.transports._by_id.values()):
        transport = conn._transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.abort()
        count += 1
    return count


async def test_retell_connection_reset_mid_call_byes_the_pbx_and_frees_the_ports() -> None:
    async with running_rig() as rig:
        call, retell_call = await connected_call(rig)
        assert rig.leftovers()["rtp_ports"] > 0
        with structlog.testing.capture_logs() as logs:
            assert reset_connections(rig.retell) == 1
            async with asyncio.timeout(5):
                await call.ended.wait()
        assert call.bye_received  # sbc hung up toward 3CX
        assert [e["event"] for e in logs if e["event"] == "retell_connection_reset"] == [
            "retell_connection_reset"
        ]
        await rig.drained()
        record = rig.record()
        assert record.end_reason == "retell_connection_lost"
        assert record.hung_up_by == "sbc"
        # The BYE toward Retell went over a new connection, and Retell's dialog ended with it.
        assert retell_call.bye_received


async def test_an_orderly_close_by_retell_keeps_the_call() -> None:
    async with running_rig() as rig:
        call, retell_call = await connected_call(rig)
        for conn in list(rig.retell.engine.transports._by_id.values()):
            conn.close()  # FIN, not RST
        # The next request reopens a connection (RFC 3261 §18): a BYE from 3CX still reaches
        # Retell, and the call ends the ordinary way.
        await asyncio.sleep(0.3)  # would the call end on its own? it must not
        assert rig.service.bridge.active == 1 and not call.ended.is_set()
        await hang_up(rig, call, retell_call)
        await rig.drained()
        assert rig.record().end_reason == "pbx_bye"


# -- the same INVITE a thousand times over UDP -----------------------------------------------------


async def test_an_invite_retransmitted_1000_times_reaches_retell_once() -> None:
    async with running_rig(ring=30.0) as rig, raw_pbx() as raw:
        invite = raw_request(
            "INVITE",
            raw.port,
            rig.port,
            call_id="dup-1@127.0.0.161",
            branch="z9hG4bK-dup-1",
            body=pbx_sdp(40000),
        )
        for n in range(1000):
            raw.send(rig, invite)
            if n % 50 == 0:
                await asyncio.sleep(0)  # let sbc read: the kernel's buffer holds ~200 datagrams
        # sbc's 180 follows Retell's, sent once Retell took the call.
        await raw.wait_for(lambda r: r.status == 180)
        await asyncio.sleep(0.5)  # any second INVITE toward Retell would be out by now
        assert invites_at_retell(rig) == 1
        assert len(rig.retell.calls) == 1
        assert rig.service.bridge.active == 1
        # Every copy was absorbed by the one server transaction (RFC 3261 §17.2.1).
        received = sum(
            n
            for (d, m, t), n in rig.service.engine.stats.messages.items()
            if (d, m, t) == ("in", "INVITE", "udp")
        )
        assert received == 1000
        # 3CX gives up: CANCEL, then the 487 is ACKed; Retell's INVITE is cancelled.
        raw.send(
            rig,
            raw_request(
                "CANCEL",
                raw.port,
                rig.port,
                call_id="dup-1@127.0.0.161",
                branch="z9hG4bK-dup-1",
            ),
        )
        final = await raw.wait_for(lambda r: r.status == 487)
        ack = raw_request(
            "ACK", raw.port, rig.port, call_id="dup-1@127.0.0.161", branch="z9hG4bK-dup-1"
        )
        ack = ack.replace(
            f"To: <sip:{EXTENSION}@{SBC}>".encode(),
            f"To: <sip:{EXTENSION}@{SBC}>;tag={final.to_tag}".encode(),
        )
        raw.send(rig, ack)
        await rig.drained()
        assert invites_at_retell(rig) == 1
        assert rig.record().end_reason == "pbx_cancel"


# -- BYE and CANCEL with no dialog ---------------------------------------------------------------


async def test_bye_and_cancel_without_a_dialog_are_481() -> None:
    async with running_rig() as rig, raw_pbx() as raw:
        raw.send(
            rig,
            raw_request(
                "BYE",
                raw.port,
                rig.port,
                call_id="nodialog-1@127.0.0.161",
                branch="z9hG4bK-nd-bye",
                to_tag=";tag=unknown",
                cseq=2,
            ),
        )
        raw.send(
            rig,
            raw_request(
                "CANCEL",
                raw.port,
                rig.port,
                call_id="nodialog-2@127.0.0.161",
                branch="z9hG4bK-nd-cancel",
            ),
        )
        bye = await raw.wait_for(lambda r: r.cseq.method == "BYE")
        cancel = await raw.wait_for(lambda r: r.cseq.method == "CANCEL")
        assert (bye.status, cancel.status) == (481, 481)
        assert invites_at_retell(rig) == 0
        await rig.drained()


# -- DNS SERVFAIL and timeout ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_dns_server() -> AsyncIterator[FakeDns]:
    loop = asyncio.get_running_loop()
    server = FakeDns()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: server, local_addr=(DNS, free_port(DNS))
    )
    server.address = transport.get_extra_info("sockname")[:2]
    try:
        yield server
    finally:
        transport.close()


async def options_answered_within(rig: Rig, raw: RawPbx, limit: float) -> float:
    n = next(_ids)
    started = asyncio.get_running_loop().time()
    raw.send(
        rig,
        raw_request("OPTIONS", raw.port, rig.port, call_id=f"o{n}@x", branch=f"z9hG4bK-o{n}"),
    )
    response = await raw.wait_for(lambda r: r.call_id == f"o{n}@x", limit)
    assert response.status == 200
    return asyncio.get_running_loop().time() - started


async def test_dns_servfail_and_timeout_are_503_fast_and_other_calls_carry_on() -> None:
    now = [0.0]  # the resolver's clock: its cache expires when the test says so
    async with fake_dns_server() as dns_server:
        dns_server.add("retell.test", "A", RETELL, ttl=60)
        resolver = Resolver(
            resolver=make_resolver([DNS], dns_server.address[1]),
            timeout=1.0,
            address_types=("A",),
            clock=lambda: now[0],
        )
        values = settings(retell_host="retell.test")
        async with running_rig(values, resolver=resolver) as rig, raw_pbx() as raw:
            first, first_retell = await connected_call(rig)
            loop = asyncio.get_running_loop()
            now[0] += 61  # the A record expired: the next call asks again

            dns_server.servfail.add("retell.test")
            started = loop.time()
            async with asyncio.timeout(10):
                refused = await rig.pbx.call()
            assert refused.statuses[-1] == 503
            assert loop.time() - started < 1.0  # SERVFAIL is an answer: no waiting

            dns_server.servfail.clear()
            dns_server.silent.add("retell.test")
            started = loop.time()
            stalled = asyncio.ensure_future(rig.pbx.call())
            await dns_server.queried.wait()
            # While that lookup hangs, sbc answers everything else at once.
            assert await options_answered_within(rig, raw, 0.5) < 0.5
            async with asyncio.timeout(10):
                timed_out = await stalled
            elapsed = loop.time() - started
            assert timed_out.statuses[-1] == 503
            assert 0.9 <= elapsed < 2.5, elapsed  # the resolver's 1 s, not SIP's 32 s

            # The call that was up all along is untouched and ends the ordinary way.
            assert not first.ended.is_set() and not first_retell.ended.is_set()
            await hang_up(rig, first, first_retell)
            await rig.drained()
            reasons = [r.end_reason for r in rig.service.bridge.records]
            statuses = [r.pbx_status for r in rig.service.bridge.records]
            assert sorted(s or 0 for s in statuses) == [200, 503, 503]
            assert "pbx_bye" in reasons
            assert invites_at_retell(rig) == 1


# -- the registrar gone, then back -----------------------------------------------------------------


async def test_registrar_gone_and_back_registers_again_by_backoff_and_takes_calls() -> None:
    t1 = 0.05  # a REGISTER times out after 64*T1 = 3.2 s
    base = 1.0
    values = settings(t1=t1, register_expires=10, backoff=base)
    async with running_rig(values, pbx_expires=10) as rig:
        loop = asyncio.get_running_loop()
        pbx = rig.pbx
        serve = pbx.engine.on_request
        assert serve is not None
        dropped: list[float] = []
        gone = True
        again = asyncio.Event()
        seen = asyncio.Event()

        def registrar(incoming: IncomingRequest) -> None:
            if incoming.request.method == "REGISTER" and gone:
                dropped.append(loop.time())  # the registrar is gone: no answer at all
                seen.set()
                return
            accepted = pbx.registrar.accepted
            serve(incoming)
            if pbx.registrar.accepted > accepted:
                again.set()

        pbx.engine.on_request = registrar
        # The refresh (at half the 10 s grant) and then the retries go unanswered.
        async with asyncio.timeout(30):
            while len(dropped) < 3:
                seen.clear()
                await seen.wait()
        gone = False
        async with asyncio.timeout(30):
            await again.wait()
        back = loop.time()
        # RFC 5626 §4.5: each retry waits a timeout (64*T1) plus a backoff of half to all of
        # min(max, base * 2**failures); never sooner.
        gaps = [b - a for a, b in itertools.pairwise([*dropped, back])]
        for failures, gap in enumerate(gaps, start=1):
            upper = backoff_upper_bound(failures, base, 60.0)
            assert 64 * t1 + upper / 2 - 0.1 <= gap <= 64 * t1 + upper + 1.0, (failures, gaps)
        # Calls are taken again.
        call, retell_call = await connected_call(rig)
        await hang_up(rig, call, retell_call)
        await rig.drained()
        assert rig.record().pbx_status == 200


# -- transfers by REFER: a NOTIFY that never comes, BYEs in the middle -----------------------------

RING_TIMEOUT = 1.0
TRANSFER_TIMER = RING_TIMEOUT + 64 * T1  # refer mode: the target's ringing, then Timer F's bound


async def transferring(rig: Rig) -> tuple[PbxCall, RetellCall]:
    """A connected call whose agent transfers to 800; 3CX accepts the REFER (202) and then
    sends no NOTIFY at all."""

    async def silent(call: PbxCall, seen: Any) -> None:
        seen.done.set()

    accepted = asyncio.Event()
    referred = rig.pbx._referred

    def noting(call: PbxCall, incoming: Any) -> None:
        referred(call, incoming)
        if call.refer is not None and call.refer.accepted is not None:
            accepted.set()

    rig.pbx._notify_refer = silent  # type: ignore[method-assign]
    rig.pbx._referred = noting  # type: ignore[method-assign]
    call, retell_call = await connected_call(rig)
    async with asyncio.timeout(5):
        assert await rig.retell.refer(retell_call, "800") == 202
        await accepted.wait()  # 3CX answered sbc's REFER 202 (after its challenge)
    return call, retell_call


async def test_notify_that_never_comes_ends_the_transfer_on_its_timer() -> None:
    async with running_rig(settings(ring_timeout=RING_TIMEOUT)) as rig:
        call, retell_call = await transferring(rig)
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(TRANSFER_TIMER + 5):
            await retell_call.transfer_done.wait()
        elapsed = asyncio.get_running_loop().time() - started
        assert TRANSFER_TIMER - 0.5 <= elapsed <= TRANSFER_TIMER + 2.0, elapsed
        final = retell_call.notifies[-1]
        assert (final.status, final.subscription_state.split(";")[0]) == (408, "terminated")
        # The caller stays with the agent; the call goes on and ends the ordinary way.
        assert not call.ended.is_set() and rig.service.bridge.active == 1
        await hang_up(rig, call, retell_call)
        await rig.drained()
        assert rig.record().transfers[0].outcome == "failed"


async def test_the_callers_bye_during_a_transfer_ends_every_leg() -> None:
    async with running_rig(settings(ring_timeout=RING_TIMEOUT)) as rig:
        call, retell_call = await transferring(rig)
        async with asyncio.timeout(5):
            assert await rig.pbx.hang_up(call) == 200
            await retell_call.ended.wait()
        assert retell_call.bye_received
        await rig.drained()
        record = rig.record()
        assert (record.end_reason, record.transfers[0].outcome) == ("pbx_bye", "aborted")


async def test_retells_bye_during_a_failing_transfer_hangs_up_the_caller() -> None:
    async with running_rig(settings(ring_timeout=RING_TIMEOUT)) as rig:
        call, retell_call = await transferring(rig)
        async with asyncio.timeout(5):
            assert await rig.retell.hang_up(retell_call) == 200
        assert not call.ended.is_set()  # 3CX may still be moving the caller
        async with asyncio.timeout(TRANSFER_TIMER + 5):
            await call.ended.wait()  # the transfer timed out: nobody is left for the caller
        assert call.bye_received
        await rig.drained()
        record = rig.record()
        assert (record.end_reason, record.transfers[0].outcome) == ("retell_bye", "failed")


# -- Retell silent ---------------------------------------------------------------------------------


async def test_silent_retell_gets_the_pbx_a_final_answer_within_answer_timeout() -> None:
    """Retell's server takes the TCP connection and never says a word (no 100, nothing)."""
    answer_timeout = 2.0
    values = settings(answer_timeout=answer_timeout)
    heard: list[bytes] = []

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            heard.append(data)
        writer.close()

    server = await asyncio.start_server(mute, RETELL, values.retell.port)
    try:
        async with running_rig(values, with_retell=False) as rig:
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(answer_timeout + 5):
                call = await rig.pbx.call()
            elapsed = loop.time() - started
            assert call.statuses[-1] == 480, call.statuses
            assert answer_timeout - 0.1 <= elapsed <= answer_timeout + 1.0, elapsed
            assert b"".join(heard).startswith(b"INVITE ")
            # Nothing to CANCEL before a provisional (RFC 3261 §9.1): the INVITE's client
            # transaction ends on Timer B (64*T1), and everything is released.
            await rig.drained(64 * T1 + 10)
            record = rig.record()
            assert (record.end_reason, record.pbx_status) == ("answer_timeout", 480)
    finally:
        server.close()
        await server.wait_closed()
