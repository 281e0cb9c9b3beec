"""Transfers by INVITE end to end with audio: pjsua2 (PJSIP) phones on every side of sbc.

Three phones, each a ``pjsua_peer.py`` subprocess driven over its stdin (``--control``) and
reporting what happens on its stdout as it happens (call states, the transfer statuses pjsua2
reads from the NOTIFYs' sipfrag, and every half second the RTP packets counted and the tone
decoded from what it heard):

* the **caller**, 3CX's call to the extension (UDP, from the PBX's address), plays 440 Hz;
* **Retell** over TCP, the agent, answers with PCMU only and plays 660 Hz; told to, it sends a
  REFER (``Call.xfer("sip:sales@...")``, no angle brackets, as Retell does);
* the **queue** on the 3CX side plays 880 Hz and answers sbc's INVITE to ``800``
  (``[transfer] targets``: sales = 800) with 200, 486, or never.

sbc sends the queue's INVITE to ``[pbx] host:port``, where it also registers. That address is
a small UDP forwarder of this module (:class:`PbxFront`): REGISTER goes on to the 3CX stand-in's
registrar (:class:`~sbc.demo.pbx.PbxStandIn`, on a port of its own), every other request to the
queue phone, and whatever either answers back to sbc. Nothing else stands between the phones
and sbc; the caller's INVITE goes straight to sbc's address, as in ``test_media_pjsua2.py``.

Every test runs in both ``[media] mode``\\ s: ``relay`` (sbc's own) and ``rtpengine`` (a real
daemon on 127.0.0.114, see ``rtpengine_helpers.py``). After each: sbc holds no call, the
relay's ports are all back in the pool, rtpengine knows no call (``query`` of the call answers
"Unknown call-id", ``list`` is empty).

Waits are for conditions (a phone's event, N windows of a tone), each with a deadline; the
only fixed durations are the phones' own ring times and the 0.5 s audio windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from bridge_helpers import demo_pbx, pbx_stand_in, quick_sip
from peers import free_port, require_pjsua2
from rtpengine_helpers import Media, Rtpengine, running_rtpengine

from sbc.b2bua.calls import CallManager
from sbc.b2bua.transfer import TransferRecord
from sbc.media.rtpengine import NgClient, RtpengineBackend, RtpengineError
from sbc.ops.service import Service
from sbc.ops.settings import (
    AdminSettings,
    CallsSettings,
    MediaSettings,
    RetellSettings,
    Settings,
    TransferSettings,
)

pytestmark = pytest.mark.integration

SBC, PBX, RETELL, RTPENGINE = "127.0.0.111", "127.0.0.112", "127.0.0.113", "127.0.0.114"
EXTENSION = "1000"
NUMBER = "+14155550100"
QUEUE_NUMBER = "800"
PEER = Path(__file__).with_name("pjsua_peer.py")
HEADERS = {"X-Caller-Number": "{caller_number}", "X-Called": "{called}"}

CALLER_HZ, AGENT_HZ, QUEUE_HZ = 440, 660, 880
PROBES = (CALLER_HZ, AGENT_HZ, QUEUE_HZ)
WINDOW = 0.5  # seconds of audio per window a phone reports
WINDOWS = 3  # consecutive windows of a tone that count as "hears it"
MIN_RX = 20  # RTP packets in a window (25 at 20 ms a packet) that count as audio flowing
MIN_SHARE = 0.6  # share of a window's energy at the tone (a pure tone gives ~1.0)
RING_TIMEOUT = 2.0  # transfer.ring_timeout: how long the queue may ring
HANDOVER = 0.2  # seconds after the queue's answer from which the caller hears only the queue
RECHECK = 0.1  # seconds between checks of a condition no phone reports


# -- media modes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rtpengine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rtpengine]:
    with running_rtpengine(RTPENGINE, tmp_path_factory.mktemp("rtpengine")) as daemon:
        yield daemon


@pytest.fixture(params=["relay", "rtpengine"])
def media(request: pytest.FixtureRequest) -> Media:
    if request.param == "rtpengine":
        return Media(SBC, "rtpengine", request.getfixturevalue("rtpengine"))
    return Media(SBC)


async def ng_request(daemon: Rtpengine, command: str, **params: Any) -> dict[str, Any]:
    """One NG command to rtpengine from a control socket of the test's own."""
    async with NgClient(daemon.ng, timeout=0.5, tries=3) as ng:
        return await ng.request(command, params)


