"""Two sbc instances behind one Kamailio dispatcher (``deploy/kamailio-dispatcher.cfg``, run
unchanged, docs/scale-out.md); one of them SIGKILLed in the middle of a load of short calls.

On loopback: Kamailio on 127.0.0.160, SIPp as Retell on .161 calling the dispatcher over TCP
with the trunk credentials, two ``sbc run`` processes on .162 and .163 (each its own extension,
1001 and 1002, registered with its own SIPp "3CX" on .164 and .165, which also answers the
calls that instance bridges). The dispatcher hashes the Call-ID (so the challenged retry of an
INVITE reaches the instance that challenged it), probes both instances with OPTIONS every
second and fails an INVITE over to the other instance when one is silent.

Once both instances have answered calls, instance 1 is killed with SIGKILL. Every call is then
read back from Retell's message trace: which instance answered it (the Contact of its 200),
when its INVITE left, whether its INVITE and BYE got their 200. The checks are the issue's:
only calls that instance 1 held fail; every call of instance 2 and every call placed after the
kill succeeds; each instance's "3CX" saw exactly the calls of that instance. Then instance 1
is started again on its address: the probes put it back in the rotation and it takes its share
of a second, smaller load.

A second test stops an instance the planned way (SIGTERM) in the middle of a load: it drains,
its 503s to new INVITEs are failed over by the dispatcher, and no call fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kamailio_helpers import Dispatcher, check_config, running_dispatcher
from peers import free_port
from rtpengine_helpers import port_range
from sbc_process import SbcProcess, running_sbc_process
from sipp_helpers import Sipp, TracedMessage, sipp_server, start_sipp

from sbc.sip.message import Request, Response
from sbc.sip.uri import SipUri, parse_name_addr

pytestmark = pytest.mark.integration

KAMAILIO = "127.0.0.160"
RETELL = "127.0.0.161"
STRANGER = "127.0.0.166"
SBC_HOSTS = ("127.0.0.162", "127.0.0.163")
PBX_HOSTS = ("127.0.0.164", "127.0.0.165")
NUMBER = "+14155550100"
TARGET = "800"  # the PBX number Retell's calls are for (allowed by [transfer] allow)
TRUNK_USER = "retell-trunk"
TRUNK_PASSWORD = "pa55word"

CALLS = 40  # Retell's calls in all
RATE = 5  # new calls per second
HOLD_MS = 2000  # each call lasts this long after its answer
AGAIN = 16  # calls once the killed instance is back (16 Call-IDs all hashed to one: 2**-15)


def sbc_values(
    index: int, sip_port: int, pbx: Sipp, *, auth: bool = True
) -> dict[str, dict[str, Any]]:
    host = SBC_HOSTS[index]
    low, high = port_range(host, 100)
    credentials = {"auth_username": TRUNK_USER, "auth_password": TRUNK_PASSWORD} if auth else {}
    return {
        "sip": {"bind": host, "port": sip_port},
        "pbx": {
            "host": pbx.host,
            "port": pbx.port,
            "extension": f"100{index + 1}",
            "password": "secret",
            "trusted": [f"{pbx.host}/32"],
            "keepalive": "off",
            "register_expires": 60,
        },
        "retell": {
            "host": RETELL,
            "number": NUMBER,
            # Retell's calls come from the dispatcher, so its address is the trusted one.
            "trusted": [f"{KAMAILIO}/32"],
            **credentials,
        },
        "media": {"mode": "relay", "rtp_port_min": low, "rtp_port_max": high},
        "admin": {"listen": f"{host}:{free_port(host, udp=False)}"},
        "log": {"format": "json"},
    }


@dataclass
class CallSeen:
    """One of Retell's calls as its SIPp trace shows it."""

    call_id: str
    invited_at: float = 0.0  # the first INVITE sent (seconds since the epoch)
    answered_at: float | None = None
    instance: str | None = None  # the host of the answering sbc's Contact
    invite_finals: list[int] = field(default_factory=list)
    bye_finals: list[int] = field(default_factory=list)
    bye_sent: bool = False

    @property
    def succeeded(self) -> bool:
        return self.invite_finals[-1:] == [200] and self.bye_finals[-1:] == [200]


