"""A call's one state enum, its state machine, and the facts that reach it from outside.

:data:`TRANSITIONS` is keyed ``(state, input)`` like the transaction tables of ``sbc/sip``: a
move with no entry is a bug in the call flow and raises ``ProtocolError``. The inputs are named
after the call's roles (``docs/architecture.md``, "A call's legs"): the caller is the PBX's
call to the extension, the agent is sbc's call to Retell.

Everything that happens to a call from outside (a response to an INVITE sbc sent, a CANCEL, an
in-dialog request, a 2xx's ACK settled, shutdown) arrives as one of the facts below on the
call's queue, so the flow never races with itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from sbc.b2bua.leg import Leg
from sbc.net.engine import IncomingRequest
from sbc.sip.message import Response

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
]


class CallState(Enum):
    INCOMING = "incoming"  # the caller's INVITE is taken, the offer is being prepared
    CALLING = "calling"  # INVITE sent to the agent
    RINGING = "ringing"  # the agent rang; the caller has been told
    CANCELLING = "cancelling"  # the caller gave up (or answer_timeout): the agent is cancelled
    ANSWERED = "answered"  # the agent answered, 200 sent to the caller, its ACK awaited
    CONNECTED = "connected"
    ENDING = "ending"  # BYEs under way
    ENDED = "ended"


class CallInput(Enum):
    OFFER_SENT = "INVITE sent to the agent"
    REJECTED = "the caller's INVITE refused locally"
    AGENT_RINGING = "1xx from the agent"
    AGENT_ANSWERED = "2xx from the agent"
    AGENT_REFUSED = "final failure from the agent (or none)"
    CALLER_CANCEL = "CANCEL from the caller"
    ANSWER_TIMEOUT = "answer_timeout reached"
    CALLER_ACK = "ACK from the caller"
    CALLER_ACK_TIMEOUT = "no ACK from the caller"
    CALLER_BYE = "BYE from the caller"
    AGENT_BYE = "BYE from the agent"
    LIMIT = "max_duration, session timer or media timeout"
    SHUTDOWN = "bridge stopping"
    FAILED = "internal error"
    HUNG_UP = "every leg ended"


S = CallState
In = CallInput

TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (S.INCOMING, In.OFFER_SENT): S.CALLING,
    (S.INCOMING, In.REJECTED): S.ENDED,
    (S.INCOMING, In.FAILED): S.ENDED,
    (S.CALLING, In.AGENT_RINGING): S.RINGING,
    (S.CALLING, In.AGENT_ANSWERED): S.ANSWERED,
    (S.CALLING, In.AGENT_REFUSED): S.ENDED,
    (S.CALLING, In.CALLER_CANCEL): S.CANCELLING,
    (S.CALLING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.CALLING, In.SHUTDOWN): S.CANCELLING,
    (S.CALLING, In.FAILED): S.CANCELLING,
    (S.RINGING, In.AGENT_RINGING): S.RINGING,
    (S.RINGING, In.AGENT_ANSWERED): S.ANSWERED,
    (S.RINGING, In.AGENT_REFUSED): S.ENDED,
    (S.RINGING, In.CALLER_CANCEL): S.CANCELLING,
    (S.RINGING, In.ANSWER_TIMEOUT): S.CANCELLING,
    (S.RINGING, In.SHUTDOWN): S.CANCELLING,
    (S.RINGING, In.FAILED): S.CANCELLING,
    (S.CANCELLING, In.AGENT_RINGING): S.CANCELLING,
    (S.CANCELLING, In.AGENT_REFUSED): S.ENDED,  # the 487 (or a failure that crossed it)
    (S.CANCELLING, In.AGENT_ANSWERED): S.ENDING,  # RFC 3261 §9.1 race: ACK, then BYE
    (S.CANCELLING, In.ANSWER_TIMEOUT): S.ENDED,  # no final answer to the CANCEL either
    (S.ANSWERED, In.CALLER_ACK): S.CONNECTED,
    (S.ANSWERED, In.CALLER_CANCEL): S.ENDING,  # the CANCEL came before the 200 could go
    (S.ANSWERED, In.CALLER_ACK_TIMEOUT): S.ENDING,  # RFC 3261 §13.3.1.4: BYE without ACK
    (S.ANSWERED, In.CALLER_BYE): S.ENDING,
    (S.ANSWERED, In.AGENT_BYE): S.ENDING,
    (S.ANSWERED, In.LIMIT): S.ENDING,
    (S.ANSWERED, In.SHUTDOWN): S.ENDING,
    (S.ANSWERED, In.FAILED): S.ENDING,
    (S.CONNECTED, In.CALLER_BYE): S.ENDING,
    (S.CONNECTED, In.AGENT_BYE): S.ENDING,
    (S.CONNECTED, In.LIMIT): S.ENDING,
    (S.CONNECTED, In.SHUTDOWN): S.ENDING,
    (S.CONNECTED, In.FAILED): S.ENDING,
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
    """The retransmission of the 2xx to ``leg``'s INVITE ended: ACKed or given up."""

    leg: Leg
    acked: bool


@dataclass(frozen=True, slots=True)
class DialogLost:
    """sbc's session refresh on ``leg`` was answered 408 or 481: its dialog is gone."""

    leg: Leg
    status: int


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    pass


Fact = InviteResponded | Cancelled | RequestArrived | AckSettled | DialogLost | ShutdownRequested