# -- 3CX's address: registrar and queue behind one UDP port ---------------------------------------


class PbxFront(asyncio.DatagramProtocol):
    """``[pbx] host:port`` over UDP: REGISTER to the registrar, any other request to the queue
    phone, and what those two send here (their answers: sbc's Via asks for rport) to sbc."""

    def __init__(self, registrar: tuple[str, int], queue: tuple[str, int]) -> None:
        self.registrar = registrar
        self.queue = queue
        self.sbc: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.to_queue: list[bytes] = []  # first lines of what went to the queue

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        source = (addr[0], addr[1])
        if source in (self.registrar, self.queue):
            if self.sbc is not None:
                self.transport.sendto(data, self.sbc)
            return
        self.sbc = source
        if data.startswith(b"REGISTER "):
            self.transport.sendto(data, self.registrar)
        else:
            self.to_queue.append(data.split(b"\r\n", 1)[0])
            self.transport.sendto(data, self.queue)


# -- sbc between the phones -----------------------------------------------------------------------


@dataclass
class Rig:
    service: Service
    settings: Settings
    media: Media
    queue_port: int
    front: PbxFront

    @property
    def manager(self) -> CallManager:
        bridge = self.service.bridge
        assert isinstance(bridge, CallManager)
        return bridge

    @property
    def sbc_uri(self) -> str:
        return f"sip:{EXTENSION}@{SBC}:{self.settings.sip.port}"

    def the_call_uuid(self) -> str:
        assert len(self.manager.calls) == 1, self.manager.calls
        return next(iter(self.manager.calls))

    async def settled(self, limit: float = 10.0) -> None:
        async with asyncio.timeout(limit):
            await self.manager.wait_idle()

    async def assert_clean(self, call_uuid: str) -> None:
        """No call in sbc, no RTP port in use, no call left in rtpengine."""
        assert self.manager.active == 0
        backend = self.manager.media
        if self.media.rtpengine is None:
            pool = getattr(backend, "pool", None)
            assert pool is not None
            assert pool.in_use == 0
            return
        assert isinstance(backend, RtpengineBackend)
        assert not backend.sessions
        with pytest.raises(RtpengineError, match="Unknown call-id"):
            await ng_request(self.media.rtpengine, "query", **{"call-id": call_uuid})
        listed = await ng_request(self.media.rtpengine, "list")
        assert listed.get("calls") == [], listed


def bridge_settings(media: Media) -> Settings:
    rtp_min = free_port(SBC) & ~1
    return Settings(
        sip=quick_sip(SBC),
        pbx=demo_pbx(PBX, EXTENSION),
        retell=RetellSettings(host=RETELL, port=free_port(RETELL), transport="tcp", number=NUMBER),
        headers=HEADERS,
        calls=CallsSettings(country_code="31", max_concurrent=4),
        media=MediaSettings(
            mode=media.mode,
            rtpengine=None if media.rtpengine is None else media.rtpengine.listen,
            rtp_port_min=rtp_min,
            rtp_port_max=rtp_min + 99,
        ),
        transfer=TransferSettings(
            mode="invite",
            allow=r"^8[0-9]{2}$",  # type: ignore[arg-type]
            targets={"sales": QUEUE_NUMBER},
            ring_timeout=RING_TIMEOUT,
        ),
        admin=AdminSettings(listen=f"{SBC}:{free_port(SBC, udp=False)}"),
    )


