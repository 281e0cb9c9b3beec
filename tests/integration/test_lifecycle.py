"""A real ``python -m sbc run`` process through its life: systemd's notify protocol, SIGTERM with
calls in progress (drain), SIGHUP (reload), and what it logs about registration (issues 10, 14).

SIPp plays 3CX (registrar and callers, 127.0.0.21) and Retell (TCP, 127.0.0.23) as in
``bridge_helpers``; sbc listens on 127.0.0.22, so the Retell scenarios' address checks hold.
What sbc did is read back from its JSON log lines and from what SIPp traced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from bridge_helpers import HEADERS, final_statuses, pbx_call, running_bridge
from peers import free_port, require_binary
from sbc_process import REPO, running_sbc_process
from sipp_helpers import Sipp, sipp_server, start_sipp

from sbc.ops.records import connect_readonly, list_calls
from sbc.sip.message import Request, Response

pytestmark = pytest.mark.integration

PBX = "127.0.0.21"
SBC = "127.0.0.22"
RETELL = "127.0.0.23"
SILENT_PBX = "127.0.0.41"  # nothing answers there
EXTENSION = "101"


def values(
    registrar_port: int,
    retell_port: int,
    *,
    sbc_port: int | None = None,
    version: str = "v1",
    drain_timeout: float = 30.0,
    level: str = "info",
) -> dict[str, dict[str, Any]]:
    """Settings of a bridge between the SIPp stand-ins (as bridge_helpers.running_bridge)."""
    return {
        "sip": {"bind": SBC, "port": sbc_port or free_port(SBC), "t1": 0.25, "t2": 2.0},
        "pbx": {
            "host": PBX,
            "port": registrar_port,
            "extension": EXTENSION,
            "auth_id": "6001auth",
            "password": "secret",
            "trusted": [f"{PBX}/32"],
            "keepalive": "off",
        },
        "retell": {
            "host": RETELL,
            "port": retell_port,
            "transport": "tcp",
            "number": "+14155550100",
        },
        "headers": {**HEADERS, "X-Version": version},
        "calls": {
            "country_code": "44",
            "national_prefix": "0",
            "international_prefix": "00",
            "passthrough_x_headers": ["X-Customer-*"],
            "drain_timeout": drain_timeout,
        },
        "media": {"mode": "passthrough"},
        "admin": {"listen": f"{SBC}:{free_port(SBC, udp=False)}"},
        "log": {"level": level, "format": "json"},
    }


@contextlib.asynccontextmanager
async def registrar(workdir: Path) -> AsyncIterator[Sipp]:
    """SIPp as 3CX's registrar: every REGISTER (Expires: 0 too) answered 200."""
    sipp = await start_sipp(
        "pbx_registrar.xml", workdir=workdir, local_ip=PBX, port=free_port(PBX), time_limit=120
    )
    try:
        await sipp.wait_listening()
        yield sipp
    finally:
        await sipp.stop()


async def retell_side(workdir: Path, port: int, calls: int) -> Sipp:
    sipp = await start_sipp(
        "retell_uas.xml",
        workdir=workdir,
        local_ip=RETELL,
        port=port,
        transport="t1",
        calls=calls,
        time_limit=120,
    )
    await sipp.wait_listening()
    return sipp


async def caller(workdir: Path, sbc_port: int, scenario: str, *extra: str, calls: int = 1) -> Sipp:
    return await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=PBX,
        remote=f"{SBC}:{sbc_port}",
        calls=calls,
        time_limit=60,
        extra=("-s", EXTENSION, *extra),
    )


def invites(sipp: Sipp) -> list[Request]:
    return [
        m.request
        for m in sipp.traced()
        if m.received and isinstance(m.message, Request) and m.message.method == "INVITE"
    ]


def wall(line: dict[str, Any]) -> float:
    """A log line's timestamp as seconds since the epoch."""
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def assert_ok(name: str, sipp: Sipp, result: Any, calls: int) -> None:
    assert (result.returncode, result.successful, result.failed) == (0, calls, 0), (
        f"{name}: {result.stats}\n{sipp.errors()}"
    )


