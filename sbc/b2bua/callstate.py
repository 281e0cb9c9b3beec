"""A call's one state enum, its state machine, and the facts that reach it from outside.

:data:`TRANSITIONS` is keyed ``(state, input)`` like the transaction tables of ``sbc/sip``: a
move with no entry is a bug in the call flow and raises ``ProtocolError``. Inputs name the
bridge's two positions (``docs/architecture.md``, "A call's legs"): leg ``a`` is the one that
called (the PBX's caller; for a call Retell sends to sbc, the agent), leg ``b`` the one sbc
called for it (the agent; the human). A transfer (``sbc/b2bua/transfer.py``) moves a connected
call through TRANSFERRING.

Everything that happens to a call from outside (a response to an INVITE sbc sent, a CANCEL, an
in-dialog request, a 2xx's ACK settled, a transfer's outcome, shutdown) arrives as one of the
facts below on the call's queue, so the flow never races with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sbc.b2bua.leg import Leg
from sbc.net.engine import IncomingRequest
from sbc.sip.message import Request, Response

__all__ = [
    "TRANSITIONS",
    "AckSettled",
    "CallInput",
    "CallState",
    "Cancelled",
    "DialogLost",
    "Fact",
    "InviteResponded",
    "RequestArrived",
    "ShutdownRequested",
    "TransferEnded",
]


class CallState(Enum):
    INCOMING = "incoming"  # leg a's INVITE is taken, the offer is being prepared
    CALLING = "calling"  # INVITE sent on leg b
    RINGING = "ringing"  # leg b rang; leg a has been told
    CANCELLING = "cancelling"  # leg a gave up (or answer_timeout): leg b's INVITE is cancelled
    ANSWERED = "answered"  # leg b answered, 200 sent to leg a, its ACK awaited
    CONNECTED = "connected"
    TRANSFERRING = "transferring"  # the agent asked for a transfer; leg a stays bridged
    ENDING = "ending"  # BYEs under way
    ENDED = "ended"

    # Members are singletons compared by identity: hash them by identity too (C), not by
    # Enum.__hash__ (a Python call per dict lookup: per-call tables and state machines).
    __hash__ = object.__hash__


class CallInput(Enum):
    OFFER_SENT = "INVITE sent on leg b"
    REJECTED = "leg a's INVITE refused locally"
    B_RINGING = "1xx on leg b"
    B_ANSWERED = "2xx on leg b"
    B_REFUSED = "final failure on leg b (or none)"
    A_CANCEL = "CANCEL on leg a"
    ANSWER_TIMEOUT = "answer_timeout reached"
    A_ACK = "ACK on leg a"
    A_ACK_TIMEOUT = "no ACK on leg a"
    A_BYE = "BYE on leg a"
    B_BYE = "BYE on leg b"
    TRANSFER_ACCEPTED = "REFER from the agent accepted (202)"
    TRANSFER_FAILED = "the transfer failed; leg a stays with the agent"
    TRANSFERRED = "the human answered (INVITE mode): bridged to leg a"
    HANDED_OVER = "the PBX took the caller (REFER mode)"
    LIMIT = "max_duration, session timer or media timeout"
    SHUTDOWN = "bridge stopping"
    FAILED = "internal error"
    HUNG_UP = "every leg ended"

    # Members are singletons compared by identity: hash them by identity too (C), not by
    # Enum.__hash__ (a Python call per dict lookup: per-call tables and state machines).
    __hash__ = object.__hash__


S = CallState
In = CallInput

TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (S.INCOMING, In.OFFER_SENT): S.CALLING,
    (S.INCOMING, In.REJECTED): S.ENDED,
    (S.INCOMING, In.FAILED): S.ENDED,
    (S.CALLING, In.B_RINGING): S.RINGING,
    (S.CALLING, In.B_ANSWERED): S.ANSWERED,
    (S.CALLING, In.B_REFUSED): S.ENDED,
    (S.CALLING, In.A_CANCEL): S.CANCELLING,
    (S.CALLING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.CALLING, In.SHUTDOWN): S.CANCELLING,
    (S.CALLING, In.FAILED): S.CANCELLING,
    (S.RINGING, In.B_RINGING): S.RINGING,
    (S.RINGING, In.B_ANSWERED): S.ANSWERED,
    (S.RINGING, In.B_REFUSED): S.ENDED,
    (S.RINGING, In.A_CANCEL): S.CANCELLING,
    (S.RINGING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.RINGING, In.SHUTDOWN): S.CANCELLING,
    (S.RINGING, In.FAILED): S.CANCELLING,
    (S.CANCELLING, In.B_RINGING): S.CANCELLING,
    (S.CANCELLING, In.B_REFUSED): S.ENDED,  # the 487 (or a failure that crossed it)
    (S.CANCELLING, In.B_ANSWERED): S.ENDING,  # RFC 3261 §9.1 race: ACK, then BYE
    (S.CANCELLING, In.ANSWER_TIMEOUT): S.ENDED,  # no final answer to the CANCEL either
    (S.ANSWERED, In.A_ACK): S.CONNECTED,
    (S.ANSWERED, In.A_CANCEL): S.ENDING,  # the CANCEL came before the 200 could go
    (S.ANSWERED, In.A_ACK_TIMEOUT): S.ENDING,  # RFC 3261 §13.3.1.4: BYE without ACK
    (S.ANSWERED, In.A_BYE): S.ENDING,
    (S.ANSWERED, In.B_BYE): S.ENDING,
    (S.ANSWERED, In.LIMIT): S.ENDING,
    (S.ANSWERED, In.SHUTDOWN): S.ENDING,
    (S.ANSWERED, In.FAILED): S.ENDING,
    (S.CONNECTED, In.A_BYE): S.ENDING,
    (S.CONNECTED, In.B_BYE): S.ENDING,
    (S.CONNECTED, In.TRANSFER_ACCEPTED): S.TRANSFERRING,
    (S.CONNECTED, In.LIMIT): S.ENDING,
    (S.CONNECTED, In.SHUTDOWN): S.ENDING,
    (S.CONNECTED, In.FAILED): S.ENDING,
    (S.TRANSFERRING, In.TRANSFER_FAILED): S.CONNECTED,
    (S.TRANSFERRING, In.TRANSFERRED): S.CONNECTED,  # leg b is now the human
    (S.TRANSFERRING, In.HANDED_OVER): S.ENDING,
    (S.TRANSFERRING, In.B_BYE): S.TRANSFERRING,  # the agent leaves; the transfer goes on
    (S.TRANSFERRING, In.A_BYE): S.ENDING,
    (S.TRANSFERRING, In.LIMIT): S.ENDING,
    (S.TRANSFERRING, In.SHUTDOWN): S.ENDING,
    (S.TRANSFERRING, In.FAILED): S.ENDING,
    (S.ENDING, In.HUNG_UP): S.ENDED,
    (S.ENDING, In.FAILED): S.ENDED,
}


@dataclass(frozen=True, slots=True)
class InviteResponded:
    """A response to the INVITE sbc sent on ``leg``."""

    leg: Leg
    response: Response


@dataclass(frozen=True, slots=True)
class Cancelled:
    """CANCEL of the INVITE ``leg`` received (the transaction layer answered it 200)."""

    leg: Leg


@dataclass(frozen=True, slots=True)
class RequestArrived:
    leg: Leg
    incoming: IncomingRequest


@dataclass(frozen=True, slots=True)
class AckSettled:
    """The retransmission of the 2xx to ``leg``'s INVITE ended: ``ack`` is the ACK, or None
    when none came."""

    leg: Leg
    ack: Request | None


@dataclass(frozen=True, slots=True)
class DialogLost:
    """sbc's session refresh on ``leg`` was answered 408 or 481: its dialog is gone."""

    leg: Leg
    status: int


@dataclass(frozen=True, slots=True)
class TransferEnded:
    """A transfer's outcome: ``human`` is the answered leg of a transfer by INVITE, ``handed
    over`` means the PBX took the caller (REFER mode); neither: it failed with ``status``."""

    status: int
    human: Leg | None = None
    handed_over: bool = False


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    """End the call from outside: the bridge stopping (``shutdown``), an operator (``admin``);
    ``reason`` becomes the call's end reason."""

    reason: str = "shutdown"


Fact = (
    InviteResponded
    | Cancelled
    | RequestArrived
    | AckSettled
    | DialogLost
    | TransferEnded
    | ShutdownRequested
)
