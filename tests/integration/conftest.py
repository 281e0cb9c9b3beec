"""Shared helpers for integration tests: free loopback ports and a SIPp runner.

SIPp comes from Debian's ``sip-tester``. When it is missing the tests that need it are skipped,
except on CI (``CI=true``), where a missing binary fails them.
"""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

REPO = Path(__file__).resolve().parents[2]
SIPP_SCENARIOS = REPO / "sip-fixtures" / "sipp"


def require_binary(name: str) -> str:
    """Path of ``name``; fails the test on CI when missing, skips it elsewhere."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is required on CI but not installed")
        pytest.skip(f"{name} not installed")
    return path


_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1", *, udp: bool = True) -> int:
    """A TCP port on ``host``, also free for UDP unless ``udp`` is False (never handed out
    twice in one run)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
            if (host, port) in _handed_out:
                continue
            try:
                if udp:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                        other.bind((host, port))
            except OSError:
                continue
        _handed_out.add((host, port))
        return port
    raise RuntimeError("no free port")


@dataclass
class SippResult:
    returncode: int
    successful: int
    failed: int
    stats: dict[str, str] = field(default_factory=dict)
    errors: str = ""
    stderr: str = ""
    elapsed: float = 0.0


def _read_stats(path: Path) -> dict[str, str]:
    """The last row of SIPp's ``-trace_stat`` CSV (``;``-separated), by column name."""
    if not path.exists():
        return {}
    rows = list(csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


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
    """Run SIPp until it exits and return its exit status and call counts.

    ``scenario`` is a file name under ``sip-fixtures/sipp`` or a built-in (``uac``, ``uas``...).
    The control port and local port are fresh free ports, so several SIPp can run at once.
    """
    sipp = require_binary("sipp")
    scenario_args = (
        ["-sf", str(SIPP_SCENARIOS / scenario)] if scenario.endswith(".xml") else ["-sn", scenario]
    )
    stat_file = workdir / f"sipp-{os.getpid()}-{free_port(local_ip)}.csv"
    error_file = workdir / f"{stat_file.stem}-errors.log"
    args = [
        sipp,
        *scenario_args,
        remote,
        "-t",
        transport,
        "-i",
        local_ip,
        "-p",
        str(free_port(local_ip)),
        "-cp",
        str(free_port(local_ip)),
        "-m",
        str(calls),
        "-timeout",
        f"{int(time_limit)}s",
        "-timeout_error",
        "-trace_stat",
        "-stf",
        str(stat_file),
        "-trace_err",
        "-error_file",
        str(error_file),
        "-nostdin",
        *extra,
    ]
    if rate is not None:
        args += ["-r", str(rate)]
    if rate_period_ms is not None:
        args += ["-rp", str(rate_period_ms)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=workdir,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), time_limit + 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    elapsed = loop.time() - started
    stats = _read_stats(stat_file)
    return SippResult(
        returncode=proc.returncode if proc.returncode is not None else -1,
        successful=int(stats.get("SuccessfulCall(C)", "0") or 0),
        failed=int(stats.get("FailedCall(C)", "0") or 0),
        stats=stats,
        errors=error_file.read_text(errors="replace") if error_file.exists() else "",
        stderr=stderr.decode(errors="replace"),
        elapsed=elapsed,
    )


@pytest.fixture
def free_port_factory() -> Callable[..., int]:
    """``free_port(host="127.0.0.1", udp=True) -> int``."""
    return free_port


@pytest.fixture
def sipp(tmp_path: Path) -> Callable[..., Awaitable[SippResult]]:
    """``await sipp(scenario, "127.0.0.1:PORT", transport="t1", calls=50, ...)``; see run_sipp."""

    def runner(scenario: str, remote: str, **kwargs: object) -> Awaitable[SippResult]:
        return run_sipp(scenario, remote, workdir=tmp_path, **kwargs)  # type: ignore[arg-type]

    return runner


class FakeDns(asyncio.DatagramProtocol):
    """A tiny authoritative DNS server on loopback for tests.

    ``records[(name, type)] = (ttl, [rdata text...])``; names in ``silent`` get no answer at all
    (a dead resolver); anything else is NXDOMAIN. ``queries`` lists what was asked.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.silent: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.queried = asyncio.Event()  # set on every query
        self.transport: asyncio.DatagramTransport | None = None
        self.address: tuple[str, int] = ("", 0)

    def add(self, name: str, rdtype: str, *rdata: str, ttl: int = 300) -> None:
        self.records[(name.lower().rstrip("."), rdtype)] = (ttl, list(rdata))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        import dns.message
        import dns.rcode
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        self.queried.set()
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        found = self.records.get((name, rdtype))
        if found is not None:
            ttl, rdata = found
            response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *rdata))
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def fake_dns() -> AsyncIterator[FakeDns]:
    """A FakeDns listening on 127.0.0.53 (a free port); ``fake_dns.address`` is (ip, port)."""
    loop = asyncio.get_running_loop()
    server = FakeDns()
    host = "127.0.0.53"
    transport, _ = await loop.create_datagram_endpoint(
        lambda: server, local_addr=(host, free_port(host))
    )
    server.address = transport.get_extra_info("sockname")[:2]
    try:
        yield server
    finally:
        transport.close()
