"""Client transactions (RFC 3261 §17.1, Figures 5 and 6, with RFC 6026's "Accepted" state).

A client transaction owns one request: it retransmits it over unreliable transports (Timers A
and E), passes responses up once, absorbs retransmitted ones, builds the ACK for a non-2xx
final response to an INVITE (§17.1.1.3), and times out (Timers B and F). It does no I/O: it
talks to its owner (the :class:`~sbc.sip.transaction.TransactionLayer`) through
:class:`ClientOwner`, which queues datagrams and events.

The two tables below are the state machines; an input with no entry raises ProtocolError.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Protocol

from sbc.sip.headers import Headers
from sbc.sip.message import Request, Response
from sbc.sip.serializer import serialize
from sbc.sip.timers import Timer, TimerConfig
from sbc.sip.tx_machine import Step, TransactionMachine, compile_table

__all__ = [
    "INVITE_CLIENT_TABLE",
    "NON_INVITE_CLIENT_TABLE",
    "ClientInput",
    "ClientOwner",
    "ClientState",
    "ClientTransaction",
    "build_ack",
]


class ClientState(Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    ACCEPTED = "Accepted"  # RFC 6026 §8.4
    TERMINATED = "Terminated"

    # Members are singletons: hashing by identity is what Enum's hash by name means, done
    # in C (the transition tables and timer maps hash these on every input).
    __hash__ = object.__hash__


class ClientInput(Enum):
    PROVISIONAL = "1xx"
    SUCCESS = "2xx"  # INVITE only: 2xx
    FAILURE = "300-699"  # INVITE only: non-2xx final
    FINAL = "200-699"  # non-INVITE: any final
    TIMER_A = "Timer A"
    TIMER_B = "Timer B"
    TIMER_D = "Timer D"
    TIMER_E = "Timer E"
    TIMER_F = "Timer F"
    TIMER_K = "Timer K"
    TIMER_M = "Timer M"
    TRANSPORT_ERROR = "transport error"
    CANCEL_SENT = "CANCEL sent"  # INVITE only

    # Members are singletons: hashing by identity is what Enum's hash by name means, done
    # in C (the transition tables and timer maps hash these on every input).
    __hash__ = object.__hash__


S = ClientState
In = ClientInput

# (state, input) -> (action method, next state or None to stay). RFC 3261 Figure 5 and
# RFC 6026 Figure 3 (INVITE client transaction).
INVITE_CLIENT_TABLE: dict[tuple[ClientState, ClientInput], tuple[str, ClientState | None]] = {
    (S.CALLING, In.TIMER_A): ("_retransmit", None),
    (S.CALLING, In.TIMER_B): ("_time_out", S.TERMINATED),
    (S.CALLING, In.PROVISIONAL): ("_proceed", S.PROCEEDING),
    (S.CALLING, In.SUCCESS): ("_accept", S.ACCEPTED),
    (S.CALLING, In.FAILURE): ("_complete_invite", S.COMPLETED),
    (S.CALLING, In.TRANSPORT_ERROR): ("_fail", S.TERMINATED),
    (S.PROCEEDING, In.PROVISIONAL): ("_pass_up", None),
    (S.PROCEEDING, In.SUCCESS): ("_accept", S.ACCEPTED),
    (S.PROCEEDING, In.FAILURE): ("_complete_invite", S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ("_fail", S.TERMINATED),
    # §9.1: once a CANCEL is sent, a final response must come within 64*T1 or the INVITE
    # transaction is given up; Timer B (the INVITE timeout) is re-armed for that.
    (S.CALLING, In.CANCEL_SENT): ("_absorb", None),  # Timer B already runs
    (S.PROCEEDING, In.CANCEL_SENT): ("_await_cancel", None),
    (S.PROCEEDING, In.TIMER_B): ("_time_out", S.TERMINATED),
    (S.COMPLETED, In.CANCEL_SENT): ("_absorb", None),
    (S.ACCEPTED, In.CANCEL_SENT): ("_absorb", None),
    # §17.1.1.2: retransmitted finals are answered with the same ACK, not passed up.
    (S.COMPLETED, In.FAILURE): ("_resend_ack", None),
    (S.COMPLETED, In.PROVISIONAL): ("_absorb", None),  # late, reordered provisional
    (S.COMPLETED, In.SUCCESS): ("_pass_up", None),  # a 2xx after all: the TU ACKs and BYEs it
    (S.COMPLETED, In.TIMER_D): ("_absorb", S.TERMINATED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
    # RFC 6026 §8.4: every 2xx is passed up while Accepted (the TU ACKs each).
    (S.ACCEPTED, In.SUCCESS): ("_pass_up_2xx", None),
    (S.ACCEPTED, In.PROVISIONAL): ("_absorb", None),
    (S.ACCEPTED, In.FAILURE): ("_absorb", None),
    (S.ACCEPTED, In.TIMER_M): ("_absorb", S.TERMINATED),
    (S.ACCEPTED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
}

# RFC 3261 Figure 6 (non-INVITE client transaction).
NON_INVITE_CLIENT_TABLE: dict[tuple[ClientState, ClientInput], tuple[str, ClientState | None]] = {
    (S.TRYING, In.TIMER_E): ("_retransmit", None),
    (S.TRYING, In.TIMER_F): ("_time_out", S.TERMINATED),
    (S.TRYING, In.PROVISIONAL): ("_pass_up", S.PROCEEDING),
    (S.TRYING, In.FINAL): ("_complete_non_invite", S.COMPLETED),
    (S.TRYING, In.TRANSPORT_ERROR): ("_fail", S.TERMINATED),
    # §17.1.2.2: in Proceeding, Timer E is reset to T2 on each firing.
    (S.PROCEEDING, In.TIMER_E): ("_retransmit_t2", None),
    (S.PROCEEDING, In.TIMER_F): ("_time_out", S.TERMINATED),
    (S.PROCEEDING, In.PROVISIONAL): ("_pass_up", None),
    (S.PROCEEDING, In.FINAL): ("_complete_non_invite", S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ("_fail", S.TERMINATED),
    (S.COMPLETED, In.PROVISIONAL): ("_absorb", None),
    (S.COMPLETED, In.FINAL): ("_absorb", None),
    (S.COMPLETED, In.TIMER_K): ("_absorb", S.TERMINATED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ("_absorb", S.TERMINATED),
}

_TIMER_INPUTS = {
    Timer.A: In.TIMER_A,
    Timer.B: In.TIMER_B,
    Timer.D: In.TIMER_D,
    Timer.E: In.TIMER_E,
    Timer.F: In.TIMER_F,
    Timer.K: In.TIMER_K,
    Timer.M: In.TIMER_M,
}


class ClientOwner(Protocol):
    """What a client transaction needs from the layer that holds it."""

    def schedule(self, tx: ClientTransaction, timer: Timer, deadline: float) -> None: ...

    def response_received(
        self, tx: ClientTransaction, response: Response, *, retransmission: bool
    ) -> None: ...

    def timed_out(self, tx: ClientTransaction) -> None: ...

    def transport_failed(self, tx: ClientTransaction) -> None: ...

    def terminated(self, tx: ClientTransaction) -> None: ...

    def retire(
        self, tx: ClientTransaction, kept: object, deadline: float, duration: float
    ) -> None: ...


def response_input(status: int, is_invite: bool) -> ClientInput:
    """The input a response with ``status`` is to a client transaction (Figures 5 and 6);
    also what the layer feeds a retired one."""
    if status < 200:
        return In.PROVISIONAL
    if not is_invite:
        return In.FINAL
    return In.SUCCESS if status < 300 else In.FAILURE


def build_ack(invite: Request, response: Response) -> Request:
    """The ACK for a non-2xx final response to ``invite`` (RFC 3261 §17.1.1.3).

    Same Request-URI, Call-ID, From and CSeq number as the INVITE, the To of the response (with
    its tag), the INVITE's top Via only (same branch), its Route header fields, CSeq method ACK.
    """
    src = invite.headers
    items: list[tuple[str, str]] = [("Via", src.values("Via")[0])]
    items.append(("Max-Forwards", src.get("Max-Forwards") or "70"))
    items.extend(("Route", value) for value in src.get_all("Route"))
    for name in ("From", "To", "Call-ID"):
        # The To field (with its tag) is the response's.
        value = (response.headers.get(name) if name == "To" else None) or src.get(name)
        if value is not None:
            items.append((name, value))
    items.append(("CSeq", f"{invite.cseq.seq} ACK"))
    return Request("ACK", invite.uri, Headers(items), b"", invite.version)


class ClientTransaction(TransactionMachine[ClientState, ClientInput]):
    """One client transaction; ``is_invite`` picks the table (Figure 5 or Figure 6)."""

    __slots__ = (
        "_interval",
        "config",
        "dest",
        "is_invite",
        "reliable",
        "request",
    )

    _ROLE = "client"
    _TIMER_INPUTS = _TIMER_INPUTS
    _TRANSPORT_ERROR = In.TRANSPORT_ERROR
    _TERMINATED = S.TERMINATED
    _owner: ClientOwner

    def __init__(
        self,
        key: str,
        request: Request,
        *,
        dest: object,
        reliable: bool,
        config: TimerConfig,
        owner: ClientOwner,
        durations: Mapping[Timer, float],
        outbox: list[tuple[object, Request | Response]],
    ) -> None:
        self.key = key
        # Dropped (None) at the final response: Completed and Accepted only absorb or resend
        # the ACK, and wait up to 32 s (Timers D, K, M) holding what the transaction keeps.
        self.request: Request | None = request
        self.dest = dest
        self.reliable = reliable
        self.config = config
        self._owner = owner
        self._durations = durations
        self._outbox = outbox
        self.is_invite = request.method == "INVITE"
        self._table = _INVITE_STEPS if self.is_invite else _NON_INVITE_STEPS
        self.state = S.CALLING if self.is_invite else S.TRYING
        self.timers: dict[Timer, int] = {}
        self._interval = config.t1

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.key} {self.state.value}>"

    # -- inputs from the layer ----------------------------------------------------------
    def start(self, now: float) -> None:
        """Send the request and arm the timers of the initial state (§17.1.1.2, §17.1.2.2)."""
        assert self.request is not None
        self._outbox.append((self.dest, self.request))
        retransmit, timeout = (Timer.A, Timer.B) if self.is_invite else (Timer.E, Timer.F)
        schedule = self._owner.schedule  # not _arm: a call less for each request sent
        if not self.reliable:
            # §17.1.1.2 / §17.1.2.2: request retransmissions only over unreliable transports.
            schedule(self, retransmit, now + self.config.t1)
        schedule(self, timeout, now + self._durations[timeout])

    # A response is fed by the layer, as _dispatch(response_input(...)) (one call, not two).

    def on_cancel_sent(self, now: float) -> None:
        """A CANCEL for this INVITE was sent (§9.1)."""
        self._dispatch(In.CANCEL_SENT, None, now)

    # -- actions ------------------------------------------------------------------------
    def _retransmit(self, response: Response | None, now: float) -> None:
        # §17.1.1.2 (Timer A doubles) and §17.1.2.2 (Timer E doubles up to T2).
        assert self.request is not None
        self._outbox.append((self.dest, self.request))
        timer = Timer.A if self.is_invite else Timer.E
        self._interval = self.config.next_interval(timer, self._interval)
        self._arm(timer, self._interval, now)

    def _retransmit_t2(self, response: Response | None, now: float) -> None:
        assert self.request is not None
        self._outbox.append((self.dest, self.request))
        self._interval = self.config.t2
        self._arm(Timer.E, self._interval, now)

    def _time_out(self, response: Response | None, now: float) -> None:
        # §17.1.1.2 / §17.1.2.2: Timer B / F, the TU treats it as a 408 (§8.1.3.1).
        self._disarm(Timer.A, Timer.E)
        self._owner.timed_out(self)

    def _fail(self, response: Response | None, now: float) -> None:
        # §17.1.1.2 / §17.1.2.2: a transport error is reported to the TU (a 503, §8.1.3.1).
        self._owner.transport_failed(self)

    def _pass_up(self, response: Response | None, now: float) -> None:
        assert response is not None
        self._owner.response_received(self, response, retransmission=False)

    def _proceed(self, response: Response | None, now: float) -> None:
        # §17.1.1.2: a provisional response stops retransmissions and Timer B. _disarm and
        # _pass_up inline, here and in the actions below: a response received runs one of
        # them, and each call saved is ~1k instructions (issue 12, round 8b).
        timers = self.timers
        timers.pop(Timer.A, None)
        timers.pop(Timer.B, None)
        assert response is not None
        self._owner.response_received(self, response, retransmission=False)

    def _accept(self, response: Response | None, now: float) -> None:
        # RFC 6026 §8.4: a 2xx moves to Accepted for Timer M; the ACK is the TU's (§13.2.2.4).
        # The record keeps the To tag of the 2xx (of each 2xx, once forks answer): a later 2xx
        # with it is a retransmission.
        assert response is not None
        timers = self.timers
        timers.pop(Timer.A, None)
        timers.pop(Timer.B, None)
        self.request = None
        self._owner.response_received(self, response, retransmission=False)
        self._retire(Timer.M, self._durations[Timer.M], response.to_tag, now)

    def _await_cancel(self, response: Response | None, now: float) -> None:
        self._arm(Timer.B, self._durations[Timer.B], now)

    def _complete_invite(self, response: Response | None, now: float) -> None:
        # §17.1.1.3: ACK the non-2xx final ourselves, then wait Timer D for retransmissions.
        assert response is not None
        self._disarm(Timer.A, Timer.B)
        assert self.request is not None
        ack = build_ack(self.request, response)
        self.request = None
        self._owner.response_received(self, response, retransmission=False)
        self._outbox.append((self.dest, ack))
        # The record keeps the ACK's bytes, resent for each copy of the final response.
        duration = self._durations[Timer.D]
        self._retire(Timer.D, duration, serialize(ack) if duration > 0 else None, now)

    def _complete_non_invite(self, response: Response | None, now: float) -> None:
        # §17.1.2.2: a final response stops Timers E and F and starts Timer K.
        timers = self.timers
        timers.pop(Timer.E, None)
        timers.pop(Timer.F, None)
        self.request = None
        assert response is not None
        self._owner.response_received(self, response, retransmission=False)
        # The record keeps nothing: Completed absorbs every response (§17.1.2.2).
        self._retire(Timer.K, self._durations[Timer.K], None, now)


# The tables with their actions resolved (what ClientTransaction._dispatch runs).
_INVITE_STEPS: Mapping[tuple[ClientState, ClientInput], Step] = compile_table(
    ClientTransaction, INVITE_CLIENT_TABLE
)
_NON_INVITE_STEPS: Mapping[tuple[ClientState, ClientInput], Step] = compile_table(
    ClientTransaction, NON_INVITE_CLIENT_TABLE
)
