"""sbc registers to a SIPp registrar that behaves like 3CX (sip-fixtures/sipp/registrar_*.xml).

sbc runs in-process (``service.serve``) or, for SIGTERM, as ``python -m sbc run``. SIPp records
every message (``-trace_msg``) and logs its credential verdicts; the assertions read them back.
Readiness is observed the way an operator would: ``GET /readyz`` on the admin endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from sipp_helpers import Sipp, TracedMessage, sipp_server

from sbc.ops import service
from sbc.ops.settings import Settings
from sbc.sip.digest import parse_authorization, parse_challenge
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.serializer import serialize
from sbc.sip.server_transaction import build_response
from sbc.sip.uri import SipUri

pytestmark = pytest.mark.integration

SBC_HOST = "127.0.0.30"
PBX_HOST = "127.0.0.31"
AUTH_ID = "auth101"
PASSWORD = "s3cret-101"
REPO = Path(__file__).resolve().parents[2]


Starter = Callable[..., contextlib.AbstractAsyncContextManager[Sipp]]

# -- plumbing ------------------------------------------------------------------------------------


@pytest.fixture
def registrar(tmp_path: Path) -> Starter:
    def start(scenario: str, transport: str = "u1") -> contextlib.AbstractAsyncContextManager[Sipp]:
        return sipp_server(
            scenario,
            transport=transport,
            workdir=tmp_path,
            host=PBX_HOST,
            keys={"user": AUTH_ID, "pass": PASSWORD},
        )

    return start


def settings_for(
    pbx: Sipp,
    free_port: Callable[..., int],
    *,
    password: str = PASSWORD,
    expires: int = 300,
    backoff_base: float = 1.0,
    backoff_max: float = 4.0,
    keepalive: str = "off",
    keepalive_interval: float = 25.0,
    transport: str = "udp",
) -> dict[str, dict[str, object]]:
    return {
        "sip": {
            "bind": SBC_HOST,
            "port": free_port(SBC_HOST),
            "keepalive_interval": keepalive_interval,
            "user_agent": "sbc-test",
        },
        "pbx": {
            "host": pbx.host,
            "port": pbx.port,
            "transport": transport,
            "extension": "101",
            "auth_id": AUTH_ID,
            "password": password,
            "register_expires": expires,
            "register_backoff_base": backoff_base,
            "register_backoff_max": backoff_max,
            "keepalive": keepalive,
        },
        "retell": {"number": "+14155550100"},
        "admin": {"listen": f"{SBC_HOST}:{free_port(SBC_HOST, udp=False)}"},
        "log": {"level": "warning"},
    }


class Running:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = f"http://{settings.admin.listen}"
        self.started_at = 0.0

    async def readyz(self, session: aiohttp.ClientSession) -> int:
        async with session.get(f"{self.admin}/readyz") as response:
            return response.status

    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.admin}/metrics") as response,
        ):
            assert response.status == 200
            return await response.text()

    async def wait_ready(self, within: float) -> float:
        """Seconds from start until /readyz said 200 (polled every 20 ms)."""
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            while loop.time() - self.started_at < within:
                with contextlib.suppress(aiohttp.ClientError):
                    if await self.readyz(session) == 200:
                        return loop.time() - self.started_at
                await asyncio.sleep(0.02)
        raise AssertionError(f"not ready within {within} s")


@contextlib.asynccontextmanager
async def running_sbc(values: dict[str, dict[str, object]]) -> AsyncIterator[Running]:
    settings = Settings(**values)  # type: ignore[arg-type]
    ready, stop = asyncio.Event(), asyncio.Event()
    running = Running(settings)
    running.started_at = asyncio.get_running_loop().time()
    task = asyncio.create_task(service.serve(settings, ready=ready, stop=stop))
    try:
        await asyncio.wait_for(ready.wait(), 5)
        yield running
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0


async def wait_for(condition: Callable[[], bool], within: float) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + within
    while not condition():
        if loop.time() > give_up:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def attempts(registers: list[TracedMessage]) -> list[TracedMessage]:
    """REGISTERs that start an attempt: no credentials (a retry after a failure starts clean)."""
    return [
        m
        for m in registers
        if "Authorization" not in m.request.headers
        and "Proxy-Authorization" not in m.request.headers
        and m.request.headers.get("Expires") != "0"
    ]


def answer_to(pbx: Sipp, request: Request) -> Response:
    for m in pbx.responses_sent():
        response = m.message
        assert isinstance(response, Response)
        if response.headers.get("CSeq") == request.headers.get("CSeq"):
            return response
    raise AssertionError(f"no answer to {request.headers.get('CSeq')}")


def hdr(message: Request | Response, name: str) -> str:
    value = message.headers.get(name)
    assert value is not None, f"no {name}"
    return value


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- the checks of the issue ----------------------------------------------------------------------


@pytest.mark.parametrize(("transport", "sipp_transport"), [("udp", "u1"), ("tcp", "t1")])
async def test_registers_within_2s_against_401_challenge_with_verified_credentials(
    registrar: Starter, free_port_factory: Callable[..., int], transport: str, sipp_transport: str
) -> None:
    async with (
        registrar("registrar_401.xml", sipp_transport) as pbx,
        running_sbc(settings_for(pbx, free_port_factory, transport=transport)) as sbc,
    ):
        elapsed = await sbc.wait_ready(within=2.0)
        metrics = await sbc.metrics()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sbc.admin}/healthz") as health,
        ):
            assert health.status == 200
    registers = pbx.registers()  # read once SIPp has exited and flushed its trace
    assert elapsed < 2.0
    assert "sbc_registered 1.0" in metrics
    assert "sbc_register_attempts_total 2.0" in metrics
    first, second = registers[0].request, registers[1].request
    params = "" if transport == "udp" else f";transport={transport}"
    assert str(first.uri) == f"sip:{PBX_HOST}:{pbx.port}{params}"
    assert first.top_via.transport == transport.upper()
    assert first.from_.uri == SipUri("sip", "101", None, PBX_HOST) == first.to.uri
    contact = hdr(first, "Contact")
    assert contact.startswith(f"<sip:101@{SBC_HOST}:") and contact.endswith(f"{params}>")
    assert first.top_via.has_rport
    assert answer_to(pbx, first).status == 401
    assert parse_authorization(hdr(second, "Authorization")).username == AUTH_ID
    assert second.call_id == first.call_id
    assert second.cseq.seq == first.cseq.seq + 1
    assert answer_to(pbx, second).status == 200
    # SIPp's <verifyauth> checked the digest with the password given to it.
    assert f"REGISTER cseq={second.cseq.seq} expires=300 authvalid=true" in pbx.log_lines()
    # A clean stop removes the binding.
    assert registers[-1].request.headers.get("Expires") == "0"


async def test_registers_within_2s_against_407_challenge(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    async with (
        registrar("registrar_407.xml") as pbx,
        running_sbc(settings_for(pbx, free_port_factory)) as sbc,
    ):
        elapsed = await sbc.wait_ready(within=2.0)
    registers = pbx.registers()
    assert elapsed < 2.0
    first, second = registers[0].request, registers[1].request
    challenge_response = answer_to(pbx, first)
    assert challenge_response.status == 407
    challenge = parse_challenge(hdr(challenge_response, "Proxy-Authenticate"), proxy=True)
    auth = parse_authorization(hdr(second, "Proxy-Authorization"))
    assert "Authorization" not in second.headers
    # SIPp cannot verify Proxy-Authorization; RFC 2617 §3.2.2.1 (no qop) computed here instead.
    ha1 = md5(f"{AUTH_ID}:3CXPhoneSystem:{PASSWORD}")
    ha2 = md5(f"REGISTER:{second.uri}")
    assert auth.uri == str(second.uri) and auth.nonce == challenge.nonce
    assert auth.response == md5(f"{ha1}:{challenge.nonce}:{ha2}")
    assert answer_to(pbx, second).status == 200


async def test_wrong_password_is_never_retried_faster_than_the_backoff(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    base, cap = 1.0, 4.0
    async with registrar("registrar_401.xml") as pbx:
        values = settings_for(
            pbx, free_port_factory, password="wrong", backoff_base=base, backoff_max=cap
        )
        async with running_sbc(values) as sbc:
            await wait_for(lambda: len(attempts(pbx.registers())) >= 4, within=15)
            async with aiohttp.ClientSession() as session:
                assert await sbc.readyz(session) == 503
            metrics = await sbc.metrics()
    registers = [m for m in pbx.registers() if m.request.headers.get("Expires") != "0"]
    starts = attempts(registers)
    for k in range(1, len(starts)):
        gap = starts[k].at - starts[k - 1].at
        upper = min(cap, base * 2**k)  # RFC 5626 §4.5, k consecutive failures so far
        assert 0.5 * upper - 0.05 <= gap <= upper + 0.5, (k, gap)
    # Each attempt: one REGISTER, one answer to the challenge, then silence until the next.
    for start, nxt in itertools.pairwise(starts):
        within = [m for m in registers if start.at <= m.at < nxt.at]
        assert len(within) == 2
        assert within[1].request.headers.get("Authorization") is not None
    assert 'sbc_register_failures_total{reason="401"}' in metrics
    assert "sbc_registered 0.0" in metrics


async def test_two_refreshes_within_25s_with_the_same_call_id(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    async with (
        registrar("registrar_401.xml") as pbx,
        running_sbc(settings_for(pbx, free_port_factory, expires=10)) as sbc,
    ):
        await sbc.wait_ready(within=2.0)

        def granted() -> list[TracedMessage]:
            return [
                m
                for m in pbx.registers()
                if m.request.headers.get("Expires") != "0"
                and any(
                    r.message.status == 200  # type: ignore[union-attr]
                    and r.message.headers.get("CSeq") == m.request.headers.get("CSeq")
                    for r in pbx.responses_sent()
                )
            ]

        await wait_for(lambda: len(granted()) >= 3, within=14)
    registers = pbx.registers()
    refreshed = granted()
    assert len(refreshed) >= 3  # the registration and two refreshes
    assert len({m.request.call_id for m in registers}) == 1
    seqs = [m.request.cseq.seq for m in registers]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # Refresh at expires - max(5 s, 10 %) = 5 s after each grant.
    for earlier, later in itertools.pairwise(refreshed):
        assert 4.8 <= later.at - earlier.at <= 5.6
    # Refreshes carry credentials up front: no new challenge needed.
    assert all(m.request.headers.get("Authorization") for m in refreshed[1:])


async def test_recovers_from_503_within_the_backoff_schedule(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    base, cap = 0.5, 4.0
    async with registrar("registrar_503_then_200.xml") as pbx:
        values = settings_for(pbx, free_port_factory, backoff_base=base, backoff_max=cap)
        async with running_sbc(values) as sbc:
            await sbc.wait_ready(within=12)
    registers = [m for m in pbx.registers() if m.request.headers.get("Expires") != "0"]
    starts = attempts(registers)
    statuses = [answer_to(pbx, m.request).status for m in starts]
    assert statuses == [503, 503, 503, 401]
    for k in range(1, len(starts)):
        gap = starts[k].at - starts[k - 1].at
        upper = min(cap, base * 2**k)
        assert 0.5 * upper - 0.05 <= gap <= upper + 0.5, (k, gap)
    assert answer_to(pbx, registers[-1].request).status == 200


async def test_interval_too_brief_is_answered_with_min_expires(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    async with (
        registrar("registrar_423.xml") as pbx,
        running_sbc(settings_for(pbx, free_port_factory, expires=60)) as sbc,
    ):
        elapsed = await sbc.wait_ready(within=3.0)
    registers = pbx.registers()
    assert elapsed < 2.0
    asked = [
        (m.request.headers.get("Expires"), answer_to(pbx, m.request).status) for m in registers
    ]
    assert asked[:3] == [("60", 423), ("120", 401), ("120", 200)]
    assert answer_to(pbx, registers[2].request).headers.get("Expires") == "120"


async def test_contact_rewritten_from_received_and_rport(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    async with (
        registrar("registrar_nat.xml") as pbx,
        running_sbc(settings_for(pbx, free_port_factory)) as sbc,
    ):
        await sbc.wait_ready(within=2.0)
        await wait_for(lambda: len(pbx.registers()) >= 2, within=2)
    registers = [m.request for m in pbx.registers()]
    assert hdr(registers[0], "Contact").startswith(f"<sip:101@{SBC_HOST}:")
    # Re-registered at the address the registrar saw (no advertised_address configured).
    assert hdr(registers[1], "Contact") == "<sip:101@127.0.0.99:40000>"
    assert registers[1].call_id == registers[0].call_id
    assert registers[1].cseq.seq == registers[0].cseq.seq + 1
    assert all(hdr(r, "Expires") != "0" for r in registers[:2])


async def test_options_keepalives_while_registered(
    registrar: Starter, free_port_factory: Callable[..., int]
) -> None:
    async with registrar("registrar_401.xml") as pbx:
        values = settings_for(pbx, free_port_factory, keepalive="options", keepalive_interval=1.0)
        async with running_sbc(values) as sbc:
            await sbc.wait_ready(within=2.0)

            def options() -> list[TracedMessage]:
                return [
                    m
                    for m in pbx.traced()
                    if m.received
                    and isinstance(m.message, Request)
                    and m.message.method == "OPTIONS"
                ]

            await wait_for(lambda: len(options()) >= 2, within=5)
    pings = options()
    assert 0.9 <= pings[1].at - pings[0].at <= 1.5
    assert pings[0].request.from_.uri == SipUri("sip", "101", None, PBX_HOST)
    answers = [m.message for m in pbx.responses_sent()]
    for ping in pings:
        (answer,) = [a for a in answers if a.call_id == ping.request.call_id]
        assert isinstance(answer, Response) and answer.status == 200


class TcpRegistrar:
    """A bare registrar on TCP that grants every REGISTER and counts CRLFCRLF pings (SIPp does
    not show them in its trace)."""

    def __init__(self) -> None:
        self.parser = StreamParser()
        self.registers: list[Request] = []
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def pings(self) -> int:
        return self.parser.pings_received

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.parser = StreamParser()  # a new connection, a new stream
        self.writers.append(writer)
        while data := await reader.read(4096):
            for message in self.parser.feed(data):
                if isinstance(message, Request) and message.method == "REGISTER":
                    self.registers.append(message)
                    granted = (("Contact", hdr(message, "Contact") + ";expires=300"),)
                    response = build_response(message, 200, to_tag="reg", headers=granted)
                    writer.write(serialize(response))
            self.parser.take_pongs()  # a registrar would answer with CRLF; not needed here
        writer.close()


async def test_crlf_keepalives_on_tcp_hold_the_connection(
    free_port_factory: Callable[..., int],
) -> None:
    pbx = TcpRegistrar()
    server = await asyncio.start_server(pbx.handle, PBX_HOST, free_port_factory(PBX_HOST))
    port = server.sockets[0].getsockname()[1]
    target = Sipp(PBX_HOST, port, "t1", Path("."))  # only host and port are read
    values = settings_for(
        target, free_port_factory, keepalive="crlf", keepalive_interval=0.3, transport="tcp"
    )
    try:
        async with running_sbc(values) as sbc:
            await sbc.wait_ready(within=2.0)
            await wait_for(lambda: pbx.pings >= 3, within=3)
            # RFC 5626 §4.4.1 pings on the registration's own connection; no re-registration.
            assert len(pbx.registers) == 1
    finally:
        server.close()
        await server.wait_closed()
    assert pbx.registers[-1].headers.get("Expires") == "0"


class UdpRegistrar(asyncio.DatagramProtocol):
    """A bare registrar on UDP that grants every REGISTER and counts CRLFCRLF datagrams."""

    def __init__(self) -> None:
        self.registers: list[Request] = []
        self.pings = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if data == b"\r\n\r\n":
            self.pings += 1
            return
        message = parse_message(data)
        if isinstance(message, Request) and message.method == "REGISTER":
            self.registers.append(message)
            granted = (("Contact", hdr(message, "Contact") + ";expires=300"),)
            response = build_response(message, 200, to_tag="reg", headers=granted)
            assert self.transport is not None
            self.transport.sendto(serialize(response), addr)


async def test_crlf_keepalives_on_udp_are_bare_datagrams(
    free_port_factory: Callable[..., int],
) -> None:
    loop = asyncio.get_running_loop()
    transport, pbx = await loop.create_datagram_endpoint(
        UdpRegistrar, local_addr=(PBX_HOST, free_port_factory(PBX_HOST))
    )
    port = transport.get_extra_info("sockname")[1]
    target = Sipp(PBX_HOST, port, "u1", Path("."))  # only host and port are read
    values = settings_for(target, free_port_factory, keepalive="crlf", keepalive_interval=0.3)
    try:
        async with running_sbc(values) as sbc:
            await sbc.wait_ready(within=2.0)
            await wait_for(lambda: pbx.pings >= 3, within=3)
            # The NAT binding is held by CRLF datagrams alone: no OPTIONS, no re-registration.
            assert len(pbx.registers) == 1
    finally:
        transport.close()


async def test_lost_tcp_connection_is_replaced_by_registering_again(
    free_port_factory: Callable[..., int],
) -> None:
    pbx = TcpRegistrar()
    server = await asyncio.start_server(pbx.handle, PBX_HOST, free_port_factory(PBX_HOST))
    port = server.sockets[0].getsockname()[1]
    target = Sipp(PBX_HOST, port, "t1", Path("."))
    values = settings_for(
        target, free_port_factory, keepalive="crlf", keepalive_interval=0.3, transport="tcp"
    )
    try:
        async with running_sbc(values) as sbc:
            await sbc.wait_ready(within=2.0)
            pbx.writers[0].close()  # 3CX restarts, say: the flow is gone
            await wait_for(lambda: len(pbx.registers) >= 2, within=3)
            first, second = pbx.registers[:2]
            # RFC 5626 §4.4.1: a failed flow is replaced by registering again, same Call-ID.
            assert second.call_id == first.call_id
            assert second.cseq.seq == first.cseq.seq + 1
            assert hdr(second, "Expires") == "300"
            assert len(pbx.writers) == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_sigterm_unregisters(
    registrar: Starter, free_port_factory: Callable[..., int], tmp_path: Path
) -> None:
    async with registrar("registrar_401.xml") as pbx:
        values = settings_for(pbx, free_port_factory)
        config = tmp_path / "sbc.toml"
        config.write_text(_toml(values))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env = {k: v for k, v in env.items() if not k.startswith("SBC_")}
        stderr = (tmp_path / "sbc.stderr").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sbc", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env, cwd=tmp_path,
        )  # fmt: skip
        try:
            running = Running(Settings(**values))  # type: ignore[arg-type]
            running.started_at = asyncio.get_running_loop().time()
            await running.wait_ready(within=10)
            proc.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(proc.wait(), 6)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            stderr.close()
    registers = pbx.registers()
    assert returncode == 0, (tmp_path / "sbc.stderr").read_text()
    last = registers[-1].request
    assert last.headers.get("Expires") == "0"
    assert last.call_id == registers[0].request.call_id
    assert answer_to(pbx, last).status == 200
    assert f"REGISTER cseq={last.cseq.seq} expires=0 authvalid=true" in pbx.log_lines()


def _toml(values: dict[str, dict[str, object]]) -> str:
    lines: list[str] = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
