"""What client and server transactions share (RFC 3261 §17): table dispatch and timers.

Each transaction class keeps its own transition table, actions and timer-to-input map; this
base runs an input through the table (an input with no entry raises ProtocolError) and keeps
the armed timers' handles, reporting deadlines to the owner that schedules them.

Once a transaction only absorbs retransmissions (its last timer is one of D, I, J, K, L, M) it
is retired: the owner replaces it by a flat record of what those duties need (see
:meth:`~sbc.sip.transaction.TransactionLayer.retire`) and the object is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from sbc.sip.errors import ProtocolError
from sbc.sip.message import Request, Response
from sbc.sip.timers import Timer

__all__ = ["TransactionMachine"]

StateT = TypeVar("StateT", bound=Enum)
InputT = TypeVar("InputT", bound=Enum)


class _Owner(Protocol):
    def schedule(self, tx: Any, timer: Timer, deadline: float) -> int: ...

    def terminated(self, tx: Any) -> None: ...

    def retire(self, tx: Any, kept: object, deadline: float, duration: float) -> None: ...


class TransactionMachine(Generic[StateT, InputT]):
    """The machinery of one transaction; subclasses set the attributes and class constants."""

    __slots__ = ("_owner", "_table", "key", "state", "timers")

    key: str
    state: StateT
    timers: dict[Timer, int]
    _table: Mapping[tuple[StateT, InputT], tuple[str, StateT | None]]
    _owner: _Owner

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
        getattr(self, action)(message, now)
        if next_state is self._TERMINATED:
            self.timers.clear()
            self._owner.terminated(self)

    def _arm(self, timer: Timer, duration: float, now: float) -> None:
        # Only the waiting timers (D, I, J, K) are ever 0 s (RFC 3261 Table 4, reliable
        # transports): they are entered through _retire, which ends the transaction at once.
        self.timers[timer] = self._owner.schedule(self, timer, now + duration)

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
