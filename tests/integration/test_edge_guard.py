"""The edge guard end to end: a real sbc (:class:`~sbc.ops.service.Service`, in this process)
with the shipped 3CX and Retell stand-ins, and hostile traffic from an untrusted loopback
address.

* ``svmap`` (from 127.0.0.77) and ``svwar`` (from 127.0.0.1: it ignores its -b option; neither
  address is trusted here) of PyPI's ``sipvicious`` find nothing: their output is parsed, and a
  run of svmap from the PBX's trusted address shows what "found" looks like;
* 5,000 garbage datagrams and 500 stalled TCP connections from 127.0.0.77 (a child process)
  while a call through sbc carries every RTP packet both ways;
* a flood of OPTIONS from the PBX's own (trusted) address above its limit: limited, never
  banned, and the call in progress goes on and hangs up normally;
* ``untrusted = "reject"`` answers every probe the same 403 (no Server header), over UDP and
  TCP; ``"drop"`` answers none, and closes a TCP connection at accept;
* the global new-call cap answers 503 with Retry-After.

Where "nothing came back" is asserted, a request from a trusted address sent after the probes
on the same sbc socket is answered first: the kernel queues one socket's datagrams in order, so
by then sbc has handled the probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import struct
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bridge_helpers import connected_call, demo_pbx, hang_up, pbx_stand_in, quick_sip
from peers import free_port, require_binary

from sbc.b2bua.calls import CallManager
from sbc.demo.pbx import PbxCall, PbxStandIn
from sbc.demo.retell import RetellCall, RetellStandIn
from sbc.net.guard import Guard
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    RetellSettings,
    SecuritySettings,
    Settings,
)

pytestmark = pytest.mark.integration

SBC, PBX, RETELL = "127.0.0.71", "127.0.0.72", "127.0.0.73"
STRANGER = "127.0.0.77"
EXTENSION = "1000"
NUMBER = "+14155550100"


@dataclass
class Rig:
    service: Service
    settings: Settings
    pbx: PbxStandIn
    retell: RetellStandIn

    @property
    def port(self) -> int:
        return self.settings.sip.port

    @property
    def guard(self) -> Guard:
        guard = self.service.engine.guard
        assert guard is not None
        return guard

    @property
    def manager(self) -> CallManager:
        return self.service.bridge

    async def settled(self, limit: float = 10.0) -> None:
        async with asyncio.timeout(limit):
            await self.manager.wait_idle()


def settings_for(security: SecuritySettings | None = None) -> Settings:
    rtp_min = free_port(SBC) & ~1
    return Settings(
        sip=quick_sip(SBC),
        pbx=demo_pbx(PBX, EXTENSION),
        # Retell's default trusted ranges (its public ones): the stand-in on loopback is let in
        # only as the peer sbc sends its INVITEs to.
        retell=RetellSettings(host=RETELL, port=free_port(RETELL), transport="tcp", number=NUMBER),
        calls=CallsSettings(country_code="31"),
        media=MediaSettings(mode="relay", rtp_port_min=rtp_min, rtp_port_max=rtp_min + 19),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
        security=security or SecuritySettings(),
    )


@contextlib.asynccontextmanager
async def running_bridge(
    security: SecuritySettings | None = None, frames: list[bytes] | None = None
) -> AsyncIterator[Rig]:
    settings = settings_for(security)
    pbx = pbx_stand_in(settings)
    retell = RetellStandIn(RETELL, settings.retell.port, ring=0.1, frames=frames)
    service = Service(settings)
    await pbx.start()
    try:
        await retell.start()
        await service.start()
        async with asyncio.timeout(10):
            await pbx.registered.wait()
        yield Rig(service, settings, pbx, retell)
    finally:
        await service.stop()
        await retell.stop()
        await pbx.stop()


def numbered(count: int, size: int = 160) -> list[bytes]:
    return [struct.pack("!I", n) + bytes([n % 251]) * (size - 4) for n in range(count)]


# -- raw probes -----------------------------------------------------------------------------------


def probe(method: str, user: str, rig: Rig, local: tuple[str, int], n: int) -> bytes:
    host, port = local
    target = f"{SBC}:{rig.port}"
    return (
        f"{method} sip:{user}@{target} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-probe-{n};rport\r\n"
        f"From: <sip:scan@{host}>;tag=scan{n}\r\n"
        f"To: <sip:{user}@{target}>\r\n"
        f"Call-ID: probe-{n}@{host}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:scan@{host}:{port}>\r\n"
        "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class Udp(asyncio.DatagramProtocol):
    """A UDP socket on ``host`` collecting what it receives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.arrived = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        self.arrived.set()

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[:2]  # type: ignore[no-any-return]

    def send(self, data: bytes, rig: Rig) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (SBC, rig.port))

    async def wait_for(self, count: int, limit: float = 5.0) -> None:
        async with asyncio.timeout(limit):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@contextlib.asynccontextmanager
