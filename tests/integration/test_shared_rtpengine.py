"""Two sbc instances sharing one rtpengine (docs/scale-out.md, "One rtpengine for several sbc").

On loopback: one rtpengine daemon in userspace (``--table=-1``) on 127.0.0.170, two ``sbc run``
processes in ``media.mode = "rtpengine"`` pointed at its one NG socket (127.0.0.174 and .175,
extensions 1001 and 1002), each registered with its own 3CX stand-in (.171, .172), both
bridging to one Retell stand-in (.173). Both 3CX place a call at the same time, each with a
tone of its own; then:

* both calls' media runs through rtpengine (its address in every SDP either side got);
* rtpengine holds exactly two calls, named by the two instances' call uuids: the NG call-id
  is sbc's random call uuid, and the tags (``a``, ``b``) only need to be unique inside a call,
  so instances need no coordination and no port plan of their own;
* no audio crosses between the instances' calls: each far end hears only its own peer's
  stream (by RTP SSRC and by tone);
* after both hang up, rtpengine's ``list`` is empty (each instance deleted its own call).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import pytest
from peers import free_port
from rtpengine_helpers import Rtpengine, running_rtpengine
from sbc_process import SbcProcess, running_sbc_process

from sbc.demo.pbx import PbxCall, PbxStandIn
from sbc.demo.peer import media_target
from sbc.demo.retell import RetellCall, RetellStandIn
from sbc.demo.rtp_peer import heard_frequency
from sbc.media.rtpengine import NgClient
from sbc.sip.uri import SipUri, parse_name_addr

pytestmark = pytest.mark.integration

RTPENGINE = "127.0.0.170"
PBX_HOSTS = ("127.0.0.171", "127.0.0.172")
RETELL = "127.0.0.173"
SBC_HOSTS = ("127.0.0.174", "127.0.0.175")
NUMBER = "+14155550100"
TONES = (440, 520)  # what each 3CX caller sends; Retell answers 660 Hz
PACKETS = 25  # half a second of audio each way, per call


def sbc_values(index: int, pbx: PbxStandIn, retell: RetellStandIn, ng: str) -> dict[str, Any]:
    host = SBC_HOSTS[index]
    return {
        "sip": {"bind": host, "port": free_port(host)},
        "pbx": {
            "host": pbx.host,
            "port": pbx.port,
            "extension": pbx.extension,
            "password": pbx.password,
            "trusted": [f"{pbx.host}/32"],
            "keepalive": "off",
        },
        "retell": {
            "host": retell.host,
            "port": retell.port,
            "transport": "tcp",
            "number": NUMBER,
            "trusted": [f"{retell.host}/32"],
        },
        # The one thing the instances share: rtpengine's NG socket.
        "media": {"mode": "rtpengine", "rtpengine": ng},
        "admin": {"listen": f"{host}:{free_port(host, udp=False)}"},
        "log": {"format": "json"},
    }


async def ng_calls(daemon: Rtpengine) -> list[str]:
    """The call-ids rtpengine holds (NG ``list``)."""
    async with NgClient(daemon.ng, timeout=1.0, tries=3) as ng:
        reply = await ng.request("list")
    calls = reply.get("calls", [])
    assert isinstance(calls, list), reply
    return sorted(str(call) for call in calls)


def instance_of(call: RetellCall) -> str:
    """The sbc that placed ``call`` (the host of its INVITE's Contact)."""
    uri = parse_name_addr(call.invite.headers.get("Contact") or "").uri
    assert isinstance(uri, SipUri)
    return uri.host


async def test_two_instances_share_one_rtpengine_without_crossing_calls(tmp_path: Path) -> None:
    with running_rtpengine(RTPENGINE, tmp_path) as daemon:
        pbxs = [
            PbxStandIn(
                host,
                free_port(host),
                extension=f"100{i + 1}",
                auth_id=f"100{i + 1}",
                password=f"secret{i + 1}",
            )
            for i, host in enumerate(PBX_HOSTS)
        ]
        retell = RetellStandIn(RETELL, free_port(RETELL), ring=0.1)
        async with contextlib.AsyncExitStack() as stack:
            for pbx in pbxs:
                await pbx.start()
                stack.push_async_callback(pbx.stop)
            await retell.start()
            stack.push_async_callback(retell.stop)
            sbcs: list[SbcProcess] = [
                await stack.enter_async_context(
                    running_sbc_process(tmp_path, sbc_values(i, pbxs[i], retell, daemon.listen))
                )
                for i in range(2)
            ]
            try:
                async with asyncio.timeout(20):
                    await asyncio.gather(*(pbx.registered.wait() for pbx in pbxs))
            except TimeoutError:
                # Say which instance did not register and what it logged (seen once in CI).
                raise AssertionError(
                    [pbx.registered.is_set() for pbx in pbxs],
                    [sbc.log_text()[-3000:] for sbc in sbcs],
                ) from None
            async with asyncio.timeout(20):
                placed: list[PbxCall] = list(
                    await asyncio.gather(
                        *(pbx.call(tone_hz=tone) for pbx, tone in zip(pbxs, TONES, strict=True))
                    )
                )
            for call in placed:
                assert call.final is not None and call.final.status == 200, call.statuses
            async with asyncio.timeout(10):
                while len(retell.calls) < 2:  # noqa: ASYNC110 (the stand-in keeps no event)
                    await asyncio.sleep(0.01)
                agents = list(retell.calls.values())
                await asyncio.gather(*(agent.acked.wait() for agent in agents))
                by_instance = {instance_of(agent): agent for agent in agents}
                assert sorted(by_instance) == sorted(SBC_HOSTS)
                far = [by_instance[host] for host in SBC_HOSTS]
                await asyncio.gather(
                    *(c.rtp.wait_received(PACKETS) for c in placed),
                    *(a.rtp.wait_received(PACKETS) for a in far),
                )

            # Media through rtpengine on both sides of both calls.
            for call, agent in zip(placed, far, strict=True):
                assert call.final is not None
                assert media_target(call.final.body)[0] == RTPENGINE
                assert media_target(agent.invite.body)[0] == RTPENGINE
                assert {host for host, _ in call.rtp.sources} == {RTPENGINE}
                assert {host for host, _ in agent.rtp.sources} == {RTPENGINE}
            # One rtpengine call per sbc call, named by each instance's own call uuid.
            uuids = sorted(str(sbc.events("call_answered")[0]["call_uuid"]) for sbc in sbcs)
            assert await ng_calls(daemon) == uuids
            # Nothing crosses: each side hears its own peer only, by SSRC and by tone.
            for call, agent, tone in zip(placed, far, TONES, strict=True):
                assert {p.header.ssrc for p in agent.rtp.received} == {call.rtp.ssrc}
                assert {p.header.ssrc for p in call.rtp.received} == {agent.rtp.ssrc}
                heard = heard_frequency(agent.rtp.received)
                assert heard is not None and abs(heard - tone) < 15, heard
                back = heard_frequency(call.rtp.received)
                assert back is not None and abs(back - 660) < 15, back

            async with asyncio.timeout(10):
                statuses = await asyncio.gather(
                    *(pbx.hang_up(c) for pbx, c in zip(pbxs, placed, strict=True))
                )
                assert statuses == [200, 200]
                await asyncio.gather(*(agent.ended.wait() for agent in far))
                # Each instance deletes its call as the call ends: another process, polled.
                while await ng_calls(daemon):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert await ng_calls(daemon) == []
            for sbc in sbcs:
                sbc.signal(signal.SIGTERM)
                assert await sbc.wait_exit(20) == 0, sbc.log_text()[-3000:]
        print(
            f"two instances, one rtpengine: calls {uuids} relayed "
            f"{[len(c.rtp.received) for c in placed]} / {[len(a.rtp.received) for a in far]}"
            " packets (3CX / Retell side), list empty after the hang-ups"
        )
