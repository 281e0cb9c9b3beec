"""Server transactions (RFC 3261 §17.2, Figures 7 and 8, with RFC 6026's "Accepted" state).

A server transaction owns one received request: it absorbs retransmissions of it (answering
them with the last response where the state says so), sends the TU's responses, retransmits a
non-2xx final response to an INVITE until the ACK comes (Timer G), and sends ``100 Trying`` by
itself when the TU is slow (§17.2.1). It does no I/O: it talks to its owner (the
:class:`~sbc.sip.transaction.TransactionLayer`) through :class:`ServerOwner`.

The two tables below are the state machines; an input with no entry raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum
from functools import lru_cache
from typing import Protocol

from sbc.sip.headers import _EXACT, Headers, canonical_name
from sbc.sip.message import Request, Response, make_response, parse_address, reason_phrase
from sbc.sip.serializer import serialize
from sbc.sip.timers import TRYING_DELAY, Timer, TimerConfig
from sbc.sip.tx_machine import Step, TransactionMachine, compile_table
from sbc.sip.uri import NameAddr

__all__ = [
    "INVITE_SERVER_TABLE",
    "NON_INVITE_SERVER_TABLE",
    "ServerInput",
    "ServerOwner",
    "ServerState",
    "ServerTransaction",
    "build_response",
    "build_trying",
]


class ServerState(Enum):
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"  # RFC 6026 §8.7
    TERMINATED = "Terminated"

    # Members are singletons: hashing by identity is what Enum's hash by name means, done
    # in C (the transition tables and timer maps hash these on every input).
    __hash__ = object.__hash__


class ServerInput(Enum):
    REQUEST = "request retransmission"
    ACK = "ACK"
    TU_PROVISIONAL = "1xx from TU"
    TU_SUCCESS = "2xx from TU"  # INVITE only
    TU_FAILURE = "300-699 from TU"  # INVITE only
    TU_FINAL = "200-699 from TU"  # non-INVITE
    TIMER_G = "Timer G"
    TIMER_H = "Timer H"
    TIMER_I = "Timer I"
    TIMER_J = "Timer J"
    TIMER_L = "Timer L"
    TIMER_TRYING = "Trying timer"
    TRANSPORT_ERROR = "transport error"

    # Members are singletons: hashing by identity is what Enum's hash by name means, done
    # in C (the transition tables and timer maps hash these on every input).
    __hash__ = object.__hash__


S = ServerState
In = ServerInput

# (state, input) -> (action method, next state or None to stay). RFC 3261 Figure 7 and
# RFC 6026 Figure 5 (INVITE server transaction).
INVITE_SERVER_TABLE: dict[tuple[ServerState, ServerInput], tuple[str, ServerState | None]] = {
    # §17.2.3: an ACK before any final response acknowledges nothing: drop it.
    (S.PROCEEDING, In.ACK): ("_absorb", None),
    # §17.2.1: a retransmitted INVITE gets the last provisional response again.
    (S.PROCEEDING, In.REQUEST): ("_resend_last", None),
    (S.PROCEEDING, In.TIMER_TRYING): ("_send_trying", None),
    (S.PROCEEDING, In.TU_PROVISIONAL): ("_send_provisional", None),
    (S.PROCEEDING, In.TU_SUCCESS): ("_accept", S.ACCEPTED),
    (S.PROCEEDING, In.TU_FAILURE): ("_complete_invite", S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    (S.COMPLETED, In.REQUEST): ("_resend_last", None),
    (S.COMPLETED, In.ACK): ("_confirm", S.CONFIRMED),
    (S.COMPLETED, In.TIMER_G): ("_retransmit_final", None),
    (S.COMPLETED, In.TIMER_H): ("_time_out", S.TERMINATED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    # §17.2.1: Confirmed only absorbs ACKs (and late INVITE copies) until Timer I.
    (S.CONFIRMED, In.ACK): ("_absorb", None),
    (S.CONFIRMED, In.REQUEST): ("_absorb", None),
    (S.CONFIRMED, In.TIMER_I): ("_absorb", S.TERMINATED),
    (S.CONFIRMED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    # RFC 6026 §7.1: INVITE copies are absorbed, ACKs passed up, 2xx from the TU sent.
    (S.ACCEPTED, In.REQUEST): ("_absorb", None),
    (S.ACCEPTED, In.ACK): ("_pass_ack", None),
    (S.ACCEPTED, In.TU_SUCCESS): ("_send_2xx_copy", None),
    (S.ACCEPTED, In.TIMER_L): ("_absorb", S.TERMINATED),
    (S.ACCEPTED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
}

# RFC 3261 Figure 8 (non-INVITE server transaction).
NON_INVITE_SERVER_TABLE: dict[tuple[ServerState, ServerInput], tuple[str, ServerState | None]] = {
    (S.TRYING, In.REQUEST): ("_absorb", None),  # §17.2.2: discarded while Trying
    (S.TRYING, In.TU_PROVISIONAL): ("_send_provisional", S.PROCEEDING),
    (S.TRYING, In.TU_FINAL): ("_complete_non_invite", S.COMPLETED),
    (S.TRYING, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    (S.PROCEEDING, In.REQUEST): ("_resend_last", None),
    (S.PROCEEDING, In.TU_PROVISIONAL): ("_send_provisional", None),
    (S.PROCEEDING, In.TU_FINAL): ("_complete_non_invite", S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    (S.COMPLETED, In.REQUEST): ("_resend_last", None),
    (S.COMPLETED, In.TIMER_J): ("_absorb", S.TERMINATED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
}

_TIMER_INPUTS = {
    Timer.G: In.TIMER_G,
    Timer.H: In.TIMER_H,
    Timer.I: In.TIMER_I,
    Timer.J: In.TIMER_J,
    Timer.L: In.TIMER_L,
    Timer.TRYING: In.TIMER_TRYING,
}


class ServerOwner(Protocol):
    """What a server transaction needs from the layer that holds it."""

    def schedule(self, tx: ServerTransaction, timer: Timer, deadline: float) -> None: ...

    def timed_out(self, tx: ServerTransaction) -> None: ...

    def terminated(self, tx: ServerTransaction) -> None: ...

    def retire(
        self, tx: ServerTransaction, kept: object, deadline: float, duration: float
    ) -> None: ...


def tu_response_input(status: int, is_invite: bool) -> ServerInput:
    """The input the TU's response with ``status`` is to a server transaction (Figures 7 and
    8); also what the layer feeds a retired one."""
    if status < 200:
        return In.TU_PROVISIONAL
    if not is_invite:
        return In.TU_FINAL
    return In.TU_SUCCESS if status < 300 else In.TU_FAILURE


@lru_cache(maxsize=256)
def _to_and_text(value: str) -> tuple[NameAddr, str]:
    """A To value parsed and written back (the text a tag is appended to), by To text."""
    to = parse_address(value)
    return to, str(to)


# RFC 3261 §8.2.6.2: copied from the request into every response, in this order.
_COPIED = (("From", "from"), ("To", "to"), ("Call-ID", "call-id"), ("CSeq", "cseq"))


def build_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> Response:
    """A response to ``request`` (RFC 3261 §8.2.6).

    Copies the Via fields (all, in order), From, To, Call-ID and CSeq; adds ``to_tag`` to the
    To field when the request's To has none (§8.2.6.2), but never on a 100 (§8.2.6.1), which
    copies Timestamp instead. ``headers`` are appended as given. Record-Route (to be copied
    into dialog-creating responses, §12.1.1) and Contact are the TU's to add.
    """
    src = request.headers
    # The fields are found through the index of lower-cased names directly: Headers.get per
    # name costs two calls each, for every response sent.
    keys = src._keys or src._lower_keys()
    fields = src._items
    n_via = keys.count("via")
    if n_via == 1:
        items: list[tuple[str, str]] = [("Via", fields[keys.index("via")][1])]
    else:
        items = [("Via", v) for v in src.get_all("Via")]
    to_copied = True
    for name, key in _COPIED:
        if key not in keys:
            continue
        value = fields[keys.index(key)][1]
        if key == "to" and to_tag is not None and status != 100 and request.to_tag is None:
            to_copied = False
            # A To that has a tag (a request inside a dialog) is copied as it is: only the
            # To of a dialog-creating request, the same text call after call, is parsed here.
            to, text = _to_and_text(value)
            # with_tag appends a tag parameter that is absent, so its text is the old text
            # plus ";tag=..."; a valueless ";tag" is replaced where it stands.
            value = str(to.with_tag(to_tag)) if to.has_param("tag") else f"{text};tag={to_tag}"
        items.append((name, value))
    if status == 100:
        timestamp = src.get("Timestamp")
        if timestamp is not None:
            items.append(("Timestamp", timestamp))
    exact = _EXACT.get  # canonical_name's first step inline: the names are nearly always so
    for name, value in headers:
        items.append((exact(name) or canonical_name(name), value))
    out = Headers._trusted(tuple(items))
    memo = src._cache
    if memo:
        # The Via lines, From and CSeq are the request's own texts (the To too unless tagged
        # here), so what the request's accessors parsed of them is what the response's would
        # parse: shared, not parsed again when a layer reads the response (the engine's 2xx
        # retransmission reads its CSeq, the server transaction the To tag).
        # A loop, not a comprehension: that is a function call of its own (every response).
        kept = {}
        for key in _SAME_PARSE if to_copied else _SAME_PARSE_TAGGED:
            if key in memo:
                kept[key] = memo[key]
        if kept:
            out._cache = kept
    return make_response(status, reason or reason_phrase(status), out, body, request.version)


# What build_response copies as text, by the key of Headers.cached that parses it.
_SAME_PARSE = ("top_via", "from", "to", "cseq")
_SAME_PARSE_TAGGED = ("top_via", "from", "cseq")  # the To tagged here differs from the request's


def build_trying(request: Request) -> Response:
    """``100 Trying`` for ``request`` (§8.2.6.1, sent by the transaction per §17.2.1)."""
    return build_response(request, 100)


class ServerTransaction(TransactionMachine[ServerState, ServerInput]):
    """One server transaction; ``is_invite`` picks the table (Figure 7 or Figure 8)."""

    __slots__ = (
        "_interval",
        "config",
        "is_invite",
        "last_response",
        "reliable",
        "request",
        "source",
    )

    _ROLE = "server"
    _TIMER_INPUTS = _TIMER_INPUTS
    _TRANSPORT_ERROR = In.TRANSPORT_ERROR
    _TERMINATED = S.TERMINATED
    _owner: ServerOwner

    def __init__(
        self,
        key: str,
        request: Request,
        *,
        source: object,
        reliable: bool,
        config: TimerConfig,
        owner: ServerOwner,
        durations: Mapping[Timer, float],
        outbox: list[tuple[object, Request | Response]],
    ) -> None:
        self.key = key
        # Dropped (None) once a final response is sent: nothing after it needs the request,
        # and a completed transaction waits up to 32 s (Timers J, L) holding what it keeps.
        self.request: Request | None = request
        self.source = source
        self.reliable = reliable
        self.config = config
        self._owner = owner
        self._durations = durations
        self._outbox = outbox
        self.is_invite = request.method == "INVITE"
        self._table = _INVITE_STEPS if self.is_invite else _NON_INVITE_STEPS
        # §17.2.1: an INVITE server transaction starts in Proceeding; Figure 8 in Trying.
        self.state = S.PROCEEDING if self.is_invite else S.TRYING
        self.timers: dict[Timer, int] = {}
        # The last response sent, kept while a request copy or Timer G may need it again.
        # Accepted, Confirmed and a non-INVITE Completed are the layer's records (retire()).
        self.last_response: Response | None = None
        self._interval = config.t1

    def __repr__(self) -> str:
        return f"<ServerTransaction {self.key} {self.state.value}>"

    @property
    def responded(self) -> bool:
        """True once a response was sent (the request is dropped at the final one)."""
        return self.last_response is not None or self.request is None

    @property
    def last_to_tag(self) -> str | None:
        """The To tag of the last response sent (None before any response)."""
        if self.last_response is not None:
            return self.last_response.to_tag
        return None

    # -- inputs from the layer ----------------------------------------------------------
    def start(self, now: float) -> None:
        if self.is_invite:
            # §17.2.1: 100 Trying unless the TU sends a provisional response within 200 ms.
            self._owner.schedule(self, Timer.TRYING, now + TRYING_DELAY)

    def on_request(self, request: Request, now: float) -> None:
        kind = In.ACK if request.method == "ACK" else In.REQUEST
        self._dispatch(kind, request, now)

    def on_response(self, response: Response, now: float) -> None:
        """The TU's response (§17.2.1, §17.2.2)."""
        self._dispatch(tu_response_input(response.status, self.is_invite), response, now)

    # -- actions ------------------------------------------------------------------------
    def _send(self, message: Request | Response | None, now: float) -> None:
        assert isinstance(message, Response)
        # _disarm(Timer.TRYING) inline: every response sent comes through here.
        self.timers.pop(Timer.TRYING, None)
        self.last_response = message
        self._outbox.append((self.source, message))

    def _resend_last(self, message: Request | Response | None, now: float) -> None:
        if self.last_response is not None:
            self._outbox.append((self.source, self.last_response))

    def _send_trying(self, message: Request | Response | None, now: float) -> None:
        # Any response from the TU disarms this timer, so nothing was sent yet (and the
        # request, dropped at the final response, is still here).
        assert self.request is not None
        self._send(build_trying(self.request), now)

    # The table's action for a provisional response is _send itself (a call less each).
    _send_provisional = _send

    def _send_final(self, message: Request | Response | None, now: float) -> None:
        # _send inline (a call less for each final response).
        assert isinstance(message, Response)
        self.timers.pop(Timer.TRYING, None)
        self.last_response = message
        self._outbox.append((self.source, message))
        # The transaction now waits for seconds; no action from here on reads the request.
        self.request = None

    def _accept(self, message: Request | Response | None, now: float) -> None:
        # RFC 6026 §7.1: after a 2xx the transaction waits Timer L, absorbing INVITE copies;
        # retransmitting the 2xx until the ACK comes is the TU's job (§13.3.1.4), so its record
        # keeps only the To tag of the 2xx (CANCEL answers and RFC 2543 ACK matching read it).
        self._send_final(message, now)
        assert isinstance(message, Response)
        self._retire(Timer.L, self._durations[Timer.L], message.to_tag, now)

    def _complete_invite(self, message: Request | Response | None, now: float) -> None:
        # §17.2.1: retransmit the final response (Timer G, unreliable only) until the ACK
        # or Timer H.
        self._send_final(message, now)
        if not self.reliable:
            self._arm(Timer.G, self.config.t1, now)
        self._arm(Timer.H, self._durations[Timer.H], now)

    def _retransmit_final(self, message: Request | Response | None, now: float) -> None:
        self._resend_last(None, now)
        self._interval = self.config.next_interval(Timer.G, self._interval)
        self._arm(Timer.G, self._interval, now)

    def _time_out(self, message: Request | Response | None, now: float) -> None:
        # §17.2.1: Timer H: the ACK never came.
        self._disarm(Timer.G)
        self._owner.timed_out(self)

    def _confirm(self, message: Request | Response | None, now: float) -> None:
        # §17.2.1: the ACK stops retransmissions; wait Timer I for ACK copies.
        # Confirmed only absorbs: the record keeps the To tag (CANCEL, RFC 2543 ACKs).
        self._disarm(Timer.G, Timer.H)
        self._retire(Timer.I, self._durations[Timer.I], self.last_to_tag, now)

    def _complete_non_invite(self, message: Request | Response | None, now: float) -> None:
        # §17.2.2: Timer J absorbs request copies (0 s over reliable transports).
        # The record keeps the response request copies are answered with, as its bytes: one
        # block instead of the message's dozen (its fields, their strings), for 32 s.
        self._send_final(message, now)
        assert isinstance(message, Response)
        duration = self._durations[Timer.J]
        self._retire(Timer.J, duration, serialize(message) if duration > 0 else None, now)


# The tables with their actions resolved (what ServerTransaction._dispatch runs).
_INVITE_STEPS: Mapping[tuple[ServerState, ServerInput], Step] = compile_table(
    ServerTransaction, INVITE_SERVER_TABLE
)
_NON_INVITE_STEPS: Mapping[tuple[ServerState, ServerInput], Step] = compile_table(
    ServerTransaction, NON_INVITE_SERVER_TABLE
)
