"""``sbc demo``: one real call through the bridge, between local stand-ins of 3CX and Retell.

Everything runs in this process on loopback (the addresses come from the demo settings, by
default ``sbc/ops/demo.toml``): the 3CX stand-in registrar and caller, the Retell stand-in
over TCP, and sbc itself, built exactly as ``sbc run`` builds it (:class:`sbc.ops.service.Service`).
The calls:

1. sbc registers the extension; 3CX challenges with 407 and checks the digest;
2. 3CX calls the extension; sbc places its own INVITE to Retell with the X- headers;
3. Retell rings, answers with one codec; both sides send a tone for ``talk`` seconds through
   the bridge's media (3CX also sends a DTMF digit as RFC 4733 events);
4. 3CX hangs up; sbc ends the Retell leg, releases the media ports;
5. 3CX calls again and, after a moment with the agent, Retell's agent transfers the caller to the
   target named ``sales`` (a REFER, as Retell sends it). In ``[transfer] mode = "invite"`` (the
   demo's default) sbc calls the queue number from the extension (3CX challenges that INVITE),
   bridges the caller to the queue, reports the outcome to Retell in NOTIFYs and lets Retell hang
   up; the caller hears the queue's tone, the queue the caller's, until 3CX hangs up. In
   ``refer`` mode sbc REFERs 3CX's own call to the queue instead, and leaves both legs;
6. sbc unregisters at stop.

Every step is bounded by a timeout. A short summary goes to ``out`` (stdout); :func:`serve`
returns 0 when every check passed, 1 otherwise, with one line per failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from sbc.demo.pbx import QUEUE_TONE_HZ, REALM, PbxCall, PbxStandIn, QueueCall
from sbc.demo.retell import NotifySeen, RetellCall, RetellStandIn
from sbc.demo.rtp_peer import RtpStream, heard_frequency, same_packets
from sbc.media.relay import RelayBackend
from sbc.media.rtp import parse_telephone_event
from sbc.ops.service import Service
from sbc.ops.settings import Settings
from sbc.sip.uri import SipUri

__all__ = ["DemoReport", "run_demo", "serve"]

DEFAULT_TALK = 8.0  # seconds of audio each way
STEP_TIMEOUT = 10.0  # any one step (registration, answer, hang-up) must finish within this
DRAIN_TIMEOUT = 2.0  # for the last RTP packets in flight once both sides stop sending
DTMF_DIGIT = "5"
CALLER_NUMBER = "0201234567"
CALLER_NAME = "Jane Doe"
CALLER_TONE_HZ = 440
AGENT_TONE_HZ = 660
TRANSFER_TARGET = "sales"  # the [transfer] targets name the agent transfers to
TRANSFER_HEADER = ("X-Transfer-Reason", "caller asked for sales")  # an X- header on the REFER
AGENT_TALK = 1.0  # seconds the second caller spends with the agent before the transfer
QUEUE_TALK = 2.0  # seconds of audio between the caller and the queue
TONE_TOLERANCE = 5.0  # Hz between a tone sent and the frequency measured where it arrived


class DemoFailed(Exception):
    """A step could not be completed; the message says which."""


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class DemoReport:
    """What the demo saw; also printed as it goes."""

    out: TextIO | None = None
    started: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def say(self, text: str) -> None:
        self._print(f"[{time.monotonic() - self.started:6.2f} s] {text}")

    def detail(self, text: str) -> None:
        self._print(f"{'':11}{text}")

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, ok, detail))
        if not ok:
            self._print(f"{'':11}FAILED: {what}" + (f" ({detail})" if detail else ""))
        return ok

    def _print(self, line: str) -> None:
        if self.out is not None:
            print(line, file=self.out, flush=True)


async def serve(settings: Settings) -> int:
    """The CLI's entry point for ``sbc demo``: run the demo, return the exit status."""
    report = await run_demo(settings, out=sys.stdout)
    return 0 if report.passed else 1


