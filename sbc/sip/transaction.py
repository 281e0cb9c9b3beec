"""The RFC 3261 §17 transaction layer, sans-I/O and pull-based (in the style of h11/aioquic).

The shell feeds it what arrives (:meth:`TransactionLayer.receive`), what the TU wants to send
(:meth:`~TransactionLayer.send_request`, :meth:`~TransactionLayer.respond`), timer ticks and
transport failures, each with the current time; it then pulls datagrams
(:meth:`~TransactionLayer.datagrams_to_send`), events (:meth:`~TransactionLayer.events`) and
the next deadline (:meth:`~TransactionLayer.next_deadline`). Destinations and sources are
opaque objects owned by the shell (an address, a connection).

Matching follows §17.1.3 for responses (top Via branch and CSeq method) and §17.2.3 for
requests (branch, sent-by and method, ACK matching its INVITE), with the RFC 2543 fallback for
branches without the ``z9hG4bK`` cookie. CANCEL is handled here per §9.2: answered 200 when it
matches an INVITE server transaction (the TU is told and must answer the INVITE 487) and 481
when it matches nothing.

A transaction that only absorbs retransmissions until its last timer (server INVITE Accepted
and Confirmed, non-INVITE server Completed, client INVITE Completed and Accepted, non-INVITE
client Completed) is retired: the layer keeps a flat record of what those states do (see
``Record``), run by the same state tables, and ends it when the timer is due.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sbc.sip.client_transaction import (
    INVITE_CLIENT_TABLE,
    NON_INVITE_CLIENT_TABLE,
    ClientInput,
    ClientState,
    ClientTransaction,
    build_ack,
    response_input,
)
from sbc.sip.errors import ProtocolError, SipError
from sbc.sip.fields import Via
from sbc.sip.headers import Headers
from sbc.sip.ids import BRANCH_COOKIE, make_branch
from sbc.sip.message import Request, Response
from sbc.sip.parser import parse_message
from sbc.sip.quickinit import quick_maker
from sbc.sip.server_transaction import (
    INVITE_SERVER_TABLE,
    NON_INVITE_SERVER_TABLE,
    ServerInput,
    ServerState,
    ServerTransaction,
    build_response,
    build_trying,
    tu_response_input,
)
from sbc.sip.timers import Timer, TimerConfig

__all__ = [
    "AckReceived",
    "CancelReceived",
    "ClientState",
    "Event",
    "RequestReceived",
    "ResponseReceived",
    "ServerState",
    "StrayResponse",
    "TransactionLayer",
    "TransactionTerminated",
    "TransactionTimedOut",
    "build_ack",
    "build_cancel",
    "build_response",
    "build_trying",
    "cancelled_key",
    "client_key",
    "make_branch",
    "server_key",
]


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request that starts a new server transaction; answer it with ``respond(key, ...)``."""

    key: str
    request: Request
    source: object