# -- systemd: the unit and the notify protocol -----------------------------------------------------


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart='s binary exists: it runs on a copy of
    the unit whose /opt/sbc/.venv/bin/sbc is this venv's sbc, and whose ExecStartPre/Reload
    are otherwise unchanged. The exposure level of ``security --offline`` is checked too."""
    analyze = require_binary("systemd-analyze")
    sbc_binary = Path(sys.executable).parent / "sbc"
    assert sbc_binary.exists(), sbc_binary
    unit = (REPO / "deploy" / "sbc.service").read_text()
    assert "/opt/sbc/.venv/bin/sbc" in unit
    copy = tmp_path / "sbc.service"
    copy.write_text(unit.replace("/opt/sbc/.venv/bin/sbc", str(sbc_binary)))
    verify = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr  # no "Invalid syntax, ignoring" either
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(copy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for sbc\.service: ([0-9.]+) (\w+)", security.stdout)
    assert found is not None, security.stdout + security.stderr
    level = float(found.group(1))
    print(f"systemd-analyze security --offline=true: {level} {found.group(2)}")
    assert level <= 2.0, security.stdout
    # The settings the issues ask for (and none they forbid).
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "CapabilityBoundingSet=\n",
        "MemoryDenyWriteExecute=true",
        "ProtectProc=invisible",
        "SystemCallFilter=@system-service",
        "LoadCredential=pbx_password:/etc/sbc/credentials/pbx_password",
        "StateDirectory=sbc",
    ):
        assert line in unit, line
    assert "\nAmbientCapabilities=" not in unit
    assert re.search(r"^ExecStartPre=.* check-config ", unit, re.MULTILINE)
    stop = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.MULTILINE).group(1))  # type: ignore[union-attr]
    assert stop >= 30 + 10  # [calls] drain_timeout's default + ending calls + unregister


class NotifySocket:
    """What systemd listens on for a Type=notify service: an AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []

    async def collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(at, fields) for at, fields in self.messages if key in fields]

    async def wait(self, key: str, limit: float, count: int = 1) -> float:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while len(self.with_key(key)) < count:
            if loop.time() > give_up:
                raise AssertionError(f"no {key} (x{count}) within {limit} s: {self.messages}")
            await asyncio.sleep(0.01)
        return self.with_key(key)[count - 1][0]


async def test_notify_ready_watchdog_stopping_under_memory_deny_write_execute(
    tmp_path: Path,
) -> None:
    """sbc run under a notify socket (and the kernel's W^X flag, PR_SET_MDWE): READY=1 once
    registered, WATCHDOG=1 every WATCHDOG_USEC/2, STOPPING=1 after SIGTERM, exit 0."""
    notify = NotifySocket(tmp_path / "notify.sock")
    collector = asyncio.create_task(notify.collect())
    try:
        async with registrar(tmp_path) as pbx:
            env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
            settings = values(pbx.port, free_port(RETELL))
            async with running_sbc_process(tmp_path, settings, env=env, mdwe=True) as sbc:
                ready_at = await notify.wait("READY", 15)
                registered = await sbc.wait_event("registered", 2)
                await notify.wait("WATCHDOG", 5, count=4)
                stop_at = sbc.signal(signal.SIGTERM)
                stopping_at = await notify.wait("STOPPING", 5)
                code = await sbc.wait_exit(5)
                exited_at = time.monotonic()
    finally:
        collector.cancel()
        notify.sock.close()
    assert code == 0, sbc.log_text()
    ready = notify.with_key("READY")[0][1]
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith(f"registered with {PBX}:{pbx.port}/udp as {EXTENSION}")
    assert wall(registered) <= time.time()
    pings = [at for at, _ in notify.with_key("WATCHDOG")]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Every 0.1 s (half of 0.2 s): never faster, and on time but for a loaded machine's jitter.
    assert min(gaps) >= 0.09 and statistics.median(gaps) <= 0.15, gaps
    assert stopping_at >= stop_at
    print(
        f"READY {ready_at - sbc.started:.2f} s after exec (registered), STOPPING "
        f"{(stopping_at - stop_at) * 1000:.0f} ms after SIGTERM, exit "
        f"{(exited_at - stop_at) * 1000:.0f} ms after SIGTERM; watchdog gaps "
        f"{min(gaps):.3f}-{max(gaps):.3f} s"
    )


