"""Calls Retell sends to sbc, end to end: SIPp as Retell (over TCP) calls the termination URI,
SIPp as 3CX (UDP; registrar of the extension and the PBX that sbc's calls reach) answers.

Each test starts its own sbc (the app's :class:`~sbc.ops.service.Service`, in this process, relay
media) on 127.0.0.22, SIPp "3CX" on 127.0.0.21 and SIPp "Retell" on 127.0.0.23 (trusted as
Retell's address, with trunk credentials set); 127.0.0.24 is a stranger. The scenarios in
``sip-fixtures/sipp`` check the messages on the wire; the tests check SIPp's exit status and call
counts, what sbc answered, and that a refused call left nothing behind: no call, no call record,
no INVITE to the PBX, no RTP port, no transaction pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import free_port
from sipp_helpers import Sipp, SippResult, start_sipp

from sbc.b2bua.calls import CallManager
from sbc.media.relay import RelayBackend
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    PbxSettings,
    RetellSettings,
    SecuritySettings,
    Settings,
    SipSettings,
    TransferSettings,
)
from sbc.sip.message import Request, Response
from sbc.sip.server_transaction import ServerState

pytestmark = pytest.mark.integration

PBX = "127.0.0.21"
SBC = "127.0.0.22"
RETELL = "127.0.0.23"
STRANGER = "127.0.0.24"
EXTENSION = "101"
RETELL_NUMBER = "+14155550100"
TRUNK_USER = "retell-trunk"
TRUNK_PASSWORD = "pa55word"


@dataclass
class Bridge:
    service: Service
    port: int
    pbx: Sipp
    pbx_result: SippResult | None = None  # 3CX's SIPp, once stopped after sbc

    @property
    def calls(self) -> CallManager:
        return self.service.bridge

    @property
    def ports_in_use(self) -> int:
        media = self.calls.media
        assert isinstance(media, RelayBackend)
        return int(media.pool.in_use)

    async def settled(self, limit: float = 10.0) -> None:
        """Until the bridge holds no call (every call task has finished)."""
        async with asyncio.timeout(limit):
            await self.calls.wait_idle()

    async def assert_nothing_left(self, limit: float = 10.0) -> None:
        """No call, no RTP port, no request of sbc's without its final response, no INVITE
        received without one, and no INVITE server transaction waiting for the ACK of a
        failure (over TCP each ends with its ACK; one still waiting would mean the ACK was not
        matched). An INVITE answered 2xx keeps its transaction a while (RFC 6026 "Accepted",
        absorbing copies); that is not pending."""
        await self.settled(limit)
        engine = self.service.engine
        assert self.calls.active == 0
        assert self.ports_in_use == 0
        assert not engine._pending, engine._pending
        assert all(incoming.final_sent for incoming in engine._incoming.values())
        async with asyncio.timeout(limit):
            while pending_invites(self):  # noqa: ASYNC110 (no event for it: polled)
                await asyncio.sleep(0.05)


PENDING = (ServerState.TRYING, ServerState.PROCEEDING, ServerState.COMPLETED)


def pending_invites(bridge: Bridge) -> list[str]:
    """INVITE server transactions without a final response or waiting for a failure's ACK."""
    layer = bridge.service.engine.layer
    return [
        key
        for key in list(layer._servers)
        if key.endswith("|INVITE") and layer.server_state(key) in PENDING
    ]


@contextlib.asynccontextmanager
async def running_bridge(
    workdir: Path, security: SecuritySettings | None = None
) -> AsyncIterator[Bridge]:
    """3CX's SIPp (registrar and callee), then sbc registered with it; at the end sbc stops
    first (its unregistration is answered), then 3CX's SIPp, whose result is kept."""
    pbx_port = free_port(PBX)
    pbx = await start_sipp(
        "pbx_registrar_callee.xml",
        workdir=workdir,
        local_ip=PBX,
        port=pbx_port,
        calls=10,
        time_limit=600,
    )
    port = free_port(SBC)
    rtp_min = free_port(SBC) & ~1
    settings = Settings(
        sip=SipSettings(bind=SBC, port=port, t1=0.25, t2=2.0),
        pbx=PbxSettings(
            host=PBX,
            port=pbx_port,
            extension=EXTENSION,
            auth_id="6001auth",
            password="secret",  # type: ignore[arg-type]
            trusted=(f"{PBX}/32",),  # type: ignore[arg-type]
            keepalive="off",
        ),
        retell=RetellSettings(
            host=RETELL,
            port=free_port(RETELL),
            transport="tcp",
            number=RETELL_NUMBER,
            trusted=(f"{RETELL}/32",),  # type: ignore[arg-type]
            auth_username=TRUNK_USER,
            auth_password=TRUNK_PASSWORD,  # type: ignore[arg-type]
        ),
        calls=CallsSettings(country_code="44", national_prefix="0", international_prefix="00"),
        media=MediaSettings(mode="relay", rtp_port_min=rtp_min, rtp_port_max=rtp_min + 19),
        transfer=TransferSettings(targets={"sales": "800"}),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
        security=security or SecuritySettings(),
    )
    service = Service(settings)
    bridge = Bridge(service, port, pbx)
    try:
        await pbx.wait_listening()
        await service.start()
        async with asyncio.timeout(10):
            await service.registration.wait_registered()
        yield bridge
    finally:
        await service.stop()
        await pbx.stop()
        bridge.pbx_result = await pbx.finish(5)


