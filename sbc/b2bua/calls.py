"""The call manager: which requests become calls, and which call and leg a request is for.

Every new server transaction reaches :meth:`CallManager.handle_request` (the engine's
``on_request``, set by :class:`sbc.ops.service.Service`):

* an INVITE without To tag is a new call only when it comes from a trusted address; anything
  else is refused before any dialog or media exists. Each call takes one route's
  :class:`~sbc.b2bua.messages.BridgeConfig` (``routes``: one per ``[[routes]]`` entry; see
  :meth:`CallManager.route_for_pbx` and :meth:`CallManager.route_for_retell`). From the PBX
  (``pbx.trusted``) it must be for a route's registered extension (else 404) and becomes a
  :class:`~sbc.b2bua.call.Call` to that route's agent. From Retell (``retell.trusted``: its
  ``sip_invite`` transfers and outbound calls) it must carry Retell's trunk credentials when
  ``retell.auth_username`` is set (407 challenge, 403 wrong credentials; ``trunk_auth.py``)
  and name a target the route's ``[transfer]`` rules allow (Request-URI user, else To user;
  403 otherwise), and becomes a :class:`~sbc.b2bua.inbound.RetellCall` to that PBX number. An
  address in both lists counts as the PBX when the Request-URI's user is a route's extension,
  else as Retell. From anywhere else: 403. Above the route's ``max_concurrent`` calls (or
  ``max_total``, all routes together) it is 503 with Retry-After (RFC 3261 §21.5.4), and so
  is a call the media layer has no ports for (``PortsExhausted``). An accepted INVITE is
  answered 100 at once (§8.2.6.1) and handed to its new call, whose ``run`` is one task;
* a request with a To tag is routed by dialog id (Call-ID, our tag) to its call and leg, or
  answered 481 (§12.2.2);
* a NOTIFY outside a dialog is 3CX's voicemail summary: 200; other methods 405.

Refusals raise the :class:`~sbc.sip.errors.SipError` that names their status; the one place
that answers them is :meth:`CallManager.handle_request`. Each is published as a
:class:`~sbc.b2bua.events.CallRefused`, except a digest challenge (407), which is part of
setting up a call rather than a refusal.

Shutting down is :meth:`CallManager.drain` (new INVITEs 503 with Retry-After, calls in progress
run on, up to a timeout), then :meth:`CallManager.stop` (BYE/CANCEL what is left, close the media
and the event bus). :meth:`CallManager.reconfigure` gives new calls another
:class:`~sbc.b2bua.messages.BridgeConfig` (SIGHUP); a call keeps the config it started with.

ACKs of 2xx, CANCELs and late 2xx copies come from the engine's hooks, which
:meth:`CallManager.attach` points at this manager. What happens to calls is published on
``events`` (:class:`~sbc.b2bua.events.EventBus`), to any number of observers. The settings
are mapped onto :class:`~sbc.b2bua.messages.BridgeConfig` by :mod:`sbc.ops.service` (b2bua never
imports ops).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import Counter
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import structlog

from sbc.b2bua.call import Call
from sbc.b2bua.events import CallEnded, CallRecord, CallRefused, CallStarted, EventBus
from sbc.b2bua.inbound import RetellCall
from sbc.b2bua.ladder import Ladder
from sbc.b2bua.leg import Leg, Role
from sbc.b2bua.messages import OUT_OF_DIALOG, BridgeConfig, Peer, uri_user
from sbc.b2bua.reachability import Reachability
from sbc.b2bua.transfer_rules import TransferRefused, resolve_target
from sbc.b2bua.trunk_auth import TrunkAuth
from sbc.media.base import MediaBackend, MediaSession
from sbc.net import randomness
from sbc.net.addresses import Destination
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.net.transport import StreamConnection
from sbc.sip.digest import Verdict
from sbc.sip.errors import (
    Forbidden,
    MethodNotAllowed,
    NotFound,
    ProxyAuthenticationRequired,
    ServiceUnavailable,
    SipError,
)
from sbc.sip.message import Request, Response

__all__ = ["CallManager", "hung_up_by", "record_of", "uuid4_text"]

log = structlog.get_logger(__name__)

STOP_WAIT = 5.0  # seconds calls get to hang up at shutdown
_TRUSTED_MEMO = 256  # source hosts whose trust is remembered (CallManager._trusted_as)


def record_of(call: Call, ladder: Ladder | None = None) -> CallRecord:
    """The record of a finished ``call`` (``ladder``: its SIP messages, when kept)."""
    end_reason = call.end_reason or call.state._value_
    humans = [leg for leg in call.all_legs if leg.role is Role.HUMAN]
    media = call.bridge.media
    stats: dict[str, Any] | None = None
    if media is not None:
        try:
            stats = media.stats()
        except Exception:
            log.exception("media_stats_failed", call_uuid=call.call_uuid)
    return CallRecord(
        call_uuid=call.call_uuid,
        pbx_call_id=call.call_id_of(Peer.PBX),
        retell_call_id=call.call_id_of(Peer.RETELL),
        caller=call.caller.number,
        called=call.called,
        started=call.started,
        answered=call.answered,
        ended=call.ended if call.ended is not None else call.started,
        pbx_status=call.pbx_status,
        retell_status=call.retell_status,
        end_reason=end_reason,
        transfers=tuple(call.transfers),
        direction="pbx->retell" if call.origin.role is Role.CALLER else "retell->pbx",
        human_call_id=humans[-1].call_id if humans else "",
        caller_name=call.caller.display or "",
        retell_number=call.config.retell.number,
        x_headers=tuple(call.x_headers),
        hung_up_by=hung_up_by(end_reason),
        media=stats,
        ladder=ladder.snapshot() if ladder is not None else (),  # summarised by the writer
        ladder_omitted=ladder.omitted if ladder is not None else 0,
        route=call.config.route,
    )


def uuid4_text(random_bytes: Callable[[int], bytes] = randomness.random_bytes) -> str:
    """``str(uuid.uuid4())``: 16 random bytes with the version (4) and variant (RFC 4122)
    bits set, as lower-case hex in 8-4-4-4-12 groups. Written out: a call's uuid through
    ``uuid.UUID`` (its checks and integer conversions) cost about twice as much."""
    data = bytearray(random_bytes(16))
    data[6] = (data[6] & 0x0F) | 0x40
    data[8] = (data[8] & 0x3F) | 0x80
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def hung_up_by(end_reason: str) -> str:
    """Which side ended the call, from its end reason: the peer that sent the BYE or CANCEL
    (``pbx_bye``, ``retell_cancel``) or refused the INVITE (``retell:486``), else sbc (limits,
    timeouts, shutdown, refusals of its own, a completed REFER transfer)."""
    name = _HUNG_UP_BY.get(end_reason)
    if name is not None:
        return name
    head, colon, _ = end_reason.partition(":")
    return head if colon and head in _PEER_NAMES else "sbc"


# The end reasons of a peer's BYE or CANCEL, and the peers' names (a refusal is "name:status").
_HUNG_UP_BY = {f"{p.value}_{what}": p.value for p in Peer for what in ("bye", "cancel")}
_PEER_NAMES = frozenset(p.value for p in Peer)


class _RetryLater(MediaBackend):
    """The backend calls get: a 503 from ``allocate`` (no free RTP ports) carries Retry-After."""

    def __init__(self, backend: MediaBackend, retry_after: int) -> None:
        self.backend = backend
        self.retry_after = retry_after
        self.immediate = getattr(backend, "immediate", False)  # (tests give None)

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
        events: EventBus | None = None,
        new_uuid: Callable[[], str] | None = None,
        wall_clock: Callable[[], float] | None = None,
        ladder_messages: int = 0,
        routes: Sequence[BridgeConfig] = (),
        keep_records: int = 100,
    ) -> None:
        self.engine = engine
        self.config = config
        # One BridgeConfig per route (settings' [[routes]]); ``config`` is the first and holds
        # what the routes share (peers, trusted networks, limits of the whole process).
        self.routes: tuple[BridgeConfig, ...] = (config,)
        self._by_extension: dict[str, BridgeConfig] = {}
        self._by_number: dict[str, BridgeConfig] = {}
        self._set_routes(config, routes)
        self.route_active: Counter[str] = Counter()  # calls in progress by route
        self.media = media
        self._call_media = _RetryLater(media, config.retry_after)
        # Retell's INVITEs are challenged when its trunk credentials are set (trunk_auth.py).
        credentials = config.retell_credentials
        self.retell_auth: TrunkAuth | None = (
            None if credentials is None else TrunkAuth(credentials, engine.config.via_host)
        )
        self.events = events if events is not None else EventBus()
        self._new_uuid: Callable[[], str] = new_uuid if new_uuid is not None else uuid4_text
        self._wall = wall_clock
        self.calls: dict[str, Call] = {}  # by call_uuid
        # The last ``keep_records`` finished calls' records, newest last, for the demo's
        # summary and for tests. ``sbc run`` keeps none (service.serve): its records go to the
        # store, and the ones kept here (ladders and all, ~9 KB each) were made at the end of
        # a burst of calls and held its allocator arenas (docs/performance.md, Round 4: idle).
        self.records: list[CallRecord] = []
        self.keep_records = keep_records
        # By (Call-ID, our tag); also how a CANCEL finds its INVITE's leg (leg a's tag is the
        # one its INVITE's responses carry), with no table by transaction of its own.
        self._dialogs: dict[tuple[str, str], tuple[Call, Leg]] = {}
        self._uac_call_ids: dict[str, tuple[Call, Leg]] = {}  # Call-IDs sbc chose
        # Each call's task (its flow, Call.run) -> the call; the manager's share of ending a
        # call runs as the task's done callback (_call_done: one bound method for all), not
        # in a coroutine wrapped around Call.run, whose frame every call would hold.
        self._tasks: dict[asyncio.Task[Any], Call] = {}
        # What every call is given to report a new leg and reaching its peer: bound once here
        # (a bound method made per call, or a closure, would be held by each call).
        self._route_new_leg = self._route
        self._b_reached_hook = self._b_reached
        self._call_done_hook = self._call_done
        self._stopping = False
        self._draining = False
        # Whether the peers answer sbc's INVITEs; outages logged once (reachability.py).
        self.reachability = {peer: Reachability(peer.value) for peer in Peer}
        self._idle = asyncio.Event()
        self._idle.set()
        # Each call's ladder (sbc/b2bua/ladder.py), fed by the engine's message tap: at most
        # ladder_messages summaries per call; 0 keeps none and leaves the tap unset.
        self.ladder_messages = ladder_messages
        self._ladders: dict[str, Ladder] = {}  # by call_uuid
        # By the leg's Call-ID: the ladder, the leg's role and peer (as the ladder writes them)
        # and that Call-ID (the leg's string: every message's ladder entry shares it)
        self._ladder_legs: dict[str, tuple[Ladder, str, str, str]] = {}
        # An INVITE before its call: (message, its source, sbc's address, when).
        self._arriving: tuple[Request, Destination, str, float] | None = None
        self._locals: dict[str, str] = {}  # sbc's address by transport or socket name
        # Calls in progress by the address their first INVITE came from, and that address by
        # call_uuid (max_calls_per_source); INVITEs refused for it.
        self.calls_by_source: dict[str, int] = {}
        self._call_sources: dict[str, str] = {}
        self.refused_per_source = 0
        # (in trusted, in retell_trusted) by source host (_trusted_as).
        self._trusted: dict[str, tuple[bool, bool]] = {}

    def attach(self) -> None:
        """Take the engine's ACK, CANCEL and late-response hooks (the service sets on_request
        to :meth:`handle_request`) and say what sbc handles outside dialogs (Allow)."""
        self.engine.on_ack = self.handle_ack
        self.engine.on_cancel = self.handle_cancel
        self.engine.on_late_response = self.handle_late_response
        self.engine.on_stray_response = self.handle_stray_response
        self.engine.allow = OUT_OF_DIALOG
        # SIP INFO DTMF bodies (the engine answers 415 to bodies it does not accept).
        self.engine.accept = self.engine.accept | {"application/dtmf-relay", "application/dtmf"}
        if self.ladder_messages > 0:
            self.engine.on_message = self.handle_message
        # Stream connections reset under a call (below); kept alongside any earlier watcher.
        # The scripted engines of the unit tests have no transports.
        transports = getattr(self.engine, "transports", None)
        if transports is not None:
            previous = transports.on_connection_lost

            def lost(conn: StreamConnection) -> None:
                if previous is not None:
                    previous(conn)
                self.connection_lost(conn)

            transports.on_connection_lost = lost

    @property
    def active(self) -> int:
        return len(self.calls)

    @property
    def dialogs(self) -> int:
        """SIP dialogs the calls hold (each leg once its dialog exists), as routed by
        (Call-ID, sbc's tag)."""
        return len(self._dialogs)

    def table_sizes(self) -> dict[str, int]:
        """Entries of every per-call table the manager keeps (leak checks: all 0 once the
        calls ended)."""
        return {
            "calls": len(self.calls),
            "dialogs": len(self._dialogs),
            "uac_call_ids": len(self._uac_call_ids),
            "call_tasks": len(self._tasks),
            "ladders": len(self._ladders),
            "ladder_legs": len(self._ladder_legs),
        }

    def hang_up(self, call_uuid: str, reason: str = "admin") -> bool:
        """End the call ``call_uuid`` from outside (the admin API): BYE on every leg that is
        up (CANCEL while it rings); returns at once, False when there is no such call."""
        call = self.calls.get(call_uuid)
        if call is None:
            return False
        call.log.info("hang_up_requested", reason=reason, state=call.state.value)
        call.hang_up(reason)
        return True

    def connection_lost(self, conn: StreamConnection) -> None:
        """A stream connection went: when Retell reset it (not an orderly close, not sbc's own
        close), every call whose Retell leg it carried is hung up (BYE to the PBX, and to
        Retell over a new connection): the agent behind that flow is gone, and the caller must
        not be left in silence until the media timeout. An orderly close keeps the calls: RFC
        3261 §18 opens a new connection for the next request."""
        if conn.lost_error is None:
            return
        for call in list(self.calls.values()):
            for leg in list(call.legs.values()):
                if leg.peer is Peer.RETELL and leg.up and _carried_by(leg, conn):
                    call.log.warning(
                        "retell_connection_reset",
                        peer=f"{conn.peer[0]}:{conn.peer[1]}",
                        error=str(conn.lost_error) or type(conn.lost_error).__name__,
                    )
                    self.hang_up(call.call_uuid, "retell_connection_lost")
                    break

    async def wait_idle(self) -> None:
        """Return once no call is left (tests, graceful shutdown)."""
        await self._idle.wait()

    # -- requests from the engine -------------------------------------------------------------
    def handle_request(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        try:
            to_tag = request.to_tag
            if to_tag is not None:
                self._in_dialog(incoming, to_tag)
            elif request.method == "INVITE":
                self._new_invite(incoming)
            elif request.method == "NOTIFY":
                incoming.respond(200)  # 3CX's voicemail summary, outside any dialog (peers.md)
            else:
                raise MethodNotAllowed(
                    f"{request.method} outside a dialog",
                    headers=(("Allow", ", ".join(OUT_OF_DIALOG)),),
                )
        except SipError as exc:
            if request.method == "INVITE" and request.to_tag is None and exc.status != 407:
                self.events.publish(CallRefused(exc.status))
            incoming.reject(exc)

    def reconfigure(self, config: BridgeConfig, routes: Sequence[BridgeConfig] = ()) -> None:
        """New calls use ``config`` (limits, header templates, transfer rules...); calls in
        progress keep the one they started with. Addresses, credentials and the trusted
        networks must be the same (the service reloads only what may change live); so must
        the routes' names, extensions and numbers."""
        self.config = config
        self._set_routes(config, routes)
        self._call_media.retry_after = config.retry_after
        self._trusted.clear()

    def _set_routes(self, config: BridgeConfig, routes: Sequence[BridgeConfig]) -> None:
        self.routes = tuple(routes) or (config,)
        self._by_extension = {route.extension: route for route in self.routes}
        self._by_number = {route.retell.number: route for route in self.routes}

    def route_for_pbx(self, request: Request) -> BridgeConfig | None:
        """The route of an INVITE from the PBX: the one whose extension is the Request-URI's
        user (3CX calls the registered Contact), else the To user's; None: no route."""
        for user in (uri_user(request.uri), uri_user(request.to.uri)):
            route = self._by_extension.get(user or "")
            if route is not None:
                return route
        return None

    def route_for_retell(self, request: Request) -> BridgeConfig:
        """The route of an INVITE from Retell: the one whose number Retell calls from (From
        user: the number the agent's call goes out on), else the one whose number is the To
        user, else the first route."""
        for user in (uri_user(request.from_.uri), uri_user(request.to.uri)):
            for number in (user or "", f"+{user}"):
                route = self._by_number.get(number)
                if route is not None:
                    return route
        return self.routes[0]

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, limit: float) -> int:
        """Refuse new calls (503 with Retry-After) and let the calls in progress end by
        themselves for up to ``limit`` seconds; returns how many are still up (then ended by
        :meth:`stop`)."""
        self._stopping = self._draining = True
        if self.calls:
            log.info("draining", calls=len(self.calls), timeout=limit)
            try:
                await asyncio.wait_for(self._idle.wait(), limit)
            except TimeoutError:
                log.info("drain_timeout", calls=len(self.calls), timeout=limit)
        return len(self.calls)

    async def stop(self) -> None:
        """Refuse new calls, end every call (BYEs or CANCELs), wait a little for them."""
        self._stopping = True
        for reachability in self.reachability.values():
            reachability.summary()
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
        await self.events.close()

    # -- new calls -----------------------------------------------------------------------------
    def _new_invite(self, incoming: IncomingRequest) -> None:
        request = incoming.request
        source = incoming.source
        from_pbx, from_retell = self._trusted_as(source)
        if from_pbx and from_retell:
            # One address in both lists: the PBX calls an extension's registered Contact.
            from_pbx = uri_user(request.uri) in self._by_extension
            from_retell = not from_pbx
        if from_pbx:
            route = self.route_for_pbx(request)
            if route is None:
                log.info("invite_other_extension", uri=str(request.uri), call_id=request.call_id)
                extensions = ", ".join(self._by_extension)
                raise NotFound(f"not extension {extensions}", headers=self._server)
            self._check_capacity(request, route)
            self._check_source(incoming)
            self._start(incoming, Call(incoming, **self._call_kwargs(route)))
        elif from_retell:
            route = self.route_for_retell(request)
            target = self._retell_target(incoming, route)
            self._check_capacity(request, route)
            self._check_source(incoming)
            self._start(incoming, RetellCall(incoming, target=target, **self._call_kwargs(route)))
        else:
            log.info("invite_untrusted", source=str(source), call_id=request.call_id)
            raise Forbidden(f"untrusted source {source}", headers=self._server)

    def _retell_target(self, incoming: IncomingRequest, route: BridgeConfig) -> str:
        """The PBX number an INVITE from Retell's addresses is for, once its credentials are
        good; raises 407 (challenge), 403 (wrong credentials, target not allowed)."""
        request = incoming.request
        source = str(incoming.source)
        if self.retell_auth is not None:
            checked = self.retell_auth.check(request)
            auth = checked.authorization
            username = None if auth is None else auth.username
            if checked.verdict is Verdict.REFUSED:
                log.warning(
                    "retell_auth_refused",
                    source=source,
                    username=username,
                    reason=checked.reason,
                    call_id=request.call_id,
                )
                raise Forbidden(f"credentials refused: {checked.reason}", headers=self._server)
            if checked.verdict is not Verdict.ACCEPTED:
                stale = checked.verdict is Verdict.STALE
                log.info(
                    "retell_invite_challenged",
                    source=source,
                    stale=stale,
                    reason=checked.reason,
                    call_id=request.call_id,
                )
                challenge = ("Proxy-Authenticate", self.retell_auth.challenge(stale=stale))
                raise ProxyAuthenticationRequired(
                    checked.reason, headers=(challenge, *self._server)
                )
        if self.config.pbx is None:
            raise ServiceUnavailable("no PBX to place calls to", headers=self._server)
        user = uri_user(request.uri) or uri_user(request.to.uri) or ""
        try:
            return resolve_target(route.transfer, user)
        except TransferRefused as exc:
            # Toll fraud guard: Retell's calls reach only what [transfer] allows.
            log.warning("retell_target_refused", target=user, detail=exc.detail, source=source)
            raise Forbidden(exc.detail, headers=self._server) from exc

    def _check_capacity(self, request: Request, route: BridgeConfig) -> None:
        total = self.config.max_total
        if self._stopping:
            log.info("invite_refused_stopping", active=len(self.calls), call_id=request.call_id)
        elif total is not None and len(self.calls) >= total:
            log.warning("invite_over_capacity", active=len(self.calls), call_id=request.call_id)
        elif self.route_active[route.route] >= route.max_concurrent:
            log.warning(
                "invite_over_capacity",
                route=route.route,
                active=self.route_active[route.route],
                call_id=request.call_id,
            )
        else:
            return
        # RFC 3261 §21.5.4: 503 with Retry-After; the caller may try again later.
        retry = ("Retry-After", str(self.config.retry_after))
        detail = "shutting down" if self._stopping else "over capacity"
        raise ServiceUnavailable(detail, headers=(retry, *self._server))

    def _check_source(self, incoming: IncomingRequest) -> None:
        """503 with Retry-After once the INVITE's source address has max_calls_per_source
        calls (dialogs) in progress: one trusted address gone wrong cannot take every call."""
        host = incoming.source.host
        active = self.calls_by_source.get(host, 0)
        limit = self.config.max_calls_per_source
        if limit is None:  # default: the process-wide call limit
            limit = self.config.max_total or self.config.max_concurrent
        if active < limit:
            return
        self.refused_per_source += 1
        log.warning(
            "invite_over_source_limit",
            source=host,
            active=active,
            call_id=incoming.request.call_id,
        )
        retry = ("Retry-After", str(self.config.retry_after))
        raise ServiceUnavailable("too many calls from this source", headers=(retry, *self._server))

    def _call_kwargs(self, route: BridgeConfig | None = None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "config": self.config if route is None else route,
            "engine": self.engine,
            "media": self._call_media,
            "call_uuid": self._new_uuid(),
        }
        if self._wall is not None:
            kwargs["wall_clock"] = self._wall
        return kwargs

    def _start(self, incoming: IncomingRequest, call: Call) -> None:
        """Answer 100 and run ``call``, routed by its legs' dialog ids."""
        if self.ladder_messages > 0:
            ladder = self._ladders[call.call_uuid] = Ladder(self.ladder_messages)
            arriving, self._arriving = self._arriving, None
            if arriving is not None and arriving[0].call_id == incoming.request.call_id:
                # The INVITE that made the call, tapped before the call existed.
                origin = call.origin
                message, source, local, at = arriving
                ladder.note(
                    "in",
                    message,
                    source,
                    local,
                    leg=origin.role._value_,
                    peer=origin.role.peer._value_,
                    at=at,
                )
        self.calls[call.call_uuid] = call
        self.route_active[call.config.route] += 1
        host = incoming.source.host
        self._call_sources[call.call_uuid] = host
        self.calls_by_source[host] = self.calls_by_source.get(host, 0) + 1
        self._idle.clear()
        call.on_new_leg = self._route_new_leg
        call.on_b_reached = self._b_reached_hook
        for leg in call.all_legs:
            self._route(call, leg)
        # Leg b's INVITE first (pass-through media: at once), then the 100: the post-dial
        # delay is the time to the far INVITE (docs/performance.md, "Round 5: post-dial tail").
        call.start()
        if not incoming.final_sent:  # (a call refused at once was answered already)
            incoming.respond(100)
        self.events.publish(CallStarted(call.call_uuid, call.config.route))
        # What ensure_future() does with a coroutine, without its four Python calls.
        task = asyncio.get_running_loop().create_task(call.run())
        self._tasks[task] = call
        task.add_done_callback(self._call_done_hook)

    def _b_reached(self, peer: Peer, failure: str | None) -> None:
        if failure is None:
            self.reachability[peer].answered()
        else:
            self.reachability[peer].failed(failure)

    def _route(self, call: Call, leg: Leg) -> None:
        """Requests in ``leg``'s dialog go to ``call`` (and 2xx copies to its INVITE)."""
        self._dialogs[leg.call_id, leg.local_tag] = (call, leg)  # (leg.key, inline)
        if leg.incoming is None:
            self._uac_call_ids[leg.call_id] = (call, leg)
        ladder = self._ladders.get(call.call_uuid)
        if ladder is not None:
            # _value_: Enum's value is a property (two Python calls each), two legs a call.
            role = leg.role
            self._ladder_legs[leg.call_id] = (ladder, role._value_, role.peer._value_, leg.call_id)

    def _call_done(self, task: asyncio.Task[Any]) -> None:
        """A call's flow returned (or was cancelled): unroute it, publish its record, free it.
        Runs before anything that awaits the task resumes (its callback came first)."""
        call = self._tasks.pop(task)
        if self.calls.pop(call.call_uuid, None) is not None:
            self.route_active[call.config.route] -= 1
        host = self._call_sources.pop(call.call_uuid, None)
        if host is not None:
            left = self.calls_by_source.get(host, 1) - 1
            if left > 0:
                self.calls_by_source[host] = left
            else:
                self.calls_by_source.pop(host, None)
        if not self.calls:
            self._idle.set()
        for leg in call.all_legs:
            self._dialogs.pop((leg.call_id, leg.local_tag), None)  # (leg.key, inline)
            self._uac_call_ids.pop(leg.call_id, None)
            self._ladder_legs.pop(leg.call_id, None)
        record = record_of(call, self._ladders.pop(call.call_uuid, None))
        if self.keep_records > 0:
            self.records.append(record)
            del self.records[: -self.keep_records]
        self.events.publish(CallEnded(record))
        call.dispose()  # no cycle left: freed now, not at the next full collection

    @property
    def _server(self) -> tuple[tuple[str, str], ...]:
        agent = self.config.user_agent
        return (("Server", agent),) if agent else ()

    def _trusted_as(self, source: Destination) -> tuple[bool, bool]:
        """Whether ``source`` is in ``trusted`` (the PBX's) and in ``retell_trusted``: by
        host, remembered (a call's INVITE otherwise tests its address against each network
        in Python, ``ipaddress``'s ``__contains__``; the sources are a few peers). Bounded:
        emptied when full (INVITEs from anywhere reach this); emptied by reconfigure."""
        host = source.host
        found = self._trusted.get(host)
        if found is None:
            config = self.config
            found = (self._in(config.trusted, source), self._in(config.retell_trusted, source))
            if len(self._trusted) >= _TRUSTED_MEMO:
                self._trusted.clear()
            self._trusted[host] = found
        return found

    @staticmethod
    def _in(networks: tuple[IPv4Network | IPv6Network, ...], source: Destination) -> bool:
        address = _address(source.host)
        return address is not None and any(address in network for network in networks)

    # -- the ladder ----------------------------------------------------------------------------
    def handle_message(
        self, direction: str, message: Request | Response, peer: Destination
    ) -> None:
        """The engine's tap (``on_message``): every message received (``in``) or transmitted
        (``out``) goes to the ladder of the call whose leg has its Call-ID; an INVITE for no
        call yet is held until :meth:`_start` (the same dispatch) makes its call."""
        # Headers.get("Call-ID") inline (the lookup keys, as the ladder's _fields reads them):
        # eleven messages a call.
        headers = message.headers
        keys = headers._keys or headers._lower_keys()
        if "call-id" not in keys:
            return
        call_id = headers._items[keys.index("call-id")][1]
        found = self._ladder_legs.get(call_id)
        if found is None:
            if direction == "in" and isinstance(message, Request) and message.method == "INVITE":
                self._arriving = (message, peer, self._local(peer), self._now())
            return
        # Eleven messages a call: _local() and _now() inlined for their common case.
        ladder, role, far, leg_call_id = found
        # Keyed by the socket's name for a named UDP socket (Retell's own), else the transport.
        local = self._locals.get(peer.local or peer.transport)
        wall = self._wall
        ladder.note(
            direction,
            message,
            peer,
            local if local is not None else self._local(peer),
            leg=role,
            peer=far,
            at=wall() if wall is not None else time.time(),
            leg_call_id=leg_call_id,
        )

    def _local(self, peer: Destination) -> str:
        transport = peer.transport
        key = peer.local or transport
        local = self._locals.get(key)
        if local is None:
            config = self.engine.config
            port = config.via_port(transport)
            if peer.local is not None:
                named = self.engine.transports.udp_named_addresses.get(peer.local)
                port = port if named is None else named[1]
            local = str(Destination(transport, config.via_host, port))
            self._locals[key] = local
        return local

    def _now(self) -> float:
        return self._wall() if self._wall is not None else time.time()

    # -- in-dialog traffic ---------------------------------------------------------------------
    def _in_dialog(self, incoming: IncomingRequest, to_tag: str) -> None:
        found = self._dialogs.get((incoming.request.call_id, to_tag))
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
        found = self._dialogs.get((incoming.request.call_id, incoming.local_tag or ""))
        if found is not None and found[1].incoming is incoming:
            call, leg = found
            call.cancelled(leg)

    def handle_late_response(self, destination: Destination | None, response: Response) -> None:
        self.handle_stray_response(response, destination)

    def handle_stray_response(self, response: Response, source: Destination | None) -> None:
        """RFC 3261 §13.2.2.4: a 2xx copy to an INVITE sbc sent is ACKed again."""
        if response.status < 200 or response.status >= 300:
            return
        found = self._uac_call_ids.get(response.call_id)
        if found is not None:
            call, leg = found
            call.response_again(leg, response)


def _carried_by(leg: Leg, conn: StreamConnection) -> bool:
    """Whether ``leg``'s dialog lives on ``conn``: the connection its INVITE came in on (sbc
    the UAS), or the one sbc opened to where it sent its INVITE (sbc the UAC)."""
    if leg.incoming is not None:
        return leg.incoming.source.connection_id == conn.id
    dest = leg.destination
    if dest is None or not conn.outbound:
        return False
    return (dest.transport, dest.host, dest.port) == (conn.transport_name, *conn.peer)


@functools.lru_cache(maxsize=1024)
def _address(host: str) -> IPv4Address | IPv6Address | None:
    """``host`` as an address (None for anything else), remembered: the sources of INVITEs
    are few, and ``ipaddress`` parses the text anew each time."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
