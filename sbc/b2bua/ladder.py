"""A call's ladder: the SIP messages of all its legs, summarised, bounded, no credentials.

The engine hands every message it receives or transmits to one tap (``SipEngine.on_message``);
the call manager finds the call and leg by Call-ID and adds a :class:`LadderEntry` to that
call's :class:`Ladder`, which the call's record carries when the call ends (``sbc calls show``
draws it as a ladder diagram of both legs, as sngrep does).

An entry keeps the time, the direction seen from sbc (``in``: sbc received it, ``out``: sbc sent
it), the leg (role and peer), source and destination, the first line, Call-ID and CSeq. The
values of ``Authorization`` and ``Proxy-Authorization`` are never kept, only which of the two
the message carried; a password in a SIP URI (``sip:user:secret@host``) is replaced as well. A
message sent or received again unchanged (a transaction's retransmission, a 2xx repeated until
its ACK, a retransmitted request absorbed by the transaction layer) is marked
``retransmission``.

The ladder is bounded: the first ``limit - tail`` messages, then the last ``tail`` ones;
``omitted`` counts those dropped in between (a long call's session refreshes).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass
from typing import Any

from sbc.net.addresses import Destination
from sbc.sip.message import Request, Response
from sbc.sip.uri import SipUri

__all__ = [
    "CREDENTIAL_HEADERS",
    "REDACTED",
    "Ladder",
    "LadderEntry",
    "first_line",
    "gap_index",
    "summarize",
]

# Header fields whose values are never stored or logged (RFC 3261 §20.7, §20.28).
CREDENTIAL_HEADERS = ("Authorization", "Proxy-Authorization")
REDACTED = "<redacted>"
DEFAULT_LIMIT = 200
MAX_TAIL = 20


@dataclass(frozen=True, slots=True)
class LadderEntry:
    """One SIP message of a call, as the ladder keeps it."""

    at: float  # wall clock
    direction: str  # "in": sbc received it; "out": sbc sent it
    leg: str  # the leg's role: caller, agent, human
    peer: str  # pbx or retell
    source: str  # transport:host:port
    destination: str
    first_line: str  # request line or status line
    call_id: str
    cseq: str  # "1 INVITE"
    retransmission: bool = False
    credentials: str = ""  # "Proxy-Authorization" when the message carried one (value not kept)

    @property
    def label(self) -> str:
        """What the ladder diagram writes on the arrow: the method, or status and reason."""
        if self.first_line.startswith("SIP/"):
            return self.first_line.partition(" ")[2]
        return self.first_line.partition(" ")[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "direction": self.direction,
            "leg": self.leg,
            "peer": self.peer,
            "source": self.source,
            "destination": self.destination,
            "first_line": self.first_line,
            "call_id": self.call_id,
            "cseq": self.cseq,
            "retransmission": self.retransmission,
            "credentials": self.credentials,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LadderEntry:
        return cls(
            at=float(data["at"]),
            direction=str(data["direction"]),
            leg=str(data.get("leg", "")),
            peer=str(data.get("peer", "")),
            source=str(data.get("source", "")),
            destination=str(data.get("destination", "")),
            first_line=str(data.get("first_line", "")),
            call_id=str(data.get("call_id", "")),
            cseq=str(data.get("cseq", "")),
            retransmission=bool(data.get("retransmission", False)),
            credentials=str(data.get("credentials", "")),
        )


def first_line(message: Request | Response) -> str:
    """The request line (without the version) or the status line; a password in the
    Request-URI is replaced by :data:`REDACTED`."""
    if isinstance(message, Response):
        return f"SIP/2.0 {message.status} {message.reason}".rstrip()
    uri = message.uri
    if isinstance(uri, SipUri) and uri.password is not None:
        uri = dataclasses.replace(uri, password=REDACTED)
    return f"{message.method} {uri}"


def summarize(
    direction: str,
    message: Request | Response,
    peer_address: Destination,
    local: str,
    *,
    leg: str,
    peer: str,
    at: float,
) -> LadderEntry:
    """The ladder entry of ``message`` (``direction`` ``in`` or ``out``; ``peer_address`` where
    it came from or went to; ``local`` sbc's own address toward it)."""
    headers = message.headers
    remote = str(peer_address)
    found = [name for name in CREDENTIAL_HEADERS if headers.get(name) is not None]
    return LadderEntry(
        at=at,
        direction=direction,
        leg=leg,
        peer=peer,
        source=remote if direction == "in" else local,
        destination=local if direction == "in" else remote,
        first_line=first_line(message),
        call_id=headers.get("Call-ID") or "",
        cseq=headers.get("CSeq") or "",
        credentials=", ".join(found),
    )


class Ladder:
    """A call's message summaries, bounded (module docstring)."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = max(0, limit)
        self.tail_size = min(MAX_TAIL, self.limit // 4)
        self._head: list[LadderEntry] = []
        self._tail: deque[LadderEntry] = deque(maxlen=self.tail_size or None)
        self.omitted = 0
        # What identifies a message sent or received again unchanged (bounded like the ladder).
        self._seen: set[tuple[str, ...]] = set()

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def add(self, entry: LadderEntry, message: Request | Response) -> None:
        key = _identity(entry, message)
        if key in self._seen:
            entry = dataclasses.replace(entry, retransmission=True)
        elif len(self._seen) < 4 * self.limit:
            self._seen.add(key)
        if len(self._head) < self.limit - self.tail_size:
            self._head.append(entry)
            return
        if self.tail_size == 0:
            self.omitted += 1
            return
        if len(self._tail) == self.tail_size:
            self.omitted += 1
        self._tail.append(entry)

    def entries(self) -> tuple[LadderEntry, ...]:
        return (*self._head, *self._tail)


def gap_index(count: int, omitted: int) -> int | None:
    """Where the omitted messages were, in a ladder of ``count`` entries that left out
    ``omitted`` (None when nothing was): before the tail, which is full once any was."""
    if omitted <= 0:
        return None
    return count - min(MAX_TAIL, count // 4)


def _identity(entry: LadderEntry, message: Request | Response) -> tuple[str, ...]:
    headers = message.headers
    via = headers.get("Via") or ""
    to = (headers.get("To") or "") if isinstance(message, Response) else ""
    return (entry.direction, entry.first_line, entry.cseq, entry.call_id, via, to)