@contextlib.asynccontextmanager
async def running_bridge(media: Media) -> AsyncIterator[Rig]:
    """The registrar behind 3CX's address, sbc registered with it."""
    settings = bridge_settings(media)
    loop = asyncio.get_running_loop()
    registrar = pbx_stand_in(settings, free_port(PBX))
    queue_port = free_port(PBX)
    front = PbxFront((PBX, registrar.port), (PBX, queue_port))
    await registrar.start()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: front, local_addr=(PBX, settings.pbx.port)
    )
    service = Service(settings)
    try:
        await service.start()
        async with asyncio.timeout(10):
            await registrar.registered.wait()
        yield Rig(service, settings, media, queue_port, front)
    finally:
        await service.stop()
        transport.close()
        await registrar.stop()


# -- the phones -----------------------------------------------------------------------------------


@dataclass
class Phone:
    """One pjsua2 phone process and what it reported so far."""

    name: str
    proc: asyncio.subprocess.Process
    log: Path
    changed: asyncio.Event
    events: list[dict[str, Any]] = field(default_factory=list)
    windows: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    ready: bool = False
    eof: bool = False
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            kind, _, payload = raw.decode(errors="replace").strip().partition(" ")
            if kind == "READY":
                self.ready = True
            elif kind == "EVENT":
                self.events.append(json.loads(payload))
            elif kind == "WINDOW":
                self.windows.append(json.loads(payload))
            elif kind == "RESULT":
                self.result = json.loads(payload)
            self.changed.set()
        self.eof = True
        self.changed.set()

    def event(self, kind: str) -> dict[str, Any] | None:
        """The first event of ``kind``."""
        return next((e for e in self.events if e["kind"] == kind), None)

    def at(self, kind: str) -> float:
        found = self.event(kind)
        assert found is not None, f"{self.name}: no {kind} event in {self.events}"
        return float(found["t"])

    def transfer_final(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e["kind"] == "xfer_status" and e["final"]), None)

    async def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self, limit: float = 10.0) -> dict[str, Any]:
        """The RESULT, once the process exited by itself (killed after ``limit`` seconds)."""
        try:
            async with asyncio.timeout(limit):
                await self.proc.wait()
                if self.reader is not None:
                    await self.reader
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"pjsua2 {self.name} still running after {limit} s") from None
        assert self.result is not None, f"no RESULT from pjsua2 {self.name}:\n{self.tail()}"
        return self.result

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


class Phones:
    """The phones of one test; ``until`` waits for any condition over what they reported."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.changed = asyncio.Event()
        self.phones: list[Phone] = []

    async def start(self, name: str, *args: str) -> Phone:
        record = self.workdir / f"{name}-windows"
        record.mkdir()
        log = self.workdir / f"{name}.log"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PEER),
            *args,
            *("--name", name, "--log", str(log), "--control", "--record-dir", str(record)),
            *("--window", str(WINDOW), "--probe", ",".join(map(str, PROBES))),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        phone = Phone(name, proc, log, self.changed)
        phone.reader = asyncio.ensure_future(phone.read())
        self.phones.append(phone)
        await self.until(lambda: phone.ready or phone.eof, 15, f"{name} listening")
        assert phone.ready, f"pjsua2 {name} exited before READY:\n{phone.tail()}"
        return phone

    async def until(self, condition: Callable[[], Any], limit: float, what: str) -> Any:
        """``condition()`` once it is truthy, re-checked on every line a phone prints (and
        every RECHECK seconds, for conditions on sbc's side)."""
        try:
            async with asyncio.timeout(limit):
                while not (value := condition()):
                    self.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), RECHECK)
                return value
        except TimeoutError:
            seen = {p.name: [e["kind"] for e in p.events][-12:] for p in self.phones}
            windows = {p.name: [summary(w) for w in p.windows[-6:]] for p in self.phones}
            raise AssertionError(
                f"not within {limit} s: {what}\nevents: {seen}\nwindows: {windows}"
            ) from None

    async def close(self) -> None:
        for phone in self.phones:
            await phone.kill()


@contextlib.asynccontextmanager
async def phones(workdir: Path) -> AsyncIterator[Phones]:
    board = Phones(workdir)
    try:
        yield board
    finally:
        await board.close()