async def run_demo(
    settings: Settings, *, talk: float = DEFAULT_TALK, out: TextIO | None = None
) -> DemoReport:
    """Run the demo call; never raises for a failure of the product (it becomes a check)."""
    report = DemoReport(out)
    baseline_tasks = asyncio.all_tasks()
    baseline_sockets = _open_sockets()
    pbx = PbxStandIn(
        settings.pbx.host,
        settings.pbx.port,
        extension=settings.pbx.extension,
        auth_id=settings.pbx.auth_id,
        password=settings.pbx.password.get_secret_value(),
        expires=settings.pbx.register_expires,
        queues=set(settings.transfer.targets.values()),
        queue_tone_hz=QUEUE_TONE_HZ,
    )
    retell = RetellStandIn(settings.retell.host, settings.retell.port, tone_hz=AGENT_TONE_HZ)
    service: Service | None = None
    _intro(report, settings)
    try:
        await _started(report, "3CX stand-in", pbx.start())
        await _started(report, "Retell stand-in", retell.start())
        service = Service(settings)
        await _started(report, "sbc", service.start())
        await _call(report, settings, service, pbx, retell, talk)
        await _transfer_call(report, settings, service, pbx, retell)
    except DemoFailed as exc:
        report.check(str(exc), False)
    except Exception as exc:  # a bug somewhere: still a clear line, and everything stopped
        report.check(f"unexpected error: {exc!r}", False)
    finally:
        await _stop(report, service, pbx, retell, baseline_tasks, baseline_sockets)
    _verdict(report)
    return report


def _intro(report: DemoReport, settings: Settings) -> None:
    pbx, retell, sip, media = settings.pbx, settings.retell, settings.sip, settings.media
    transfer = settings.transfer
    queue = transfer.targets.get(TRANSFER_TARGET, "?")
    report.say(
        "sbc demo: two calls from a 3CX stand-in to a Retell stand-in through sbc;"
        " the agent transfers the second one back to 3CX"
    )
    report.detail(
        f"3CX stand-in     {pbx.transport}:{pbx.host}:{pbx.port}  registrar, caller, queue {queue}"
    )
    report.detail(
        f"Retell stand-in  {retell.transport}:{retell.host}:{retell.port}  answers, transfers"
    )
    ports = (
        f" (RTP ports {media.rtp_port_min}-{media.rtp_port_max})" if media.mode == "relay" else ""
    )
    report.detail(
        f"sbc              {sip.bind}:{sip.port}  media {media.mode}{ports},"
        f" transfers by {transfer.mode.upper()}"
    )


async def _started(report: DemoReport, name: str, starting: Awaitable[None]) -> None:
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await starting
    except TimeoutError as exc:
        raise DemoFailed(f"{name} did not start within {STEP_TIMEOUT:g} s") from exc
    except OSError as exc:
        raise DemoFailed(
            f"{name} could not start: {exc} (is another demo running? --config picks addresses)"
        ) from exc
    except Exception as exc:
        raise DemoFailed(f"{name} could not start: {exc!r}") from exc


