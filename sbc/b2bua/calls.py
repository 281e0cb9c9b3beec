"""The call manager: which requests become calls, and which call an in-dialog request is for.

Every new server transaction reaches :meth:`CallManager.handle_request` (the engine's
``on_request``, set by :class:`sbc.ops.service.Service`):

* an INVITE without To tag is a new call only when it comes from a trusted PBX address and is
  for the registered extension; anything else is refused before any dialog or media exists
  (403 untrusted source, 404 another extension). Above ``max_concurrent`` calls it is 503 with
  Retry-After (RFC 3261 §21.5.4), and so is a call the media layer has no ports for
  (``PortsExhausted``). An accepted INVITE is answered 100 at once (§8.2.6.1) and
  handed to a new :class:`~sbc.b2bua.call.Call`, whose ``run`` is one task;
* a request with a To tag is routed by dialog id (Call-ID, our tag) to its call and leg, or
  answered 481 (§12.2.2);
* a NOTIFY outside a dialog is 3CX's voicemail summary: 200; other methods 405.

ACKs of 2xx, CANCELs and late 2xx copies come from the engine's hooks, which
:meth:`CallManager.attach` points at this manager. The settings are mapped onto
:class:`~sbc.b2bua.legs.BridgeConfig` by :mod:`sbc.ops.service` (b2bua never imports ops).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from sbc.b2bua.call import Call
from sbc.b2bua.legs import BridgeConfig, uri_user
from sbc.media.base import Leg, MediaBackend, MediaSession
from sbc.net.addresses import Destination
from sbc.net.engine import ClientTransaction, IncomingRequest, SipEngine
from sbc.sip.errors import ServiceUnavailable
from sbc.sip.message import Request, Response

__all__ = ["CallManager", "CallObserver", "CallRecord"]

log = structlog.get_logger(__name__)

STOP_WAIT = 5.0  # seconds calls get to hang up at shutdown


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What a finished call leaves behind (logs, call records, metrics)."""

    call_uuid: str
    pbx_call_id: str
    retell_call_id: str
    caller: str
    called: str
    started: float  # wall clock
    answered: float | None
    ended: float
    pbx_status: int | None  # final status sent to the PBX's INVITE
    retell_status: int | None  # final status Retell gave the bridge's INVITE
    end_reason: str


class CallObserver(Protocol):
    """Who hears about calls (metrics, call records); every method is optional to act on."""

    def call_started(self, call_uuid: str) -> None: ...

    def call_ended(self, record: CallRecord) -> None: ...

    def call_refused(self, status: int) -> None: ...


def record_of(call: Call) -> CallRecord:
    return CallRecord(
        call_uuid=call.call_uuid,
        pbx_call_id=call.a_invite.call_id,
        retell_call_id=call.b_ids.call_id,
        caller=call.caller.number,
        called=call.called,
        started=call.started,
        answered=call.answered,
        ended=call.ended if call.ended is not None else call.started,
        pbx_status=call.pbx_status,
        retell_status=call.retell_status,
        end_reason=call.end_reason or call.state.value,
    )


class _RetryLater(MediaBackend):
    """The backend calls get: a 503 from ``allocate`` (no free RTP ports) carries Retry-After."""

    def __init__(self, backend: MediaBackend, retry_after: int) -> None:
        self.backend = backend
        self.retry_after = retry_after

    async def allocate(self, call_id: str) -> MediaSession:
        try:
            return await self.backend.allocate(call_id)
        except ServiceUnavailable as exc:
            if any(name.lower() == "retry-after" for name, _ in exc.headers):
                raise
            # RFC 3261 §21.5.4: a temporary overload; the PBX may try again after this delay.
            raise ServiceUnavailable(
                exc.detail, headers=(*exc.headers, ("Retry-After", str(self.retry_after)))
            ) from exc

    async def close(self) -> None:
        await self.backend.close()