async def start_retell(board: Phones, rig: Rig) -> Phone:
    port = str(rig.settings.retell.port)
    return await board.start(
        "retell",
        *("--role", "answerer", "--bind", RETELL, "--port", port, "--transport", "tcp"),
        *("--id-uri", f"sip:{NUMBER}@{RETELL}", "--tone", str(AGENT_HZ), "--max-time", "60"),
    )


async def start_queue(board: Phones, rig: Rig, answer: int) -> Phone:
    return await board.start(
        "queue",
        *("--role", "answerer", "--bind", PBX, "--port", str(rig.queue_port)),
        *("--id-uri", f"sip:{QUEUE_NUMBER}@{PBX}", "--tone", str(QUEUE_HZ)),
        *("--answer", str(answer), "--ring", "0.3", "--max-time", "60"),
    )


async def start_caller(board: Phones, rig: Rig, *extra: str) -> Phone:
    return await board.start(
        "caller",
        *("--role", "caller", "--bind", PBX, "--port", str(free_port(PBX))),
        *("--id-uri", f'"Jane Doe" <sip:0201234567@{PBX}>', "--target", rig.sbc_uri),
        *("--tone", str(CALLER_HZ), "--talk", "0", "--max-time", "60", *extra),
    )


# -- what the phones heard ------------------------------------------------------------------------


def full(window: dict[str, Any]) -> bool:
    return bool(window["end"] - window["start"] >= 0.9 * WINDOW)


def hears(window: dict[str, Any], hz: int) -> bool:
    """A full window with RTP flowing whose audio is the ``hz`` tone."""
    return (
        full(window)
        and window["rx"] >= MIN_RX
        and window["power"].get(str(hz), 0.0) >= MIN_SHARE
        and abs(window["freq"] - hz) <= 0.03 * hz
    )


def heard(phone: Phone, hz: int, after: float = 0.0, count: int = WINDOWS) -> list[dict[str, Any]]:
    """The first ``count`` consecutive windows starting after ``after`` in which ``phone``
    heard ``hz``; empty until there are that many."""
    run: list[dict[str, Any]] = []
    for window in phone.windows:
        if window["start"] < after:
            continue
        run = [*run, window] if hears(window, hz) else []
        if len(run) == count:
            return run
    return []


def summary(window: dict[str, Any]) -> str:
    shares = "/".join(f"{window['power'].get(str(hz), 0):.2f}" for hz in PROBES)
    return f"{window['rx']}rx {window['freq']:.0f}Hz [{shares}]"


def gaps(phone: Phone, hz: int, start: float, end: float) -> list[str]:
    """The full windows of ``phone`` between ``start`` and ``end`` in which it did not hear
    ``hz`` (no RTP, too little, or something else)."""
    return [
        f"{phone.name} {w['start'] - start:+.2f} {summary(w)}"
        for w in phone.windows
        if w["start"] >= start and w["end"] <= end and full(w) and not hears(w, hz)
    ]


def timeline(phone: Phone, since: float) -> list[str]:
    """``phone``'s windows from ``since`` on: start (seconds after ``since``) and summary."""
    return [f"{w['start'] - since:+.2f} {summary(w)}" for w in phone.windows if w["end"] > since]


def measured(phone: Phone, windows: list[dict[str, Any]]) -> str:
    packets = sum(w["rx"] for w in windows)
    freqs = ", ".join(f"{w['freq']:.1f}" for w in windows)
    return f"{phone.name}: {packets} RTP packets in {len(windows)} windows, tone {freqs} Hz"


def statuses(phone: Phone) -> list[tuple[int, bool]]:
    """The transfer statuses pjsua2 reported: 100 when the REFER was accepted (202), then each
    NOTIFY's sipfrag, the last one final."""
    return [(e["status"], e["final"]) for e in phone.events if e["kind"] == "xfer_status"]