@contextlib.asynccontextmanager
async def _step(what: str, seconds: float = STEP_TIMEOUT) -> AsyncIterator[None]:
    """Bound one step; running out of time is a failure named after the step."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise DemoFailed(f"{what}: nothing after {seconds:g} s") from None


async def _poll(condition: Callable[[], bool]) -> None:
    """Wait for a state of the bridge that has no event of its own (checked every 20 ms)."""
    while not condition():  # noqa: ASYNC110 - the call table offers no event to wait on
        await asyncio.sleep(0.02)


# -- the call ---------------------------------------------------------------------------------


async def _call(
    report: DemoReport,
    settings: Settings,
    service: Service,
    pbx: PbxStandIn,
    retell: RetellStandIn,
    talk: float,
) -> None:
    started = asyncio.get_running_loop().time()
    async with _step("registration with the 3CX stand-in"):
        await pbx.registered.wait()
    _registered(report, settings, pbx, started)

    report.say(f'3CX calls extension {settings.pbx.extension}: "{CALLER_NAME}" <{CALLER_NUMBER}>')
    invited = asyncio.get_running_loop().time()
    async with _step("3CX's INVITE to sbc"):
        pbx_call = await pbx.call(caller_number=CALLER_NUMBER, tone_hz=CALLER_TONE_HZ)
    if not retell.calls:
        raise DemoFailed(f"Retell received no INVITE (3CX got {_statuses(pbx_call)})")
    retell_call = next(iter(retell.calls.values()))
    _invite_seen(report, settings, pbx, pbx_call, retell_call)
    _answered(report, pbx_call, retell_call, invited)
    if pbx_call.final is None or pbx_call.final.status != 200:
        raise DemoFailed(f"the call was not answered (3CX got {_statuses(pbx_call)})")

    async with _step("the ACK on the Retell leg"):
        await retell_call.acked.wait()
    await _talk(report, pbx_call, retell_call, talk)

    async with _step("the answer to 3CX's BYE"):
        status = await pbx.hang_up(pbx_call)
    async with _step("the BYE on the Retell leg"):
        await retell_call.ended.wait()
    report.say(f"3CX hung up: its BYE was answered {status}")
    report.check("sbc answered 3CX's BYE with 200", status == 200, str(status))
    report.check("sbc sent BYE to Retell (answered 200)", retell_call.bye_received)
    report.detail(f"Retell received BYE from sbc: {'yes' if retell_call.bye_received else 'no'}")
    await _released(report, service)


def _registered(report: DemoReport, settings: Settings, pbx: PbxStandIn, started: float) -> None:
    log = pbx.registrar
    took = (log.registered_at or started) - started
    report.say(
        f"registered: extension {settings.pbx.extension} as {settings.pbx.auth_id}"
        f" in {took * 1000:.0f} ms (407 challenge, MD5, realm {REALM}; {log.challenges} challenge,"
        f" {log.accepted} accepted)"
    )
    report.detail(f"binding {log.binding}, expires {log.expires} s, User-Agent {log.user_agent}")
    report.facts["registered_ms"] = round(took * 1000, 1)
    report.check("REGISTER challenged then accepted", log.challenges >= 1 and log.accepted >= 1)
    report.check("no REGISTER refused", log.refused == 0, f"{log.refused} refused")


def _invite_seen(
    report: DemoReport,
    settings: Settings,
    pbx: PbxStandIn,
    pbx_call: PbxCall,
    retell_call: RetellCall,
) -> None:
    invite = retell_call.invite
    report.say(f"Retell received an INVITE over {retell_call.transport.upper()}:")
    report.detail(f"Request-URI  {invite.uri}")
    report.detail(f"From         {invite.headers.get('From')}")
    report.detail(f"To           {invite.headers.get('To')}")
    for name, value in retell_call.x_headers:
        report.detail(f"{name}: {value}")
    report.facts["request_uri"] = str(invite.uri)
    report.facts["from"] = invite.headers.get("From")
    report.facts["to"] = invite.headers.get("To")
    report.facts["x_headers"] = dict(retell_call.x_headers)

    number = settings.retell.number
    uri = invite.uri
    report.check(
        f"Request-URI and To user are {number}",
        isinstance(uri, SipUri)
        and isinstance(invite.to.uri, SipUri)
        and uri.user == number
        and invite.to.uri.user == number,
    )
    report.check(
        f"INVITE to Retell over {settings.retell.transport.upper()}",
        retell_call.transport == settings.retell.transport,
        retell_call.transport,
    )
    report.check(
        f'From carries the caller name "{CALLER_NAME}"', invite.from_.display == CALLER_NAME
    )
    received = {name.lower(): value for name, value in retell_call.x_headers}
    missing = [name for name in settings.headers if not received.get(name.lower())]
    report.check("every configured X- header arrived", not missing, f"missing {missing}")
    leaked = _leaks(invite.headers.items(), pbx, pbx_call)
    report.check("nothing of the 3CX leg in Retell's INVITE headers", not leaked, "; ".join(leaked))
    if not leaked:
        report.detail(f"no 3CX Call-ID, Via, Record-Route or address ({pbx.host}) in its headers")


def _leaks(headers: tuple[tuple[str, str], ...], pbx: PbxStandIn, pbx_call: PbxCall) -> list[str]:
    found = []
    pbx_call_id = pbx_call.invite.call_id
    for name, value in headers:
        if name == "Call-ID" and value == pbx_call_id:
            found.append("the 3CX Call-ID")
        if name == "Record-Route":
            found.append(f"Record-Route {value}")
        if pbx.host in value:
            found.append(f"{name}: {value}")
    return found


def _answered(
    report: DemoReport, pbx_call: PbxCall, retell_call: RetellCall, invited: float
) -> None:
    codecs = retell_call.codecs
    report.say(
        f"Retell rang and answered with {', '.join(codecs) or 'nothing'};"
        f" 3CX got {_statuses(pbx_call)}"
    )
    if pbx_call.answered_at is not None:
        report.detail(f"INVITE to answer: {(pbx_call.answered_at - invited) * 1000:.0f} ms")
    report.check("3CX heard ringing (180)", 180 in pbx_call.statuses, _statuses(pbx_call))
    report.check(
        "3CX's call answered 200",
        pbx_call.final is not None and pbx_call.final.status == 200,
        _statuses(pbx_call),
    )
    if pbx_call.final is not None and pbx_call.final.status == 200:
        report.check("sbc's 200 OK echoed 3CX's Record-Route", pbx_call.record_route_echoed)


async def _talk(
    report: DemoReport, pbx_call: PbxCall, retell_call: RetellCall, talk: float
) -> None:
    a, b = pbx_call.rtp, retell_call.rtp
    report.say(
        f"talking for {talk:g} s: 3CX sends {CALLER_TONE_HZ} Hz, Retell {AGENT_TONE_HZ} Hz"
        " (PCMU, 20 ms packets)"
    )
    await asyncio.sleep(min(1.0, talk / 2))
    a.send_dtmf(DTMF_DIGIT)
    report.detail(f'3CX sends DTMF "{DTMF_DIGIT}" as RFC 4733 telephone-event packets')
    await asyncio.sleep(max(0.0, talk - min(1.0, talk / 2)))
    a.stop_sending()
    b.stop_sending()
    await _drained(a, b)
    _rtp_line(report, "3CX -> Retell", a, b)
    _rtp_line(report, "Retell -> 3CX", b, a)
    events = b.events_received()
    digits = {str(parse_telephone_event(p.payload).event) for p in events}
    shown = ", ".join(sorted(digits)) or "none"
    report.detail(f"Retell received {len(events)} telephone-event packets, digit(s) {shown}")
    report.check(f'DTMF "{DTMF_DIGIT}" reached Retell', digits == {DTMF_DIGIT}, str(digits))
    report.facts["dtmf_packets"] = len(events)


async def _drained(a: RtpStream, b: RtpStream) -> None:
    """Let the packets in flight arrive (a loss shows up as a count mismatch, not a hang)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await a.wait_received(len(b.sent))
            await b.wait_received(len(a.sent))


