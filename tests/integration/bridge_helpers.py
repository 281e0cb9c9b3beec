"""The bridge end to end, shared by the SIPp tests of calls and transfers: a real sbc
(:class:`~sbc.ops.service.Service`, in this process) between SIPp "3CX" and SIPp "Retell".

Each test starts its own sbc on 127.0.0.22, SIPp "3CX" (registrar and caller, UDP) on
127.0.0.21 and SIPp "Retell" (TCP) on 127.0.0.23, so that the Retell side can check by address
that nothing of the PBX leg reached it. Imported by bare name (``from bridge_helpers import
running_bridge``), as pytest puts this folder on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from peers import free_port
from sipp_helpers import Sipp, SippResult, start_sipp

from sbc.b2bua.calls import CallManager
from sbc.demo.pbx import PbxCall, PbxStandIn
from sbc.demo.retell import RetellCall, RetellStandIn
from sbc.media.relay import RelayBackend
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    PbxSettings,
    RecordsSettings,
    RetellSettings,
    SecuritySettings,
    Settings,
    SipSettings,
    TransferSettings,
)

__all__ = [
    "EXTENSION",
    "HEADERS",
    "PBX",
    "RETELL",
    "RETELL_NUMBER",
    "SBC",
    "STRANGER",
    "Bridge",
    "StandIns",
    "assert_both_ends",
    "connected_call",
    "demo_pbx",
    "final_statuses",
    "hang_up",
    "pbx_call",
    "pbx_stand_in",
    "quick_sip",
    "retell",
    "running_bridge",
]

PBX = "127.0.0.21"
SBC = "127.0.0.22"
RETELL = "127.0.0.23"
STRANGER = "127.0.0.24"
EXTENSION = "101"
RETELL_NUMBER = "+14155550100"

HEADERS = {
    "X-Caller-Number": "{caller_number}",
    "X-Caller-Name": "{caller_name}",
    "X-Called": "{called}",
    "X-PBX-Call-ID": "{pbx_call_id}",
    "X-Call-UUID": "{call_uuid}",
    "X-Started": "{now}",
    "X-PAI": "{header[P-Asserted-Identity]}",
    "X-Queue": "queue={header[X-3CX-Queue]}",
}

PASSTHROUGH = MediaSettings(mode="passthrough")


@dataclass
class Bridge:
    service: Service
    port: int
    retell_port: int
    registrar: Sipp  # SIPp "3CX" at pbx.host:pbx.port, where sbc's own calls to 3CX would go

    @property
    def calls(self) -> CallManager:
        return self.service.bridge

    async def settled(self, limit: float = 10.0) -> None:
        """Wait until the bridge holds no call (every call task has finished)."""
        async with asyncio.timeout(limit):
            await self.calls.wait_idle()

    def leftovers(self) -> dict[str, int]:
        """What the bridge still holds: calls, SIP transactions (client and server, in any
        state: the engine's transaction layer), RTP port pairs (relay mode; 0 otherwise)."""
        media = self.service.media
        return {
            "calls": self.calls.active,
            "transactions": len(self.service.engine.layer),
            "rtp_ports": media.pool.in_use if isinstance(media, RelayBackend) else 0,
        }

    async def drained(self, limit: float) -> None:
        """Wait until :meth:`leftovers` are all 0: calls finished, every transaction ended on
        its timers (Timer J, K, I, L: up to 64*T1 over UDP), ports back in the pool. Fails
        with what is left after ``limit`` seconds."""
        await self.settled(limit)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + limit
        while any(self.leftovers().values()):
            if loop.time() > give_up:
                raise AssertionError(f"left after {limit} s: {self.leftovers()}")
            await asyncio.sleep(0.05)  # transaction timers have no event to wait for


def quick_sip(bind: str) -> SipSettings:
    """sbc's SIP on ``bind`` (a free port), with the short timers the in-process tests use."""
    return SipSettings(bind=bind, port=free_port(bind), t1=0.25, t2=2.0)


def demo_pbx(host: str, extension: str, **extra: Any) -> PbxSettings:
    """The PBX stand-in's account on ``host`` (a free port), without keepalives; ``extra`` adds
    or overrides fields."""
    fields: dict[str, Any] = {
        "host": host,
        "port": free_port(host),
        "extension": extension,
        "auth_id": "demo1000",
        "password": "secret",
        "keepalive": "off",
    }
    return PbxSettings(**(fields | extra))


def pbx_stand_in(settings: Settings, port: int | None = None, **extra: Any) -> PbxStandIn:
    """The 3CX stand-in (registrar) for sbc's ``settings.pbx`` account, on its port or ``port``."""
    return PbxStandIn(
        settings.pbx.host,
        port or settings.pbx.port,
        extension=settings.pbx.extension,
        auth_id=settings.pbx.auth_id,
        password=settings.pbx.password.get_secret_value(),
        **extra,
    )


class StandIns(Protocol):
    """A test rig with both stand-ins running."""

    pbx: PbxStandIn
    retell: RetellStandIn


async def connected_call(
    rig: StandIns, frames: list[bytes] | None = None
) -> tuple[PbxCall, RetellCall]:
    """3CX calls the extension; returns once both legs are up and Retell was ACKed."""
    async with asyncio.timeout(10):
        call = await rig.pbx.call(frames=frames)
    assert call.final is not None and call.final.status == 200, call.statuses
    retell_call = rig.retell.calls[next(reversed(rig.retell.calls))]
    async with asyncio.timeout(5):
        await retell_call.acked.wait()
    return call, retell_call


async def hang_up(rig: StandIns, call: PbxCall, retell_call: RetellCall) -> None:
    """3CX hangs up; Retell gets the BYE."""
    async with asyncio.timeout(10):
        assert await rig.pbx.hang_up(call) == 200
        await retell_call.ended.wait()
    assert retell_call.bye_received


@contextlib.asynccontextmanager
async def running_bridge(
    workdir: Path,
    *,
    answer_timeout: float = 30.0,
    retell_port: int | None = None,
    max_concurrent: int = 100,
    max_duration: float = 7200.0,
    media: MediaSettings = PASSTHROUGH,
    transfer: TransferSettings | None = None,
    retell_auth: tuple[str, str] | None = None,
    timers: tuple[float, float, float] = (0.25, 2.0, 5.0),
    records: RecordsSettings | None = None,
    security: SecuritySettings | None = None,
    retell_transport: str = "tcp",
    retell_udp_port: int | None = None,
) -> AsyncIterator[Bridge]:
    """SIPp registrar for 3CX, then sbc registered with it; both stopped at the end.

    ``timers`` are sip.t1, t2 and t4; ``retell_auth`` retell.auth_username and auth_password;
    ``records`` the call records' settings (default: calls.sqlite3 in ``workdir``);
    ``security`` the edge guard's (default: untrusted sources dropped unanswered);
    ``retell_transport`` and ``retell_udp_port`` retell.transport and retell.local_udp_port.
    """
    registrar_port = free_port(PBX)
    registrar = await start_sipp(
        "pbx_registrar.xml", workdir=workdir, local_ip=PBX, port=registrar_port, time_limit=600
    )
    port = free_port(SBC)
    retell_port = retell_port or free_port(RETELL)
    t1, t2, t4 = timers
    auth_username, auth_password = retell_auth or (None, None)
    settings = Settings(
        sip=SipSettings(bind=SBC, port=port, t1=t1, t2=t2, t4=t4),
        pbx=PbxSettings(
            host=PBX,
            port=registrar_port,
            extension=EXTENSION,
            auth_id="6001auth",
            password="secret",  # type: ignore[arg-type]
            trusted=(f"{PBX}/32",),  # type: ignore[arg-type]
            keepalive="off",
        ),
        retell=RetellSettings(
            host=RETELL,
            port=retell_port,
            transport=retell_transport,  # type: ignore[arg-type]
            local_udp_port=retell_udp_port,
            number=RETELL_NUMBER,
            answer_timeout=answer_timeout,
            auth_username=auth_username,
            auth_password=auth_password,  # type: ignore[arg-type]
        ),
        headers=HEADERS,
        calls=CallsSettings(
            country_code="44",
            national_prefix="0",
            international_prefix="00",
            passthrough_x_headers=("X-Customer-*",),
            max_concurrent=max_concurrent,
            max_duration=max_duration,
        ),
        media=media,
        transfer=transfer or TransferSettings(),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC)}"),
        records=records or RecordsSettings(path=str(workdir / "calls.sqlite3")),
        security=security or SecuritySettings(),
    )
    service = Service(settings)
    try:
        await service.start()
        async with asyncio.timeout(10):
            await service.registration.wait_registered()
        yield Bridge(service, port, retell_port, registrar)
    finally:
        await service.stop()
        await registrar.stop()


