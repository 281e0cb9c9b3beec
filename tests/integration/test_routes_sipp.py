"""Two routes in one sbc against SIPp (issue 13, "Two routes ..."): extensions 1001 and 1002,
each with its own Authentication ID and password, bridged to Retell numbers A and B with
headers of their own.

SIPp "3CX" is one registrar for both extensions (``registrar_routes.xml``: it verifies each
REGISTER against both extensions' credentials and logs the verdicts) and, from the same
address, the caller (``pbx_caller.xml`` with ``-s EXTENSION``); SIPp "Retell" answers any
number (``retell_uas_any.xml``) and its message trace shows which number and which X- headers
each call brought. Readiness is read as an operator would: ``GET /readyz`` and
``/readyz?route=NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from peers import free_port
from sipp_helpers import Sipp, start_sipp

from sbc.b2bua.messages import uri_user
from sbc.ops.service import Service
from sbc.ops.settings import Settings
from sbc.sip.message import Request

pytestmark = pytest.mark.integration

PBX = "127.0.0.131"
SBC = "127.0.0.132"
RETELL = "127.0.0.133"
NUMBER_A = "+14155550101"
NUMBER_B = "+14155550102"
CREDENTIALS = {"user1": "auth-1001", "pass1": "pw-1001", "user2": "auth-1002", "pass2": "pw-1002"}


def settings(registrar: Sipp, retell_port: int, workdir: Path, password_2: str) -> Settings:
    data: dict[str, Any] = {
        "sip": {"bind": SBC, "port": free_port(SBC), "t1": 0.25, "t2": 2.0, "t4": 5.0},
        "pbx": {
            "host": PBX,
            "port": registrar.port,
            "trusted": [f"{PBX}/32"],
            "keepalive": "off",
            "register_backoff_base": 1.0,
            "register_backoff_max": 2.0,
        },
        "retell": {"host": RETELL, "port": retell_port, "transport": "tcp"},
        "headers": {"X-Called": "{called}", "X-Route": "top-level"},
        "media": {"mode": "passthrough"},
        "admin": {"listen": f"{SBC}:{free_port(SBC, udp=False)}"},
        "records": {"path": str(workdir / "calls.sqlite3")},
        "routes": [
            {
                "name": "sales",
                "extension": "1001",
                "auth_id": CREDENTIALS["user1"],
                "password": CREDENTIALS["pass1"],
                "number": NUMBER_A,
                "headers": {"X-Route": "sales", "X-Called": "{called}"},
            },
            {
                "name": "support",
                "extension": "1002",
                "auth_id": CREDENTIALS["user2"],
                "password": password_2,
                "number": NUMBER_B,
                "headers": {"X-Route": "support", "X-Line": "second"},
            },
        ],
    }
    return Settings(**data)


@contextlib.asynccontextmanager
async def running(workdir: Path, *, password_2: str) -> AsyncIterator[tuple[Service, Sipp, int]]:
    registrar = await start_sipp(
        "registrar_routes.xml",
        workdir=workdir,
        local_ip=PBX,
        port=free_port(PBX),
        calls=50,
        time_limit=120,
        keys=CREDENTIALS,
    )
    await registrar.wait_listening()
    retell_port = free_port(RETELL)
    service = Service(settings(registrar, retell_port, workdir, password_2))
    try:
        await service.start()
        yield service, registrar, retell_port
    finally:
        await service.stop()
        await registrar.stop()


async def readyz(service: Service, query: str = "") -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{service.settings.admin.listen}/readyz{query}") as response,
    ):
        return response.status, await response.text()


async def metrics(service: Service) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{service.settings.admin.listen}/metrics") as response,
    ):
        return await response.text()


async def call(workdir: Path, service: Service, retell_port: int, extension: str) -> list[Request]:
    """One call from 3CX to ``extension``, answered by SIPp "Retell"; the INVITEs Retell got."""
    far = await start_sipp(
        "retell_uas_any.xml",
        workdir=workdir / extension,
        local_ip=RETELL,
        port=retell_port,
        transport="t1",
        time_limit=30,
    )
    await far.wait_listening()
    near = await start_sipp(
        "pbx_caller.xml",
        workdir=workdir / extension,
        local_ip=PBX,
        remote=f"{SBC}:{service.settings.sip.port}",
        time_limit=30,
        extra=("-s", extension, "-d", "200"),
    )
    for name, sipp in (("3CX", near), ("Retell", far)):
        result = await sipp.finish(40)
        assert (result.returncode, result.successful, result.failed) == (0, 1, 0), (
            f"{name} ({extension}): {result.stats}\n{sipp.errors()}"
        )
    return [
        m.request
        for m in far.traced()
        if m.received and isinstance(m.message, Request) and m.message.method == "INVITE"
    ]


async def settled(service: Service) -> None:
    async with asyncio.timeout(10):
        await service.bridge.wait_idle()
        await service.bridge.events.flush()


def verdicts(registrar: Sipp) -> list[tuple[str, str, str]]:
    """(AOR user, valid1, valid2) of every REGISTER the registrar logged."""
    found = []
    for line in registrar.log_lines():
        match = re.search(r"aor=sip:([^@]*)@ .*valid1=(\w+) valid2=(\w+)", line)
        if match:
            found.append((match[1], match[2], match[3]))
    return found


async def two_calls(tmp_path: Path, service: Service, port: int) -> tuple[Request, Request, str]:
    """Both routes registered, ready; one call to each extension: Retell's two INVITEs and
    the metrics after them."""
    async with asyncio.timeout(10):
        for registration in service.registrations.values():
            await registration.wait_registered()
    assert (await readyz(service))[0] == 200
    assert await readyz(service, "?route=support") == (200, "route support registered: ok\n")
    # Each route registered on its own: its own Call-ID and AOR.
    aors = {r.core.call_id: str(r.config.aor) for r in service.registrations.values()}
    assert len(aors) == 2 and {a.split("@")[0] for a in aors.values()} == {
        "sip:1001",
        "sip:1002",
    }
    (invite_a,) = await call(tmp_path, service, port, "1001")
    (invite_b,) = await call(tmp_path, service, port, "1002")
    await settled(service)
    exposition = await metrics(service)
    return invite_a, invite_b, exposition


async def test_two_routes_register_and_each_call_reaches_its_number_with_its_headers(
    tmp_path: Path,
) -> None:
    for extension in ("1001", "1002"):
        (tmp_path / extension).mkdir()
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, password_2=CREDENTIALS["pass2"]) as running_parts:
            service, registrar, port = running_parts
            invite_a, invite_b, exposition = await two_calls(tmp_path, service, port)
    # Call to 1001: number A, route 1's headers; to 1002: number B, route 2's (no fallback).
    assert uri_user(invite_a.uri) == NUMBER_A and uri_user(invite_a.to.uri) == NUMBER_A
    assert invite_a.headers.get("X-Route") == "sales"
    assert invite_a.headers.get("X-Called") == "1001"
    assert invite_a.headers.get("X-Line") is None
    assert uri_user(invite_b.uri) == NUMBER_B and uri_user(invite_b.to.uri) == NUMBER_B
    assert invite_b.headers.get("X-Route") == "support"
    assert invite_b.headers.get("X-Line") == "second"
    assert invite_b.headers.get("X-Called") is None
    # The registrar granted each extension with its own credentials, never the other's.
    granted = {(aor, v1, v2) for aor, v1, v2 in verdicts(registrar) if "true" in (v1, v2)}
    assert ("1001", "true", "false") in granted and ("1002", "false", "true") in granted
    assert all((aor == "1001") == (v1 == "true") for aor, v1, _ in granted)
    # Call records and metrics carry the route.
    records = {r.called: r for r in service.bridge.records}
    assert (records["1001"].route, records["1001"].retell_number) == ("sales", NUMBER_A)
    assert (records["1002"].route, records["1002"].retell_number) == ("support", NUMBER_B)
    assert 'sbc_route_calls_started_total{route="sales"} 1.0' in exposition
    assert 'sbc_route_calls_started_total{route="support"} 1.0' in exposition
    assert 'sbc_route_calls_active{route="sales"} 0.0' in exposition
    assert 'sbc_route_registered{route="support"} 1.0' in exposition
    assert "sbc_registered 1.0" in exposition
    # Log lines name the route: the calls' and each registration's.
    answered = {e["route"]: e for e in logs if e["event"] == "call_answered"}
    assert set(answered) == {"sales", "support"}
    registered = {e["route"] for e in logs if e["event"] == "registered"}
    assert registered == {"sales", "support"}


async def test_wrong_credentials_on_route_2_leave_route_1_working(tmp_path: Path) -> None:
    (tmp_path / "1001").mkdir()
    async with running(tmp_path, password_2="wrong-password") as (service, registrar, port):
        sales, support = service.registrations["sales"], service.registrations["support"]
        async with asyncio.timeout(10):
            await sales.wait_registered()
            await support.wait_settled()  # its first attempt failed (401 after the answer)
        assert not support.registered
        assert (await readyz(service))[0] == 503
        assert (await readyz(service, "?route=sales"))[0] == 200
        assert await readyz(service, "?route=support") == (
            503,
            "route support registered: failing\n",
        )
        assert (await readyz(service, "?route=nope"))[0] == 404
        (invite_a,) = await call(tmp_path, service, port, "1001")
        await settled(service)
        # Route 2 kept retrying on its own backoff meanwhile, and still failed.
        assert not support.registered and sales.registered
        exposition = await metrics(service)
    assert uri_user(invite_a.uri) == NUMBER_A
    assert invite_a.headers.get("X-Route") == "sales"
    (record,) = service.bridge.records
    assert (record.route, record.pbx_status, record.retell_status) == ("sales", 200, 200)
    assert 'sbc_route_registered{route="sales"} 1.0' in exposition
    assert 'sbc_route_registered{route="support"} 0.0' in exposition
    assert re.search(
        r'sbc_route_register_failures_total\{reason="401",route="support"\} [1-9]', exposition
    ) or re.search(
        r'sbc_route_register_failures_total\{route="support",reason="401"\} [1-9]', exposition
    )
    assert "sbc_registered 0.0" in exposition
    # Route 2's REGISTERs never verified (with either extension's credentials).
    support_verdicts = [v for v in verdicts(registrar) if v[0] == "1002"]
    assert support_verdicts and all(v[1:] == ("false", "false") for v in support_verdicts)