def _rtp_line(report: DemoReport, direction: str, sender: RtpStream, receiver: RtpStream) -> None:
    sent, got = len(sender.sent), len(receiver.received)
    same = same_packets(sender.sent, receiver.received)
    report.say(
        f"RTP {direction}: {sent} sent, {got} received"
        + (" (sequence numbers and payloads identical)" if same else "")
    )
    report.facts[f"rtp {direction}"] = (sent, got)
    report.check(f"RTP {direction} flowed", sent > 0 and got > 0, f"{sent} sent, {got} received")
    report.check(f"RTP {direction} arrived unchanged, in order", same)


async def _released(report: DemoReport, service: Service, after: str = "") -> None:
    manager = service.bridge
    async with _step("the end of the call in sbc"):
        await _poll(lambda: not manager.calls)
    if manager.records:
        last = manager.records[-1]
        report.detail(
            f"sbc's call record: {last.caller} -> {last.called}, ended by {last.end_reason},"
            f" 3CX {last.pbx_status}, Retell {last.retell_status}"
        )
    if not isinstance(manager.media, RelayBackend):
        report.say(f"sbc: {len(manager.calls)} calls left ({type(manager.media).__name__} media)")
        return
    pool = manager.media.pool
    report.say(
        f"sbc: {len(manager.calls)} calls left, RTP port pairs in use {pool.in_use}"
        f" of {pool.capacity}"
    )
    report.facts["ports_in_use" + (f" {after}" if after else "")] = pool.in_use
    report.check(
        "RTP ports released" + (f" {after}" if after else ""),
        pool.in_use == 0,
        f"{pool.in_use} pairs still in use",
    )


# -- the transfer -------------------------------------------------------------------------------