async def udp_socket(host: str) -> AsyncIterator[Udp]:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(Udp, local_addr=(host, 0))
    try:
        yield protocol
    finally:
        protocol.close()


async def barrier(rig: Rig, number: int) -> None:
    """An OPTIONS from the PBX's (trusted) address, answered: sbc has read every datagram that
    reached its socket before it."""
    async with udp_socket(PBX) as trusted:
        trusted.send(probe("OPTIONS", EXTENSION, rig, trusted.local, number), rig)
        await trusted.wait_for(1)
        assert trusted.received[0].startswith(b"SIP/2.0 200 ")


PROBES = [
    ("OPTIONS", EXTENSION),
    ("OPTIONS", "999"),
    ("REGISTER", EXTENSION),
    ("REGISTER", "100"),
    ("INVITE", EXTENSION),
    ("INVITE", "admin"),
    ("SUBSCRIBE", "1001"),
    ("BYE", "2000"),
]


def normalised(response: bytes) -> str:
    """A response without what echoes the request (Via, From, To, Call-ID, CSeq) and tags."""
    head = response.decode().split("\r\n\r\n")[0]
    keep = [
        line
        for line in head.split("\r\n")
        if not re.match(r"(?i)(via|v|from|f|to|t|call-id|i|cseq):", line)
    ]
    return "\r\n".join(keep)


# -- (d) reject and drop --------------------------------------------------------------------------


async def test_reject_mode_answers_every_probe_the_same_403() -> None:
    async with running_bridge(SecuritySettings(untrusted="reject")) as rig:
        async with udp_socket(STRANGER) as stranger:
            for n, (method, user) in enumerate(PROBES):
                stranger.send(probe(method, user, rig, stranger.local, n), rig)
            await stranger.wait_for(len(PROBES))
        statuses = [r.split(b" ", 2)[1] for r in stranger.received]
        assert statuses == [b"403"] * len(PROBES)
        answers = {normalised(r) for r in stranger.received}
        assert answers == {"SIP/2.0 403 Forbidden\r\nContent-Length: 0"}, answers
        assert rig.guard.stats.rejected == len(PROBES)
        assert rig.manager.active == 0 and rig.manager.records == []
        # An oversized request gets the same 403, not a 513 that would tell it apart.
        async with udp_socket(STRANGER) as stranger:
            big = probe("OPTIONS", "1", rig, stranger.local, 99).replace(
                b"Max-Forwards", b"X-Pad: " + b"p" * 20_000 + b"\r\nMax-Forwards"
            )
            stranger.send(big, rig)
            await stranger.wait_for(1)
        assert normalised(stranger.received[0]) == "SIP/2.0 403 Forbidden\r\nContent-Length: 0"


