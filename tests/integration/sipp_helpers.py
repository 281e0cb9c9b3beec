"""The one way the tests run SIPp (Debian ``sip-tester``), and readers for what it recorded.

Every SIPp goes through :func:`start_sipp`, which makes each run:

* bounded: at most ``calls`` calls (``-m``) and ``time_limit`` seconds (``-timeout``; reaching
  it is an error, ``-timeout_error``);
* loopback only: SIP on ``local_ip`` (``-i``), its RTP echo there too (``-mi``), its control
  socket there too (``-ci``) on a fresh port (``-cp``), so several SIPp can run at once; the
  remote must be a loopback address as well;
* recorded in the test's directory: statistics (``-trace_stat``), every message
  (``-trace_msg``), ``<log>`` actions (``-trace_logs``), unexpected messages (``-trace_err``)
  and stderr, read back through :class:`Sipp`.

Three ways to use it:

* ``await run_sipp(scenario, remote, workdir=...)`` (conftest's ``sipp`` fixture): SIPp as a
  client, run to completion, a :class:`SippResult`;
* ``sipp = await start_sipp(...)``, then ``await sipp.finish(limit)`` (a :class:`SippResult`)
  or ``await sipp.stop()``: SIPp in the background while the test does something else;
* ``async with sipp_server(...) as pbx``: SIPp listening in the background (a registrar, say),
  yielded once it listens, stopped on exit.

A missing ``sipp`` binary fails the test on CI (``CI=true``) and skips it elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ipaddress
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from peers import free_port, require_binary

from sbc.sip.errors import ParseError
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message

__all__ = [
    "SIPP_SCENARIOS",
    "Sipp",
    "SippResult",
    "TracedMessage",
    "hex_ip",
    "listening",
    "read_messages",
    "read_stats",
    "run_sipp",
    "sipp_server",
    "start_sipp",
]

SIPP_SCENARIOS = Path(__file__).resolve().parents[2] / "sip-fixtures" / "sipp"

# Options start_sipp sets itself: ``extra`` may not override the bounds, addresses or traces.
OWN_OPTIONS = frozenset(
    {
        "-sf", "-sn", "-t", "-i", "-p", "-mi", "-ci", "-cp", "-rsa", "-m", "-timeout",
        "-timeout_error", "-trace_stat", "-stf", "-trace_msg", "-message_file", "-trace_logs",
        "-log_file", "-trace_err", "-error_file", "-nostdin", "-bg",
    }
)  # fmt: skip

_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)\s*$", re.MULTILINE)
_DIRECTION = re.compile(r"^(UDP|TCP|TLS) message (received|sent)", re.IGNORECASE)


# -- reading what SIPp recorded ------------------------------------------------------------------


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


def read_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's ``-trace_stat`` CSV (``;``-separated), by column name."""
    if not path.exists():
        return {}
    rows = list(csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def hex_ip(host: str) -> str:
    """/proc/net's spelling of an IPv4 address: the 32-bit value in host byte order."""
    return "".join(f"{int(part):02X}" for part in reversed(host.split(".")))


def listening(host: str, port: int, transport: str = "u1") -> bool:
    """Whether a socket is bound to ``host:port`` (UDP, SIPp transport ``u*``) or listens
    there (TCP/TLS), read from /proc/net so that no probe reaches the listener (IPv4 only)."""
    udp = transport.startswith("u")
    table = "/proc/net/udp" if udp else "/proc/net/tcp"
    want = f"{hex_ip(host)}:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    return any(
        fields[1] == want and (udp or fields[3] == "0A")  # 0A: TCP_LISTEN
        for fields in (line.split() for line in lines)
    )


# -- one SIPp process ----------------------------------------------------------------------------


@dataclass
class SippResult:
    """How a SIPp run ended: exit status, its call counts and what it recorded."""

    returncode: int
    successful: int
    failed: int
    stats: dict[str, str] = field(default_factory=dict)
    errors: str = ""
    stderr: str = ""
    elapsed: float = 0.0  # seconds from start until the test saw it exit