async def retell_call(
    workdir: Path,
    bridge: Bridge,
    scenario: str,
    *,
    target: str = "sales",
    password: str = TRUNK_PASSWORD,
    local_ip: str = RETELL,
    pause_ms: int = 500,
) -> tuple[SippResult, str]:
    """SIPp as Retell calls ``target`` at sbc over TCP: its result once it has exited, and its
    message trace."""
    sipp = await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=local_ip,
        remote=f"{SBC}:{bridge.port}",
        transport="t1",
        time_limit=30,
        extra=(
            *("-s", target, "-au", TRUNK_USER, "-ap", password, "-d", str(pause_ms)),
            # Retell's LiveKit stack hashes the To URI as digest-uri (docs/peers.md).
            *("-auth_uri", f"{target}@{SBC}"),
        ),
    )
    return await sipp.finish(40), sipp.messages()


def is_invite(message: Request | Response) -> bool:
    return isinstance(message, Request) and message.method == "INVITE"


def final_statuses(messages: str) -> list[int]:
    """Statuses of the final responses a SIPp caller received (its message trace)."""
    found = re.findall(r"message received[^\n]*\n\n?SIP/2\.0 ([2-6][0-9][0-9]) [^\n]*\n", messages)
    return [int(s) for s in found]


def assert_ok(name: str, result: SippResult, calls: int = 1) -> None:
    code, ok, failed = result.returncode, result.successful, result.failed
    assert (code, ok, failed) == (0, calls, 0), f"{name}: {result.stats}\n{result.errors}"


def assert_pbx_saw_no_invite(bridge: Bridge) -> None:
    result = bridge.pbx_result
    assert result is not None
    assert (result.successful, result.failed) == (0, 0), f"{result.stats}\n{result.errors}"
    assert "INVITE sip:" not in bridge.pbx.messages()
    assert result.errors == ""


# -- the checks of the issue ---------------------------------------------------------------------


async def test_retell_call_with_credentials_is_bridged_to_the_pbx(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        retell, trace = await retell_call(tmp_path, bridge, "retell_invite_auth.xml")
        assert_ok("Retell", retell)
        assert final_statuses(trace) == [407, 200, 200]  # challenge, INVITE, BYE
        await bridge.assert_nothing_left()
        (record,) = bridge.calls.records
        assert (record.retell_status, record.pbx_status) == (200, 200)
        assert (record.caller, record.called) == (RETELL_NUMBER, "800")
        assert record.end_reason == "retell_bye"
        assert record.answered is not None
        assert record.retell_call_id != record.pbx_call_id
    pbx = bridge.pbx_result
    assert pbx is not None
    # The registration's SIPp call lasts as long as SIPp; the INVITE's succeeded.
    assert (pbx.successful, pbx.failed) == (1, 0), f"{pbx.stats}\n{pbx.errors}"
    assert pbx.errors == ""
    invites = [m.request for m in bridge.pbx.traced() if m.received and is_invite(m.message)]
    assert len(invites) == 2  # challenged once, then with the extension's credentials
    assert "Proxy-Authorization" not in invites[0].headers
    assert invites[1].cseq.seq == invites[0].cseq.seq + 1


async def test_wrong_credentials_are_challenged_then_refused_and_nothing_allocated(
    tmp_path: Path,
) -> None:
    async with running_bridge(tmp_path) as bridge:
        retell, trace = await retell_call(
            tmp_path, bridge, "retell_invite_refused.xml", password="not-the-password"
        )
        assert_ok("Retell", retell)
        assert final_statuses(trace) == [407, 403]
        await bridge.assert_nothing_left()
        assert bridge.calls.records == []
    assert_pbx_saw_no_invite(bridge)


async def test_no_credentials_get_a_challenge_and_nothing_else(tmp_path: Path) -> None:
    async with running_bridge(tmp_path) as bridge:
        retell, trace = await retell_call(tmp_path, bridge, "retell_invite_no_auth.xml")
        assert_ok("Retell", retell)
        assert final_statuses(trace) == [407]
        await bridge.assert_nothing_left()
        assert bridge.calls.records == []
    assert_pbx_saw_no_invite(bridge)


async def test_untrusted_source_is_refused_without_a_challenge(tmp_path: Path) -> None:
    # Reject mode answers the stranger 403 (drop, the default, would answer nothing).
    async with running_bridge(tmp_path, SecuritySettings(untrusted="reject")) as bridge:
        stranger, trace = await retell_call(
            tmp_path, bridge, "retell_invite_no_auth.xml", local_ip=STRANGER
        )
        assert_ok("stranger", stranger)
        assert final_statuses(trace) == [403]
        assert "Proxy-Authenticate" not in trace
        await bridge.assert_nothing_left()
        assert bridge.calls.records == []
    assert_pbx_saw_no_invite(bridge)


async def test_target_the_rules_do_not_allow_is_refused_after_the_credentials(
    tmp_path: Path,
) -> None:
    async with running_bridge(tmp_path) as bridge:
        # "support" is no configured target and no number: never a route to anywhere.
        retell, trace = await retell_call(
            tmp_path, bridge, "retell_invite_refused.xml", target="support"
        )
        assert_ok("Retell", retell)
        assert final_statuses(trace) == [407, 403]
        await bridge.assert_nothing_left()
        assert bridge.calls.records == []
    assert_pbx_saw_no_invite(bridge)
