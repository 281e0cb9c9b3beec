"""Media end to end through sbc: real RTP between real SIP phones.

Three tests run twice, once per ``[media] mode``: ``relay`` (sbc's own RTP relay) and
``rtpengine`` (a real rtpengine daemon, userspace only, started by this module on 127.0.0.64
with a free NG port and its own RTP port range; see ``rtpengine_helpers.py``):

* pjsua2 (PJSIP) as 3CX's caller and as Retell's answerer (over TCP), each in a subprocess
  (``pjsua_peer.py``): both receive the other's audio, and a DTMF digit sent as RFC 4733
  telephone-event reaches the answerer;
* the shipped stand-ins (:mod:`sbc.demo`) where exact packets matter: every payload
  byte and sequence number, telephone-event packets included, arrives as sent in both
  directions;
* a call without media is torn down after media_timeout.

After each call nothing of its media is left: the relay's ports are back in the pool, or
rtpengine no longer knows the call (sbc deleted it; ``query`` answers "Unknown call-id").

Relay mode only: port exhaustion answers 503 without disturbing the call in progress; 1,000
calls leave no port and no call behind.

sbc registers with the 3CX stand-in's registrar first; the pjsua2 caller sends its INVITE
straight to sbc's address with ``sip:EXT@sbc`` as Request-URI, from the PBX's address (trusted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import connected_call, demo_pbx, hang_up, pbx_stand_in, quick_sip
from peers import free_port, require_pjsua2
from rtpengine_helpers import Media, Rtpengine, running_rtpengine

from sbc.b2bua.calls import CallManager
from sbc.demo.pbx import PbxStandIn
from sbc.demo.retell import RetellStandIn
from sbc.media.rtpengine import NgClient, NgReply, RtpengineBackend, RtpengineError, rtp_totals
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    RetellSettings,
    Settings,
)

pytestmark = pytest.mark.integration

SBC, PBX, RETELL = "127.0.0.61", "127.0.0.62", "127.0.0.63"
RTPENGINE = "127.0.0.64"
EXTENSION = "1000"
NUMBER = "+14155550100"
PEER = Path(__file__).with_name("pjsua_peer.py")
HEADERS = {"X-Caller-Number": "{caller_number}", "X-Called": "{called}"}


# -- media modes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rtpengine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rtpengine]:
    """One rtpengine for the module (a missing binary fails on CI, skips elsewhere)."""
    with running_rtpengine(RTPENGINE, tmp_path_factory.mktemp("rtpengine")) as daemon:
        yield daemon


@pytest.fixture(params=["relay", "rtpengine"])
def media(request: pytest.FixtureRequest) -> Media:
    if request.param == "rtpengine":
        return Media(SBC, "rtpengine", request.getfixturevalue("rtpengine"))
    return Media(SBC)


async def rtpengine_query(daemon: Rtpengine, call_id: str) -> NgReply:
    """rtpengine's ``query`` of ``call_id``, from a control socket of the test's own."""
    async with NgClient(daemon.ng, timeout=0.5, tries=3) as ng:
        return await ng.query(call_id)


# -- the bridge between stand-ins -----------------------------------------------------------------


@dataclass
class Rig:
    service: Service
    settings: Settings
    pbx: PbxStandIn
    retell: RetellStandIn
    media: Media = field(default_factory=lambda: Media(SBC))

    @property
    def manager(self) -> CallManager:
        bridge = self.service.bridge
        assert isinstance(bridge, CallManager)
        return bridge

    @property
    def ports_in_use(self) -> int:
        pool = getattr(self.manager.media, "pool", None)
        assert pool is not None, "relay mode has a port pool"
        return int(pool.in_use)

    async def settled(self, limit: float = 10.0) -> None:
        """Until sbc holds no call (the table has no event of its own: polled)."""
        async with asyncio.timeout(limit):
            while self.manager.active:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    @property
    def sbc_uri(self) -> str:
        return f"sip:{EXTENSION}@{SBC}:{self.settings.sip.port}"

    async def in_rtpengine(self, limit: float = 10.0) -> tuple[str, NgReply]:
        """Once sbc's call is bridged in rtpengine (both legs' tags known there): its call-id
        and rtpengine's ``query`` of it. Polled, bounded by ``limit``."""
        daemon = self.media.rtpengine
        assert daemon is not None, "rtpengine mode only"
        async with asyncio.timeout(limit):
            while True:
                for call_uuid in list(self.manager.calls):
                    with contextlib.suppress(RtpengineError):
                        reply = await rtpengine_query(daemon, call_uuid)
                        if set(reply.get("tags") or ()) == {"a", "b"}:
                            return call_uuid, reply
                await asyncio.sleep(0.05)

    async def assert_media_released(self, call_uuid: str) -> None:
        """Nothing of the call's media is left: the relay's ports are back in its pool, or
        rtpengine no longer knows the call (sbc deleted it) and the backend holds no session."""
        if self.media.rtpengine is None:
            assert self.ports_in_use == 0
            return
        backend = self.manager.media
        assert isinstance(backend, RtpengineBackend)
        assert not backend.sessions
        with pytest.raises(RtpengineError, match="Unknown call-id") as unknown:
            await rtpengine_query(self.media.rtpengine, call_uuid)
        assert unknown.value.command == "query"