def notifies(phone: Phone) -> list[tuple[str, str, str]]:
    """The NOTIFYs ``phone`` received: (sipfrag status line, Subscription-State, Event)."""
    return [
        (e["sipfrag"], e["state"].split(";")[0], e["event"])
        for e in phone.events
        if e["kind"] == "notify"
    ]


def assert_notified(phone: Phone, status: int, reason: str, *, trying: bool = True) -> None:
    """Retell's REFER got NOTIFY 100 Trying (unless the target was refused at once), then
    NOTIFY ``status``, which ended the subscription; pjsua2 reported the same, the last final."""
    first = [("SIP/2.0 100 Trying", "active", "refer")] if trying else []
    assert notifies(phone) == [
        *first,
        (f"SIP/2.0 {status} {reason}", "terminated", "refer"),
    ], notifies(phone)
    # pjsua2 reports 100 for the 202 too, unless a NOTIFY came first.
    reported = statuses(phone)
    assert reported[-1] == (status, True) and set(reported[:-1]) <= {(100, False)}, reported


# -- the checks -----------------------------------------------------------------------------------


async def test_invite_transfer_bridges_the_caller_to_the_queue_with_audio(
    tmp_path: Path, media: Media
) -> None:
    require_pjsua2()
    started = time.monotonic()
    async with running_bridge(media) as rig, phones(tmp_path) as board:
        retell = await start_retell(board, rig)
        queue = await start_queue(board, rig, answer=200)
        caller = await start_caller(board, rig)
        await board.until(
            lambda: heard(caller, AGENT_HZ) and heard(retell, CALLER_HZ),
            15,
            "caller and agent hear each other",
        )
        caller_agent, agent_caller = heard(caller, AGENT_HZ), heard(retell, CALLER_HZ)
        call_uuid = rig.the_call_uuid()
        refer_sent = time.monotonic()
        await retell.send(f"xfer sip:sales@{RETELL}")
        final = await board.until(retell.transfer_final, 15, "Retell's final NOTIFY")
        # sbc ends the agent's leg itself (Retell's pjsua2 does not hang up after a transfer).
        await board.until(lambda: retell.eof, 10, "the agent's call ended")
        queue_up = queue.at("connected")
        agent_gone = retell.at("disconnected")
        after = max(queue_up, agent_gone)
        await board.until(
            lambda: heard(caller, QUEUE_HZ, after) and heard(queue, CALLER_HZ, after),
            10,
            "caller and queue hear each other",
        )
        caller_queue, queue_caller = heard(caller, QUEUE_HZ, after), heard(queue, CALLER_HZ, after)
        hangup_sent = time.monotonic()
        await caller.send("hangup")
        called = await caller.finish()
        queued = await queue.finish()
        agent = await retell.finish()
        await rig.settled()
        record = rig.manager.records[-1]
        await rig.assert_clean(call_uuid)
        to_queue = list(rig.front.to_queue)
    elapsed = time.monotonic() - started

    print(f"[{media.mode}] transfer by INVITE, {elapsed:.1f} s")
    print(f"  before: {measured(caller, caller_agent)}; {measured(retell, agent_caller)}")
    print(f"  after:  {measured(caller, caller_queue)}; {measured(queue, queue_caller)}")
    print(f"  Retell's NOTIFYs: {notifies(retell)}")
    print(
        f"  REFER -> final NOTIFY {final['t'] - refer_sent:.2f} s, -> queue answered"
        f" {queue_up - refer_sent:.2f} s, -> agent's call ended {agent_gone - refer_sent:.2f} s"
    )
    print(f"  re-INVITEs the caller got: {called['rx_offers']}; record: {record.transfers}")
    for phone in (caller, queue, retell):
        print(f"  {phone.name} since the REFER: {timeline(phone, refer_sent)}")
    # The windows from just after the queue's answer (the caller's jitter buffer takes the
    # queue's stream, of another SSRC, in its stride) until the hang-up.
    settled = queue_up + HANDOVER
    handover = [
        *gaps(caller, QUEUE_HZ, settled, hangup_sent),
        *gaps(queue, CALLER_HZ, settled, hangup_sent),
    ]
    print(f"  windows from the queue's answer on without the other's tone: {handover}")
    assert_notified(retell, 200, "OK")
    # The agent's leg ended by sbc's BYE right after the final NOTIFY (pjsua2 reports the BYE
    # it received as 200): in rtpengine mode nothing else would keep its audio from the caller.
    assert agent["connected"] and agent["disconnected"] and not agent["hung_up_here"], agent
    assert agent_gone - final["t"] <= 1.0
    # From the answer on the caller hears the queue only and the queue the caller, in both
    # modes (relay: the agent is a retired source; rtpengine: the agent's leg is gone).
    assert not handover, handover
    # The queue got sbc's INVITE to the target's PBX number, from the extension, with the
    # caller's name, the call's X- headers and media through sbc.
    invite = queued["invite"]
    assert invite.startswith(f"INVITE sip:{QUEUE_NUMBER}@{PBX}:{rig.settings.pbx.port}"), invite
    assert to_queue[0].startswith(f"INVITE sip:{QUEUE_NUMBER}@".encode()), to_queue
    assert f'\r\nFrom: "Jane Doe" <sip:{EXTENSION}@{PBX}>;tag=' in invite
    assert f'\r\nP-Asserted-Identity: "Jane Doe" <sip:+31201234567@{PBX}>\r\n' in invite
    assert "\r\nX-Caller-Number: +31201234567\r\nX-Called: 1000\r\n" in invite
    assert f"c=IN IP4 {media.host}\r\n" in invite
    assert queued["connected"] and queued["disconnected"] and not queued["hung_up_here"]
    assert called["connected"] and called["hung_up_here"], called
    (transfer,) = record.transfers
    assert transfer == TransferRecord(
        QUEUE_NUMBER, "invite", "transferred", 200, transfer.answer_after
    )
    assert record.end_reason == "pbx_bye", record