async def _transfer_call(
    report: DemoReport,
    settings: Settings,
    service: Service,
    pbx: PbxStandIn,
    retell: RetellStandIn,
) -> None:
    """A second call, which the agent transfers to the ``sales`` target (module docstring)."""
    transfer = settings.transfer
    number = transfer.targets.get(TRANSFER_TARGET)
    if number is None:
        raise DemoFailed(f'no [transfer] target "{TRANSFER_TARGET}" in the demo settings')
    report.say(
        f"transfer: 3CX calls extension {settings.pbx.extension} again; after {AGENT_TALK:g} s"
        f' the agent hands the caller to "{TRANSFER_TARGET}"'
    )
    report.detail(
        f'[transfer] mode {transfer.mode}, targets: "{TRANSFER_TARGET}" = queue {number},'
        f" allow {transfer.allow.pattern}"
    )
    before = set(retell.calls)
    async with _step("3CX's second INVITE to sbc"):
        pbx_call = await pbx.call(
            caller_number=CALLER_NUMBER, caller_name=CALLER_NAME, tone_hz=CALLER_TONE_HZ
        )
    new = [call for call_id, call in retell.calls.items() if call_id not in before]
    if not new or pbx_call.final is None or pbx_call.final.status != 200:
        raise DemoFailed(f"the second call was not answered (3CX got {_statuses(pbx_call)})")
    retell_call = new[0]
    async with _step("the ACK on the second Retell leg"):
        await retell_call.acked.wait()
    await asyncio.sleep(AGENT_TALK)

    name, value = TRANSFER_HEADER
    report.say(f"Retell's agent sends REFER  Refer-To: sip:{TRANSFER_TARGET}@{retell.host}")
    report.detail(f"{name}: {value}  (no Referred-By, no angle brackets: as Retell)")
    referred = asyncio.get_running_loop().time()
    async with _step("the answer to Retell's REFER"):
        status = await retell.refer(retell_call, TRANSFER_TARGET, headers=(TRANSFER_HEADER,))
    if 200 <= status < 300:
        async with _step("the final NOTIFY to Retell", transfer.ring_timeout + STEP_TIMEOUT):
            await retell_call.transfer_done.wait()
    final = _final_notify(retell_call.notifies)
    report.facts["transfer_notified_ms"] = (
        None if final is None else round((final.at - referred) * 1000, 1)
    )
    if final is None or final.status != 200:
        # Refused or failed: the caller stays with the agent; say what Retell saw, then end.
        _retell_saw(report, retell_call, status)
        report.say("the transfer did not happen; 3CX hangs up")
        async with _step("the answer to 3CX's BYE"):
            await pbx.hang_up(pbx_call)
        await _released(report, service, "after the transfer")
        return
    if transfer.mode == "invite":
        await _to_the_queue(report, settings, pbx, pbx_call, retell_call, status, number)
    else:
        await _to_the_pbx(report, settings, pbx_call, retell_call, status, number)
    await _released(report, service, "after the transfer")
    await _record_of_transfer(report, service, number, transfer.mode)


async def _to_the_queue(
    report: DemoReport,
    settings: Settings,
    pbx: PbxStandIn,
    pbx_call: PbxCall,
    retell_call: RetellCall,
    refer_status: int,
    number: str,
) -> None:
    """Invite mode: sbc called the queue; the caller and the queue talk; 3CX hangs up."""
    async with _step(f"the queue's answer to sbc's INVITE to {number}"):
        await pbx.queue_answered.wait()
    queue = next(q for q in pbx.queue_calls.values() if q.answer is not None)
    async with _step("the ACK on the queue's call"):
        await queue.acked.wait()
    caller = pbx_call.rtp
    await asyncio.sleep(QUEUE_TALK)
    async with _step("Retell's BYE after the transfer"):
        await retell_call.ended.wait()
    caller.stop_sending()
    queue.rtp.stop_sending()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await _poll(lambda: len(caller.received_from(queue.rtp.ssrc)) >= len(queue.rtp.sent))
    _retell_saw(report, retell_call, refer_status)
    _queue_saw(report, settings, pbx, queue, retell_call)
    _caller_heard(report, settings, pbx_call, queue, retell_call)

    async with _step("the answer to 3CX's BYE"):
        status = await pbx.hang_up(pbx_call)
    async with _step("the BYE on the queue's call"):
        await queue.ended.wait()
    report.say(
        f"3CX hung up: its BYE was answered {status}; the queue received BYE from sbc:"
        f" {'yes' if queue.bye_received else 'no'}"
    )
    report.check("sbc answered 3CX's BYE after the transfer with 200", status == 200, str(status))
    report.check("sbc sent BYE to the queue (answered 200)", queue.bye_received)