def bridge_settings(
    *,
    rtp_ports: int = 100,
    media_timeout: float = 60.0,
    max_concurrent: int = 20,
    media: Media | None = None,
) -> Settings:
    media = media or Media(SBC)
    rtp_min = free_port(SBC) & ~1
    return Settings(
        sip=quick_sip(SBC),
        pbx=demo_pbx(PBX, EXTENSION),
        retell=RetellSettings(host=RETELL, port=free_port(RETELL), transport="tcp", number=NUMBER),
        headers=HEADERS,
        calls=CallsSettings(country_code="31", max_concurrent=max_concurrent),
        media=MediaSettings(
            mode=media.mode,
            rtpengine=None if media.rtpengine is None else media.rtpengine.listen,
            rtp_port_min=rtp_min,
            rtp_port_max=rtp_min + rtp_ports - 1,
            media_timeout=media_timeout,
        ),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
    )


@contextlib.asynccontextmanager
async def running_bridge(
    settings: Settings,
    *,
    retell: bool = True,
    ring: float = 0.2,
    frames: list[bytes] | None = None,
    media: Media | None = None,
) -> AsyncIterator[Rig]:
    """The 3CX stand-in (registrar), optionally the Retell stand-in, and sbc registered."""
    pbx = pbx_stand_in(settings)
    retell_standin = RetellStandIn(RETELL, settings.retell.port, ring=ring, frames=frames)
    service = Service(settings)
    await pbx.start()
    try:
        if retell:
            await retell_standin.start()
        await service.start()
        async with asyncio.timeout(10):
            await pbx.registered.wait()
        yield Rig(service, settings, pbx, retell_standin, media or Media(SBC))
    finally:
        await service.stop()
        if retell:
            await retell_standin.stop()
        await pbx.stop()


def numbered(count: int, size: int = 160) -> list[bytes]:
    """RTP payloads that differ packet by packet: the packet number, then filler."""
    return [struct.pack("!I", n) + bytes([n % 251]) * (size - 4) for n in range(count)]


def packets(stream: list[Any]) -> list[tuple[int, int, bytes]]:
    return [(p.header.sequence, p.header.payload_type, p.payload) for p in stream]


# -- pjsua2 -------------------------------------------------------------------------------------


@dataclass
class PeerProcess:
    proc: asyncio.subprocess.Process
    log: Path

    async def result(self, limit: float) -> dict[str, Any]:
        """The RESULT line, once the process has exited (killed after ``limit`` seconds)."""
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(limit):
                out, err = await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"pjsua2 peer still running after {limit} s") from None
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("RESULT "):
                parsed: dict[str, Any] = json.loads(line[len("RESULT ") :])
                parsed["returncode"] = self.proc.returncode
                return parsed
        raise AssertionError(
            f"no RESULT from the pjsua2 peer (exit {self.proc.returncode}):\n"
            f"{err.decode(errors='replace')[-2000:]}\n{self.tail()}"
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def start_peer(tmp_path: Path, name: str, *args: str) -> PeerProcess:
    """Start ``pjsua_peer.py`` and wait for its READY line (it listens from then on)."""
    log = tmp_path / f"{name}.log"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PEER),
        *args,
        "--log",
        str(log),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    peer = PeerProcess(proc, log)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(15):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError(f"pjsua2 {name} exited before READY:\n{peer.tail()}")
                if line.strip() == b"READY":
                    return peer
    except BaseException:
        await peer.kill()
        raise