class CallManager:
    """All calls of one bridge, routed by dialog id."""

    def __init__(
        self,
        engine: SipEngine,
        config: BridgeConfig,
        media: MediaBackend,
        *,
        observer: CallObserver | None = None,
        new_uuid: Callable[[], str] = lambda: str(uuid.uuid4()),
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.media = media
        self._call_media = _RetryLater(media, config.retry_after)
        self.observer = observer
        self._new_uuid = new_uuid
        self._wall = wall_clock
        self.calls: dict[str, Call] = {}  # by call_uuid
        self.records: list[CallRecord] = []  # the last finished calls, newest last
        self._dialogs: dict[tuple[str, str], tuple[Call, Leg]] = {}
        self._invites: dict[str, Call] = {}  # PBX INVITE server transaction key -> call
        self._retell_ids: dict[str, Call] = {}  # Retell-leg Call-ID -> call
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._idle = asyncio.Event()
        self._idle.set()

    def attach(self) -> None:
        """Take the engine's ACK, CANCEL and late-response hooks (the service sets on_request
        to :meth:`handle_request`)."""
        self.engine.on_ack = self.handle_ack
        self.engine.on_cancel = self.handle_cancel
        self.engine.on_late_response = self.handle_late_response
        self.engine.on_stray_response = self.handle_stray_response
        # SIP INFO DTMF bodies (the engine answers 415 to bodies it does not accept).
        self.engine.accept = self.engine.accept | {"application/dtmf-relay", "application/dtmf"}

    @property
    def active(self) -> int:
        return len(self.calls)

    async def wait_idle(self) -> None:
        """Return once no call is left (tests, graceful shutdown)."""
        await self._idle.wait()

    # -- requests from the engine -------------------------------------------------------------
    async def handle_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        if request.to_tag is not None:
            self._in_dialog(incoming)
        elif request.method == "INVITE":
            self._new_invite(incoming)
        elif request.method == "NOTIFY":
            incoming.respond(200)  # 3CX's voicemail summary, outside any dialog (PEERS.md)
        else:
            incoming.respond(405, headers=(("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS"),))

    async def stop(self) -> None:
        """Refuse new calls, end every call (BYEs or CANCELs), wait a little for them."""
        self._stopping = True
        for call in list(self.calls.values()):
            call.shutdown()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=STOP_WAIT)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        try:
            await self.media.close()
        except Exception:
            log.exception("media_close_failed")

    # -- new calls -----------------------------------------------------------------------------
    def _new_invite(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        source = incoming.source
        if not self._trusted(source):
            log.info("invite_untrusted", source=str(source), call_id=request.call_id)
            self._refuse(incoming, 403)
            return
        if not self._for_extension(request):
            log.info("invite_other_extension", uri=str(request.uri), call_id=request.call_id)
            self._refuse(incoming, 404)
            return
        if self._stopping or len(self.calls) >= self.config.max_concurrent:
            log.warning("invite_over_capacity", active=len(self.calls), call_id=request.call_id)
            # RFC 3261 §21.5.4: 503 with Retry-After; the PBX may try again later.
            self._refuse(incoming, 503, (("Retry-After", str(self.config.retry_after)),))
            return
        incoming.respond(100)
        kwargs: dict[str, Any] = {}
        if self._wall is not None:
            kwargs["wall_clock"] = self._wall
        call = Call(
            incoming,
            config=self.config,
            engine=self.engine,
            media=self._call_media,
            call_uuid=self._new_uuid(),
            **kwargs,
        )
        self.calls[call.call_uuid] = call
        self._idle.clear()
        self._dialogs[call.pbx_key] = (call, "pbx")
        self._dialogs[call.retell_key] = (call, "retell")
        self._invites[incoming.key] = call
        self._retell_ids[call.b_ids.call_id] = call
        if self.observer is not None:
            self.observer.call_started(call.call_uuid)
        task = asyncio.ensure_future(self._run(call, incoming.key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: Call, invite_key: str) -> None:
        try:
            await call.run()
        finally:
            self.calls.pop(call.call_uuid, None)
            if not self.calls:
                self._idle.set()
            self._dialogs.pop(call.pbx_key, None)
            self._dialogs.pop(call.retell_key, None)
            self._invites.pop(invite_key, None)
            self._retell_ids.pop(call.b_ids.call_id, None)
            record = record_of(call)
            self.records.append(record)
            del self.records[:-100]
            if self.observer is not None:
                with contextlib.suppress(Exception):
                    self.observer.call_ended(record)

    def _refuse(
        self, incoming: IncomingRequest, status: int, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        incoming.respond(status, headers=(*headers, ("Server", self.config.user_agent)))
        if self.observer is not None:
            self.observer.call_refused(status)

    def _trusted(self, source: Destination) -> bool:
        try:
            address = ipaddress.ip_address(source.host)
        except ValueError:
            return False
        return any(address in network for network in self.config.trusted)

    def _for_extension(self, request: Request) -> bool:
        # 3CX sends to the registered Contact (user = extension); To names the extension too.
        extension = self.config.extension
        return uri_user(request.uri) == extension or uri_user(request.to.uri) == extension

    # -- in-dialog traffic ---------------------------------------------------------------------
    def _in_dialog(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        found = self._dialogs.get((request.call_id, request.to_tag or ""))
        if found is None:
            incoming.respond(481)  # RFC 3261 §12.2.2: no such dialog
            return
        call, leg = found
        call.request_arrived(leg, incoming)

    def handle_ack(self, request: Request, source: Destination) -> None:
        found = self._dialogs.get((request.call_id, request.to_tag or ""))
        if found is not None:
            call, leg = found
            call.ack_arrived(leg, request)

    def handle_cancel(self, incoming: IncomingRequest, cancel: Request) -> None:
        # The transaction layer answered the CANCEL 200; the call answers its INVITE 487.
        call = self._invites.get(incoming.key)
        if call is not None:
            call.pbx_cancelled()

    def handle_late_response(self, handle: ClientTransaction, response: Response) -> None:
        self.handle_stray_response(response, handle.destination)

    def handle_stray_response(self, response: Response, source: Destination | None) -> None:
        """RFC 3261 §13.2.2.4: a 2xx copy from Retell is ACKed again."""
        if response.status < 200 or response.status >= 300:
            return
        call = self._retell_ids.get(response.call_id)
        if call is not None:
            call.retell_2xx_again(response)