def _queue_saw(
    report: DemoReport,
    settings: Settings,
    pbx: PbxStandIn,
    queue: QueueCall,
    retell_call: RetellCall,
) -> None:
    invite = queue.invite
    if invite is None:
        report.check(f"the queue {queue.number} answered sbc's INVITE", False)
        return
    report.say(f"what 3CX's queue {queue.number} saw:")
    report.detail(f"INVITE {invite.uri}")
    report.detail(f"From         {invite.headers.get('From')}")
    pai = invite.headers.get("P-Asserted-Identity")
    report.detail(f"P-Asserted-Identity  {pai}")
    for name, value in queue.x_headers:
        report.detail(f"{name}: {value}")
    report.detail(
        f"{queue.challenges} challenge (407), then the digest of {queue.username or '?'}"
        f" accepted; answered 180, then 200 after {pbx.queue_ring:g} s"
    )
    received = queue.rtp.received_from(retell_call.rtp.ssrc)  # never: the agent is gone
    heard = [p for p in queue.rtp.received if p.header.ssrc != retell_call.rtp.ssrc]
    frequency = heard_frequency(heard)
    report.detail(
        f"the queue sends {QUEUE_TONE_HZ} Hz and heard the caller: {len(heard)} packets,"
        f" {_hz(frequency)}"
    )
    report.facts["queue_invite"] = invite
    report.facts["queue_x_headers"] = dict(queue.x_headers)
    report.facts["queue_heard"] = (len(heard), frequency)

    from_uri = invite.from_.uri
    report.check(
        f"the queue got sbc's INVITE from extension {settings.pbx.extension}, challenged 407"
        " then accepted",
        isinstance(from_uri, SipUri)
        and from_uri.user == settings.pbx.extension
        and queue.challenges >= 1
        and queue.username == settings.pbx.auth_id
        and queue.refused == 0,
        f"From {from_uri}, {queue.challenges} challenges, {queue.refused} refused",
    )
    caller_uri = retell_call.invite.from_.uri
    number = caller_uri.user if isinstance(caller_uri, SipUri) else None
    report.check(
        "the queue's INVITE carries the caller's name and number",
        invite.from_.display == CALLER_NAME
        and pai is not None
        and f"<sip:{number}@" in pai
        and f'"{CALLER_NAME}"' in pai,
        f"From {invite.headers.get('From')}, P-Asserted-Identity {pai}",
    )
    got = {n.lower(): v for n, v in queue.x_headers}
    wanted = {n.lower(): v for n, v in (*retell_call.x_headers, TRANSFER_HEADER)}
    wrong = sorted(n for n, v in wanted.items() if got.get(n) != v)
    report.check(
        "the queue's INVITE carries the call's and the REFER's X- headers", not wrong, str(wrong)
    )
    report.check(
        f"the queue heard the caller ({CALLER_TONE_HZ} Hz)",
        len(heard) > 0 and not received and _near(frequency, CALLER_TONE_HZ),
        f"{len(heard)} packets, {_hz(frequency)}, {len(received)} from the agent",
    )


def _caller_heard(
    report: DemoReport,
    settings: Settings,
    pbx_call: PbxCall,
    queue: QueueCall,
    retell_call: RetellCall,
) -> None:
    caller = pbx_call.rtp
    from_queue = caller.received_from(queue.rtp.ssrc)
    frequency = heard_frequency(from_queue)
    first = next(
        (i for i, p in enumerate(caller.received) if p.header.ssrc == queue.rtp.ssrc), None
    )
    after = [] if first is None else caller.received[first:]
    agent_after = sum(1 for p in after if p.header.ssrc == retell_call.rtp.ssrc)
    sent = len(queue.rtp.sent)
    report.say("what the caller heard after the transfer (on 3CX's call to the extension):")
    report.detail(
        f"the queue: {len(from_queue)} of {sent} packets, {_hz(frequency)}; the agent:"
        f" {agent_after} packets after the queue's first"
    )
    report.facts["caller_heard_queue"] = (sent, len(from_queue), frequency)
    report.check(
        f"the caller hears the queue ({QUEUE_TONE_HZ} Hz) after the transfer",
        len(from_queue) > 0 and _near(frequency, QUEUE_TONE_HZ),
        f"{len(from_queue)} packets, {_hz(frequency)}",
    )
    if pbx_call.reinvites:
        report.detail(f"sbc re-INVITEd the caller {pbx_call.reinvites} time(s) to move its media")
    detail = f"{len(from_queue)} of {sent} from the queue, {agent_after} from the agent"
    if settings.media.mode != "relay":
        # The agent's RTP goes to the caller directly until it hangs up: nothing sbc can drop.
        report.check(
            "the caller hears every packet of the queue", len(from_queue) >= sent - 1, detail
        )
        return
    report.check(
        "the caller hears every packet of the queue and nothing more of the agent",
        len(from_queue) >= sent - 1 and agent_after == 0,
        detail,
    )


