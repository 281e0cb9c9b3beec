"""What client and server transactions share (RFC 3261 §17): table dispatch and timers.

Each transaction class keeps its own transition table, actions and timer-to-input map; this
base runs an input through the table (an input with no entry raises ProtocolError) and keeps
the armed timers' handles, reporting deadlines to the owner that schedules them.

Once a transaction only absorbs retransmissions (its last timer is one of D, I, J, K, L, M) it
is retired: the owner replaces it by a flat record of what those duties need (see
:meth:`~sbc.sip.transaction.TransactionLayer.retire`) and the object is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from sbc.sip.errors import ProtocolError
from sbc.sip.message import Request, Response
from sbc.sip.timers import Timer

__all__ = ["Step", "TransactionMachine", "compile_table"]

StateT = TypeVar("StateT", bound=Enum)
InputT = TypeVar("InputT", bound=Enum)


# What a table entry runs: the action (a function of the transaction class, not its name: no
# getattr and bound method per input) and the next state (None: stay).
Step = tuple[Callable[[Any, Request | Response | None, float], None], Any]


def compile_table(cls: type, table: Mapping[Any, tuple[str, Any]]) -> dict[Any, Step]:
    """``table`` (action names, as RFC 3261's figures read) with each name resolved on ``cls``
    once; the named tables stay what the layer runs a retired transaction's inputs by.

    An action the class does not have is one only a retired transaction's record runs (the
    layer does it: ``_resend_ack``, ``_pass_ack``, ...): its entry is left out, so that such an
    input to a live transaction is the table's ProtocolError."""
    return {
        key: (getattr(cls, name), next_state)
        for key, (name, next_state) in table.items()
        if hasattr(cls, name)
    }


class _Owner(Protocol):
    def schedule(self, tx: Any, timer: Timer, deadline: float) -> None: ...

    def terminated(self, tx: Any) -> None: ...

    def retire(self, tx: Any, kept: object, deadline: float, duration: float) -> None: ...


class TransactionMachine(Generic[StateT, InputT]):
    """The machinery of one transaction; subclasses set the attributes and class constants."""

    __slots__ = ("_durations", "_outbox", "_owner", "_table", "key", "state", "timers")

    key: str
    state: StateT
    timers: dict[Timer, int]
    _table: Mapping[tuple[StateT, InputT], Step]
    _owner: _Owner
    # The first duration of each timer for this transaction's transport (the layer's dict for
    # reliable or unreliable transports, shared), and the layer's queue of datagrams to send:
    # read directly, not through TimerConfig.initial and the owner's send (a Python call each,
    # several a message).
    _durations: Mapping[Timer, float]
    _outbox: list[tuple[object, Request | Response]]

    _ROLE: ClassVar[str]  # "client" or "server", for error messages
    _TIMER_INPUTS: ClassVar[Mapping[Timer, Any]]  # Timer -> the subclass's input
    _TRANSPORT_ERROR: ClassVar[Any]  # the subclass's transport-error input
    _TERMINATED: ClassVar[Any]  # the subclass's Terminated state

    def on_timer(self, timer: Timer, now: float) -> None:
        self.timers.pop(timer, None)
        self._dispatch(self._TIMER_INPUTS[timer], None, now)

    def on_transport_error(self, now: float) -> None:
        self._dispatch(self._TRANSPORT_ERROR, None, now)

    def _dispatch(self, kind: InputT, message: Request | Response | None, now: float) -> None:
        try:
            action, next_state = self._table[(self.state, kind)]
        except KeyError:
            raise ProtocolError(
                f"{self._ROLE} transaction {self.key}: {kind.value} in state {self.state.value}"
            ) from None
        if next_state is not None:
            self.state = next_state
        action(self, message, now)
        if next_state is self._TERMINATED:
            self.timers.clear()
            self._owner.terminated(self)

    def _arm(self, timer: Timer, duration: float, now: float) -> None:
        # Only the waiting timers (D, I, J, K) are ever 0 s (RFC 3261 Table 4, reliable
        # transports): they are entered through _retire, which ends the transaction at once.
        # The owner notes the timer's token in self.timers. (The timers every transaction
        # arms as it starts are armed by calling schedule directly: a call less each.)
        self._owner.schedule(self, timer, now + duration)

    def _retire(self, timer: Timer, duration: float, kept: object, now: float) -> None:
        """Enter the waiting of ``timer`` (the state is already the absorbing one): over a
        reliable transport (0 s, RFC 3261 Table 4) the transaction ends at once; else the owner
        keeps ``kept`` in a record until ``now + duration`` and this object is let go."""
        if duration <= 0:
            self.on_timer(timer, now)
            return
        self._owner.retire(self, kept, now + duration, duration)

    def _disarm(self, *timers: Timer) -> None:
        for timer in timers:
            self.timers.pop(timer, None)

    def _absorb(self, message: Request | Response | None, now: float) -> None:
        return None