async def test_pjsua2_caller_and_answerer_hear_each_other_through_sbc(
    tmp_path: Path, media: Media
) -> None:
    require_pjsua2()
    settings = bridge_settings(media=media)
    loop = asyncio.get_running_loop()
    async with running_bridge(settings, retell=False, media=media) as rig:
        answerer = await start_peer(
            tmp_path,
            "answerer",
            *("--role", "answerer", "--bind", RETELL, "--port", str(settings.retell.port)),
            *("--transport", "tcp", "--id-uri", f"sip:{NUMBER}@{RETELL}", "--tone", "660"),
            *("--max-time", "30"),
        )
        try:
            started = loop.time()
            caller = await start_peer(
                tmp_path,
                "caller",
                *("--role", "caller", "--bind", PBX, "--port", str(free_port(PBX))),
                *("--id-uri", f'"Jane Doe" <sip:0201234567@{PBX}>', "--target", rig.sbc_uri),
                *("--talk", "3", "--dtmf", "5", "--tone", "440", "--max-time", "30"),
            )
            # rtpengine mode: the call is there while it is up (what "gone" is checked against).
            bridged = asyncio.ensure_future(rig.in_rtpengine(limit=20)) if media.rtpengine else None
            try:
                called = await caller.result(40)
            finally:
                await caller.kill()
                if bridged is not None and not bridged.done():
                    bridged.cancel()
            answered = await answerer.result(15)
        finally:
            await answerer.kill()
        await rig.settled()
        elapsed = loop.time() - started
        record = rig.manager.records[-1]
        if bridged is not None:
            assert bridged.done() and not bridged.cancelled(), "never seen in rtpengine"
            call_uuid, seen = bridged.result()
            assert call_uuid == record.call_uuid
            assert set(seen["tags"]) == {"a", "b"}
        await rig.assert_media_released(record.call_uuid)

    def summary(side: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in side.items() if k != "invite"}

    print(f"[{media.mode}] pjsua2 call of {elapsed:.1f} s")
    print(f"[{media.mode}] pjsua2 caller:", summary(called))
    print(f"[{media.mode}] pjsua2 answerer:", summary(answered))
    assert called["connected"] and called["hung_up_here"] and called["disconnected"], called
    # The answerer's call ended by sbc's BYE after the caller hung up.
    assert answered["connected"] and answered["disconnected"], answered
    assert not answered["hung_up_here"], answered
    # Three seconds of 20 ms packets is 150: at least 100 each way, at both ends.
    for side in (called, answered):
        assert side["tx_packets"] >= 100, side
        assert side["rx_packets"] >= 100, side
    # RFC 4733 telephone-event crossed sbc's media path and was decoded by pjsua2.
    assert answered["digits"] == ["5"], answered
    invite = answered["invite"]
    assert invite.startswith(f"INVITE sip:{NUMBER}@{RETELL}:{settings.retell.port};transport=tcp ")
    assert "X-Caller-Number: +31201234567" in invite
    assert "X-Called: 1000" in invite
    assert PBX not in invite  # nothing of the 3CX leg, SDP included
    assert f"c=IN IP4 {media.host}\r\n" in invite  # media through the relay or rtpengine
    assert record.end_reason == "pbx_bye" and record.pbx_status == 200, record


# -- exact packets with the stand-ins -----------------------------------------------------------


