"""``sbc demo``: one real call through the bridge, between local stand-ins of 3CX and Retell.

Everything runs in this process on loopback (the addresses come from the demo settings, by
default ``sbc/ops/demo.toml``): the 3CX stand-in registrar and caller, the Retell stand-in
over TCP, and sbc itself, built exactly as ``sbc run`` builds it (:class:`sbc.ops.service.Service`).
The call:

1. sbc registers the extension; 3CX challenges with 407 and checks the digest;
2. 3CX calls the extension; sbc places its own INVITE to Retell with the X- headers;
3. Retell rings, answers with one codec; both sides send a tone for ``talk`` seconds through
   the bridge's media (3CX also sends a DTMF digit as RFC 4733 events);
4. 3CX hangs up; sbc ends the Retell leg, releases the media ports and unregisters at stop.

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

from sbc.demo.pbx import REALM, PbxCall, PbxStandIn
from sbc.demo.retell import RetellCall, RetellStandIn
from sbc.demo.rtp_peer import RtpStream, same_packets
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
    )
    retell = RetellStandIn(settings.retell.host, settings.retell.port)
    service: Service | None = None
    _intro(report, settings)
    try:
        await _started(report, "3CX stand-in", pbx.start())
        await _started(report, "Retell stand-in", retell.start())
        service = Service(settings)
        await _started(report, "sbc", service.start())
        await _call(report, settings, service, pbx, retell, talk)
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
    report.say("sbc demo: one call from a 3CX stand-in to a Retell stand-in through sbc")
    report.detail(f"3CX stand-in     {pbx.transport}:{pbx.host}:{pbx.port}  registrar and caller")
    report.detail(f"Retell stand-in  {retell.transport}:{retell.host}:{retell.port}  answers")
    ports = (
        f" (RTP ports {media.rtp_port_min}-{media.rtp_port_max})" if media.mode == "relay" else ""
    )
    report.detail(f"sbc              {sip.bind}:{sip.port}  media {media.mode}{ports}")


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
        pbx_call = await pbx.call(caller_number=CALLER_NUMBER)
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
    report.say(f"talking for {talk:g} s: 3CX sends 440 Hz, Retell 660 Hz (PCMU, 20 ms packets)")
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


async def _released(report: DemoReport, service: Service) -> None:
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
    report.facts["ports_in_use"] = pool.in_use
    report.check("RTP ports released", pool.in_use == 0, f"{pool.in_use} pairs still in use")


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