# -- SIGTERM with calls in progress ------------------------------------------------------------


async def test_sigterm_drains_calls_refuses_new_ones_byes_the_rest_and_unregisters(
    tmp_path: Path,
) -> None:
    drain = 3.0
    async with registrar(tmp_path) as pbx:
        retell_port, sbc_port = free_port(RETELL), free_port(SBC)
        far = await retell_side(tmp_path, retell_port, calls=4)
        settings = values(pbx.port, retell_port, sbc_port=sbc_port, drain_timeout=drain)
        async with running_sbc_process(tmp_path, settings) as sbc:
            await sbc.wait_event("registered", 10)
            # Two calls whose caller hangs up 1.5 s after the answer (they end while draining)
            # and two that wait for sbc's BYE (they are still up at the drain timeout).
            short = await caller(tmp_path, sbc_port, "pbx_caller.xml", "-d", "1500", calls=2)
            long = await caller(tmp_path, sbc_port, "pbx_wait_bye.xml", calls=2)
            await sbc.wait_event("call_answered", 10, count=4)
            sent = time.time()
            sbc.signal(signal.SIGTERM)
            await sbc.wait_event("draining", 3)
            late = await caller(tmp_path, sbc_port, "pbx_rejected.xml")
            late_result = await late.finish(10)
            code = await sbc.wait_exit(drain + 10)
            exited = time.time()
        short_result, long_result = await short.finish(10), await long.finish(10)
        far_result = await far.finish(10)
    assert code == 0, sbc.log_text()
    assert_ok("short calls", short, short_result, 2)
    assert_ok("long calls", long, long_result, 2)
    assert_ok("Retell", far, far_result, 4)
    # The new INVITE: 503 with Retry-After (RFC 3261 §21.5.4).
    assert late_result.returncode == 0, late.errors()
    assert final_statuses(late.messages()) == [503]
    (refusal,) = [
        m.message
        for m in late.traced()
        if m.received and isinstance(m.message, Response) and m.message.status == 503
    ]
    assert refusal.headers.get("Retry-After") == "30"
    # The short calls ended by themselves while draining, the long ones at the drain timeout.
    ended = sbc.events("call_ended")
    assert sorted(line["reason"] for line in ended) == [
        "pbx_bye",
        "pbx_bye",
        "shutdown",
        "shutdown",
    ]
    for line in ended:
        after = wall(line) - sent
        if line["reason"] == "pbx_bye":
            assert after < drain, line
        else:
            assert drain - 0.2 <= after <= drain + 1.5, (after, line)
    drained = sbc.events("drain_timeout")
    assert len(drained) == 1 and drained[0]["calls"] == 2
    # Every call has its record, flushed before the exit (the records are in the state dir).
    with contextlib.closing(connect_readonly(tmp_path / "calls.sqlite3")) as db:
        rows = {row["call_uuid"]: row["end_reason"] for row in list_calls(db)}
    assert rows == {line["call_uuid"]: line["reason"] for line in ended}
    # Then the registration was removed, and the process exited 0.
    last = pbx.registers()[-1].request
    assert last.headers.get("Expires") == "0"
    bye_times = [wall(line) - sent for line in ended if line["reason"] == "shutdown"]
    print(
        f"drain_timeout {drain} s: BYE'd calls ended {min(bye_times):.2f}-{max(bye_times):.2f} s "
        f"after SIGTERM, exit 0 after {exited - sent:.2f} s"
    )


# -- SIGHUP ----------------------------------------------------------------------------------------