async def test_drop_mode_answers_nothing() -> None:
    async with running_bridge() as rig:
        async with udp_socket(STRANGER) as stranger:
            for n, (method, user) in enumerate(PROBES):
                stranger.send(probe(method, user, rig, stranger.local, n), rig)
            await barrier(rig, 100)
            assert stranger.received == []
        stats = rig.guard.stats
        assert stats.dropped_untrusted == len(PROBES)
        assert stats.rejected == 0
        # Nothing was parsed: the engine never saw a request from the stranger.
        assert rig.service.engine.stats.requests_rejected == 0
        assert rig.manager.active == 0 and rig.manager.records == []


async def tcp_probe(rig: Rig, method: str, user: str) -> bytes:
    """One request over a new TCP connection from the stranger; what came back until sbc
    closed the connection (or 5 s passed)."""
    reader, writer = await asyncio.open_connection(SBC, rig.port, local_addr=(STRANGER, 0))
    try:
        local = writer.get_extra_info("sockname")[:2]
        writer.write(probe(method, user, rig, local, 7).replace(b"/UDP ", b"/TCP "))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(5):
            try:
                return await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                return getattr(exc, "partial", b"")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_over_tcp_reject_answers_403_and_drop_closes_the_connection() -> None:
    async with running_bridge(SecuritySettings(untrusted="reject")) as rig:
        answer = await tcp_probe(rig, "INVITE", EXTENSION)
        assert answer.startswith(b"SIP/2.0 403 Forbidden\r\n"), answer
        assert b"Server:" not in answer
        assert rig.guard.stats.rejected == 1
    async with running_bridge() as rig:
        # Closed at accept, before a byte is read: EOF or a reset, never an answer.
        assert await tcp_probe(rig, "INVITE", EXTENSION) == b""
        assert rig.guard.stats.connections_refused == 1
        assert rig.service.engine.transports.stats.connections_accepted == 0


# -- (a) sipvicious -------------------------------------------------------------------------------


def sipvicious(tool: str) -> str:
    path = Path(sys.executable).parent / f"sipvicious_{tool}"
    if path.exists():
        return str(path)
    return require_binary(f"sipvicious_{tool}")