async def test_payloads_and_sequence_numbers_cross_unchanged_both_ways(media: Media) -> None:
    settings = bridge_settings(media=media)
    loop = asyncio.get_running_loop()
    async with running_bridge(settings, frames=numbered(500), media=media) as rig:
        call, retell_call = await connected_call(rig, frames=numbered(500))
        started = loop.time()
        a, b = call.rtp, retell_call.rtp
        await asyncio.sleep(0.5)  # talk time, not synchronisation
        a.send_dtmf("1")
        b.send_dtmf("#")
        await asyncio.sleep(1.5)
        a.stop_sending()
        b.stop_sending()
        async with asyncio.timeout(3):
            await a.wait_received(len(b.sent))
            await b.wait_received(len(a.sent))
        elapsed = loop.time() - started
        call_uuid = next(iter(rig.manager.calls))
        if media.rtpengine is not None:
            # rtpengine carried the call: it counted every packet either side sent.
            _, reply = await rig.in_rtpengine()
            assert rtp_totals(reply).packets == len(a.sent) + len(b.sent)
        await hang_up(rig, call, retell_call)
        await rig.settled()
        assert rig.manager.records[-1].call_uuid == call_uuid
        await rig.assert_media_released(call_uuid)
    print(
        f"[{media.mode}] stand-ins: 3CX->Retell {len(a.sent)} sent / {len(b.received)} received,"
        f" Retell->3CX {len(b.sent)} sent / {len(a.received)} received, {elapsed:.2f} s"
    )
    for sender, receiver in ((a, b), (b, a)):
        assert len(sender.sent) >= 90
        assert packets(receiver.received) == packets(sender.sent)
        # Raw bytes too: nothing is touched (header fields, marker, SSRC).
        assert receiver.received == sender.sent
        events = [p for p in receiver.received if p.header.payload_type == 101]
        assert len(events) == 7, len(events)  # 5 packets, the final one three times
    # Both sides sent from the port they receive on, and heard only sbc's relay (or rtpengine).
    media_ports = {port for _, port in a.sources | b.sources}
    assert {host for host, _ in a.sources | b.sources} == {media.host}
    assert len(media_ports) == 2


async def test_port_exhaustion_answers_503_and_spares_the_call_in_progress() -> None:
    # Four ports: two RTP/RTCP pairs, which one call (one pair per leg) takes.
    settings = bridge_settings(rtp_ports=4)
    async with running_bridge(settings) as rig:
        call, retell_call = await connected_call(rig)
        assert rig.ports_in_use == 2
        async with asyncio.timeout(10):
            refused = await rig.pbx.call()
        assert refused.final is not None and refused.final.status == 503, refused.statuses
        assert len(rig.retell.calls) == 1  # the refused call never reached Retell
        # The first call goes on: 25 more packets (half a second) arrive each way.
        a, b = call.rtp, retell_call.rtp
        async with asyncio.timeout(5):
            await a.wait_received(len(a.received) + 25)
            await b.wait_received(len(b.received) + 25)
        await hang_up(rig, call, retell_call)
        await rig.settled()
        assert rig.ports_in_use == 0
        assert rig.manager.active == 0


async def test_a_thousand_calls_leave_no_port_and_no_call() -> None:
    settings = bridge_settings(rtp_ports=200, max_concurrent=50)
    total, width = 1000, 20
    async with running_bridge(settings, ring=0) as rig:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answered = 0

        async def one() -> None:
            nonlocal answered
            call, retell_call = await connected_call(rig)
            await hang_up(rig, call, retell_call)
            answered += 1
            await call.rtp.close()
            await retell_call.rtp.close()
            rig.pbx.calls.pop(call.invite.call_id, None)
            rig.retell.calls.pop(retell_call.invite.call_id, None)

        async with asyncio.timeout(240):
            for first in range(0, total, width):
                await asyncio.gather(*(one() for _ in range(min(width, total - first))))
        await rig.settled()
        elapsed = loop.time() - started
        print(f"{total} calls set up and torn down in {elapsed:.1f} s")
        assert answered == total
        assert rig.manager.active == 0
        assert rig.ports_in_use == 0
        assert all(r.end_reason == "pbx_bye" for r in rig.manager.records)


async def test_media_timeout_ends_a_silent_call_and_frees_its_media(media: Media) -> None:
    # rtpengine mode: sbc polls rtpengine's counters every media_timeout / 4 seconds.
    settings = bridge_settings(media_timeout=2.0, media=media)
    async with running_bridge(settings, media=media) as rig:
        call, retell_call = await connected_call(rig)
        call_uuid = next(iter(rig.manager.calls))
        call.rtp.stop_sending()
        retell_call.rtp.stop_sending()
        # No RTP either way: after media_timeout sbc must hang up both legs itself.
        try:
            async with asyncio.timeout(settings.media.media_timeout + 5):
                await call.ended.wait()
                await retell_call.ended.wait()
        except TimeoutError:
            raise AssertionError(
                f"sbc did not end a call without media within media_timeout"
                f" ({settings.media.media_timeout:g} s) + 5 s: 3CX got BYE {call.bye_received},"
                f" Retell got BYE {retell_call.bye_received}"
            ) from None
        assert call.bye_received and retell_call.bye_received
        await rig.settled()
        assert rig.manager.records[-1].end_reason == "media_timeout", rig.manager.records[-1]
        await rig.assert_media_released(call_uuid)
