"""The engine: asyncio transports and DNS around the sans-I/O transaction layer.

Bytes from a transport become messages, which go into :class:`~sbc.sip.transaction.
TransactionLayer` with the current time; the messages it wants sent and the events it raises are
pulled out right after, and one timer per engine is re-armed at the layer's next deadline (the
shape of aioquic's ``asyncio/protocol.py``). Everything above (the registration driver, the
B2BUA) talks to the engine only:

* ``handle = engine.send_request(request, target)`` starts a client transaction (DNS, failover to
  the next destination with a new branch, RFC 3263 §4.3); ``async for response in handle`` yields
  its responses up to the final one, ``await handle`` returns the final one. A timeout is a
  synthetic 408, a transport failure a synthetic 503 (RFC 3261 §8.1.3.1).
* ``engine.on_request`` is called (synchronously, no task per request) with an
  :class:`IncomingRequest` for each new server transaction; ``IncomingRequest.respond`` answers
  it, then or later (a handler that must wait starts its own task). OPTIONS outside a dialog is
  answered by the engine.
* ``engine.send_ack`` sends an ACK for a 2xx (stateless), ``engine.cancel`` a CANCEL.
* ``engine.on_message``, when set, sees every message received and transmitted (a tap for
  call ladders and the SIP trace; it must not block).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog

from sbc.net.addresses import (
    DEFAULT_PORTS,
    VIA_TRANSPORT,
    Destination,
    TransportConfig,
    ip_literal,
    target_of_uri,
)
from sbc.net.dns import ResolutionFailed, Resolver
from sbc.net.guard import ADMIT, REJECT, Guard
from sbc.net.handles import (
    IncomingRequest,
    OutgoingRequest,
    RequestTarget,
    error_response,
    new_tag,
)
from sbc.net.randomness import random_bytes
from sbc.net.transport import Transports, count_of, counted
from sbc.sip.errors import BadRequest, Forbidden, MessageTooLarge, ServiceUnavailable, SipError
from sbc.sip.fields import Via, parse_via
from sbc.sip.fields import make_via as _via_of  # (not SipEngine.make_via: a Via object)
from sbc.sip.headers import Headers, split_list
from sbc.sip.ids import BRANCH_COOKIE
from sbc.sip.message import Request, Response, make_request, with_top_via
from sbc.sip.serializer import serialized_size
from sbc.sip.server_transaction import ServerState
from sbc.sip.transaction import (
    AckReceived,
    CancelReceived,
    RequestReceived,
    ResponseReceived,
    StrayResponse,
    TransactionLayer,
    TransactionTerminated,
    TransactionTimedOut,
    build_cancel,
    build_response,
    server_key,
)
from sbc.sip.uri import SipUri, parse_name_addr, parse_uri
from sbc.sip.validate import DEFAULT_ACCEPT, DEFAULT_SUPPORTED, validate_request, validate_response

log = structlog.get_logger(__name__)

Message = Request | Response
RequestHandler = Callable[[IncomingRequest], None]
# ("in" | "out", the message, where it came from or goes to): SipEngine.on_message.
MessageTap = Callable[[str, Message, Destination], None]

DEFAULT_ALLOW = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REFER", "NOTIFY")
# RFC 3261 §18.1.1: a request larger than this goes over a congestion-controlled transport.
LARGE_REQUEST = 1300
# After a TCP connection to a UDP peer failed, its large requests go over UDP for this long
# (only the first one pays for the failed connect).
TCP_REFUSED_MEMORY = 300.0
# Retry-After of the stateless 503 for a source over max_transactions_per_source.
TRANSACTIONS_RETRY_AFTER = "5"
# Methods counted by name in EngineStats.messages; any other is counted as "other", so that
# requests from the network cannot grow the table (and the metric's label values) without bound.
COUNTED_METHODS = frozenset(
    {
        "INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "REFER", "NOTIFY", "SUBSCRIBE",
        "INFO", "UPDATE", "PRACK", "MESSAGE", "PUBLISH",
    }
)  # fmt: skip

__all__ = [
    "DEFAULT_ALLOW",
    "Destination",
    "EngineStats",
    "IncomingRequest",
    "MessageTap",
    "OutgoingRequest",
    "RequestHandler",
    "RequestTarget",
    "SipEngine",
    "TransportConfig",
    "error_response",
    "stamp_via",
]


@dataclass(slots=True)
class EngineStats:
    """The engine's counters. Those updated for every message are :func:`itertools.count`
    objects (``requests``, ``responses``, ``timers``, ``message_counters``), read through the
    properties below: as ints in attributes or a dict, each ``+= 1`` made a new int object
    (above 256) kept until the next, and the last ones, made at the end of a burst of calls,
    were alive long after it in the arenas the burst took, which Python's allocator then
    could not give back (docs/performance.md, Round 8: idle). A count keeps a machine integer;
    ``next()`` costs what ``+= 1`` on an attribute did (an array's cell: three times that)."""

    requests_rejected: int = 0
    responses_dropped: int = 0
    handler_errors: int = 0
    dns_failures: int = 0
    failovers: int = 0
    # Messages sent again for want of an answer: requests on Timers A/E, final responses on
    # Timer G, and a 2xx the TU repeats until its ACK (RFC 3261 §13.3.1.4).
    retransmissions: int = 0
    # Every message received from / handed to a transport, retransmissions included, by
    # ("in" | "out", method (COUNTED_METHODS or "other") or status code, transport): a counter
    # per key (messages: the counts by key).
    message_counters: dict[tuple[str, str | int, str], itertools.count[int]] = field(
        default_factory=dict
    )
    requests: itertools.count[int] = field(default_factory=itertools.count)
    responses: itertools.count[int] = field(default_factory=itertools.count)
    timers: itertools.count[int] = field(default_factory=itertools.count)
    # Requests refused because their source had max_transactions_per_source server
    # transactions open (answered 503 statelessly).
    transactions_refused: int = 0
    # RFC 3261 §18.1.1: attempts of large requests over TCP to a UDP peer, and those that
    # went back to UDP because the TCP connection could not be made.
    large_over_tcp: int = 0
    large_tcp_fallbacks: int = 0

    requests_received = counted("requests")
    responses_received = counted("responses")
    # Loop timers armed for the transaction layer's next deadline (one engine timer; see
    # SipEngine._arm_timer): what the timer bookkeeping costs the event loop.
    timer_arms = counted("timers")

    @property
    def messages(self) -> dict[tuple[str, str | int, str], int]:
        """The messages counted by key (a copy)."""
        return {key: count_of(counter) for key, counter in self.message_counters.items()}


class SipEngine:
    """Owns the transaction layer, the transports, the resolver and the one timer."""

    def __init__(
        self,
        config: TransportConfig,
        *,
        resolver: Resolver | None = None,
        layer: TransactionLayer | None = None,
        client_ssl: ssl.SSLContext | None = None,
        server_ssl: ssl.SSLContext | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.config = config
        self.layer = layer or TransactionLayer(t1=config.t1, t2=config.t2, t4=config.t4)
        ipv6 = ":" in config.bind
        self.resolver = resolver or Resolver(
            timeout=config.dns_timeout, address_types=("AAAA",) if ipv6 else ("A",)
        )
        self.transports = Transports(
            config,
            self._message_received,
            self._send_failed,
            client_ssl=client_ssl,
            server_ssl=server_ssl,
        )
        self.transports.on_oversized = self._oversized
        # The edge guard (sbc/net/guard.py): source checks before parsing in the transports,
        # the verdict on each request here, the new-call cap. None: everyone is let in.
        self.guard = guard
        if guard is not None:
            self.transports.admit_datagram = guard.admit_datagram
            self.transports.admit_connection = guard.admit_connection
        self.stats = EngineStats()
        # Hooks for the layers above.
        self.on_request: RequestHandler | None = None
        self.on_ack: Callable[[Request, Destination], None] | None = None
        self.on_cancel: Callable[[IncomingRequest, Request], None] | None = None
        self.on_stray_response: Callable[[Response, Destination], None] | None = None
        # A response to a client transaction whose final response already came (a 2xx copy
        # for an ACK, RFC 6026 §8.4), with where that request went.
        self.on_late_response: Callable[[Destination | None, Response], None] | None = None
        # The message tap: called with ("in", message, source) for every message received and
        # ("out", message, destination) for every message handed to a transport, retransmissions
        # included (call ladders, the SIP trace). Unset, it costs one attribute check each way.
        self.on_message: MessageTap | None = None
        # Capabilities announced in answers to OPTIONS and checked on requests.
        self.answer_options = True
        self.allow: tuple[str, ...] = DEFAULT_ALLOW
        self.accept: frozenset[str] = DEFAULT_ACCEPT | {
            "message/sipfrag",
            "application/simple-message-summary",
        }
        self.supported: frozenset[str] = DEFAULT_SUPPORTED
        self._options_basis: tuple[object, ...] | None = None
        self._options_headers: tuple[tuple[str, str], ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pumping = False
        self._pump_again = False
        # make_via's text before the branch, by transport (by (transport, socket name) for a
        # named UDP socket), for self._via_config.
        self._via_prefixes: dict[object, tuple[str, Via | None]] = {}
        self._via_config: TransportConfig | None = None
        self._clients: dict[str, OutgoingRequest] = {}
        # Client transactions past their final response (up to Timer M/K), by key: only where
        # the request went, which is all a late response needs. Not the handle: it holds the
        # request as sent and every response (about 5 KB an INVITE), 32 s per call.
        self._finished: dict[str, Destination | None] = {}
        self._branch_keys: dict[tuple[str, str], str] = {}
        self._key_branches: dict[str, tuple[str, str]] = {}
        self._incoming: dict[str, IncomingRequest] = {}
        self._transport_failed: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Requests without a final response yet, each with the destinations not tried yet
        # (RFC 3263 §4.3 failover).
        self._pending: dict[OutgoingRequest, list[Destination]] = {}
        self._running = False
        # Server transactions not answered yet (no final response) by source address
        # (max_transactions_per_source), and the source of each by key, to count it down at its
        # final response or its end. Answered ones (absorbing retransmissions until Timer J)
        # are not counted: they end by themselves, and a source's rate of new ones is the
        # rate limiter's business.
        self._source_transactions: dict[str, int] = {}
        self._transaction_sources: dict[str, str] = {}
        # (host, port) of UDP peers whose TCP connect failed, until when large requests to
        # them stay on UDP.
        self._no_tcp_until: dict[tuple[str, int], float] = {}

    def release_tables(self) -> None:
        """Free the tables of the per-transaction dicts and sets that are empty, and the
        transaction layer's (:meth:`TransactionLayer.release_tables`): a dict or set keeps the
        table a burst of calls grew it to, and the first insert after the burst makes a small
        new one in the burst's allocator arenas, which then stay taken for good. For when
        the service has gone quiet (sbc/ops/idle.py), not per call."""
        tables: tuple[dict[Any, Any] | set[Any], ...] = (
            self._clients,
            self._finished,
            self._branch_keys,
            self._key_branches,
            self._incoming,
            self._transport_failed,
            self._pending,
            self._source_transactions,
            self._transaction_sources,
        )
        for table in tables:
            if not table:
                table.clear()  # an empty one: frees its table, allocates nothing
        self.layer.release_tables()

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # The loop's clock itself from now on (read ten times a call): no Python frame of _now
        # around it. An engine given its loop by hand (tests) keeps the method.
        self._now = self._loop.time  # type: ignore[method-assign]
        await self.transports.start()
        self._running = True
        log.info(
            "sip_engine_started",
            udp=self.transports.udp_address,
            tcp=self.transports.tcp_address,
            tls=self.transports.tls_address,
            udp_named=self.transports.udp_named_addresses or None,
        )

    async def stop(self) -> None:
        """Close every socket, cancel every task; pending requests end with a synthetic 503."""
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for handle in list(self._pending):
            handle.local_failure = handle.local_failure or "engine stopped"
            handle.deliver(build_response(handle.request, 503, "Service Unavailable"))
        self._pending.clear()
        self._clients.clear()
        await self.resolver.aclose()
        await self.transports.stop()

    @property
    def transactions_by_source(self) -> Mapping[str, int]:
        """Server transactions not answered yet (no final response), by source address
        (read-only view)."""
        return MappingProxyType(self._source_transactions)

    def table_sizes(self) -> dict[str, int]:
        """Entries of every per-request table the engine keeps (leak checks: all return to 0,
        or to a bound, once the traffic and its timers have ended)."""
        return {
            "engine_clients": len(self._clients),
            "engine_finished": len(self._finished),
            "engine_branch_keys": len(self._branch_keys),
            "engine_key_branches": len(self._key_branches),
            "engine_incoming": len(self._incoming),
            "engine_transport_failed": len(self._transport_failed),
            "engine_pending": len(self._pending),
            "engine_tasks": len(self._tasks),
            # Per-source counts of unanswered server transactions ([sip] limits).
            "engine_source_transactions": len(self._source_transactions),
            "engine_transaction_sources": len(self._transaction_sources),
            "transaction_timers": self.layer.timers_pending,
            # Only the (side, method, state) present: what a transaction count that does not
            # drain is made of.
            **{f"tx_{key}": count for key, count in self.layer.census().items()},
        }

    def _now(self) -> float:
        assert self._loop is not None, "engine not started"
        return self._loop.time()

    # -- client side ---------------------------------------------------------------------------
    def make_via(
        self, transport: str, local: str | None = None, *, branch: str | None = None
    ) -> str:
        """A Via for a request we send: advertised address, fresh branch, ``rport`` (RFC 3581).

        ``local``: the named UDP socket the request will leave from (``send_request``'s
        ``local``), whose port the Via then names; ignored for other transports and for a
        name with no open socket (the SIP port's Via). ``branch``: the branch to write
        instead of a fresh one (a caller that replaces it anyway, as a leg's in-dialog
        requests do in ``Dialog.create_request``, saves the random draw: a system call)."""
        # The text alone (a leg's in-dialog requests): no parsed Via made to be dropped.
        prefix = self._via_prefix(transport, local)[0]
        if branch is not None:
            return f"{prefix}{branch};rport"
        return f"{prefix}{BRANCH_COOKIE}{random_bytes(12).hex()};rport"

    def _new_via(self, transport: str, local: str | None = None) -> tuple[str, Via | None]:
        """make_via's text and, when known, what parsing it gives (not parsed per request)."""
        prefix, shape = self._via_prefix(transport, local)
        # make_branch(new_branch(...)) without its two Python frames: the same text.
        branch = f"{BRANCH_COOKIE}{random_bytes(12).hex()}"
        text = f"{prefix}{branch};rport"
        if shape is None:
            return text, None
        return text, _via_of(shape.transport, shape.host, shape.port, (("branch", branch), _RPORT))

    def _via_prefix(self, transport: str, local: str | None = None) -> tuple[str, Via | None]:
        """The Via of ``transport`` up to its branch, and a Via of its shape (None when the
        parser refuses the advertised address)."""
        config = self.config
        if self._via_config is not config:
            self._via_prefixes = {}
            self._via_config = config
        named = None
        key: object = transport
        if local is not None and transport == "udp":
            named = self.transports.udp_named_addresses.get(local)
            if named is not None:
                key = (transport, local)
        known = self._via_prefixes.get(key)
        if known is None:
            # Once per transport: the advertised address and port do not change per request,
            # so neither does the Via but for its branch. A named socket's Via names its own
            # port: the responses come back to it (RFC 3261 §18.2.2, RFC 3581).
            port = config.via_port(transport) if named is None else named[1]
            prefix = f"SIP/2.0/{VIA_TRANSPORT[transport]} {config.via_host}:{port};branch="
            shape: Via | None
            try:
                shape = parse_via(f"{prefix}{BRANCH_COOKIE}0;rport")
            except SipError:
                shape = None  # an advertised name the parser refuses: the layer does, as before
            if shape is not None and shape.params != (("branch", f"{BRANCH_COOKIE}0"), _RPORT):
                shape = None  # (not reached) then each request's Via is parsed when read
            known = (prefix, shape)
            self._via_prefixes[key] = known
        return known

    def send_request(
        self, request: Request, target: RequestTarget = None, local: str | None = None
    ) -> OutgoingRequest:
        """Start a client transaction for ``request``; returns its handle at once.

        ``target`` is a Destination (no DNS), a SIP URI (object or text) resolved per RFC 3263,
        or None for the request's own next hop (top Route with ``lr``, else Request-URI,
        RFC 3261 §8.1.2). A request without Via gets one from :meth:`make_via` for each
        attempt, so the engine may fail over to the next destination with a new branch; a
        request that already carries a Via (a CANCEL) is sent as it is, to one destination.

        ``local`` names the UDP socket (``TransportConfig.udp_sockets``) that the request
        leaves from when it goes over UDP, and that its Via names (a request with its own Via
        must have it from ``make_via(transport, local)``); a name with no open socket, or
        another transport, leaves it to the SIP port's socket.
        """
        owns_via = "Via" not in request.headers
        handle = OutgoingRequest(request, target, owns_via)
        if local is not None:
            handle.local = local
        self._pending[handle] = []
        destinations = self._destinations_now(request, target)
        if destinations is None:
            self._spawn(self._start_client(handle))  # a DNS lookup first
        else:
            # Sent at once: no task per request when no lookup is needed (the usual case).
            self._send_to(handle, destinations)
        return handle

    def cancel(self, invite: OutgoingRequest) -> OutgoingRequest:
        """CANCEL a pending INVITE (RFC 3261 §9.1): same Via, to the same destination."""
        cancel = build_cancel(invite.request)
        return self.send_request(cancel, invite.destination)

    async def send_ack(
        self, ack: Request, target: RequestTarget = None, local: str | None = None
    ) -> Request:
        """Send an ACK for a 2xx statelessly (RFC 3261 §13.2.2.4); returns it as sent.

        Send the returned ACK again (same Via) for each retransmitted 2xx. ``local``: as for
        :meth:`send_request`.
        """
        # No coroutine when no lookup is needed (an ACK goes where its INVITE went).
        destinations = self._destinations_now(ack, target)
        if destinations is None:
            destinations = await self._destinations(ack, target)
        dest = destinations[0]
        if local is not None and local in self.transports.udp_named_addresses:
            dest = self._from_socket(dest, local)
        if "Via" not in ack.headers:
            via = self.make_via(dest.transport, dest.local)
            ack = _with_headers(ack, ack.headers.prepend("Via", via))
        self.layer.send_stateless(ack, dest=dest)
        self._pump()
        return ack

    def send_stateless(self, message: Request | Response, dest: Destination) -> None:
        """Send ``message`` outside any transaction (an ACK again for a retransmitted 2xx, a
        2xx retransmitted by a UAS core, RFC 3261 §13.3.1.4). Responses are addressed per
        RFC 3261 §18.2.2 from their top Via, like any other response."""
        self.layer.send_stateless(message, dest=dest)
        self._pump()

    async def _start_client(self, handle: OutgoingRequest) -> None:
        try:
            destinations = await self._destinations(handle.request, handle.target)
        except (ResolutionFailed, SipError) as exc:
            self.stats.dns_failures += 1
            log.info(
                "request_target_unresolved",
                call_id=handle.request.headers.get("Call-ID"),
                target=str(handle.target),
                error=str(exc),
            )
            handle.local_failure = f"unresolved: {exc}"
            self._finish(handle, build_response(handle.request, 503, "Service Unavailable"))
            return
        self._send_to(handle, destinations)

    def _send_to(self, handle: OutgoingRequest, destinations: list[Destination]) -> None:
        # A request sent with its own Via goes to one destination only.
        if handle.owns_via:
            destinations = self._large_over_tcp(handle, destinations)
        self._pending[handle] = destinations if handle.owns_via else destinations[:1]
        try:
            self._attempt(handle)
        except Exception:
            # A bug (ours or the core's) must still end the caller's wait.
            log.exception("request_send_failed", call_id=handle.request.headers.get("Call-ID"))
            self._finish(handle, build_response(handle.request, 500, "Server Internal Error"))

    def _from_socket(self, dest: Destination, local: str) -> Destination:
        """``dest`` sent from the named UDP socket ``local`` (open: the caller checked) when it
        goes over UDP; else as it is (a stream, or a destination that names its socket)."""
        if dest.local is not None or dest.transport != "udp":
            return dest
        return Destination(dest.transport, dest.host, dest.port, None, dest.server_name, local)

    def _attempt(self, handle: OutgoingRequest) -> None:
        """Send to the next destination; the caller checked that one is left."""
        dest = self._pending[handle].pop(0)
        local = handle.local
        # (the name of a socket that is not open, "pbx" without one, costs no call)
        if local is not None and local in self.transports.udp_named_addresses:
            dest = self._from_socket(dest, local)
        request = handle.request
        if handle.owns_via:
            headers = request.headers
            if handle.attempts:
                headers = headers.remove_first("Via")
            text, via = self._new_via(dest.transport, dest.local)
            headers = headers.prepend("Via", text)
            if via is not None:
                # The layer and the branch table read the top Via: it need not be parsed.
                headers.cached("top_via", lambda _: via)
            request = _with_headers(request, headers)
        handle.request = request
        handle.destination = dest
        handle.local_failure = None
        handle.attempts += 1
        left = self._pending[handle]
        if (
            left
            and dest.transport == "tcp"
            and left[0] == dataclasses.replace(dest, transport="udp")
        ):
            self.stats.large_over_tcp += 1
        try:
            key = self.layer.send_request(
                request, dest=dest, reliable=dest.transport != "udp", now=self._now()
            )
        except SipError as exc:
            log.warning(
                "request_refused_by_core", call_id=request.headers.get("Call-ID"), error=exc.detail
            )
            self._finish(handle, error_response(request, exc))
            return
        handle.key = key
        self._clients[key] = handle
        branch_key = (request.top_via.branch or "", request.method)
        self._branch_keys[branch_key] = key
        self._key_branches[key] = branch_key
        handle.mark_sent()
        self._pump()

    def _large_over_tcp(
        self, handle: OutgoingRequest, destinations: list[Destination]
    ) -> list[Destination]:
        """RFC 3261 §18.1.1: a request over 1300 bytes for a UDP destination goes over TCP to
        the same address and port first, the UDP destination kept right behind it as the
        failover (a peer that does not take TCP still gets the request, as before).

        Only where the peer's transport was not stated: a target URI without ``transport=``
        (a Destination given by the caller, or ``transport=udp``, is kept as it is), with
        ``large_requests_over_tcp`` set and TCP enabled; and not to a peer whose TCP connect
        failed in the last ``TCP_REFUSED_MEMORY`` seconds.
        """
        config = self.config
        if not (config.large_requests_over_tcp and config.tcp):
            return destinations
        for dest in destinations:
            if dest.transport == "udp":
                break
        else:
            return destinations  # nothing over UDP (no generator per request)
        target = handle.target
        if isinstance(target, Destination):
            return destinations
        try:
            uri = (
                self._next_hop(handle.request)
                if target is None
                else parse_uri(target)
                if isinstance(target, str)
                else target
            )
        except (ResolutionFailed, SipError):
            return destinations
        if not isinstance(uri, SipUri) or uri.transport is not None or uri.is_secure:
            return destinations
        # The Via written per attempt is not there yet: one of the same shape stands in.
        # (counted, not serialised: the transport serialises the request once its Via is set)
        # (its length, so a stand-in branch of a real one's length: no random draw, a system
        # call, for a text only measured)
        via = self.make_via("udp", branch=_BRANCH_STAND_IN)
        size = serialized_size(handle.request) + len(via) + len("Via: \r\n")
        if size <= LARGE_REQUEST:
            return destinations
        now = self._now()
        out: list[Destination] = []
        for dest in destinations:
            if dest.transport == "udp" and self._no_tcp_until.get((dest.host, dest.port), 0) <= now:
                out.append(dataclasses.replace(dest, transport="tcp", connection_id=None))
            out.append(dest)
        return out

    def _finish(self, handle: OutgoingRequest, response: Response) -> None:
        handle.deliver(response)
        self._pending.pop(handle, None)

    def _destinations_now(
        self, request: Request, target: RequestTarget
    ) -> list[Destination] | None:
        """The destinations of ``request`` when finding them needs no DNS lookup (a
        Destination, an IP literal, records fresh in the resolver's cache); None otherwise,
        and also on any error, which :meth:`_start_client` then meets and reports."""
        if type(target) is Destination:
            return [target]
        try:
            if target is None:
                target = self._next_hop(request)
            uri = parse_uri(target) if type(target) is str else target
            if type(uri) is not SipUri:
                return None
            return self.resolver.resolve_cached(target_of_uri(uri))
        except (ResolutionFailed, SipError):
            return None

    async def _destinations(self, request: Request, target: RequestTarget) -> list[Destination]:
        """The destinations of ``request``, looked up: its callers try
        :meth:`_destinations_now` first and come here only when that found none."""
        if isinstance(target, Destination):
            return [target]
        if target is None:
            target = self._next_hop(request)
        uri = parse_uri(target) if isinstance(target, str) else target
        if not isinstance(uri, SipUri):
            raise ResolutionFailed(f"cannot route to {uri}")
        return await self.resolver.resolve(target_of_uri(uri))

    @staticmethod
    def _next_hop(request: Request) -> SipUri:
        # RFC 3261 §8.1.2: the first Route entry when it is a loose router, else the R-URI.
        routes = request.headers.values("Route")
        if routes:
            route = parse_name_addr(routes[0]).uri
            if isinstance(route, SipUri) and route.has_param("lr"):
                return route
        if not isinstance(request.uri, SipUri):
            raise ResolutionFailed(f"no SIP next hop for {request.uri}")
        return request.uri

    def _client_response(self, key: str, response: Response, retransmission: bool) -> None:
        handle = self._clients.get(key)
        if handle is None or handle.key != key:
            if key in self._finished and self.on_late_response is not None:
                # RFC 6026 §8.4: 2xx retransmissions (or other forks) reach the TU for an ACK.
                self.on_late_response(self._finished[key], response)
            return
        if handle.final is not None:
            if self.on_late_response is not None:
                self.on_late_response(handle.destination, response)
            return
        # A final response with destinations left to try (RFC 3263 failover, a large
        # request's UDP twin); without any, as nearly always, neither step has work.
        if response.status >= 200 and self._pending.get(handle):
            self._settle_large_over_tcp(handle, key)
            if self._should_fail_over(handle, key, response):
                self.stats.failovers += 1
                log.info(
                    "request_failover",
                    call_id=response.headers.get("Call-ID"),
                    failed=str(handle.destination),
                    status=response.status,
                )
                self._clients.pop(key, None)
                self._attempt(handle)
                return
        handle.deliver(response)
        if response.status >= 200:
            self._pending.pop(handle, None)
            # From now on the transaction only absorbs copies: the engine lets go of the
            # handle (the TU keeps it as long as it needs it), and of what maps a transport
            # failure to it (it sends nothing more that could fail: an ACK is not mapped).
            del self._clients[key]
            self._finished[key] = handle.destination
            self._transport_failed.discard(key)
            branch_key = self._key_branches.pop(key, None)
            if branch_key is not None and self._branch_keys.get(branch_key) == key:
                del self._branch_keys[branch_key]

    def _settle_large_over_tcp(self, handle: OutgoingRequest, key: str) -> None:
        """A final response to a large request sent over TCP in front of its UDP twin (see
        :meth:`_large_over_tcp`). The twin is for a connection that could not be made: then
        it goes next and the peer is remembered. Any other outcome came from the peer itself
        (an answer, or a timeout after it took the connection): the twin is dropped, so that
        a 503 fails over to the next server, not to the same one over UDP."""
        tried = handle.destination
        following = self._pending.get(handle)
        if tried is None or tried.transport != "tcp" or not following:
            return
        after = following[0]
        if after.transport != "udp" or (after.host, after.port) != (tried.host, tried.port):
            return
        if key not in self._transport_failed:
            del following[0]
            return
        self.stats.large_tcp_fallbacks += 1
        self._no_tcp_until[(tried.host, tried.port)] = self._now() + TCP_REFUSED_MEMORY
        log.info("large_request_back_to_udp", dest=f"{tried.host}:{tried.port}")

    def _should_fail_over(self, handle: OutgoingRequest, key: str, response: Response) -> bool:
        """RFC 3263 §4.3: a transport failure, a timeout or a 503 moves on to the next
        destination, as long as nothing but 100 Trying came from this one."""
        if not self._pending.get(handle) or not handle.owns_via:
            return False
        if any(r.status > 100 for r in handle.responses):
            return False
        return key in self._transport_failed or response.status in (408, 503)

    def _timed_out(self, key: str) -> None:
        handle = self._clients.get(key)
        if handle is None or handle.final is not None:
            return
        # RFC 3261 §8.1.3.1: a transaction timeout is treated as a 408.
        handle.local_failure = "timeout"
        self._client_response(key, build_response(handle.request, 408, "Request Timeout"), False)

    # -- server side ---------------------------------------------------------------------------
    def respond(self, server_key: str, response: Response) -> None:
        """Send a response through the server transaction ``server_key``."""
        if response.status >= 200:
            # The first final response finds its transaction still counted as unanswered;
            # only a later one needs the layer's state.
            host = self._transaction_sources.pop(server_key, None)
            if host is not None:
                self._source_done(host)
            elif self.layer.server_state(server_key) is ServerState.ACCEPTED:
                self.stats.retransmissions += 1  # the TU's 2xx again, until its ACK
        self.layer.respond(server_key, response, now=self._now())
        if response.status >= 200:
            # A CANCEL can no longer change anything (RFC 3261 §9.2): the INVITE as received
            # is not kept for it until Timer L or H (32 s); the TU keeps what it needs.
            self._incoming.pop(server_key, None)
        self._pump()

    def _cancel_received(self, event: CancelReceived) -> None:
        """RFC 3261 §9.2: the layer answered the CANCEL 200; the INVITE still needs its 487."""
        incoming = self._incoming.get(event.key)
        if incoming is None:
            return
        incoming.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(incoming, event.request)
        elif not incoming.final_sent:
            incoming.respond(487)

    def _answer_options(self, incoming: IncomingRequest) -> None:
        # The header fields only change when the capabilities do; rebuilt then.
        basis = (tuple(self.allow), self.supported, self.config.user_agent)
        if self._options_basis != basis:
            self._options_basis = basis
            self._options_headers = (
                ("Allow", ", ".join(self.allow)),
                ("Accept", "application/sdp"),
                ("Supported", ", ".join(sorted(self.supported))),
                *self._server_headers,
            )
        incoming.respond(200, headers=self._options_headers)

    def _request_received(self, key: str, request: Request, source: Destination) -> None:
        host = source.host
        self._transaction_sources[key] = host
        counts = self._source_transactions
        counts[host] = counts.get(host, 0) + 1
        to_tag = request.to_tag
        incoming = IncomingRequest(self, key, request, source, to_tag)
        guard = self.guard
        if (
            guard is not None
            and request.method == "INVITE"
            and to_tag is None
            and not guard.new_call_allowed()
        ):
            # The global new-call cap (RFC 3261 §21.5.4: 503 with Retry-After).
            retry = ("Retry-After", str(guard.config.new_call_retry_after))
            incoming.respond(503, headers=(retry, *self._server_headers))
            return
        if request.method == "INVITE":
            # Kept for a CANCEL (RFC 3261 §9.2), which only an INVITE can get.
            self._incoming[key] = incoming
        if request.method == "OPTIONS" and self.answer_options and to_tag is None:
            self._answer_options(incoming)
            return
        handler = self.on_request
        if handler is None:
            incoming.respond(405, headers=(("Allow", ", ".join(("OPTIONS",))),))
            return
        try:
            handler(incoming)
        except Exception:
            self._handler_failed(incoming)

    def _handler_failed(self, incoming: IncomingRequest) -> None:
        """A bug in a handler: log it, answer 500 if nothing final went out, keep serving."""
        self.stats.handler_errors += 1
        request = incoming.request
        log.exception(
            "request_handler_failed",
            call_id=request.headers.get("Call-ID"),
            branch=_branch(request),
            method=request.method,
        )
        if not incoming.final_sent and self._running:
            try:
                incoming.respond(500)
            except SipError:
                log.warning("request_handler_500_failed", call_id=request.headers.get("Call-ID"))

    # -- input from the transports -------------------------------------------------------------
    @property
    def _server_headers(self) -> tuple[tuple[str, str], ...]:
        # No Server header unless one is configured (nothing for a scanner to fingerprint).
        agent = self.config.user_agent
        return (("Server", agent),) if agent else ()

    def _guarded(self, guard: Guard, request: Request, source: Destination) -> bool:
        """The guard's verdict on a parsed request; True when it stops here (dropped, or
        answered 403 statelessly: the same answer whatever was asked, RFC 3261 §21.4.4)."""
        method = request.method
        if method == "ACK" or method == "CANCEL":
            new = False
        else:
            try:
                new = request.to_tag is None
            except SipError:
                new = True  # no readable To: treated as outside any dialog
        verdict = guard.request_verdict(source.host, counted=source.transport == "udp", new=new)
        if verdict == ADMIT:
            return False
        if verdict == REJECT and method != "ACK":
            try:
                stamped = stamp_via(request, source)
            except SipError:
                return True
            self._reject_stateless(
                stamped, source, Forbidden("untrusted source", headers=self._server_headers)
            )
            self._pump()
        return True

    def _message_received(self, message: Message, source: Destination) -> None:
        # One branch per kind, each with the same steps (the guard for requests only): the
        # tap, the count, the processing.
        counters = self.stats.message_counters
        tap = self.on_message
        try:
            if isinstance(message, Request):
                guard = self.guard
                if guard is not None:
                    try:
                        if self._guarded(guard, message, source):
                            return
                    except Exception:
                        log.exception("guard_failed", source=str(source))
                        return
                if tap is not None:
                    try:
                        tap("in", message, source)
                    except Exception:
                        # A tap's bug must not stop a message.
                        log.exception("message_tap_failed", direction="in")
                method = message.method
                key: tuple[str, str | int, str] = (
                    "in",
                    method if method in COUNTED_METHODS else "other",
                    source.transport,
                )
                counter = counters.get(key)
                if counter is None:
                    counter = counters[key] = itertools.count()
                next(counter)
                self._incoming_request(message, source)
            else:
                if tap is not None:
                    try:
                        tap("in", message, source)
                    except Exception:
                        log.exception("message_tap_failed", direction="in")
                key = ("in", message.status, source.transport)
                counter = counters.get(key)
                if counter is None:
                    counter = counters[key] = itertools.count()
                next(counter)
                self._incoming_response(message, source)
        except Exception:
            # A bug in the core or here must not take the listener down.
            log.exception(
                "message_processing_failed",
                call_id=message.headers.get("Call-ID"),
                source=str(source),
            )
        self._pump()

    def _incoming_request(self, request: Request, source: Destination) -> None:
        next(self.stats.requests)
        try:
            if request.method == "ACK":
                request = _ack_as_received(request, source)
            else:
                request = stamp_via(request, source)
        except SipError:
            # No usable top Via: there is nowhere to send an answer to (RFC 3261 §18.2.2).
            self.stats.requests_rejected += 1
            return
        try:
            validate_request(request, supported=self.supported, accept=self.accept)
        except SipError as exc:
            self.stats.requests_rejected += 1
            if request.method == "ACK":
                # Never answered (RFC 3261 §17.2.3): one sbc cannot read is dropped here, not
                # left to fail in the transaction layer or the call manager (found by fuzzing).
                log.debug("ack_dropped", call_id=request.headers.get("Call-ID"), detail=exc.detail)
                return
            log.info(
                "request_rejected",
                call_id=request.headers.get("Call-ID"),
                status=exc.status,
                detail=exc.detail,
            )
            self._reject_stateless(request, source, exc)
            return
        if (
            request.method not in ("ACK", "CANCEL")
            and self._source_transactions.get(source.host, 0)
            >= self.config.max_transactions_per_source
            and self.layer.server_state(server_key(request)) is None
        ):
            # Stateless, so that the refusal itself holds no transaction; retransmissions
            # of a request already in a transaction still reach it. CANCEL is let through:
            # it ends an INVITE's transaction sooner; an ACK makes none.
            self.stats.transactions_refused += 1
            # Debug only: one line per refused request would let a flood fill the log.
            log.debug("request_over_source_transactions", source=source.host)
            retry = (("Retry-After", TRANSACTIONS_RETRY_AFTER),)
            self._reject_stateless(
                request, source, ServiceUnavailable("too many transactions", headers=retry)
            )
            return
        self.layer.receive(
            request, source=source, reliable=source.transport != "udp", now=self._now()
        )

    def _oversized(self, message: Message, source: Destination) -> None:
        if not isinstance(message, Request) or message.method == "ACK":
            return
        if self.guard is not None and self._guarded(self.guard, message, source):
            return  # an untrusted source gets its 403 (or nothing), never a telling 513
        try:
            request = stamp_via(message, source)
        except SipError:
            return
        self.stats.requests_rejected += 1
        self._reject_stateless(request, source, MessageTooLarge("message too large"))
        self._pump()

    def _reject_stateless(self, request: Request, source: Destination, exc: SipError) -> None:
        try:
            response = error_response(
                request, exc, to_tag=new_tag() if _to_tag(request) is None else None
            )
        except SipError:
            return  # not even enough of a request to build an answer
        self.layer.send_stateless(response, dest=source)

    def _incoming_response(self, response: Response, source: Destination) -> None:
        next(self.stats.responses)
        try:
            validate_response(response)
            via = response.top_via
        except SipError:
            self.stats.responses_dropped += 1
            return
        # RFC 3261 §18.1.2: a response whose top Via is not ours is discarded.
        host = via.host
        if host != self.config.via_host and host.lower() != self.config.via_host.lower():
            self.stats.responses_dropped += 1
            log.debug("response_not_ours", sent_by=via.host, source=str(source))
            return
        self.layer.receive(
            response, source=source, reliable=source.transport != "udp", now=self._now()
        )

    def _send_failed(self, dest: Destination, messages: list[Message], reason: str) -> None:
        now = self._now()
        for message in messages:
            if isinstance(message, Request):
                if message.method == "ACK":
                    continue
                key = self._branch_keys.get((_branch(message) or "", message.method))
                if key is None:
                    continue
                self._transport_failed.add(key)
                handle = self._clients.get(key)
                if handle is not None:
                    handle.local_failure = reason
                # RFC 3261 §8.1.3.1: a transport error is reported to the TU as a 503.
                try:
                    self.layer.transport_error(key, now=now)
                except SipError as exc:
                    log.warning("transport_error_refused", key=key, detail=exc.detail)
            else:
                log.info(
                    "response_undeliverable",
                    call_id=message.headers.get("Call-ID"),
                    dest=str(dest),
                    reason=reason,
                )
        self._pump()

    # -- output and events ---------------------------------------------------------------------
    def _pump(self) -> None:
        """Drain the layer's output and events, then re-arm the timer (re-entrant safe)."""
        if self._pumping:
            # Called while a pump runs (a handler answered, a request went out, a send
            # failed): whatever that queued in the layer is taken by one more round of it.
            self._pump_again = True
            return
        self._pumping = True
        layer = self.layer
        try:
            while True:
                # Every engine method that queues output or events in the layer pumps right
                # after, so a round that none of them ran in left nothing behind: no second
                # pair of empty reads per message (11 pumps per bridged call).
                self._pump_again = False
                for dest, message in layer.datagrams_to_send():
                    self._transmit(dest, message)
                for event in layer.events():
                    try:
                        self._dispatch(event)
                    except Exception:
                        log.exception("event_dispatch_failed", kind=type(event).__name__)
                if not self._pump_again:
                    break
        finally:
            self._pumping = False
        # _arm_timer's first test without its frame: after most messages the earliest deadline
        # is the one the loop timer is already armed at (nine pumps a call).
        deadline = layer.next_deadline()
        if deadline != self._timer_at:
            self._arm_timer(deadline)

    def _transmit(self, dest: object, message: Message) -> None:
        assert type(dest) is Destination  # what the engine gave the layer with each message
        if isinstance(message, Response):
            dest = self._response_destination(dest, message)
            key: tuple[str, str | int, str] = ("out", message.status, dest.transport)
        else:
            method = message.method
            key = ("out", method if method in COUNTED_METHODS else "other", dest.transport)
            if self.guard is not None:
                self.guard.note_peer(dest.host)  # its answers and requests are let in
        counters = self.stats.message_counters
        counter = counters.get(key)
        if counter is None:
            counter = counters[key] = itertools.count()
        next(counter)
        tap = self.on_message
        if tap is not None:
            try:
                tap("out", message, dest)
            except Exception:
                # A tap's bug must not stop a message.
                log.exception("message_tap_failed", direction="out")
        self.transports.send(dest, message)

    def _response_destination(self, source: Destination, response: Response) -> Destination:
        """RFC 3261 §18.2.2 with RFC 3581 §4: where a response to a request from ``source`` goes."""
        if (
            source.transport != "udp"
            and source.connection_id is not None
            and self.transports.connection(source.connection_id) is not None
        ):
            return source  # back over the connection the request came on
        fields = response.headers.items()
        if fields and fields[0][0] == "Via":
            first = fields[0][1]  # build_response puts the Via fields first
        else:
            first = response.headers.get("Via") or ""
        if source.transport == "udp" and ";rport=" in first and "," not in first:
            # RFC 3581 §4: the request had rport (stamp_via filled it): back to its source.
            return source
        try:
            # Not response.top_via: that would keep the parsed Via on a response the
            # transaction holds for seconds.
            via = parse_via(response.headers.values("Via")[0])
        except (SipError, IndexError):
            return source
        host = via.received or via.host
        if via.has_rport and via.rport is not None:
            port = via.rport
        else:
            port = via.port or DEFAULT_PORTS[source.transport]
        literal = ip_literal(host)
        if literal is None:
            return source
        # From the socket the request came in on (a named UDP socket's requests are answered
        # from it: the peer's transaction matches the answer by where it sent the request).
        return Destination(source.transport, literal, port, None, None, source.local)

    def _dispatch(self, event: object) -> None:
        # The two events of nearly every message first, by exact type (the layer's own
        # classes, never subclassed): no isinstance call each.
        if type(event) is RequestReceived:
            assert type(event.source) is Destination
            self._request_received(event.key, event.request, event.source)
        elif type(event) is ResponseReceived:
            self._client_response(event.key, event.response, event.retransmission)
        elif isinstance(event, AckReceived):
            if self.on_ack is not None:
                assert type(event.source) is Destination
                self.on_ack(event.request, event.source)
        elif isinstance(event, CancelReceived):
            self._cancel_received(event)
        elif isinstance(event, StrayResponse):
            if self.on_stray_response is not None:
                assert type(event.source) is Destination
                self.on_stray_response(event.response, event.source)
        elif isinstance(event, TransactionTimedOut):
            self._timed_out(event.key)
        elif isinstance(event, TransactionTerminated):
            self._terminated(event.key)

    def _unanswered_done(self, key: str) -> None:
        host = self._transaction_sources.pop(key, None)
        if host is not None:
            self._source_done(host)

    def _source_done(self, host: str) -> None:
        left = self._source_transactions.get(host, 1) - 1
        if left > 0:
            self._source_transactions[host] = left
        else:
            self._source_transactions.pop(host, None)

    def _terminated(self, key: str) -> None:
        self._unanswered_done(key)
        self._incoming.pop(key, None)
        handle = self._clients.pop(key, None)
        self._finished.pop(key, None)
        self._transport_failed.discard(key)
        branch_key = self._key_branches.pop(key, None)
        if branch_key is not None and self._branch_keys.get(branch_key) == key:
            del self._branch_keys[branch_key]
        if handle is not None and handle.final is None and handle.key == key:
            # Terminated without a final response reaching the TU: treat as a timeout.
            handle.local_failure = "timeout"
            self._finish(handle, build_response(handle.request, 408, "Request Timeout"))

    def _arm_timer(self, deadline: float | None) -> None:
        """The loop timer for the layer's earliest ``deadline``, which differs from the one it
        is armed at (``_pump`` compared them)."""
        armed = self._timer_at
        if self._timer is not None and armed is not None and (deadline is None or deadline > armed):
            # The earliest timer went away (a request answered before its Trying or
            # retransmission timer, a transaction ended): the loop timer stays and fires early,
            # finds nothing due and is armed again then. Re-arming at each such change cost a
            # new loop timer and a cancel each time (a UDP request answered before Timer A/E,
            # an INVITE answered after its Trying timer was armed). Still never late: it is
            # re-armed whenever a deadline comes before it.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None and self._running:
            self._timer = self._loop.call_at(deadline, self._timer_fired)
            next(self.stats.timers)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.layer.handle_timer(self._now())
        except Exception:
            log.exception("timer_handling_failed")
        # What timers make the layer send is retransmissions (Timers A, E, G; the other timers
        # only end transactions): counted here, then sent like everything else.
        resent = self.layer.datagrams_to_send()
        self.stats.retransmissions += len(resent)
        for dest, message in resent:
            self._transmit(dest, message)
        self._pump()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def stamp_via(request: Request, source: Destination) -> Request:
    """RFC 3261 §18.2.1 and RFC 3581 §4: record where a request really came from.

    ``received`` is added when the sent-by host differs from the packet's source address;
    a valueless ``rport`` is filled with the source port (and then ``received`` is always set).
    Raises :class:`SipError` when there is no readable top Via.
    """
    first, via = _top_via_element(request)
    params = via.params
    port = source.port
    if (
        params
        and first.endswith(";rport")
        and first[-7:-6] not in (" ", "\t")
        and params[-1][1] is None
        and '"' not in first
        and 0 <= port <= 65535
        and _IP_LITERAL_CHARS.fullmatch(source.host) is not None
    ):
        low = first.lower()
        # The text ends with ";rport": so does the name of the last parameter, as written.
        if low.find("rport") == len(low) - 5 and params[-1][0] == "rport":
            # What SIPp and most phones send: one valueless rport, written last. The general
            # path's regex replacement and parameter search (_stamp) give the same text and
            # Via here (tests/unit/test_hot_path.py compares them).
            text = f"{first[:-6]};rport={port};received={source.host}"
            stamped = (*params[:-1], ("rport", str(port)), ("received", source.host))
            return with_top_via(request, text, _via_of(via.transport, via.host, via.port, stamped))
    return _stamp(request, source, first, via)


def _top_via_element(request: Request) -> tuple[str, Via]:
    """The text of ``request``'s top Via element and what it parses to; :class:`SipError`
    when there is none to read (the request cannot be answered)."""
    first = request.headers.get("Via")
    if first is None:
        raise BadRequest("missing Via")
    if "," in first:
        elements = split_list(first)
        if not elements:
            raise BadRequest("empty Via")
        first = elements[0]
        return first, parse_via(first)
    if first and first == first.strip():
        return first, request.top_via  # the same parse, remembered for when nothing is stamped
    return first, parse_via(first)


def _ack_as_received(request: Request, source: Destination) -> Request:
    """:func:`stamp_via` of an ACK, but one with an RFC 3261 branch as it came (its Via read
    the same way, the same :class:`SipError` when it cannot be): an ACK is never answered
    (RFC 3261 §17.1.1.3, §13.2.2.4), so what stamping adds (``received``, the ``rport``
    value: where answers go) is never read, and such an ACK's transaction is found by branch
    and sent-by alone (§17.2.3), which stamping leaves as they are. An RFC 2543 ACK is
    stamped: its INVITE's transaction is found by the whole Via as stamped. One request in
    three of every call; the copy of the request and its header fields that stamping makes
    was work thrown away."""
    branch = _top_via_element(request)[1].branch
    if branch is not None and branch.startswith(BRANCH_COOKIE) and branch != BRANCH_COOKIE:
        return request
    return stamp_via(request, source)


def _stamp(request: Request, source: Destination, first: str, via: Via) -> Request:
    """stamp_via for any top Via ``first`` (parsed: ``via``)."""
    host = via.host
    if host.startswith("["):
        host = host[1:-1]
    # Without quoted strings the stamped text parses to `via` with the rport value filled in
    # and received appended (rport and received values that are an IP literal and a port
    # number): that Via is built here rather than parsed again.
    known = '"' not in first and _IP_LITERAL_CHARS.fullmatch(source.host) is not None
    if via.has_rport and via.param("rport") is None:
        # RFC 3581 §4: rport gets the source port, and received is set even when equal.
        text = _BARE_RPORT.sub(f";rport={source.port}", first, count=1)
        text += f";received={source.host}"
        if known and 0 <= source.port <= 65535:
            params = list(via.params)
            i = [name.lower() for name, _ in params].index("rport")
            params[i] = ("rport", str(source.port))
            params.append(("received", source.host))
            stamped: Via | None = _via_of(via.transport, via.host, via.port, tuple(params))
        else:
            stamped = None
    elif host != source.host:
        text = f"{first};received={source.host}"
        appended = (*via.params, ("received", source.host))
        stamped = _via_of(via.transport, via.host, via.port, appended) if known else None
    else:
        return request
    return with_top_via(request, text, stamped)


# What a source address from a socket is made of (IPv4, IPv6 with zone); a valid Via value.
_IP_LITERAL_CHARS = re.compile(r"[0-9A-Za-z.:%_\-]+")
# A valueless rport parameter of a Via (RFC 3581 §3), LWS allowed around ';' (RFC 3261 §25.1).
_BARE_RPORT = re.compile(r"[ \t]*;[ \t]*rport(?=[ \t]*(?:;|$))", re.IGNORECASE)


_RPORT = ("rport", None)
# As long as the branch make_via draws (the cookie and 12 random bytes in hex).
_BRANCH_STAND_IN = BRANCH_COOKIE + "0" * 24


def _with_headers(request: Request, headers: Headers) -> Request:
    """``request`` with other header fields (dataclasses.replace walks the fields by name and
    costs several times this)."""
    return make_request(request.method, request.uri, headers, request.body, request.version)


def _branch(message: Message) -> str | None:
    try:
        return message.top_via.branch
    except SipError:
        return None


def _to_tag(request: Request) -> str | None:
    try:
        return request.to_tag
    except SipError:
        return None
