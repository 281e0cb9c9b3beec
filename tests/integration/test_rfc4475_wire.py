"""Every RFC 4475 torture message over the wire to a running ``sbc run``, over UDP and over TCP,
from an address inside ``pbx.trusted``; after each one an OPTIONS must still be answered 200
(the listener survived it), and no answer is a 500 (what a handler failing on the message would
give). One sbc process serves the whole module; at the end its log must hold no error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from peers import free_port
from sbc_process import SbcProcess, running_sbc_process

from sbc.sip.message import Response
from sbc.sip.parser import StreamParser, parse_message

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

FIXTURES = Path(__file__).resolve().parents[2] / "sip-fixtures" / "rfc4475"
FILES = sorted(path.name for path in FIXTURES.glob("*.dat"))

SENDER = "127.0.0.141"  # inside pbx.trusted
SBC = "127.0.0.142"
RETELL = "127.0.0.143"  # nothing listens: an INVITE that gets that far is answered 503
_probe = itertools.count(1)


def options(transport: str, port: int) -> bytes:
    n = next(_probe)
    return (
        f"OPTIONS sip:{SBC}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {SENDER}:5060;branch=z9hG4bK-4475-{n};rport\r\n"
        f"From: <sip:probe@{SENDER}>;tag=p{n}\r\n"
        f"To: <sip:{SBC}:{port}>\r\n"
        f"Call-ID: probe-{n}@{SENDER}\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


class UdpPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sbc(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[SbcProcess, int]]:
    workdir = tmp_path_factory.mktemp("rfc4475")
    port = free_port(SBC)
    values: dict[str, dict[str, Any]] = {
        "sip": {"bind": SBC, "port": port, "t1": 0.1, "t2": 0.4, "t4": 0.5},
        "pbx": {
            "host": SENDER,
            "port": free_port(SENDER),  # no registrar: registration backs off, calls still work
            "extension": "101",
            "password": "secret",
            "trusted": [f"{SENDER}/32"],
            "keepalive": "off",
        },
        "retell": {
            "host": RETELL,
            "port": free_port(RETELL),
            "transport": "tcp",
            "number": "+14155550100",
        },
        "media": {"mode": "passthrough"},
        "admin": {"listen": f"{SBC}:{free_port(SBC, udp=False)}"},
        "log": {"level": "info", "format": "json"},
    }
    async with running_sbc_process(workdir, values) as process:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 20
        while not await udp_options_answered(port):
            assert process.process.returncode is None, process.log_text()[-4000:]
            assert loop.time() < give_up, f"sbc not answering:\n{process.log_text()[-4000:]}"
        yield process, port
        errors = [line for line in process.lines() if line.get("level") in ("error", "critical")]
        assert errors == []
        assert process.process.returncode is None


@contextlib.asynccontextmanager
async def udp_peer(port: int = 0) -> AsyncIterator[tuple[asyncio.DatagramTransport, UdpPeer]]:
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=(SENDER, port))
    try:
        yield transport, peer
    finally:
        transport.close()


async def udp_options_answered(port: int) -> bool:
    async with udp_peer() as (transport, peer):
        transport.sendto(options("UDP", port), (SBC, port))
        try:
            async with asyncio.timeout(1):
                while True:
                    answer = parse_message(await peer.queue.get())
                    if isinstance(answer, Response) and answer.cseq.method == "OPTIONS":
                        return answer.status == 200
        except TimeoutError:
            return False


async def tcp_exchange(port: int, data: bytes, *, until_answer: bool) -> list[Response]:
    """``data`` on a new connection from SENDER; with ``until_answer`` the first response is
    awaited, otherwise end of stream (sent after the data) and what came back until sbc closed."""
    reader, writer = await asyncio.open_connection(SBC, port, local_addr=(SENDER, 0))
    parser = StreamParser()
    got: list[Response] = []
    try:
        writer.write(data)
        if not until_answer:
            writer.write_eof()
        async with asyncio.timeout(5):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return got
                got.extend(m for m in parser.feed(chunk) if isinstance(m, Response))
                if until_answer and got:
                    return got
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@pytest.mark.parametrize("name", FILES)
async def test_over_udp_then_options_answered(sbc: tuple[SbcProcess, int], name: str) -> None:
    process, port = sbc
    # On 5060: the files' Via has no rport, so answers go to the sent-by port (5060 or none).
    async with udp_peer(5060) as (transport, peer):
        transport.sendto((FIXTURES / name).read_bytes(), (SBC, port))
        assert await udp_options_answered(port), process.log_text()[-3000:]
        answers = []
        while not peer.queue.empty():
            answers.append(parse_message(peer.queue.get_nowait()))
    assert all(not isinstance(a, Response) or a.status != 500 for a in answers), answers
    assert process.process.returncode is None


@pytest.mark.parametrize("name", FILES)
async def test_over_tcp_then_options_answered(sbc: tuple[SbcProcess, int], name: str) -> None:
    process, port = sbc
    answers = await tcp_exchange(port, (FIXTURES / name).read_bytes(), until_answer=False)
    assert all(a.status != 500 for a in answers), answers
    (answer,) = await tcp_exchange(port, options("TCP", port), until_answer=True)
    assert answer.status == 200
    assert process.process.returncode is None


async def test_every_file_is_covered() -> None:
    assert len(FILES) >= 49