async def pbx_call(
    workdir: Path,
    bridge: Bridge,
    scenario: str,
    *,
    calls: int = 1,
    extra: Sequence[str] = (),
    local_ip: str = PBX,
    extension: str = EXTENSION,
) -> Sipp:
    return await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=local_ip,
        remote=f"{SBC}:{bridge.port}",
        calls=calls,
        extra=("-s", extension, *extra),
    )


async def retell(
    workdir: Path,
    bridge: Bridge,
    scenario: str,
    *,
    calls: int = 1,
    extra: Sequence[str] = (),
    transport: str = "t1",
) -> Sipp:
    sipp = await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=RETELL,
        port=bridge.retell_port,
        transport=transport,
        calls=calls,
        extra=extra,
    )
    await sipp.wait_listening()
    return sipp


def final_statuses(messages: str) -> list[int]:
    """Statuses of the final responses a SIPp caller received (its message trace)."""
    found = re.findall(r"message received[^\n]*\n\n?SIP/2\.0 ([2-6][0-9][0-9]) [^\n]*\n", messages)
    return [int(s) for s in found]


def assert_both_ends(name: str, result: SippResult, sipp: Sipp, calls: int) -> None:
    code, stats = result.returncode, result.stats
    ok, failed = result.successful, result.failed
    assert (code, ok, failed) == (0, calls, 0), f"{name}: {stats}\n{sipp.errors()}"