def calls_seen(trace: list[TracedMessage]) -> dict[str, CallSeen]:
    calls: dict[str, CallSeen] = {}
    for item in trace:
        message = item.message
        call = calls.setdefault(message.call_id, CallSeen(message.call_id))
        if isinstance(message, Request):
            if message.method == "INVITE" and not item.received and not call.invited_at:
                call.invited_at = item.at
            if message.method == "BYE" and not item.received:
                call.bye_sent = True
            continue
        assert isinstance(message, Response)
        if not item.received or message.status < 200:
            continue
        method = message.cseq.method
        if method == "INVITE":
            call.invite_finals.append(message.status)
            if message.status == 200 and call.answered_at is None:
                call.answered_at = item.at
                uri = parse_name_addr(message.headers.get("Contact") or "").uri
                call.instance = uri.host if isinstance(uri, SipUri) else None
        elif method == "BYE":
            call.bye_finals.append(message.status)
    return calls


def invites_received(pbx: Sipp, until: float) -> list[str]:
    """Call-IDs of the INVITEs ``pbx`` received before ``until`` (seconds since the epoch)."""
    return [
        m.message.call_id
        for m in pbx.traced()
        if m.received
        and m.at < until
        and isinstance(m.message, Request)
        and m.message.method == "INVITE"
    ]


def byes_answered(pbx: Sipp) -> set[str]:
    return {
        m.message.call_id
        for m in pbx.traced()
        if not m.received
        and isinstance(m.message, Response)
        and m.message.status == 200
        and m.message.cseq.method == "BYE"
    }


@dataclass
class ScaleOut:
    """Two instances, each with its 3CX, behind the dispatcher."""

    pbxs: list[Sipp]
    ports: list[int]
    sbcs: list[SbcProcess]
    dispatcher: Dispatcher

    @property
    def uris(self) -> list[str]:
        return [f"sip:{host}:{port}" for host, port in zip(SBC_HOSTS, self.ports, strict=True)]


async def scale_out(
    stack: contextlib.AsyncExitStack, workdir: Path, *, calls: int, auth: bool = True
) -> ScaleOut:
    """Both 3CX (SIPp, up to ``calls`` calls each), both sbc registered, then the dispatcher
    (probes every second, failover after 1 s of silence, no call ringing past 8 s); all
    stopped when ``stack`` closes."""
    pbxs = [
        await stack.enter_async_context(
            sipp_server(
                "pbx_instance_callee.xml",
                workdir=workdir,
                host=host,
                calls=calls + 10,
                time_limit=180,
            )
        )
        for host in PBX_HOSTS
    ]
    ports = [free_port(host) for host in SBC_HOSTS]
    sbcs: list[SbcProcess] = [
        await stack.enter_async_context(
            running_sbc_process(workdir, sbc_values(i, ports[i], pbxs[i], auth=auth))
        )
        for i in range(2)
    ]
    for sbc in sbcs:
        await sbc.wait_event("registered", 20)
    dispatcher = await stack.enter_async_context(
        running_dispatcher(
            KAMAILIO,
            workdir,
            [f"sip:{host}:{port}" for host, port in zip(SBC_HOSTS, ports, strict=True)],
            defines={
                "RETELL_NETS": f'"{RETELL}/32"',
                "DS_ALG": 0,  # the shipped default, stated: hash over the Call-ID
                "DS_PING_INTERVAL": 1,
                "DS_PROBING_THRESHOLD": 1,
                "FR_TIMER": 1000,
                "FR_INV_TIMER": 8000,
            },
        )
    )
    return ScaleOut(pbxs, ports, sbcs, dispatcher)


async def retell_load(
    workdir: Path, dispatcher: Dispatcher, *, calls: int, rate: float, hold_ms: int, auth: bool
) -> Sipp:
    """SIPp as Retell placing ``calls`` calls through the dispatcher over TCP (in the
    background); with ``auth`` it answers sbc's challenges with the trunk credentials."""
    if auth:
        scenario = "retell_via_dispatcher.xml"
        credentials: tuple[str, ...] = (
            *("-au", TRUNK_USER, "-ap", TRUNK_PASSWORD, "-auth_uri", f"{TARGET}@{KAMAILIO}"),
        )
    else:
        scenario, credentials = "retell_via_dispatcher_no_auth.xml", ()
    return await start_sipp(
        scenario,
        workdir=workdir,
        local_ip=RETELL,
        remote=f"{KAMAILIO}:{dispatcher.port}",
        transport="t1",
        calls=calls,
        rate=rate,
        time_limit=90,
        extra=("-s", TARGET, *credentials, "-d", str(hold_ms)),
    )


def entry(listing: str, uri: str) -> str:
    """One destination's block of ``kamcmd dispatcher.list`` output."""
    _, found, rest = listing.partition(f"URI: {uri}\n")
    assert found, f"{uri} not in {listing}"
    return rest.split("}", 1)[0]