async def test_sighup_reloads_header_templates_for_new_calls_only(tmp_path: Path) -> None:
    async with registrar(tmp_path) as pbx:
        retell_port, sbc_port = free_port(RETELL), free_port(SBC)
        far = await retell_side(tmp_path, retell_port, calls=3)
        settings = values(pbx.port, retell_port, sbc_port=sbc_port)
        async with running_sbc_process(tmp_path, settings) as sbc:
            await sbc.wait_event("registered", 10)
            first = await caller(tmp_path, sbc_port, "pbx_caller.xml", "-d", "4000")
            await sbc.wait_event("call_answered", 10)
            # v2 while the first call is up.
            sbc.rewrite({**settings, "headers": {**HEADERS, "X-Version": "v2"}})
            sbc.signal(signal.SIGHUP)
            reloaded = await sbc.wait_event("config_reloaded", 5)
            second = await caller(tmp_path, sbc_port, "pbx_caller.xml", "-d", "200")
            second_result = await second.finish(20)
            # A file that fails validation: refused, v2 stays.
            broken = {**settings, "headers": {**HEADERS, "X-Version": "{nope}"}}
            sbc.rewrite(broken)
            sbc.signal(signal.SIGHUP)
            refused = await sbc.wait_event("config_reload_refused", 5)
            third = await caller(tmp_path, sbc_port, "pbx_caller.xml", "-d", "200")
            third_result = await third.finish(20)
            # A change that cannot apply live is named, not applied.
            moved = {**settings, "headers": {**HEADERS, "X-Version": "v2"}}
            moved["sip"] = {**settings["sip"], "t1": 0.5}
            sbc.rewrite(moved)
            sbc.signal(signal.SIGHUP)
            frozen = await sbc.wait_event("config_reloaded", 5, count=2)
            first_result = await first.finish(20)
            sbc.signal(signal.SIGTERM)
            assert await sbc.wait_exit(10) == 0
        far_result = await far.finish(10)
    assert_ok("first call", first, first_result, 1)
    assert_ok("second call", second, second_result, 1)
    assert_ok("third call", third, third_result, 1)
    assert_ok("Retell", far, far_result, 3)
    assert reloaded["applied"] == ["headers.X-Version"] and "not_applied" not in reloaded
    assert reloaded["level"] == "info"
    (problem,) = refused["problems"]
    assert problem.startswith("headers.X-Version: unknown variable {nope}"), problem
    assert frozen["applied"] == [] and frozen["not_applied"] == ["sip.t1"]
    assert frozen["level"] == "warning"
    # The call in progress at the reload kept its INVITE (no re-INVITE to Retell), the next
    # call got v2, and after the refused file still v2.
    versions = [invite.headers.get("X-Version") for invite in invites(far)]
    assert versions == ["v1", "v2", "v2"]


# -- what registration logs (issue 14) -----------------------------------------------------------


class SilentRegistrar(asyncio.DatagramProtocol):
    """A UDP address that receives REGISTERs and never answers."""

    def __init__(self) -> None:
        self.received: list[tuple[float, bytes]] = []

        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((time.monotonic(), data))
        self.arrived.set()


def silent_values(port: int, transport: str = "udp") -> dict[str, dict[str, Any]]:
    settings = values(port, free_port(RETELL))
    settings["pbx"] = {**settings["pbx"], "host": SILENT_PBX, "transport": transport}
    settings["pbx"]["trusted"] = [f"{SILENT_PBX}/32"]
    return settings


async def test_register_attempt_logged_at_once_and_sigterm_unregistered_is_quick(
    tmp_path: Path,
) -> None:
    loop = asyncio.get_running_loop()
    transport, silent = await loop.create_datagram_endpoint(
        SilentRegistrar, local_addr=(SILENT_PBX, free_port(SILENT_PBX))
    )
    port = transport.get_extra_info("sockname")[1]
    try:
        async with running_sbc_process(tmp_path, silent_values(port)) as sbc:
            attempt = await sbc.wait_event("register_attempt", 5)
            starting = sbc.events("sbc_starting")[0]
            await asyncio.wait_for(silent.arrived.wait(), 5)
            sent = sbc.signal(signal.SIGTERM)
            code = await sbc.wait_exit(5)
            took = time.monotonic() - sent
            await asyncio.sleep(0.3)  # anything sent at the very end arrives by now
    finally:
        transport.close()
    assert code == 0, sbc.log_text()
    assert attempt["level"] == "info"
    assert attempt["target"] == f"sip:{SILENT_PBX}:{port}"
    assert (attempt["transport"], attempt["expires"], attempt["attempt"]) == ("udp", "300", 1)
    logged_after = wall(attempt) - wall(starting)
    assert logged_after < 1.0
    assert took < 1.0, took
    # One REGISTER (the attempt), retransmissions of it, and no unregistration.
    registers = [data for _, data in silent.received if data.startswith(b"REGISTER ")]
    assert registers and all(b"\r\nExpires: 300\r\n" in data for data in registers)
    assert len({re.search(rb"CSeq: (\d+)", d).group(1) for d in registers}) == 1  # type: ignore[union-attr]
    assert not sbc.events("unregister_unanswered") and not sbc.events("unregistering")
    print(
        f"register_attempt logged {logged_after * 1000:.0f} ms after sbc_starting; SIGTERM with "
        f"nothing registered: exit 0 after {took * 1000:.0f} ms"
    )