@dataclass(frozen=True)
class Failure:
    name: str
    status: int  # what Retell's final NOTIFY says
    reason: str
    refer_to: str  # the REFER's target (user part)
    queue_answer: int | None  # the queue phone's answer; None: no queue phone at all
    outcome: str = "failed"
    trying: bool = True  # NOTIFY 100 before the outcome (not for a target refused at once)


FAILURES = [
    Failure("busy", 486, "Busy Here", "sales", 486),
    Failure("no_answer", 408, "Request Timeout", "sales", 0),
    Failure("not_allowed", 403, "Forbidden", "+442071234567", None, "refused", trying=False),
]


@pytest.mark.parametrize("failure", FAILURES, ids=[f.name for f in FAILURES])
async def test_failed_transfer_keeps_the_caller_with_the_agent(
    tmp_path: Path, media: Media, failure: Failure
) -> None:
    require_pjsua2()
    started = time.monotonic()
    async with running_bridge(media) as rig, phones(tmp_path) as board:
        retell = await start_retell(board, rig)
        queue = None
        if failure.queue_answer is not None:
            queue = await start_queue(board, rig, answer=failure.queue_answer)
        caller = await start_caller(board, rig)
        await board.until(
            lambda: heard(caller, AGENT_HZ) and heard(retell, CALLER_HZ),
            15,
            "caller and agent hear each other",
        )
        call_uuid = rig.the_call_uuid()
        refer_sent = time.monotonic()
        await retell.send(f"xfer sip:{failure.refer_to}@{RETELL}")
        final = await board.until(retell.transfer_final, 15, "Retell's final NOTIFY")
        failed_at = float(final["t"])
        await board.until(
            lambda: heard(caller, AGENT_HZ, failed_at) and heard(retell, CALLER_HZ, failed_at),
            10,
            "caller and agent still hear each other",
        )
        caller_agent = heard(caller, AGENT_HZ, failed_at)
        agent_caller = heard(retell, CALLER_HZ, failed_at)
        hangup_sent = time.monotonic()
        await caller.send("hangup")
        called = await caller.finish()
        agent = await retell.finish()
        queued = await queue.finish() if queue is not None else None
        await rig.settled()
        record = rig.manager.records[-1]
        await rig.assert_clean(call_uuid)
        to_queue = list(rig.front.to_queue)
    elapsed = time.monotonic() - started

    # Every full window of the caller and the agent from the REFER until the hang-up.
    during = [
        w
        for phone in (caller, retell)
        for w in phone.windows
        if w["start"] >= refer_sent and w["end"] <= hangup_sent and full(w)
    ]
    missing = [
        *gaps(caller, AGENT_HZ, refer_sent, hangup_sent),
        *gaps(retell, CALLER_HZ, refer_sent, hangup_sent),
    ]
    print(
        f"[{media.mode}] {failure.name}: {elapsed:.1f} s, REFER -> final NOTIFY"
        f" {failed_at - refer_sent:.2f} s, NOTIFYs {notifies(retell)}"
    )
    print(f"  after:  {measured(caller, caller_agent)}; {measured(retell, agent_caller)}")
    print(f"  {len(during)} windows since the REFER, without the other's tone: {missing}")
    assert_notified(retell, failure.status, failure.reason, trying=failure.trying)
    # The agent kept the caller until the caller hung up (sbc's BYE then ended its call).
    assert agent["disconnected"] and not agent["hung_up_here"], agent
    assert called["hung_up_here"] and called["rx_offers"] == 0, called
    # The caller and the agent heard each other all along, while the queue rang too.
    assert not missing, missing
    if queued is None:
        assert to_queue == [], to_queue  # a target not allowed never reaches the PBX
    else:
        assert to_queue[0].startswith(f"INVITE sip:{QUEUE_NUMBER}@".encode()), to_queue
        # Busy: the queue's own 486; no answer: sbc's CANCEL, answered 487.
        assert not queued["connected"]
        assert queued["last_status"] == (486 if failure.queue_answer == 486 else 487), queued
    if failure.queue_answer == 0:
        assert any(line.startswith(b"CANCEL sip:800@") for line in to_queue), to_queue
        assert RING_TIMEOUT <= failed_at - refer_sent <= RING_TIMEOUT + 1.0
    assert len(record.transfers) == 1
    assert record.transfers[0].status == failure.status
    assert record.transfers[0].outcome == failure.outcome
    assert record.end_reason == "pbx_bye", record