def test_dispatcher_config_passes_kamailio_check() -> None:
    """The shipped file parses and its modules load with the defaults an operator gets."""
    done = check_config()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "config file ok" in done.stdout + done.stderr


async def test_sigkill_of_one_instance_fails_only_its_calls(tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        setup = await scale_out(stack, tmp_path, calls=CALLS + AGAIN)
        pbxs, ports, sbcs, dispatcher = setup.pbxs, setup.ports, setup.sbcs, setup.dispatcher
        dead_uri = setup.uris[0]
        retell = await retell_load(
            tmp_path, dispatcher, calls=CALLS, rate=RATE, hold_ms=HOLD_MS, auth=True
        )
        # Kill instance 1 once both carry calls and three of instance 1's have ended (Retell's
        # BYE reached it): its finished calls stay finished, the ones it holds are lost. (The
        # third's 200 may be cut off by the kill; the first two were answered long before.)
        await sbcs[0].wait_event("bye_received", 30, count=3)
        await sbcs[1].wait_event("call_answered", 30, count=1)
        killed_at = time.time()
        sbcs[0].signal(signal.SIGKILL)
        assert await sbcs[0].wait_exit(5) == -signal.SIGKILL
        result = await retell.finish(120)
        listing = await dispatcher.rpc("dispatcher.list")
        # Only Retell's addresses may call through the proxy (the instances trust the proxy).
        stranger = await start_sipp(
            "retell_invite_no_auth.xml",
            workdir=tmp_path,
            local_ip=STRANGER,
            remote=f"{KAMAILIO}:{dispatcher.port}",
            transport="t1",
            time_limit=20,
            extra=("-s", TARGET),
        )
        refused = await stranger.finish(30)
        # Instance 1 comes back on its address: one answered probe returns it to the rotation,
        # and new calls land on it again.
        revived = await stack.enter_async_context(
            running_sbc_process(tmp_path, sbc_values(0, ports[0], pbxs[0]))
        )
        await revived.wait_event("registered", 20)
        revived_at = time.monotonic()
        async with asyncio.timeout(15):
            # Another process's state: polled.
            while "FLAGS: AP" not in entry(await dispatcher.rpc("dispatcher.list"), dead_uri):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        back_after = time.monotonic() - revived_at
        again_at = time.time()
        again = await retell_load(
            tmp_path, dispatcher, calls=AGAIN, rate=10, hold_ms=300, auth=True
        )
        again_result = await again.finish(70)
        revived.signal(signal.SIGTERM)
        assert await revived.wait_exit(30) == 0, revived.log_text()[-3000:]
        # Instance 2 ends what it holds and unregisters; then its "3CX" has seen every BYE.
        sbcs[1].signal(signal.SIGTERM)
        assert await sbcs[1].wait_exit(30) == 0, sbcs[1].log_text()[-3000:]
    # (the SIPp servers and the dispatcher are stopped here, their traces complete)

    calls = calls_seen(retell.traced())
    assert len(calls) == CALLS, sorted(calls)
    assert result.successful + result.failed == CALLS, result.stats
    sbc1, sbc2 = SBC_HOSTS
    answered_by = Counter(call.instance for call in calls.values() if call.instance)
    before = [call for call in calls.values() if call.invited_at < killed_at]
    after = [call for call in calls.values() if call.invited_at >= killed_at]
    failed = [call for call in calls.values() if not call.succeeded]

    # The load was spread: both instances answered calls placed before the kill.
    assert {call.instance for call in before if call.answered_at} == {sbc1, sbc2}
    # Every call of instance 2 succeeded, and so did every call placed after the kill (the
    # first of them failed over from the dead instance to the live one).
    assert all(call.succeeded for call in calls.values() if call.instance == sbc2)
    # Instance 1's calls that ended before the kill are not touched by it.
    assert sum(call.succeeded for call in before if call.instance == sbc1) >= 2
    assert len(after) >= 10, f"the kill came too late to test new calls: {len(after)}"
    assert all(call.succeeded and call.instance == sbc2 for call in after), [
        (c.call_id, c.invite_finals, c.bye_finals, c.instance) for c in after if not c.succeeded
    ]
    # Only instance 1's calls in progress at the kill failed, and the kill did hit some.
    assert failed, "no call was in progress on the killed instance"
    assert len(failed) == result.failed
    for call in failed:
        assert call.invited_at < killed_at
        assert call.instance in (sbc1, None)  # answered by instance 1, or never answered
        ended_before_kill = call.bye_finals[-1:] == [200]
        assert not ended_before_kill
    # Each 3CX saw only its instance's calls: instance 2's every call, each ended by a BYE.
    pbx_invites = [invites_received(pbx, until=again_at) for pbx in pbxs]
    assert len(pbx_invites[1]) == answered_by[sbc2]
    assert set(pbx_invites[1]) <= byes_answered(pbxs[1])
    assert len(pbx_invites[0]) >= answered_by[sbc1]
    assert (refused.returncode, refused.successful) == (0, 1), refused.errors
    answers = [m.message for m in stranger.traced() if isinstance(m.message, Response)]
    assert [(r.status, (r.headers.get("Server") or "").split()[0]) for r in answers] == [
        (403, "kamailio")
    ]
    # The dispatcher's probes took the dead instance out of the rotation ("I": inactive,
    # "P": still probed, so it comes back by itself once it answers again).
    assert "FLAGS: IP" in entry(listing, dead_uri), listing
    assert "FLAGS: AP" in entry(listing, f"sip:{sbc2}:{ports[1]}"), listing
    # Back in the rotation, the restarted instance takes its share of new calls again.
    assert (again_result.returncode, again_result.successful) == (0, AGAIN), again_result.stats
    again_by = Counter(call.instance for call in calls_seen(again.traced()).values())
    assert set(again_by) == {sbc1, sbc2}, again_by
    after_setup = [c.answered_at - c.invited_at for c in after if c.answered_at is not None]
    print(
        f"{CALLS} calls at {RATE}/s, {HOLD_MS} ms each: instance 1 answered "
        f"{answered_by[sbc1]}, instance 2 {answered_by[sbc2]}; instance 1 killed after "
        f"{len(before)} calls were placed; failed {len(failed)} (all instance 1's, in progress); "
        f"{len(after)} calls after the kill all succeeded, INVITE->200 at most "
        f"{max(after_setup) * 1000:.0f} ms (median "
        f"{sorted(after_setup)[len(after_setup) // 2] * 1000:.0f} ms); restarted, back in the "
        f"rotation {back_after:.1f} s after registering, then {dict(again_by)} of {AGAIN} calls"
    )


async def test_sigterm_of_one_instance_loses_no_call(tmp_path: Path) -> None:
    """A planned stop (SIGTERM: drain, then unregister) in the middle of the load: the stopping
    instance answers new INVITEs 503, the dispatcher sends those to the other instance, the calls
    it holds end normally; not one call fails. (Without trunk credentials: a 503 after sbc's
    challenge would send Retell's retry to the other instance, which challenges it again; Retell
    answers that, this SIPp scenario does not.)"""
    calls, hold_ms = 30, 3000
    async with contextlib.AsyncExitStack() as stack:
        setup = await scale_out(stack, tmp_path, calls=calls, auth=False)
        sbcs = setup.sbcs
        retell = await retell_load(
            tmp_path, setup.dispatcher, calls=calls, rate=RATE, hold_ms=hold_ms, auth=False
        )
        await sbcs[0].wait_event("call_answered", 30, count=2)
        await sbcs[1].wait_event("call_answered", 30, count=1)
        stopped_at = time.time()
        sbcs[0].signal(signal.SIGTERM)
        # It drains: its calls end when Retell hangs up (hold_ms), then it unregisters and exits.
        assert await sbcs[0].wait_exit(30) == 0, sbcs[0].log_text()[-3000:]
        result = await retell.finish(120)
        sbcs[1].signal(signal.SIGTERM)
        assert await sbcs[1].wait_exit(30) == 0, sbcs[1].log_text()[-3000:]
        dispatcher_log = setup.dispatcher.log_text()
    assert (result.returncode, result.successful, result.failed) == (0, calls, 0), (
        f"{result.stats}\n{result.errors}"
    )
    seen = calls_seen(retell.traced())
    # Nothing new reached instance 1 once it was stopping (half a second for the signal to be
    # handled): what it refused went to instance 2.
    refused = len(sbcs[0].events("invite_refused_stopping"))
    late = [
        c for c in seen.values() if c.instance == SBC_HOSTS[0] and c.invited_at > stopped_at + 0.5
    ]
    assert late == []
    failovers = dispatcher_log.count("failover of ")
    assert refused >= 1, "no INVITE reached the draining instance"
    assert failovers >= refused
    # Every call instance 1 had taken was ended with a BYE to its 3CX: none was cut.
    taken = invites_received(setup.pbxs[0], until=time.time())
    assert taken and set(taken) <= byes_answered(setup.pbxs[0])
    print(
        f"{calls} calls, instance 1 stopped (SIGTERM) after {len(taken)} of its calls: "
        f"{refused} INVITEs refused 503 while draining, {failovers} failovers, all "
        f"{result.successful} calls completed"
    )
