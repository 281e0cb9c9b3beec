"""SIPp as a long-running server peer (a registrar, say), and readers for what it recorded.

``conftest.run_sipp`` runs SIPp as a client to completion; here SIPp listens in the background
while the code under test talks to it, records every message it sees (``-trace_msg``) and its
``<log>`` actions (``-trace_logs``), and is stopped by the test. The records are then read back:
:func:`read_messages` returns each message with its timestamp and direction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

SIPP_SCENARIOS = Path(__file__).resolve().parents[2] / "sip-fixtures" / "sipp"

_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)\s*$", re.MULTILINE)
_DIRECTION = re.compile(r"^(UDP|TCP|TLS) message (received|sent)", re.IGNORECASE)


@dataclass(frozen=True)
class TracedMessage:
    """One message in SIPp's ``-trace_msg`` file: when, which way (from SIPp's side), what."""

    at: float  # seconds since the epoch, as SIPp stamped it
    received: bool  # True: SIPp received it (it came from the code under test)
    message: Request | Response

    @property
    def request(self) -> Request:
        assert isinstance(self.message, Request)
        return self.message


def read_messages(path: Path) -> list[TracedMessage]:
    """Parse a SIPp ``-trace_msg`` file (blocks headed by a dashed line with a timestamp)."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    out: list[TracedMessage] = []
    marks = list(_SEPARATOR.finditer(text))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        block = text[mark.end() : end].lstrip("\n")
        first, _, rest = block.partition("\n")
        direction = _DIRECTION.match(first)
        if direction is None:
            continue
        raw = rest.lstrip("\n").rstrip("\n") + "\n\n"
        raw = raw.replace("\r\n", "\n").replace("\n", "\r\n")
        try:
            message = parse_message(raw.encode())
        except ParseError:
            continue
        stamp = datetime.fromisoformat(f"{mark.group(1)} {mark.group(2)}").timestamp()
        out.append(TracedMessage(stamp, direction.group(2).lower() == "received", message))
    return out


@dataclass
class SippServer:
    """A SIPp process listening on ``host:port`` with ``scenario``."""

    host: str
    port: int
    transport: str
    workdir: Path
    process: asyncio.subprocess.Process | None = None
    message_file: Path = field(init=False)
    log_file: Path = field(init=False)
    error_file: Path = field(init=False)

    def __post_init__(self) -> None:
        stem = f"sipp-{self.port}"
        self.message_file = self.workdir / f"{stem}-messages.log"
        self.log_file = self.workdir / f"{stem}-logs.log"
        self.error_file = self.workdir / f"{stem}-errors.log"

    @property
    def uri_host_port(self) -> str:
        return f"{self.host}:{self.port}"

    def messages(self) -> list[TracedMessage]:
        return read_messages(self.message_file)

    def registers(self) -> list[TracedMessage]:
        """REGISTER requests SIPp received, in order."""
        return [
            m
            for m in self.messages()
            if m.received and isinstance(m.message, Request) and m.message.method == "REGISTER"
        ]

    def responses_sent(self) -> list[TracedMessage]:
        return [m for m in self.messages() if not m.received and isinstance(m.message, Response)]

    def log_lines(self) -> list[str]:
        if not self.log_file.exists():
            return []
        return [line for line in self.log_file.read_text(errors="replace").splitlines() if line]

    def errors(self) -> str:
        return self.error_file.read_text(errors="replace") if self.error_file.exists() else ""


def _listening(host: str, port: int, transport: str) -> bool:
    """Whether something has bound ``host:port`` (read from /proc/net, IPv4 only)."""
    table = "/proc/net/udp" if transport == "u1" else "/proc/net/tcp"
    want = f"{hex_ip(host)}:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == want for line in lines)


def hex_ip(host: str) -> str:
    """/proc/net's spelling of an IPv4 address: the 32-bit value in host byte order."""
    return "".join(f"{int(part):02X}" for part in reversed(host.split(".")))


@contextlib.asynccontextmanager
async def sipp_server(
    scenario: str,
    *,
    sipp: str,
    workdir: Path,
    host: str,
    port: int,
    control_port: int,
    transport: str = "u1",
    keys: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    time_limit: float = 60.0,
) -> AsyncIterator[SippServer]:
    """Start SIPp (binary ``sipp``, from conftest's ``require_binary``) with ``scenario`` (a file
    in ``sip-fixtures/sipp``) listening on ``host:port``; yield once it listens; stop it
    (SIGTERM, then SIGKILL) on exit."""
    server = SippServer(host, port, transport, workdir)
    args = [
        sipp,
        "-sf",
        str(SIPP_SCENARIOS / scenario),
        "-t",
        transport,
        "-i",
        host,
        "-p",
        str(port),
        "-cp",
        str(control_port),
        "-timeout",
        f"{int(time_limit)}s",
        "-trace_msg",
        "-message_file",
        str(server.message_file),
        "-trace_logs",
        "-log_file",
        str(server.log_file),
        "-trace_err",
        "-error_file",
        str(server.error_file),
        "-nostdin",
        *extra,
    ]
    for name, value in (keys or {}).items():
        args += ["-key", name, value]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=workdir,
    )
    server.process = proc
    try:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 5.0
        while not _listening(host, port, transport):
            if proc.returncode is not None or loop.time() > give_up:
                stderr = b""
                if proc.stderr is not None:
                    with contextlib.suppress(Exception):
                        stderr = await asyncio.wait_for(proc.stderr.read(), 1.0)
                raise RuntimeError(
                    f"SIPp did not start listening: {stderr.decode(errors='replace')}"
                )
            await asyncio.sleep(0.02)  # polling a condition, not standing in for one
        yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