async def test_late_offer_invite_from_the_pbx_is_bridged_with_audio(
    tmp_path: Path, media: Media
) -> None:
    require_pjsua2()
    started = time.monotonic()
    async with running_bridge(media) as rig, phones(tmp_path) as board:
        retell = await start_retell(board, rig)
        caller = await start_caller(board, rig, "--late-offer")
        await board.until(lambda: rig.manager.active == 1, 10, "sbc has the call")
        call_uuid = rig.the_call_uuid()
        caller_invite = rig.manager.calls[call_uuid].a_invite
        await board.until(
            lambda: heard(caller, AGENT_HZ) and heard(retell, CALLER_HZ),
            15,
            "caller and agent hear each other",
        )
        caller_agent, agent_caller = heard(caller, AGENT_HZ), heard(retell, CALLER_HZ)
        await caller.send("hangup")
        called = await caller.finish()
        agent = await retell.finish()
        await rig.settled()
        record = rig.manager.records[-1]
        await rig.assert_clean(call_uuid)
    elapsed = time.monotonic() - started

    print(f"[{media.mode}] late offer, {elapsed:.1f} s")
    print(f"  {measured(caller, caller_agent)}; {measured(retell, agent_caller)}")
    # 3CX's INVITE had no SDP, so neither had sbc's to Retell: Retell's 200 held the offer,
    # the caller's ACK the answer.
    assert caller_invite.body == b"", caller_invite.body
    assert "\r\nm=audio" not in agent["invite"], agent["invite"]
    assert called["rx_offers"] >= 1, called
    assert called["hung_up_here"] and agent["disconnected"] and not agent["hung_up_here"]
    assert record.end_reason == "pbx_bye" and record.pbx_status == 200, record