async def _to_the_pbx(
    report: DemoReport,
    settings: Settings,
    pbx_call: PbxCall,
    retell_call: RetellCall,
    refer_status: int,
    number: str,
) -> None:
    """Refer mode: 3CX took its caller back (its REFER was challenged, then accepted); sbc
    leaves 3CX's dialog and Retell leaves its own."""
    async with _step("sbc's BYE on 3CX's call"):
        await pbx_call.ended.wait()
    async with _step("Retell's BYE after the transfer"):
        await retell_call.ended.wait()
    pbx_call.rtp.stop_sending()
    _retell_saw(report, retell_call, refer_status)
    refer = pbx_call.refer
    report.say("what 3CX saw on its call to the extension:")
    if refer is None or refer.accepted is None:
        report.check("3CX got sbc's REFER to the queue", False)
        return
    refer_to = refer.accepted.headers.get("Refer-To") or ""
    report.detail(f"REFER  Refer-To: {refer_to}")
    report.detail(f"Referred-By: {refer.accepted.headers.get('Referred-By')}")
    report.detail(
        f"{refer.challenges} challenge (407), then the digest of {refer.username} accepted;"
        f" answered 202, NOTIFYs 100 and 200 answered {', '.join(map(str, refer.notify_statuses))}"
    )
    report.detail(
        f"then sbc left the call: BYE received {'yes' if pbx_call.bye_received else 'no'}"
    )
    report.facts["pbx_refer_to"] = refer_to
    report.check(
        f"3CX got sbc's REFER to {number}, challenged 407 then accepted",
        refer_to.startswith(f"<sip:{number}@")
        and refer.challenges >= 1
        and refer.username == settings.pbx.auth_id,
        f"Refer-To {refer_to}, {refer.challenges} challenges",
    )
    report.check("3CX's NOTIFYs answered 200", refer.notify_statuses == [200, 200])
    report.check("sbc left 3CX's call with BYE", pbx_call.bye_received)


def _retell_saw(report: DemoReport, retell_call: RetellCall, status: int) -> None:
    start = retell_call.refer_sent_at or 0.0

    def at(moment: float | None) -> str:
        return " " * 9 if moment is None else f"+{(moment - start) * 1000:5.0f} ms"

    report.say("what Retell saw (times from its REFER):")
    report.detail(f"{at(retell_call.refer_answered_at)}  {status} to the REFER")
    for notify in retell_call.notifies:
        report.detail(
            f"{at(notify.at)}  NOTIFY {notify.sipfrag:<18}  Subscription-State:"
            f" {notify.subscription_state}  (answered 200)"
        )
    if retell_call.bye_sent_at is not None:
        report.detail(
            f"{at(retell_call.bye_sent_at)}  BYE from Retell (the agent leaves),"
            f" answered {retell_call.bye_status}"
        )
    elif retell_call.bye_received:
        report.detail("           BYE from sbc (the agent's leg ends with the final NOTIFY)")
    final = _final_notify(retell_call.notifies)
    statuses = [n.status for n in retell_call.notifies]
    report.facts["retell_notifies"] = [
        (n.status, n.subscription_state) for n in retell_call.notifies
    ]
    report.check("sbc answered Retell's REFER 202", status == 202, str(status))
    report.check(
        "Retell got NOTIFY 100 Trying, then 200 OK with Subscription-State: terminated",
        statuses == [100, 200]
        and final is not None
        and final.subscription_state.startswith("terminated")
        and all(
            n.event.startswith("refer") and n.content_type.startswith("message/sipfrag")
            for n in retell_call.notifies
        ),
        ", ".join(f"{n.sipfrag} ({n.subscription_state})" for n in retell_call.notifies),
    )
    report.check(
        # invite mode: sbc ends Retell's leg right after the final NOTIFY (the agent's audio
        # must stop); refer mode: Retell hangs up itself about a second later.
        "Retell's leg ended after the transfer (BYE answered 200)",
        retell_call.bye_received or retell_call.bye_status == 200,
        f"BYE status {retell_call.bye_status}, BYE from sbc {retell_call.bye_received}",
    )


