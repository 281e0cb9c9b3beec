"""Fuzzing harness shared by the short CI runs (tests/unit/test_fuzz_parser.py,
tests/integration/test_fuzz_engine.py) and the long local run (bench/fuzz.py).

Inputs start from the RFC 4475 torture messages (sip-fixtures/rfc4475) plus a few well-formed
messages of each method sbc handles, and are mutated at the byte and at the line level. Two
targets:

* the parser (:func:`check_parser`): ``parse_message``, ``StreamParser`` fed whole and in random
  pieces, every field accessor, validation and a serialize/parse round trip. Only ``SipError``
  (the parser's own error family) may come out; anything else propagates as a finding.
* a running sbc (:class:`EngineTarget`): the whole :class:`~sbc.ops.service.Service` (engine,
  call manager, media) on loopback, fed datagrams through its transport entry and stream bytes
  over real TCP connections from a trusted PBX address. A finding is any log line at error
  level (the engine logs an exception escaping a handler as a bug) and any exception that
  reaches the event loop; after a batch, an OPTIONS over UDP and one over TCP must still be
  answered 200, and every call must end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import traceback
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbc.sip.errors import SipError
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamParser, parse_message
from sbc.sip.serializer import serialize
from sbc.sip.validate import validate_request, validate_response

__all__ = [
    "EngineTarget",
    "Finding",
    "check_parser",
    "mutate",
    "running_engine_target",
    "seeds",
]

FIXTURES = Path(__file__).resolve().parents[1] / "sip-fixtures" / "rfc4475"
MAX_INPUT = 70_000  # beyond max_message_size (16 KiB) and a UDP datagram: both limits are hit

# Loopback addresses of the engine fuzzing, apart from those of the other integration tests.
PBX = "127.0.0.131"
SBC = "127.0.0.132"
RETELL = "127.0.0.133"
EXTENSION = "101"

_SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.131\r\ns=-\r\nc=IN IP4 127.0.0.131\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
)


def _request(method: str, *, to_tag: str = "", body: bytes = b"", extra: str = "") -> bytes:
    seq = 2 if method in ("BYE", "NOTIFY", "REFER", "INFO") else 1
    head = (
        f"{method} sip:{EXTENSION}@{SBC} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {PBX}:5060;branch=z9hG4bK-{method.lower()}-1;rport\r\n"
        f'From: "Caller" <sip:+442071234567@{PBX}>;tag=from1\r\n'
        f"To: <sip:{EXTENSION}@{SBC}>{to_tag}\r\n"
        f"Call-ID: seed-{method.lower()}@{PBX}\r\n"
        f"CSeq: {seq} {method}\r\n"
        f"Contact: <sip:caller@{PBX}:5060>\r\n"
        "Max-Forwards: 70\r\n"
        "Supported: timer, replaces\r\n"
        "Session-Expires: 1800;refresher=uac\r\n"
        f"{extra}"
        + ("Content-Type: application/sdp\r\n" if body.startswith(b"v=0") else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _response(status: int, reason: str, method: str) -> bytes:
    return (
        f"SIP/2.0 {status} {reason}\r\n"
        f"Via: SIP/2.0/UDP {SBC}:5060;branch=z9hG4bK-resp-1\r\n"
        f"From: <sip:{EXTENSION}@{PBX}>;tag=from2\r\n"
        f"To: <sip:{EXTENSION}@{PBX}>;tag=to2\r\n"
        f"Call-ID: seed-resp@{SBC}\r\n"
        f"CSeq: 1 {method}\r\n"
        'WWW-Authenticate: Digest realm="3cx", nonce="abc", qop="auth", algorithm=MD5\r\n'
        "Content-Length: 0\r\n\r\n"
    ).encode()


def seeds() -> list[bytes]:
    """The RFC 4475 files, then one well-formed message of each kind sbc meets (the last
    :data:`WELL_FORMED`)."""
    found = [path.read_bytes() for path in sorted(FIXTURES.glob("*.dat"))]
    return [
        *found,
        _request("INVITE", body=_SDP),
        _request("OPTIONS"),
        _request("BYE", to_tag=";tag=to1"),
        _request("CANCEL"),
        _request("ACK", to_tag=";tag=to1"),
        _request(
            "INFO",
            to_tag=";tag=to1",
            body=b"Signal=5\r\nDuration=160\r\n",
            extra="Content-Type: application/dtmf-relay\r\n",
        ),
        _request("REFER", to_tag=";tag=to1", extra=f"Refer-To: <sip:200@{PBX}>\r\n"),
        _request(
            "NOTIFY",
            to_tag=";tag=to1",
            body=b"SIP/2.0 200 OK\r\n",
            extra="Event: refer\r\nContent-Type: message/sipfrag\r\n",
        ),
        _request("UPDATE", to_tag=";tag=to1"),
        _request("REGISTER"),
        _response(200, "OK", "INVITE"),
        _response(180, "Ringing", "INVITE"),
        _response(401, "Unauthorized", "REGISTER"),
    ]


WELL_FORMED = 13

# Octet strings that tend to sit on a parser's edges: empty, signs, overflows, escapes, brackets,
# separators, line ends, non-ASCII and NUL, long runs.
# fmt: off
INTERESTING: tuple[bytes, ...] = (
    b"", b"0", b"-1", b"4294967296", b"18446744073709551617", b"99999999999999999999999",
    b"\x00", b"\xff\xfe", b"\xc3\x28", "\u00e9\u4e2d".encode(), b"%", b"%0", b"%00", b"%zz",
    b"<", b">", b"<>", b'"', b'\\"', b"\\", b";", b";;", b",", b",,", b"=", b":", b"@", b"sip:",
    b"sips:", b"tel:", b"[", b"[::1", b"]", b"::", b"\r\n", b"\n", b"\r", b" ", b"\t",
    b"\r\n ", b"\r\n\r\n", b"SIP/2.0", b"SIP/3.0", b"z9hG4bK", b";branch=", b";tag=", b";rport",
    b";received=", b";maddr=", b";lr", b";transport=tcp", b"Content-Length: 99999\r\n",
    b"Via: SIP/2.0/TCP x\r\n", b"Route: <sip:a;lr>\r\n", b"Max-Forwards: 0\r\n",
    b"CSeq: 2147483648 INVITE\r\n", b"Expires: -5\r\n", b"m=audio 0 RTP/AVP\r\n",
    b"c=IN IP6 ::\r\n", b"A" * 300, b"," * 200, b";a" * 200, b"Via: a\r\n" * 80,
)

_HEADER_NAMES = (
    b"Via", b"v", b"From", b"f", b"To", b"t", b"Call-ID", b"i", b"CSeq", b"Contact", b"m",
    b"Content-Length", b"l", b"Content-Type", b"c", b"Max-Forwards", b"Route", b"Record-Route",
    b"Refer-To", b"r", b"Event", b"o", b"Session-Expires", b"x", b"Min-SE", b"Require",
    b"Supported", b"k", b"Proxy-Require", b"Authorization", b"Proxy-Authenticate", b"Allow",
    b"Accept", b"Expires", b"Subscription-State", b"Replaces", b"Referred-By", b"b",
)
# fmt: on


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


def mutate(data: bytes, rng: random.Random, pool: Sequence[bytes]) -> bytes:
    """``data`` changed by one to eight random edits, at most :data:`MAX_INPUT` octets."""
    raw = bytearray(data)
    # Mostly one or two edits: an input should often still parse, so that it reaches the
    # transaction layer and the call manager, not only the parser.
    edits = 1
    while edits < 8 and rng.random() < 0.4:
        edits += 1
    for _ in range(edits):
        op = rng.randrange(13)
        pos = rng.randint(0, len(raw))
        if op == 0 and raw:  # flip one bit
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert an edge value
            raw[pos:pos] = rng.choice(INTERESTING)
        elif op == 2 and raw:  # delete a range
            raw[pos : pos + rng.randint(1, 32)] = b""
        elif op == 3 and raw:  # repeat a range
            chunk = raw[pos : pos + rng.randint(1, 64)]
            raw[pos:pos] = bytes(chunk) * rng.randint(1, 8)
        elif op == 4:  # replace a header's value
            lines = _lines(bytes(raw))
            i = rng.randrange(len(lines))
            name, sep, _ = lines[i].partition(b":")
            if sep:
                lines[i] = name + b": " + rng.choice(INTERESTING)
                raw = bytearray(b"\r\n".join(lines))
        elif op == 5:  # drop a line
            lines = _lines(bytes(raw))
            del lines[rng.randrange(len(lines))]
            raw = bytearray(b"\r\n".join(lines))
        elif op == 6:  # repeat a line
            lines = _lines(bytes(raw))
            i = rng.randrange(len(lines))
            lines[i:i] = [lines[i]] * rng.randint(1, 4)
            raw = bytearray(b"\r\n".join(lines))
        elif op == 7 and pool:  # splice with another input
            other = rng.choice(pool)
            raw = raw[:pos] + other[rng.randint(0, len(other)) :]
        elif op == 8:  # a header of a name sbc reads, with an edge value
            line = rng.choice(_HEADER_NAMES) + b": " + rng.choice(INTERESTING) + b"\r\n"
            first = raw.find(b"\r\n") + 2
            raw[first:first] = line
        elif op == 9:  # another Content-Length
            length = rng.choice([0, 1, len(raw), 2**31, rng.randint(0, 5000)])
            lines = _lines(bytes(raw))
            lines = [
                b"Content-Length: %d" % length if ln.lower().startswith(b"content-length") else ln
                for ln in lines
            ]
            raw = bytearray(b"\r\n".join(lines))
        elif op == 10:  # other line ends
            raw = bytearray(bytes(raw).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\n\r\n"])))
        elif op == 11:  # truncate
            del raw[pos:]
        elif op == 12 and raw:  # one random octet
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        if len(raw) > MAX_INPUT:
            del raw[MAX_INPUT:]
    return bytes(raw)


# -- the parser --------------------------------------------------------------------------------


def _exercise(message: Request | Response) -> None:
    """Read what a caller might read; only SipError may come out of any of it."""
    getters: list[Callable[[], object]] = [
        lambda: message.call_id,
        lambda: message.cseq,
        lambda: message.vias,
        lambda: message.top_via,
        lambda: message.from_,
        lambda: message.to,
        lambda: message.from_tag,
        lambda: message.to_tag,
        lambda: list(message.headers.items()),
    ]
    for getter in getters:
        with contextlib.suppress(SipError):
            getter()
    with contextlib.suppress(SipError):
        if isinstance(message, Request):
            validate_request(message)
        else:
            validate_response(message)
    try:
        again = serialize(message)
    except SipError:
        return
    # What sbc writes of a message it accepted must itself be readable.
    with contextlib.suppress(SipError):
        parse_message(again)


def check_parser(data: bytes, rng: random.Random) -> int:
    """Feed ``data`` to every parser entry; returns how many messages came out. Any exception
    but SipError escapes (a finding)."""
    count = 0
    try:
        message = parse_message(data)
    except SipError:
        pass
    else:
        count += 1
        _exercise(message)
    for whole in (True, False):
        parser = StreamParser(max_message_size=16384)
        try:
            if whole:
                pieces = [data]
            else:
                cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(1, 6)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            for piece in pieces:
                for message in parser.feed(piece):
                    count += 1
                    _exercise(message)
        except SipError:
            pass
    return count


# -- a running sbc -----------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # "log" (an error-level log line) or "loop" (an exception reaching the loop)
    detail: str
    data: bytes | None = None


@dataclass
class EngineTarget:
    """A running sbc fed fuzzed input; see the module docstring."""

    service: Any  # sbc.ops.service.Service
    port: int
    findings: list[Finding] = field(default_factory=list)
    udp_inputs: int = 0
    tcp_inputs: int = 0
    current: bytes | None = None

    def feed_udp(self, data: bytes, source_port: int = 5060) -> None:
        """One datagram through the transport's entry, as if it came from the PBX."""
        self.current = data
        self.udp_inputs += 1
        self.service.engine.transports._datagram_received(data, (PBX, source_port))
        self.current = None

    async def feed_tcp(self, data: bytes, rng: random.Random) -> None:
        """``data`` over a new TCP connection from the PBX address, in random pieces; returns
        once sbc closed the connection after the peer's end of stream (all of it was read)."""
        self.tcp_inputs += 1
        reader, writer = await _connect(self.port)
        try:
            start = 0
            while start < len(data):
                end = min(len(data), start + rng.randint(1, 4096))
                writer.write(data[start:end])
                start = end
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(10):
                while await reader.read(65536):
                    pass
        except (ConnectionError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                self.findings.append(Finding("tcp", "connection not closed after EOF", data))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def options_answered(self) -> bool:
        """An OPTIONS over real UDP and one over TCP, each answered 200 within 5 s."""
        return await _options_udp(self.port) and await _options_tcp(self.port)

    async def quiet(self, limit: float = 30.0) -> bool:
        """Every call ended within ``limit`` seconds (INVITEs fuzzed into calls end with 503:
        Retell's address refuses connections)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while self.service.bridge.active:
            if loop.time() > give_up:
                return False
            await asyncio.sleep(0.05)  # calls end on their own; nothing to wait on
        return True


_options_count = 0


def _options(transport: str, port: int) -> bytes:
    global _options_count
    _options_count += 1
    n = _options_count
    return (
        f"OPTIONS sip:{SBC}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {PBX}:5060;branch=z9hG4bK-probe-{n};rport\r\n"
        f"From: <sip:probe@{PBX}>;tag=probe{n}\r\n"
        f"To: <sip:{SBC}:{port}>\r\n"
        f"Call-ID: probe-{n}@{PBX}\r\n"
        f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


async def _options_udp(port: int) -> bool:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((PBX, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (SBC, port))
        await loop.sock_sendall(sock, _options("UDP", port))
        try:
            async with asyncio.timeout(5):
                answer = await loop.sock_recv(sock, 65536)
        except TimeoutError:
            return False
    return answer.startswith(b"SIP/2.0 200 ")


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(SBC, port, local_addr=(PBX, 0))


async def _options_tcp(port: int) -> bool:
    reader, writer = await _connect(port)
    try:
        writer.write(_options("TCP", port))
        async with asyncio.timeout(5):
            parser = StreamParser()
            while True:
                data = await reader.read(65536)
                if not data:
                    return False
                for message in parser.feed(data):
                    return isinstance(message, Response) and message.status == 200
    except TimeoutError:
        return False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def running_engine_target(workdir: Path) -> AsyncIterator[EngineTarget]:
    """A Service on :data:`SBC` trusting :data:`PBX`; its registrar and Retell addresses
    refuse (nothing listens there), so nothing leaves loopback and calls end at once. Log
    lines at error level and exceptions reaching the loop become findings."""
    import structlog

    from sbc.ops.service import Service
    from sbc.ops.settings import (
        AdminSettings,
        MediaSettings,
        PbxSettings,
        RecordsSettings,
        RetellSettings,
        SecuritySettings,
        Settings,
        SipSettings,
    )

    def free_port(host: str) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((host, port))  # the SIP port is UDP and TCP: both must be free
            return port

    port = free_port(SBC)
    settings = Settings(
        # Fuzzing floods from the trusted PBX address far above what a PBX sends: the edge
        # guard's trusted rate limit and the per-source transaction limit would (rightly) refuse
        # much of it, and nothing would reach the parser. Both are tested elsewhere.
        sip=SipSettings(
            bind=SBC, port=port, t1=0.1, t2=0.4, t4=0.5, max_transactions_per_source=1_000_000
        ),
        security=SecuritySettings(trusted_rate_limit=10_000_000),
        pbx=PbxSettings(
            host=PBX,
            port=free_port(PBX),
            extension=EXTENSION,
            password="secret",  # type: ignore[arg-type]
            trusted=(f"{PBX}/32",),  # type: ignore[arg-type]
            keepalive="off",
        ),
        retell=RetellSettings(
            host=RETELL,
            port=free_port(RETELL),
            transport="tcp",
            number="+14155550100",
            answer_timeout=5.0,
        ),
        media=MediaSettings(mode="relay"),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC)}"),
        records=RecordsSettings(path=str(workdir / "fuzz-calls.sqlite3")),
    )
    target = EngineTarget(Service(settings), port)

    def keep_errors(_logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        if method in ("error", "exception", "critical"):
            # Logged from an except block (log.exception): the traceback is the one in flight.
            detail = f"{event} {traceback.format_exc()}"
            target.findings.append(Finding("log", detail[-6000:], target.current))
        raise structlog.DropEvent

    def loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        target.findings.append(Finding("loop", repr(context)[:4000], target.current))

    saved = structlog.get_config()
    structlog.configure(
        processors=[keep_errors],
        wrapper_class=structlog.BoundLogger,
        cache_logger_on_first_use=False,
    )
    loop = asyncio.get_running_loop()
    saved_handler = loop.get_exception_handler()
    loop.set_exception_handler(loop_error)
    try:
        await target.service.start()
        yield target
    finally:
        try:
            await target.service.stop()
        finally:
            loop.set_exception_handler(saved_handler)
            structlog.configure(**saved)