async def test_refused_tcp_registration_reports_the_os_error_not_a_status(tmp_path: Path) -> None:
    port = free_port(SILENT_PBX)  # nothing listens: the TCP connect is refused
    async with running_sbc_process(tmp_path, silent_values(port, "tcp")) as sbc:
        attempt = await sbc.wait_event("register_attempt", 5)
        failed = await sbc.wait_event("registration_failed", 5)
        sbc.signal(signal.SIGTERM)
        assert await sbc.wait_exit(5) == 0
    assert attempt["transport"] == "tcp"
    assert failed["level"] == "warning"
    assert failed["cause"] == "transport_error"
    assert "status" not in failed
    assert "Connect call failed" in failed["transport_error"] or "refused" in (
        failed["transport_error"].lower()
    ), failed
    assert "111" in failed["transport_error"] or "refused" in failed["transport_error"].lower()


async def test_each_challenge_is_logged_at_debug(tmp_path: Path) -> None:
    async with sipp_server(
        "registrar_401.xml",
        workdir=tmp_path,
        host=PBX,
        keys={"user": "6001auth", "pass": "secret"},
    ) as pbx:
        settings = values(pbx.port, free_port(RETELL), level="debug")
        async with running_sbc_process(tmp_path, settings) as sbc:
            await sbc.wait_event("registered", 10)
            challenged = sbc.events("register_challenged")
            answering = sbc.events("register_answering_challenge")
            attempts = sbc.events("register_attempt")
            sbc.signal(signal.SIGTERM)
            assert await sbc.wait_exit(5) == 0
    assert [line["status"] for line in challenged] == [401]
    assert challenged[0]["level"] == "debug" and answering[0]["level"] == "debug"
    assert len(attempts) == 1  # the answer to the challenge is part of the same attempt
    assert sbc.events("unregistering")  # registered: the binding is removed at the end


# -- Retell unreachable: one warning per outage ---------------------------------------------------


async def test_retell_unreachable_is_one_warning_per_outage_with_a_count(tmp_path: Path) -> None:
    closed_port = free_port(RETELL)  # nothing listens: every INVITE's TCP connect is refused
    with structlog.testing.capture_logs() as logs:
        async with running_bridge(tmp_path, retell_port=closed_port) as bridge:
            for _ in range(3):
                near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
                await near.finish(20)
                assert final_statuses(near.messages()) == [503]
            # Retell is back (and refuses the call): the outage is over.
            back = await start_sipp(
                "retell_reject_486.xml",
                workdir=tmp_path,
                local_ip=RETELL,
                port=closed_port,
                transport="t1",
            )
            await back.wait_listening()
            near = await pbx_call(tmp_path, bridge, "pbx_rejected.xml")
            await near.finish(20)
            await back.finish(20)
            await bridge.settled()
    unreachable = [e for e in logs if e["event"] == "retell_unreachable"]
    again = [e for e in logs if e["event"] == "retell_reachable_again"]
    assert len(unreachable) == 1, unreachable
    assert unreachable[0]["log_level"] == "warning"
    assert "Connect call failed" in unreachable[0]["error"] or "refused" in unreachable[0]["error"]
    assert len(again) == 1 and again[0]["calls_refused"] == 3
    assert again[0]["log_level"] == "warning"