def _final_notify(notifies: list[NotifySeen]) -> NotifySeen | None:
    return next((n for n in notifies if n.final), None)


async def _record_of_transfer(report: DemoReport, service: Service, number: str, mode: str) -> None:
    """sbc's view: the call record of the transferred call (read once the call ended) and the
    transfer counted in its metrics."""
    records = service.bridge.records
    transfers = records[-1].transfers if records else ()
    for t in transfers:
        answer = f", {t.answer_after:.2f} s after the REFER" if t.answer_after is not None else ""
        report.detail(
            f"sbc's transfer record: target {t.target}, mode {t.mode}, outcome {t.outcome}"
            f" (status {t.status}{answer})"
        )
    if not transfers:
        report.detail("sbc's call record has no transfer")
    report.facts["transfers"] = [(t.target, t.mode, t.outcome, t.status) for t in transfers]
    report.check(
        f"sbc's call record: transferred to {number} by {mode}",
        [(t.target, t.mode, t.outcome, t.status) for t in transfers]
        == [(number, mode, "transferred", 200)],
        str(report.facts["transfers"]),
    )
    labels = {"mode": mode, "outcome": "transferred"}

    def counted() -> float:
        return service.metrics.registry.get_sample_value("sbc_transfers_total", labels) or 0.0

    with contextlib.suppress(TimeoutError):  # the metrics see the call's end through the bus
        async with asyncio.timeout(DRAIN_TIMEOUT):
            await _poll(lambda: counted() >= 1)
    report.detail(
        f'sbc\'s metrics: sbc_transfers_total{{mode="{mode}",outcome="transferred"}} {counted():g}'
    )
    report.check("sbc counted the transfer in its metrics", counted() == 1, f"{counted():g}")


def _near(frequency: float | None, expected: float) -> bool:
    return frequency is not None and abs(frequency - expected) <= TONE_TOLERANCE


def _hz(frequency: float | None) -> str:
    return "no tone" if frequency is None else f"{frequency:.0f} Hz"


# -- stopping -----------------------------------------------------------------------------------


async def _stop(
    report: DemoReport,
    service: Service | None,
    pbx: PbxStandIn,
    retell: RetellStandIn,
    baseline_tasks: set[asyncio.Task[Any]],
    baseline_sockets: int | None,
) -> None:
    if service is not None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await service.stop()
        except TimeoutError:
            report.check("sbc stopped", False, f"still stopping after {STEP_TIMEOUT:g} s")
        removed = pbx.registrar.removed
        report.say(
            "sbc stopped" + (" and unregistered (Expires: 0 answered 200)" if removed else "")
        )
        report.check("sbc unregistered at stop", removed >= 1)
    for part in (retell, pbx):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_TIMEOUT):
                await part.stop()
    await asyncio.sleep(0)  # done callbacks of the last tasks
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t not in baseline_tasks and t is not current]
    report.check("no task left running", not left, ", ".join(_task_name(t) for t in left))
    sockets = _open_sockets()
    if baseline_sockets is not None and sockets is not None:
        extra = sockets - baseline_sockets
        report.check("no socket left open", extra <= 0, f"{extra} more than before")
    report.say(f"stand-ins stopped; tasks left {len(left)}")


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", task.get_name())


def _open_sockets() -> int | None:
    """Sockets this process holds (Linux /proc), None where that cannot be read."""
    try:
        return sum(1 for link in _fd_links() if link.startswith("socket:"))
    except OSError:
        return None


def _fd_links() -> Iterator[str]:
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            yield os.readlink(f"/proc/self/fd/{name}")


def _statuses(call: PbxCall) -> str:
    return ", ".join(str(s) for s in call.statuses) or "no response"


def _verdict(report: DemoReport) -> None:
    failures = report.failures
    total = len(report.checks)
    if report.passed:
        report.say(f"PASS: all {total} checks passed")
        return
    report.say(f"FAIL: {len(failures)} of {total} checks failed:")
    for check in failures:
        report.detail(f"- {check.what}" + (f": {check.detail}" if check.detail else ""))