@dataclass(frozen=True, slots=True)
class AckReceived:
    """An ACK outside any server transaction (the ACK of a 2xx, §17.2.3): the dialog's."""

    request: Request
    source: object


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """A CANCEL matched INVITE transaction ``key``; it was answered 200 (§9.2).

    The TU must now answer the INVITE with 487 (if it has not sent a final response yet).
    """

    key: str
    cancel_key: str
    request: Request


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A response for client transaction ``key``; ``retransmission`` marks a repeated 2xx."""

    key: str
    response: Response
    retransmission: bool = False


@dataclass(frozen=True, slots=True)
class StrayResponse:
    """A response that matches no client transaction (a late 2xx copy: the TU re-ACKs it)."""

    response: Response
    source: object


@dataclass(frozen=True, slots=True)
class TransactionTimedOut:
    """Timer B, F or H fired. For a client transaction the TU treats it as 408 (§8.1.3.1)."""

    key: str


@dataclass(frozen=True, slots=True)
class TransactionTerminated:
    key: str


Event = (
    RequestReceived
    | AckReceived
    | CancelReceived
    | ResponseReceived
    | StrayResponse
    | TransactionTimedOut
    | TransactionTerminated
)

# The events of every call's messages, made with every field given (see quick_maker).
_request_received: Callable[[str, Request, object], RequestReceived] = quick_maker(RequestReceived)
_ack_received: Callable[[Request, object], AckReceived] = quick_maker(AckReceived)
_response_received: Callable[[str, Response, bool], ResponseReceived] = quick_maker(
    ResponseReceived
)
_terminated: Callable[[str], TransactionTerminated] = quick_maker(TransactionTerminated)

Message = Request | Response

_TIMERS = {timer.value: timer for timer in Timer}

# A retired transaction (one that only absorbs retransmissions until its last timer):
# (deadline, key, state, peer, kept). ``peer`` is the source of a server transaction's request
# or the destination of a client's; ``kept`` what the state's duties need: the To tag of the
# final response (server INVITE Accepted, Confirmed), the bytes of the final response request
# copies are answered with (server non-INVITE Completed), those of the ACK resent for copies of
# a non-2xx final (client INVITE Completed), the To tag of the 2xx (client INVITE Accepted; a
# tuple of them once forks answered), or None (client non-INVITE Completed). One tuple instead
# of a transaction object, its timer dict and a heap entry: thousands wait for 32 s at a time
# under load.
Record = tuple[float, str, "ClientState | ServerState", object, object]


# -- helpers ---------------------------------------------------------------------------------


def build_cancel(invite: Request) -> Request:
    """The CANCEL for ``invite`` (RFC 3261 §9.1).

    Same Request-URI, Call-ID, From, To (tags included) and CSeq number as the INVITE, CSeq
    method CANCEL, the INVITE's top Via only (same branch) and its Route fields. Send it with
    :meth:`TransactionLayer.send_request` to the INVITE's destination, and only once a
    provisional response has arrived (§9.1).
    """
    src = invite.headers
    items: list[tuple[str, str]] = [("Via", src.values("Via")[0])]
    items.append(("Max-Forwards", src.get("Max-Forwards") or "70"))
    items.extend(("Route", value) for value in src.get_all("Route"))
    for name in ("From", "To", "Call-ID"):
        value = src.get(name)
        if value is not None:
            items.append((name, value))
    items.append(("CSeq", f"{invite.cseq.seq} CANCEL"))
    return Request("CANCEL", invite.uri, Headers(items), b"", invite.version)


def client_key(branch: str, method: str) -> str:
    """§17.1.3: a client transaction is its top Via branch plus CSeq method."""
    return f"c|{branch}|{method}"


def _sent_by(via: Via) -> str:
    port = via.port
    return f"{via.host.lower()}:{port if port is not None else ''}"


def server_key(request: Request) -> str:
    """§17.2.3: the key of the server transaction ``request`` belongs to.

    An ACK gets the key of its INVITE; a CANCEL its own (see :func:`cancelled_key` for the
    INVITE it refers to). Without the magic cookie the RFC 2543 fields are used: Request-URI,
    From tag, Call-ID, CSeq number and top Via (the To tag is checked apart, since an ACK
    carries the tag of the response).
    """
    return _key(request, "INVITE" if request.method == "ACK" else request.method)


def cancelled_key(cancel: Request) -> str:
    """§9.2: the key of the INVITE server transaction a CANCEL refers to (method ignored)."""
    return _key(cancel, "INVITE")


def _key(request: Request, method: str) -> str:
    via = request.top_via
    branch = via.branch
    if branch is not None and branch.startswith(BRANCH_COOKIE) and branch != BRANCH_COOKIE:
        # _is_rfc3261_branch(branch) and _sent_by(via), inlined (every request received).
        port = via.port
        return f"s|{branch}|{via.host.lower()}:{port if port is not None else ''}|{method}"
    # §17.2.3: RFC 2543 fallback.
    return (
        f"s2543|{request.uri}|{request.from_tag}|{request.call_id}|{request.cseq.seq}|"
        f"{via.without_param('branch')}|{branch}|{method}"
    )


# -- the layer -------------------------------------------------------------------------------


class TransactionLayer:
    """Client and server transactions of one SIP endpoint, keyed by their §17 identity."""

    def __init__(self, *, t1: float = 0.5, t2: float = 4.0, t4: float = 5.0) -> None:
        self.config = TimerConfig(t1=t1, t2=t2, t4=t4)
        self._clients: dict[str, ClientTransaction] = {}
        self._servers: dict[str, ServerTransaction] = {}
        self._outbox: list[tuple[object, Message]] = []
        self._events: list[Event] = []
        # (deadline, token, transaction key, timer name); stale entries are skipped when popped.
        # Only strings and numbers: thousands of entries wait for Timer J at a time, and the
        # garbage collector stops scanning tuples that hold no containers.
        self._heap: list[tuple[float, int, str, str]] = []
        self._tokens = itertools.count(1)
        # Disarmed timers stay in the heap until due (Timer B or F for 32 s once answered):
        # the heap is rebuilt without them when it grows past this size.
        self._prune_at = _PRUNE_MIN
        # Retired transactions by key (both sides: the keys' prefixes differ), and their
        # expiries: one FIFO per duration, in deadline order as the clock only goes forward
        # (no heap: appending is all the work); a record replaced or ended early leaves its
        # entry behind, skipped when due.
        self._done: dict[str, Record] = {}
        self._expiries: dict[float, deque[Record]] = {}

    @property
    def config(self) -> TimerConfig:
        """T1, T2, T4 for the transactions started from now on."""
        return self._config

    @config.setter
    def config(self, config: TimerConfig) -> None:
        self._config = config
        # Every timer's first duration by transport kind (reliable or not), given to each
        # transaction: read there directly, not through TimerConfig.initial (a call each).
        self._durations = {
            reliable: {timer: config.initial(timer, reliable=reliable) for timer in Timer}
            for reliable in (False, True)
        }

    # -- client side -------------------------------------------------------------------
    def send_request(self, request: Request, *, dest: object, reliable: bool, now: float) -> str:
        """Start a client transaction for ``request`` (its top Via carries the branch).

        Returns the transaction key. ACK is refused: the ACK of a 2xx goes through
        :meth:`send_stateless`, that of a non-2xx is the transaction's own (§17.1.1.3).
        """
        if request.method == "ACK":
            raise ProtocolError("ACK is not sent in a client transaction; use send_stateless")
        branch = request.top_via.branch
        if not branch:
            raise ProtocolError("request has no Via branch")
        key = client_key(branch, request.cseq.method)
        if key in self._clients or key in self._done:
            raise ProtocolError(f"client transaction {key} already exists")
        tx = ClientTransaction(
            key,
            request,
            dest=dest,
            reliable=reliable,
            config=self._config,
            owner=self,
            durations=self._durations[reliable],
            outbox=self._outbox,
        )
        self._clients[key] = tx
        tx.start(now)
        if request.method == "CANCEL":
            invite = self._clients.get(client_key(branch, "INVITE"))
            if invite is not None:
                # §9.1: without a final response 64*T1 after the CANCEL, the INVITE
                # transaction times out (TransactionTimedOut, then TransactionTerminated).
                invite.on_cancel_sent(now)
        return key

    def send_stateless(self, message: Message, *, dest: object) -> None:
        """Queue ``message`` outside any transaction (the ACK of a 2xx, a 2xx copy)."""
        self._outbox.append((dest, message))

    # -- server side / input -----------------------------------------------------------
    def receive(self, message: Message, *, source: object, reliable: bool, now: float) -> None:
        """Feed a message that arrived from ``source``.

        A request whose Via, CSeq, From or Call-ID cannot be read raises the
        :class:`~sbc.sip.errors.SipError` of the accessor (the shell answers or drops it).
        """
        if isinstance(message, Response):
            self._receive_response(message, source, now)
        elif message.method == "ACK":
            self._receive_ack(message, source, now)
        elif message.method == "CANCEL":
            self._receive_cancel(message, source, reliable, now)
        else:
            key = _key(message, message.method)  # server_key(message) without its call
            tx = self._servers.get(key)
            if tx is not None:
                tx.on_request(message, now)
                return
            record = self._done.get(key)
            if record is not None:
                self._record_input(record, ServerInput.REQUEST, message)
                return
            self._new_server(key, message, source, reliable, now)
            self._events.append(_request_received(key, message, source))

    def respond(self, server_key: str, response: Response, *, now: float) -> None:
        """Send the TU's ``response`` in server transaction ``server_key``."""
        tx = self._servers.get(server_key)
        if tx is not None:
            # tx.on_response(response, now) without its call (every response the TU sends).
            tx._dispatch(tu_response_input(response.status, tx.is_invite), response, now)
            return
        record = self._done.get(server_key)
        if record is None or server_key.startswith("c|"):
            raise ProtocolError(f"no server transaction {server_key}")
        kind = tu_response_input(response.status, server_key.endswith("|INVITE"))
        self._record_input(record, kind, response)

    def transport_error(self, key: str, *, now: float) -> None:
        """The shell could not send for transaction ``key`` (unknown keys are ignored)."""
        client = self._clients.get(key)
        if client is not None:
            client.on_transport_error(now)
            return
        server = self._servers.get(key)
        if server is not None:
            server.on_transport_error(now)
            return
        if key in self._done:
            # Every waiting state ends on a transport error (Figures 5-8).
            self._end_record(key)

    # -- time --------------------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        """Fire every timer whose deadline is ``now`` or earlier, in deadline order; then end
        the retired transactions whose waiting timer (D, I, J, K, L or M) is due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token, key, name = heapq.heappop(heap)
            tx = self._armed(key, name, token)
            if tx is not None:
                tx.on_timer(_TIMERS[name], now)
        if self._expiries:
            done = self._done
            for queue in self._expiries.values():
                while queue and queue[0][0] <= now:
                    deadline, key = queue.popleft()[:2]
                    record = done.get(key)
                    # Not a record replaced or ended early (then its entry is stale).
                    if record is not None and record[0] == deadline:
                        self._end_record(key)
            if not done:
                # A dict keeps its table when emptied: after a burst the last one ends with
                # a table for thousands of records (a third of a MiB for 9,000), let go here.
                # clear() frees it without making a new dict: one made now would land in an
                # arena the burst is emptying and keep it (pymalloc frees whole arenas only).
                done.clear()
                self._expiries.clear()

    def next_deadline(self) -> float | None:
        heap = self._heap
        first = None
        while heap:
            deadline, token, key, name = heap[0]
            # _armed() inline: the engine asks after every message it handles.
            tx = self._clients.get(key) if key.startswith("c|") else self._servers.get(key)
            if tx is not None and tx.timers.get(_TIMERS[name]) == token:
                first = deadline
                break
            heapq.heappop(heap)
        # The FIFOs' heads, stale or not: a stale one makes the shell's timer fire early, for
        # nothing but dropping it (rare: a record ended by a transport error).
        for queue in self._expiries.values():
            if queue:
                due = queue[0][0]
                if first is None or due < first:
                    first = due
        return first

    def _armed(
        self, key: str, name: str, token: int
    ) -> ClientTransaction | ServerTransaction | None:
        """The transaction whose timer ``name`` is still armed with ``token``, if any."""
        tx: ClientTransaction | ServerTransaction | None
        tx = self._clients.get(key) if key.startswith("c|") else self._servers.get(key)
        if tx is None or tx.timers.get(_TIMERS[name]) != token:
            return None
        return tx

    def release_tables(self) -> None:
        """Free the tables of the transaction dicts once no transaction is left in them.

        A dict keeps the table it grew to when its items go, and a burst of calls grows
        these; the next insert after the burst then remakes a small one, in one of the
        burst's allocator arenas, which it keeps for good (docs/performance.md, Round 8b:
        idle). ``clear()`` on an empty dict frees its table and allocates nothing. For when the
        service has gone quiet (sbc/ops/idle.py), not per call."""
        for table in (self._clients, self._servers):
            if not table:
                table.clear()

    # -- output ------------------------------------------------------------------------
    # Both hand over a copy and keep their own list (emptied): a new list in its place would
    # be kept until the next call, the last one made at the end of a burst of calls and alive
    # after it in the arenas the burst took, which Python's allocator then cannot give back
    # (docs/performance.md, Round 8: idle).
    def datagrams_to_send(self) -> list[tuple[object, Message]]:
        outbox = self._outbox
        if not outbox:
            return []
        out = outbox.copy()
        outbox.clear()
        return out

    def events(self) -> list[Event]:
        events = self._events
        if not events:
            return []
        out = events.copy()
        events.clear()
        return out

    # -- introspection (tests, metrics) ------------------------------------------------
    def client_state(self, key: str) -> ClientState | None:
        tx = self._clients.get(key)
        if tx is not None:
            return tx.state
        record = self._done.get(key) if key.startswith("c|") else None
        if record is None:
            return None
        state = record[2]
        assert isinstance(state, ClientState)
        return state

    def server_state(self, key: str) -> ServerState | None:
        tx = self._servers.get(key)
        if tx is not None:
            return tx.state
        record = None if key.startswith("c|") else self._done.get(key)
        if record is None:
            return None
        state = record[2]
        assert isinstance(state, ServerState)
        return state

    def __len__(self) -> int:
        return len(self._clients) + len(self._servers) + len(self._done)

    def census(self) -> dict[str, int]:
        """Transactions by side, method and state, e.g. ``client_INVITE_Proceeding``: which
        ones are left when a count that should drain does not."""
        out: dict[str, int] = {}
        for side, table in (("client", self._clients), ("server", self._servers)):
            for tx_key, tx in table.items():
                # The method from the key (every key ends with it): a finished transaction
                # no longer keeps its request.
                key = f"{side}_{tx_key.rsplit('|', 1)[-1]}_{tx.state.value}"
                out[key] = out.get(key, 0) + 1
        for tx_key, record in self._done.items():
            side = "client" if tx_key.startswith("c|") else "server"
            key = f"{side}_{tx_key.rsplit('|', 1)[-1]}_{record[2].value}"
            out[key] = out.get(key, 0) + 1
        return out

    @property
    def timers_pending(self) -> int:
        """Timer entries still in the heap, those of ended or re-armed transactions included
        (they are dropped lazily once due, or when the heap is rebuilt), and the expiries of
        retired transactions: bounded by the longest timer, not by traffic."""
        return len(self._heap) + sum(len(queue) for queue in self._expiries.values())

    # -- owner callbacks (called by the transactions) ----------------------------------
    # (What they send they append to this layer's outbox themselves: the list they are given.)
    def schedule(
        self, tx: ClientTransaction | ServerTransaction, timer: Timer, deadline: float
    ) -> None:
        """Arm ``timer`` of ``tx`` (noted in its ``timers`` with the entry's token)."""
        token = next(self._tokens)
        heap = self._heap
        if len(heap) >= self._prune_at:
            self._prune()
        # _value_: the member's value without Enum's Python-level `value` property.
        heapq.heappush(heap, (deadline, token, tx.key, timer._value_))
        tx.timers[timer] = token

    def _prune(self) -> None:
        """Rebuild the heap without its disarmed entries, in place (handle_timer may be
        iterating it). Run once it has doubled since the last rebuild: amortised O(1) a push."""
        heap = self._heap
        heap[:] = [entry for entry in heap if self._armed(entry[2], entry[3], entry[1])]
        heapq.heapify(heap)
        self._prune_at = max(2 * len(heap), _PRUNE_MIN)

    def retire(
        self,
        tx: ClientTransaction | ServerTransaction,
        kept: object,
        deadline: float,
        duration: float,
    ) -> None:
        """Replace ``tx``, now in a state that only absorbs retransmissions, by a record that
        ends at ``deadline`` (its last timer, ``duration`` long)."""
        key = tx.key
        peer: object
        if isinstance(tx, ClientTransaction):
            del self._clients[key]
            peer = tx.dest
        else:
            del self._servers[key]
            peer = tx.source
        record: Record = (deadline, key, tx.state, peer, kept)
        self._done[key] = record
        queue = self._expiries.get(duration)
        if queue is None:
            queue = self._expiries[duration] = deque()
        if queue and queue[-1][0] > deadline:
            # A clock that went back (only a caller's own clock can): keep the FIFO sorted.
            bisect.insort(queue, record, key=_deadline_of)
        else:
            queue.append(record)

    def _end_record(self, key: str) -> None:
        del self._done[key]
        self._events.append(_terminated(key))

    def _record_input(
        self, record: Record, kind: ClientInput | ServerInput, message: Message
    ) -> None:
        """A retired transaction's ``kind`` input, by the state tables (which still describe
        the waiting states): the few actions they name there, done on the record."""
        _, key, state, peer, kept = record
        client = isinstance(kind, ClientInput)
        entry = _TABLES[client, key.endswith("|INVITE")].get((state, kind))
        if entry is None:
            role = "client" if client else "server"
            raise ProtocolError(f"{role} transaction {key}: {kind.value} in state {state.value}")
        action = entry[0]
        if action == "_resend_last" or action == "_resend_ack":
            # §17.2.2 (the last response to a request copy), §17.1.1.2 (the ACK to a copy of
            # the non-2xx final): the message kept as bytes, read back (what the serializer
            # writes, it reads back to the same bytes); copies are rare, records many.
            assert isinstance(kept, bytes)
            self._outbox.append((peer, parse_message(kept)))
        elif action == "_send_2xx_copy":
            # RFC 6026 §7.1: a 2xx retransmitted by the TU in Accepted goes out.
            self._outbox.append((peer, message))
        elif action == "_pass_ack":
            # RFC 6026 §7.1: the ACK of the 2xx goes to the TU.
            assert isinstance(message, Request)
            self._events.append(_ack_received(message, peer))
        elif action == "_pass_up":
            # §17.1.1.2 (Completed): a 2xx after a non-2xx final; the TU ACKs and BYEs it.
            assert isinstance(message, Response)
            self._events.append(_response_received(key, message, False))
        elif action == "_pass_up_2xx":
            # RFC 6026 §8.4: a 2xx with a To tag already seen is a retransmission; another tag
            # is another fork. Either way the TU gets it (it ACKs each).
            # The tag of the first 2xx alone, a tuple of them once another fork answered.
            assert isinstance(message, Response)
            tags = kept if isinstance(kept, tuple) else (kept,)
            tag = message.to_tag
            seen = tag in tags
            if not seen:
                self._done[key] = (record[0], key, state, peer, (*tags, tag))
            self._events.append(_response_received(key, message, seen))
        # "_absorb": nothing (a late provisional, a copy the state swallows).

    def response_received(
        self, tx: ClientTransaction, response: Response, *, retransmission: bool
    ) -> None:
        self._events.append(_response_received(tx.key, response, retransmission))

    def timed_out(self, tx: ClientTransaction | ServerTransaction) -> None:
        self._events.append(TransactionTimedOut(tx.key))

    def transport_failed(self, tx: ClientTransaction) -> None:
        # RFC 3261 §8.1.3.1: a transport error is reported to the TU as a 503.
        # Transport errors reach the TU only before a final response: the request is there.
        assert tx.request is not None
        synthetic = build_response(tx.request, 503, "Service Unavailable")
        self._events.append(_response_received(tx.key, synthetic, False))

    def terminated(self, tx: ClientTransaction | ServerTransaction) -> None:
        if isinstance(tx, ClientTransaction):
            self._clients.pop(tx.key, None)
        else:
            self._servers.pop(tx.key, None)
        self._events.append(_terminated(tx.key))

    # -- matching --------------------------------------------------------------------------
    def _new_server(
        self, key: str, request: Request, source: object, reliable: bool, now: float
    ) -> ServerTransaction:
        tx = ServerTransaction(
            key,
            request,
            source=source,
            reliable=reliable,
            config=self._config,
            owner=self,
            durations=self._durations[reliable],
            outbox=self._outbox,
        )
        self._servers[key] = tx
        tx.start(now)
        return tx

    def _receive_response(self, response: Response, source: object, now: float) -> None:
        tx = None
        # RFC 3261 §18.1.2: a response with more than one Via is not for us. One line without
        # a comma is one Via (the usual case, found by the header index without splitting).
        headers = response.headers
        keys = headers._keys or headers._lower_keys()
        if (keys.count("via") == 1 and "," not in headers._items[keys.index("via")][1]) or len(
            headers.values("Via")
        ) == 1:
            try:
                branch = response.top_via.branch
                method = response.cseq.method
            except SipError:
                branch = None
            if branch is not None:
                key = f"c|{branch}|{method}"  # client_key(branch, method)
                tx = self._clients.get(key)
                if tx is None:
                    record = self._done.get(key)
                    if record is not None:
                        self._record_input(
                            record, response_input(response.status, method == "INVITE"), response
                        )
                        return
        if tx is None:
            self._events.append(StrayResponse(response, source))
            return
        # Fed to the machine directly (a call less for every response received).
        tx._dispatch(response_input(response.status, tx.is_invite), response, now)

    def _receive_ack(self, ack: Request, source: object, now: float) -> None:
        key = server_key(ack)
        tx = self._servers.get(key)
        if tx is not None:
            if tx.is_invite and _ack_matches(tx, ack):
                tx.on_request(ack, now)
                return
        else:
            record = self._done.get(key)
            # The key ends with INVITE: Accepted or Confirmed, which keep the final's To tag.
            if record is not None and (
                _is_rfc3261_branch(ack.top_via.branch) or ack.to_tag == record[4]
            ):
                self._record_input(record, ServerInput.ACK, ack)
                return
        # §17.2.3: the ACK of a 2xx matches no transaction; it belongs to the dialog.
        self._events.append(_ack_received(ack, source))

    def _receive_cancel(self, cancel: Request, source: object, reliable: bool, now: float) -> None:
        own_key = server_key(cancel)
        # A CANCEL's transaction is answered below as it starts: a copy finds its record
        # (Completed, Timer J) or nothing (ended at once over a reliable transport).
        own_record = self._done.get(own_key)
        if own_record is not None:
            self._record_input(own_record, ServerInput.REQUEST, cancel)  # answered again
            return
        invite_key = cancelled_key(cancel)
        invite_tx = self._servers.get(invite_key)
        tx = self._new_server(own_key, cancel, source, reliable, now)
        if invite_tx is None:
            invite_record = self._done.get(invite_key)
            if invite_record is None:
                # §9.2: a CANCEL that matches no transaction is answered 481.
                tx.on_response(build_response(cancel, 481, to_tag=None), now)
                return
            # Accepted or Confirmed: too late to cancel, the TU is not told; the 200 carries
            # the To tag of the final response.
            to_tag = invite_record[4]
            assert to_tag is None or isinstance(to_tag, str)
            tx.on_response(build_response(cancel, 200, to_tag=to_tag), now)
            return
        # §9.2: the CANCEL is answered 200 (its To tag is that of the INVITE's responses);
        # the INVITE is the TU's to end with 487 while no final response has been sent.
        tx.on_response(build_response(cancel, 200, to_tag=invite_tx.last_to_tag), now)
        if invite_tx.state is ServerState.PROCEEDING:
            self._events.append(CancelReceived(invite_tx.key, own_key, cancel))


# The heap is rebuilt without disarmed entries once it reaches this size (then twice its size).
_PRUNE_MIN = 512


# The state tables by (client side, INVITE), for the inputs of retired transactions.
_TABLES: dict[tuple[bool, bool], Mapping[Any, tuple[str, object]]] = {
    (True, True): INVITE_CLIENT_TABLE,
    (True, False): NON_INVITE_CLIENT_TABLE,
    (False, True): INVITE_SERVER_TABLE,
    (False, False): NON_INVITE_SERVER_TABLE,
}


def _deadline_of(record: Record) -> float:
    return record[0]


def _is_rfc3261_branch(branch: str | None) -> bool:
    # RFC 3261 §17.2.3, RFC 4475 §3.2.1: the cookie alone identifies no transaction.
    return branch is not None and branch.startswith(BRANCH_COOKIE) and branch != BRANCH_COOKIE


def _ack_matches(tx: ServerTransaction, ack: Request) -> bool:
    """RFC 3261 §17.2.3: an RFC 2543 ACK also needs the To tag of the response sent."""
    if _is_rfc3261_branch(ack.top_via.branch):
        return True
    return tx.responded and ack.to_tag == tx.last_to_tag