@dataclass
class Sipp:
    """A SIPp process on ``host:port`` started by :func:`start_sipp`, and its records.

    Without a ``process`` it only names an address (tests that stand in for SIPp use that).
    """

    host: str
    port: int
    transport: str = "u1"
    workdir: Path = Path(".")
    scenario: str = "sipp"
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0  # the event loop's clock when it was started

    @property
    def uri_host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def stem(self) -> str:
        return f"{Path(self.scenario).stem}-{self.host}-{self.port}"

    @property
    def stat_file(self) -> Path:
        return self.workdir / f"{self.stem}.csv"

    @property
    def message_file(self) -> Path:
        return self.workdir / f"{self.stem}-messages.log"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.stem}-logs.log"

    @property
    def error_file(self) -> Path:
        return self.workdir / f"{self.stem}-errors.log"

    @property
    def stderr_file(self) -> Path:
        return self.workdir / f"{self.stem}-stderr.log"

    # what it recorded (complete once it has exited)

    def stats(self) -> dict[str, str]:
        """The last row of its statistics, by column name."""
        return read_stats(self.stat_file)

    def messages(self) -> str:
        """Its message trace as text."""
        return _text(self.message_file)

    def traced(self) -> list[TracedMessage]:
        """Its message trace, parsed."""
        return read_messages(self.message_file)

    def registers(self) -> list[TracedMessage]:
        """REGISTER requests SIPp received, in order."""
        return [
            m
            for m in self.traced()
            if m.received and isinstance(m.message, Request) and m.message.method == "REGISTER"
        ]

    def responses_sent(self) -> list[TracedMessage]:
        return [m for m in self.traced() if not m.received and isinstance(m.message, Response)]

    def log_lines(self) -> list[str]:
        """Its ``<log>`` actions, one line each."""
        return [line for line in _text(self.log_file).splitlines() if line]

    def errors(self) -> str:
        """Unexpected messages it traced."""
        return _text(self.error_file)

    def stderr(self) -> str:
        return _text(self.stderr_file)

    # its life

    async def wait_listening(self, limit: float = 5.0) -> None:
        """Wait until SIPp listens on its address (polled, bounded by ``limit``)."""
        process = self._process()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while not listening(self.host, self.port, self.transport):
            if process.returncode is not None or loop.time() > give_up:
                raise AssertionError(
                    f"SIPp {self.scenario} not listening on {self.uri_host_port} after {limit} s"
                    f" (exit status {process.returncode}): {self.stderr()}"
                )
            await asyncio.sleep(0.01)  # polling kernel state, not standing in for an event

    async def finish(self, limit: float) -> SippResult:
        """Wait for SIPp to exit (killing it and failing after ``limit`` seconds)."""
        process = self._process()
        try:
            await asyncio.wait_for(process.wait(), limit)
        except TimeoutError:
            await self.stop(grace=0.0)
            raise AssertionError(f"SIPp {self.scenario} still running after {limit} s") from None
        elapsed = asyncio.get_running_loop().time() - self.started
        stats = self.stats()
        return SippResult(
            returncode=process.returncode if process.returncode is not None else -1,
            successful=int(stats.get("SuccessfulCall(C)", "0") or 0),
            failed=int(stats.get("FailedCall(C)", "0") or 0),
            stats=stats,
            errors=self.errors(),
            stderr=self.stderr(),
            elapsed=elapsed,
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop SIPp if it still runs: SIGTERM, then SIGKILL after ``grace`` seconds."""
        process = self._process()
        if process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()

    def _process(self) -> asyncio.subprocess.Process:
        assert self.process is not None, "this Sipp was not started by start_sipp"
        return self.process


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _loopback(host: str) -> str:
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"SIPp runs on loopback addresses only, not {host!r}")
    return host


# -- starting it ---------------------------------------------------------------------------------


async def start_sipp(
    scenario: str,
    *,
    workdir: Path,
    local_ip: str = "127.0.0.1",
    port: int | None = None,
    remote: str | None = None,
    transport: str = "u1",
    calls: int = 1,
    rate: float | None = None,
    rate_period_ms: int | None = None,
    time_limit: float = 60.0,
    keys: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> Sipp:
    """Start SIPp in the background and return at once (see the module's docstring).

    ``scenario`` is a file in ``sip-fixtures/sipp`` (``*.xml``) or a built-in (``uac``,
    ``uas``...). SIPp uses ``local_ip:port`` (a free port when ``port`` is None) and, as a
    client, calls ``remote`` (``host:port``). ``keys`` become ``-key name value``; ``extra`` is
    passed as is, but may not set what this function sets (:data:`OWN_OPTIONS`).
    """
    _loopback(local_ip)
    if remote is not None:
        _loopback(remote.rpartition(":")[0] or remote)
    if calls < 1 or time_limit <= 0:
        raise ValueError("SIPp needs a bound: calls >= 1 and time_limit > 0")
    clashes = sorted(OWN_OPTIONS.intersection(extra))
    if clashes:
        raise ValueError(f"start_sipp sets {clashes} itself")
    binary = require_binary("sipp")
    sipp = Sipp(
        local_ip, free_port(local_ip) if port is None else port, transport, workdir, scenario
    )
    source = (
        ("-sf", str(SIPP_SCENARIOS / scenario)) if scenario.endswith(".xml") else ("-sn", scenario)
    )
    args = [
        binary,
        *source,
        *([remote] if remote else []),
        *("-t", transport, "-i", local_ip, "-p", str(sipp.port), "-mi", local_ip),
        *("-ci", local_ip, "-cp", str(free_port(local_ip))),
        *("-m", str(calls), "-timeout", f"{math.ceil(time_limit)}s", "-timeout_error"),
        *("-trace_stat", "-stf", str(sipp.stat_file)),
        *("-trace_msg", "-message_file", str(sipp.message_file)),
        *("-trace_logs", "-log_file", str(sipp.log_file)),
        *("-trace_err", "-error_file", str(sipp.error_file)),
        "-nostdin",
    ]
    if rate is not None:
        args += ["-r", str(rate)]
    if rate_period_ms is not None:
        args += ["-rp", str(rate_period_ms)]
    for name, value in (keys or {}).items():
        args += ["-key", name, value]
    args += extra
    with sipp.stderr_file.open("wb") as stderr:
        sipp.process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            cwd=workdir,
        )
    sipp.started = asyncio.get_running_loop().time()
    return sipp


async def run_sipp(
    scenario: str,
    remote: str,
    *,
    workdir: Path,
    transport: str = "u1",
    calls: int = 10,
    rate: float | None = None,
    rate_period_ms: int | None = None,
    local_ip: str = "127.0.0.1",
    time_limit: float = 30.0,
    extra: Sequence[str] = (),
) -> SippResult:
    """Run SIPp as a client against ``remote`` until it exits; its exit status and counts."""
    sipp = await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=local_ip,
        remote=remote,
        transport=transport,
        calls=calls,
        rate=rate,
        rate_period_ms=rate_period_ms,
        time_limit=time_limit,
        extra=extra,
    )
    return await sipp.finish(time_limit + 10)


@contextlib.asynccontextmanager
async def sipp_server(
    scenario: str,
    *,
    workdir: Path,
    host: str,
    port: int | None = None,
    transport: str = "u1",
    keys: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
    calls: int = 100,
    time_limit: float = 60.0,
) -> AsyncIterator[Sipp]:
    """SIPp with ``scenario`` listening on ``host:port`` (a free port when None); yielded once
    it listens, stopped (SIGTERM, then SIGKILL) on exit."""
    sipp = await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=host,
        port=port,
        transport=transport,
        calls=calls,
        time_limit=time_limit,
        keys=keys,
        extra=extra,
    )
    try:
        await sipp.wait_listening()
        yield sipp
    finally:
        await sipp.stop()