async def run_tool(*args: str, limit: float = 60.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        async with asyncio.timeout(limit):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace")


def svmap_devices(output: str) -> list[str]:
    """The rows of svmap's result table: ``| host:port | user agent |``."""
    rows = re.findall(r"^\|\s*([0-9.]+:\d+)\s*\|\s*([^|]*?)\s*\|", output, flags=re.M)
    return [f"{host} {agent}" for host, agent in rows if host[0].isdigit()]


def svwar_extensions(output: str) -> list[str]:
    """The rows of svwar's result table: ``| extension | authentication |``."""
    rows = re.findall(r"^\|\s*([^|\s]+)\s*\|\s*([^|]*?)\s*\|", output, flags=re.M)
    return [ext for ext, auth in rows if ext.lower() != "extension"]


async def svmap(rig: Rig, source: str) -> str:
    return await run_tool(
        sipvicious("svmap"), "-b", source, "-P", str(free_port(source)),
        "-p", str(rig.port), "-t", "0.05", SBC,
    )  # fmt: skip


# svwar 0.3.8 takes -b but never passes it on (its main() leaves TakeASip's bindingip unset): it
# binds the wildcard address and the kernel sends its probes from 127.0.0.1, which these tests'
# settings do not trust either (only the PBX's 127.0.0.72 and Retell's public ranges).
SVWAR_SOURCE = "127.0.0.1"


async def svwar(rig: Rig, *extra: str) -> str:
    return await run_tool(
        sipvicious("svwar"), "-P", str(free_port(SVWAR_SOURCE)),
        "-p", str(rig.port), "-e", "990-1010", "-t", "0.05", "--maximumtime", "3",
        *extra, SBC,
    )  # fmt: skip


async def test_svmap_and_svwar_find_nothing_from_an_untrusted_address() -> None:
    async with running_bridge() as rig:
        # What "found" looks like: the PBX's own address is trusted, so sbc answers it.
        found = await svmap(rig, PBX)
        assert svmap_devices(found) == [f"{SBC}:{rig.port} unknown"], found
        assert "sbc" not in found.lower()  # no Server header: nothing to fingerprint

        mapped = await svmap(rig, STRANGER)
        assert svmap_devices(mapped) == [], mapped
        assert "found nothing" in mapped.lower(), mapped
        for method in ("REGISTER", "OPTIONS", "INVITE"):
            # --force: svwar gives up at once when its first probe goes unanswered otherwise.
            warred = await svwar(rig, "-m", method, "--force")
            assert svwar_extensions(warred) == [], warred
            assert "found nothing" in warred.lower(), warred
        assert not rig.guard.is_trusted(SVWAR_SOURCE) and not rig.guard.is_trusted(STRANGER)
        # Every probe was dropped by address, unparsed and unanswered; never a call.
        stats = rig.guard.stats
        assert stats.dropped_untrusted + stats.dropped_banned >= 4
        assert stats.rejected == 0
        assert rig.service.engine.stats.requests_rejected == 0
        assert rig.manager.records == []


async def test_svwar_cannot_tell_extensions_apart_in_reject_mode() -> None:
    # rate_limit raised: every probe is answered (a ban would end the answers).
    security = SecuritySettings(untrusted="reject", rate_limit=100_000)
    async with running_bridge(security) as rig:
        for method in ("REGISTER", "OPTIONS", "INVITE"):
            # --force: scan on after the first answer, a 403 svwar cannot place.
            warred = await svwar(rig, "-m", method, "--force")
            assert svwar_extensions(warred) == [], warred
            assert "found nothing" in warred.lower(), warred
        assert rig.guard.stats.rejected >= 3
        assert rig.manager.records == []


# -- (b) garbage and stalled connections during a call --------------------------------------------

FLOODER = r"""
import os, socket, sys, time
host, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
datagrams, connections = int(sys.argv[4]), int(sys.argv[5])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, 0))
udp.setblocking(False)
junk = [os.urandom(40 + n % 400) for n in range(64)]
junk.append(b"INVITE sip:1000@x SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4\r\n\r\n")
junk.append(b"OPTIONS sip:x SIP/2.0\r\n" + b"X: " + b"y" * 900 + b"\r\n\r\n")
sent = 0
for n in range(datagrams):
    while True:
        try:
            udp.sendto(junk[n % len(junk)], (target, port))
            break
        except BlockingIOError:
            time.sleep(0.001)
    sent += 1
    if n % 200 == 199:
        time.sleep(0.005)  # paced: the kernel's receive buffer must not drop any
held = []
refused = 0
for n in range(connections):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((host, 0))
    try:
        s.connect((target, port))
        s.send(b"INVITE sip:1000@" + target.encode() + b" SIP/2.0\r\nVia: SIP/2.0/TCP ")
    except OSError:
        refused += 1
    held.append(s)
answers = 0
for s in held:
    s.settimeout(0.01)
    try:
        answers += len(s.recv(65536))
    except OSError:
        pass
try:
    while True:
        answers += len(udp.recv(65536))
except OSError:
    pass
print(sent, len(held), refused, answers, flush=True)
sys.stdin.read()
"""


async def test_garbage_and_stalled_connections_from_a_stranger_spare_a_call() -> None:
    frames = numbered(250)
    async with running_bridge(frames=frames) as rig:
        call, retell_call = await connected_call(rig, frames)
        a, b = call.rtp, retell_call.rtp
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, STRANGER, SBC, str(rig.port), "5000", "500",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flooder.stdout is not None
            async with asyncio.timeout(60):
                line = await flooder.stdout.readline()
            sent, held, refused, answers = (int(x) for x in line.split())
            # The stalled connections were all closed by sbc (none is left open to it).
            transports = rig.service.engine.transports
            assert not [c for c in transports._by_id.values() if c.peer[0] == STRANGER]
        finally:
            assert flooder.stdin is not None
            flooder.stdin.close()
            async with asyncio.timeout(10):
                await flooder.wait()
        assert (sent, held) == (5000, 500)
        assert answers == 0  # not one byte came back to the stranger
        await barrier(rig, 200)
        stats = rig.guard.stats
        # Every datagram and every connection was judged by address alone, none parsed.
        assert stats.dropped_untrusted + stats.dropped_banned == 5000 + 500 - refused
        assert stats.connections_refused == 500 - refused
        assert stats.bans == 1
        assert transports.stats.datagrams_dropped == 0  # the parser never saw the garbage
        # The call: every packet crossed both ways, and it hangs up normally.
        async with asyncio.timeout(15):
            await a.wait_received(len(frames))
            await b.wait_received(len(frames))
        assert a.received == b.sent and b.received == a.sent
        await hang_up(rig, call, retell_call)
        await rig.settled()
        (record,) = rig.manager.records
        assert record.end_reason == "pbx_bye"
    print(f"flood: {sent} datagrams, {held} connections ({refused} refused by the kernel)")


# -- (c) a trusted flood --------------------------------------------------------------------------


async def until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``condition`` (a counter of sbc's, which has no event to wait on) up to ``limit``."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_trusted_flood_is_limited_without_dropping_the_call_in_progress() -> None:
    limit = 40
    # A window so long that the bucket stays empty for the rest of the test (0.04 per second).
    security = SecuritySettings(trusted_rate_limit=limit, rate_window=1000.0)
    frames = numbered(150)
    async with running_bridge(security, frames=frames) as rig:
        call, retell_call = await connected_call(rig, frames)
        stats = rig.guard.stats
        flood = 1000
        async with udp_socket(PBX) as burst:
            for n in range(flood):
                burst.send(probe("OPTIONS", EXTENSION, rig, burst.local, 1000 + n), rig)
                if n % 100 == 99:
                    await asyncio.sleep(0)  # let sbc's reader keep up with the socket
            # The PBX's INVITE took one token of its bucket; the flood the rest.
            await burst.wait_for(limit - 1, limit=10)
            await until(lambda: stats.dropped_trusted_rate + len(burst.received) >= flood)
            answered = len(burst.received)
        assert answered == limit - 1
        assert stats.dropped_trusted_rate == flood - answered
        assert stats.bans == 0 and not rig.guard.is_banned(PBX)
        # Over its limit, the PBX's in-dialog requests still pass: the call carries all its
        # audio and the PBX's BYE is answered 200.
        async with asyncio.timeout(15):
            await a_b_audio(call, retell_call, len(frames))
        await hang_up(rig, call, retell_call)
        await rig.settled()
        (record,) = rig.manager.records
        assert record.end_reason == "pbx_bye"
        assert stats.dropped_trusted_rate == flood - answered  # the BYE was not one of them


async def a_b_audio(call: PbxCall, retell_call: RetellCall, count: int) -> None:
    await call.rtp.wait_received(count)
    await retell_call.rtp.wait_received(count)
    assert call.rtp.received == retell_call.rtp.sent
    assert retell_call.rtp.received == call.rtp.sent


# -- the new-call cap -----------------------------------------------------------------------------


async def test_new_calls_above_the_cap_get_503_with_retry_after() -> None:
    security = SecuritySettings(new_call_rate=0.01, new_call_burst=1, new_call_retry_after=7)
    async with running_bridge(security) as rig:
        first, retell_call = await connected_call(rig, numbered(10))
        async with asyncio.timeout(10):
            second = await rig.pbx.call(frames=numbered(10))
        assert second.final is not None and second.final.status == 503
        assert second.final.headers.get("Retry-After") == "7"
        assert rig.guard.stats.new_calls_limited == 1
        await hang_up(rig, first, retell_call)
        await rig.settled()
        assert len(rig.manager.records) == 1
