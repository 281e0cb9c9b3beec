"""A call's ladder: the SIP messages of all its legs, summarised, bounded, no credentials.

The engine hands every message it receives or transmits to one tap (``SipEngine.on_message``);
the call manager finds the call and leg by Call-ID and notes the message in that call's
:class:`Ladder`, which the call's record carries when the call ends (``sbc calls show`` draws it
as a ladder diagram of both legs, as sngrep does). The :class:`LadderEntry` summaries are made
when the ladder is read: the event loop only keeps, per message, the few fields they are made
of (not the message: a held call would keep them all), the records writer stores those fields
as they are (:meth:`Ladder.packed`), and ``sbc calls`` makes the summaries from them
(:func:`unpacked_ladder`).

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

import ast
import dataclasses
import json
import math
import sys
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, overload

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
    "ladder_json",
    "packed_ladder",
    "summarize",
    "unpacked_ladder",
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
        return _first_line(message.status, message.reason)
    return _first_line(message.method, message.uri)


def _first_line(head: str | int, tail: object) -> str:
    """:func:`first_line` of a response (``head`` its status, ``tail`` its reason) or of a
    request (``head`` its method, ``tail`` its Request-URI)."""
    if type(head) is int:
        return f"SIP/2.0 {head} {tail}".rstrip()
    if isinstance(tail, SipUri) and tail.password is not None:
        tail = dataclasses.replace(tail, password=REDACTED)
    return f"{head} {tail}"


# What a summary takes from the header fields, by name (Headers keeps canonical names):
# the index in _fields_by_scan()'s list.
_WANTED = {
    "Call-ID": 0,
    "CSeq": 1,
    "Via": 2,
    "To": 3,
    "Authorization": 4,
    "Proxy-Authorization": 5,
}


def _fields(message: Request | Response) -> tuple[str, str, str, str, str]:
    """Call-ID, CSeq, the first Via line, To (responses only: a request's To is no part of
    its identity) and the names of the credential fields it carries; the first field of a
    name counts, as ``Headers.get`` finds it."""
    # Through the lookup keys the parser (or the first lookup of whoever built the message)
    # already made: a membership test and an index over them are C loops, where a Python
    # pass over every field (_fields_by_scan, the same result) cost about 180 bytecodes
    # per message, eleven messages a call.
    headers = message.headers
    keys = headers._keys or headers._lower_keys()
    items = headers._items
    call_id = items[keys.index("call-id")][1] if "call-id" in keys else ""
    cseq = items[keys.index("cseq")][1] if "cseq" in keys else ""
    via = items[keys.index("via")][1] if "via" in keys else ""
    to = ""
    if type(message) is Response and "to" in keys:
        to = items[keys.index("to")][1]
    if "authorization" not in keys and "proxy-authorization" not in keys:
        return call_id, cseq, via, to, ""
    return call_id, cseq, via, to, _fields_by_scan(message)[4]


def _fields_by_scan(message: Request | Response) -> tuple[str, str, str, str, str]:
    """:func:`_fields` in one pass over the fields (the credential names of a message that
    carries some, and the reference its tests compare with)."""
    found: list[str | None] = [None, None, None, None, None, None]
    wanted = _WANTED.get
    for name, value in message.headers.items():
        i = wanted(name)
        if i is not None and found[i] is None:
            found[i] = value
    if found[4] is None and found[5] is None:
        credentials = ""
    else:
        credentials = ", ".join(
            name
            for name, value in zip(CREDENTIAL_HEADERS, found[4:], strict=True)
            if value is not None
        )
    return (
        found[0] or "",
        found[1] or "",
        found[2] or "",
        (found[3] or "") if isinstance(message, Response) else "",
        credentials,
    )


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
    # Through a one-entry ladder: Ladder.note is the one place a message's fields are taken.
    ladder = Ladder(1)
    ladder.note(direction, message, peer_address, local, leg=leg, peer=peer, at=at)
    return ladder.entries()[0]


# A message as the event loop notes it (``Ladder.note``), summarised later: only what the
# summary needs (the message itself is let go), in as few objects as a held call can keep
# (bench/bench_held_service.py): at; where (direction, sbc's local address, leg, peer, credential
# names: one tuple shared by every message of that shape, _where()); status or method; reason or
# Request-URI; Call-ID (the leg's own string once seen); CSeq (shared text, _shared()); the hash
# of the top Via and To (responses), which tell a retransmission from another message with the
# same first line, CSeq and Call-ID (the texts themselves, a new transaction's branch in each,
# were most of a held call's ladder); the peer's address.
_Where = tuple[str, str, str, str, str]
_Raw = tuple[float, _Where, "str | int", object, str, str, int, Destination]


# A summary as the ladder keeps it once made: LadderEntry's fields, in its order, as a plain
# tuple (a frozen dataclass costs several times more to make, and the records writer only
# needs the JSON text, ladder_json()).
_Summary = tuple[float, str, str, str, str, str, str, str, str, bool, str]


def _summary_of(raw: _Raw) -> _Summary:
    at, (direction, local, leg, peer, credentials), head, tail, call_id, cseq, _, address = raw
    remote = str(address)
    if direction == "in":
        source, destination = remote, local
    else:
        source, destination = local, remote
    line = _first_line(head, tail)
    return (at, direction, leg, peer, source, destination, line, call_id, cseq, False, credentials)


def _identity(via: str, to: str) -> int:
    """What of a message's identity is kept of its top Via and To: their hash (64 bits: two
    different messages of one call with the same first line, CSeq and Call-ID would have to
    collide on it to be taken for one)."""
    return hash((via, to))


# Texts that repeat call after call (CSeq values, methods, reasons) and the ``where`` tuples,
# one object each; bounded: cleared whole when full (a text then gets a new object, nothing
# else changes).
_SHARED: dict[object, Any] = {}
_SHARED_MAX = 4096


def _shared(value: Any) -> Any:
    found = _SHARED.get(value)
    if found is not None:
        return found
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    _SHARED[value] = value
    return value


def _fields_of(entry: LadderEntry) -> _Summary:
    return (
        entry.at,
        entry.direction,
        entry.leg,
        entry.peer,
        entry.source,
        entry.destination,
        entry.first_line,
        entry.call_id,
        entry.cseq,
        entry.retransmission,
        entry.credentials,
    )


def ladder_json(entries: Iterable[LadderEntry]) -> str:
    """The JSON text of ``entries`` as the records store it: a list of
    :meth:`LadderEntry.as_dict` objects (as ``json.dumps(..., separators=(",", ":"),
    ensure_ascii=False)`` writes it)."""
    if isinstance(entries, LadderSnapshot):
        return entries.json()
    return _summaries_json([_fields_of(entry) for entry in entries])


def _summaries_json(summaries: Sequence[_Summary]) -> str:
    # Written by hand because every call's record pays for it: measured on 12 typical entries,
    # 16 us against 41 us for json.dumps() of a dict per entry (52 us via as_dict()), i.e.
    # ~30 us of the ~1.8 ms of CPU a call costs at 600 calls/s. A Sequence, not any Iterable:
    # the fallback below reads the entries a second time.
    q = encode_basestring
    try:
        parts = [
            f'{{"at":{_number(at)},"direction":{q(direction)},"leg":{q(leg)},'
            f'"peer":{q(peer)},"source":{q(source)},"destination":{q(destination)},'
            f'"first_line":{q(line)},"call_id":{q(call_id)},"cseq":{q(cseq)},'
            f'"retransmission":{"true" if again else "false"},'
            f'"credentials":{q(credentials)}}}'
            for (
                at,
                direction,
                leg,
                peer,
                source,
                destination,
                line,
                call_id,
                cseq,
                again,
                credentials,
            ) in summaries
        ]
    except TypeError:  # a value that is no text (an entry made by hand): as json writes it
        return json.dumps(
            [LadderEntry(*fields).as_dict() for fields in summaries],
            separators=(",", ":"),
            ensure_ascii=False,
            default=str,
        )
    return f"[{','.join(parts)}]"


def _number(value: float) -> str:
    text = repr(value)
    if type(value) is float and not math.isfinite(value):
        return json.dumps(value)  # NaN, Infinity: as json writes them
    if type(value) is not float and type(value) is not int:
        raise TypeError(text)
    return text


class Ladder:
    """A call's message summaries, bounded (module docstring).

    :meth:`note` is what the engine's tap calls for every message: it keeps the fields the
    summary is made of (one pass over the header fields; the message itself is let go) and
    leaves the summary (first line, addresses, credentials, retransmission mark) to whoever reads
    :meth:`entries` first, which is the records writer's thread for an ended call, off the
    event loop. Summaries are made in the order the messages came, so the marks are those an
    eager ladder would give; a message about to leave the bound is summarised before it goes.
    """

    # Slots, no tail until the head is full (long calls only), no set of identities until the
    # ladder is read, one lock for all ladders: every held call has a ladder.
    __slots__ = (
        "_fields",
        "_head",
        "_idents",
        "_pending",
        "_seen",
        "_tail",
        "_times",
        "limit",
        "omitted",
        "tail_size",
    )

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = max(0, limit)
        self.tail_size = min(MAX_TAIL, self.limit // 4)
        # Each item: a LadderEntry (add()), a message noted (_Raw, pending) or its summary.
        self._head: list[LadderEntry | _Raw | _Summary] = []
        self._tail: deque[LadderEntry | _Raw | _Summary] | tuple[()] = ()
        self.omitted = 0
        self._pending = 0  # kept messages not summarised yet: always the last ones
        # What identifies a message sent or received again unchanged (bounded like the
        # ladder); made when the ladder is first read.
        self._seen: set[tuple[object, ...]] | None = None
        # The messages noted and not summarised while the head has room (every message of
        # most calls), in columns rather than a tuple each: _RAW_FIELDS objects per message
        # in one list, the times and identities in two arrays of machine numbers (a float and
        # an int object less per message). None until the first, and once summarised.
        self._fields: list[Any] | None = None
        self._times: array[float] | None = None
        self._idents: array[int] | None = None

    def __len__(self) -> int:
        times = self._times
        return len(self._head) + len(self._tail) + (0 if times is None else len(times))

    def add(self, entry: LadderEntry, message: Request | Response) -> None:
        """Keep ``entry``, the summary of ``message``, marked when it is a retransmission."""
        self._resolve()
        _, _, via, to, _ = _fields(message)
        key = (entry.direction, entry.first_line, entry.cseq, entry.call_id, _identity(via, to))
        if self._seen_before(key):
            entry = dataclasses.replace(entry, retransmission=True)
        self._keep(entry, None)

    def note(
        self,
        direction: str,
        message: Request | Response,
        peer_address: Destination,
        local: str,
        *,
        leg: str,
        peer: str,
        at: float,
        leg_call_id: str | None = None,
    ) -> None:
        """Keep what :func:`summarize` needs of ``message`` (not the message: a held call
        would keep its every message alive), summarised when first read. ``leg_call_id``:
        the message's Call-ID as the leg already holds it (the same text), kept instead of the
        message's own copy."""
        # The one place a _Raw is made (summarize() goes through here too). Shared texts are
        # looked up inline (_shared() only on a miss): eleven messages a call.
        shared = _SHARED.get
        if isinstance(message, Response):
            head: str | int = message.status
            tail: object = shared(message.reason) or _shared(message.reason)
        else:
            head = shared(message.method) or _shared(message.method)
            tail = message.uri
            if type(tail) is SipUri and tail.password is not None:
                # never kept (first_line() would replace it when summarised anyway)
                tail = dataclasses.replace(tail, password=REDACTED)
        # _fields() inline (a call less per message; the Call-ID read only when the leg's is
        # not given): the same lookups through the keys.
        headers = message.headers
        keys = headers._keys or headers._lower_keys()
        items = headers._items
        if leg_call_id is not None:
            call_id = leg_call_id
        else:
            call_id = items[keys.index("call-id")][1] if "call-id" in keys else ""
        # One scan of the keys for each field a message always has (index() alone, not `in`
        # first: each scan compares the names one by one), the credentials' absence through
        # the names' hashes: ~1.5k instructions a message fewer.
        try:
            cseq = items[keys.index("cseq")][1]
        except ValueError:
            cseq = ""
        try:
            via = items[keys.index("via")][1]
        except ValueError:
            via = ""
        to = items[keys.index("to")][1] if type(message) is Response and "to" in keys else ""
        credentials = "" if _CREDENTIAL_KEYS.isdisjoint(keys) else _fields_by_scan(message)[4]
        where = (direction, local, leg, peer, credentials)
        where = shared(where) or _shared(where)
        cseq = shared(cseq) or _shared(cseq)
        ident = hash((via, to))  # _identity(), inline
        # While the head has room, what is pending is all in the columns (a message goes to
        # the tail only after they were summarised): their count is _pending.
        if len(self._head) + self._pending < self.limit - self.tail_size:
            fields, times = self._fields, self._times
            if fields is None or times is None or self._idents is None:
                fields, times = self._fields, self._times = [], array("d")
                self._idents = array("q")
            fields += (where, head, tail, call_id, cseq, peer_address)  # _RAW_FIELDS
            times.append(at)
            self._idents.append(ident)
            self._pending += 1
            return
        # The head is full (a long call): what it holds is summarised now, in order, and this
        # message goes to the tail (the rare path).
        self._resolve()
        self._keep(None, (at, where, head, tail, call_id, cseq, ident, peer_address))

    def _keep(self, entry: LadderEntry | None, raw: _Raw | None) -> None:
        item: LadderEntry | _Raw | _Summary = entry if entry is not None else raw  # type: ignore[assignment]
        if len(self._head) < self.limit - self.tail_size:
            self._head.append(item)
            self._pending += raw is not None
            return
        if self.tail_size == 0 or len(self._tail) == self.tail_size:
            # A message leaves the ladder (this one, or the tail's oldest): its identity must
            # be seen first, as an eager ladder would have (a rare path: long calls only).
            self._resolve()
            if raw is not None:
                item = _resolved(self, raw)
                raw = None
            self.omitted += 1
            if self.tail_size == 0:
                return
        if not isinstance(self._tail, deque):
            self._tail = deque(maxlen=self.tail_size)
        self._tail.append(item)
        self._pending += raw is not None

    def entries(self) -> tuple[LadderEntry, ...]:
        return tuple(
            [
                item if type(item) is LadderEntry else LadderEntry(*item)  # type: ignore[misc]
                for item in self._summaries()
            ]
        )

    def _summaries(self) -> list[LadderEntry | _Summary]:
        self._resolve()
        return [*self._head, *self._tail]

    def json(self) -> str:
        """:func:`ladder_json` of the entries, without making them."""
        return _summaries_json(
            [item if type(item) is tuple else _fields_of(item) for item in self._summaries()]  # type: ignore[arg-type]
        )

    def packed(self) -> str | None:
        """The ladder as the records store it when nothing of it was summarised yet (every
        message of most calls is still in the columns ``note`` fills): one text of those columns,
        written by C code (:func:`_pack_columns`), which :func:`unpacked_ladder` summarises
        when the record is read. None when the ladder cannot be written so (an entry added
        whole, a summary made, a tail, an omitted message): :meth:`json` then.

        Written in the records writer's thread for every call: summarising and writing
        each entry's JSON there was three quarters of a record's cost."""
        with _LOCK:  # against a summary made meanwhile on the loop (the columns let go)
            fields, times, idents = self._fields, self._times, self._idents
            if self._head or self._tail or self.omitted or fields is None:
                return None
            if times is None or idents is None or self._pending != len(times):
                return None  # pragma: no cover - the columns are filled together
        return _pack_columns(fields, times, idents)

    def snapshot(self) -> LadderSnapshot:
        """The entries as a sequence summarised on first access: for the call record, so that
        the summaries are made in the records writer's thread rather than on the event loop.
        The ladder must take no more messages."""
        return LadderSnapshot(self)

    def _resolve(self) -> None:
        """Summarise the pending messages, in the order they came."""
        if not self._pending:
            return
        with _LOCK:
            if not self._pending:
                return
            fields, times, idents = self._fields, self._times, self._idents
            if fields is not None and times is not None and idents is not None:
                # The noted messages come after everything kept so far (the head is not full
                # while they are noted): summarised in order, onto the head.
                head = self._head
                for i, at in enumerate(times):
                    w, h, t, c, q, a = fields[_RAW_FIELDS * i : _RAW_FIELDS * (i + 1)]
                    head.append(_resolved(self, (at, w, h, t, c, q, idents[i], a)))
                self._fields = self._times = self._idents = None
            # Anything else pending is in the tail (a message is kept as a _Raw only once the
            # head is full).
            tail = self._tail
            for i, item in enumerate(tail):
                if type(item) is tuple and len(item) == _RAW_SIZE:
                    tail[i] = _resolved(self, item)  # type: ignore[arg-type, index]
            self._pending = 0

    def _seen_before(self, key: tuple[object, ...]) -> bool:
        """Whether a message of identity ``key`` was kept before (then it is a
        retransmission); remembers it otherwise."""
        seen = self._seen
        if seen is None:
            seen = self._seen = set()
        if key in seen:
            return True
        if len(seen) < 4 * self.limit:
            seen.add(key)
        return False


# The header names (as Headers keys them) that carry credentials (note()).
_CREDENTIAL_KEYS = frozenset({"authorization", "proxy-authorization"})
_RAW_SIZE = 8  # a _Raw's length (a _Summary has 11 items)
_RAW_FIELDS = 6  # objects per message in Ladder._fields (a _Raw but its time and identity)

# Summaries are made on the event loop (a long call's ladder, add()) or in the records
# writer's thread (an ended call's): one lock for every ladder, taken once per ladder read.
_LOCK = threading.Lock()


class LadderSnapshot(Sequence[LadderEntry]):
    """A finished ladder's entries (:meth:`Ladder.snapshot`), summarised when first read."""

    __slots__ = ("_entries", "_ladder")

    def __init__(self, ladder: Ladder) -> None:
        self._ladder = ladder
        self._entries: tuple[LadderEntry, ...] | None = None

    def json(self) -> str:
        """:func:`ladder_json` of the entries (made from the summaries when no entry was)."""
        if self._entries is not None:
            return _summaries_json([_fields_of(entry) for entry in self._entries])
        return self._ladder.json()

    def packed(self) -> str | None:
        """:meth:`Ladder.packed` (None once the entries were made)."""
        return None if self._entries is not None else self._ladder.packed()

    def _all(self) -> tuple[LadderEntry, ...]:
        if self._entries is None:
            self._entries = self._ladder.entries()
        return self._entries

    def __len__(self) -> int:
        return len(self._ladder)

    @overload
    def __getitem__(self, index: int) -> LadderEntry: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[LadderEntry, ...]: ...

    def __getitem__(self, index: int | slice) -> LadderEntry | tuple[LadderEntry, ...]:
        return self._all()[index]

    def __iter__(self) -> Iterator[LadderEntry]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LadderSnapshot):
            return self._all() == other._all()
        if isinstance(other, tuple):
            return self._all() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


def _resolved(ladder: Ladder, raw: _Raw) -> _Summary:
    """The summary of ``raw``, marked when ``ladder`` saw the same message before."""
    summary = _summary_of(raw)
    # A message's identity: direction, first line, CSeq, Call-ID, Via and To (responses).
    if ladder._seen_before((summary[1], summary[6], raw[5], raw[4], raw[6])):
        return (*summary[:9], True, summary[10])
    return summary


# -- the packed form the records store (Ladder.packed) --------------------------------------------

# A packed ladder is one text: fields joined by _SEP, namely the version, the messages' times
# and identities (64-bit floats and integers, little-endian, as hexadecimal text), then the
# fields of all the messages by kind: where (its five texts joined by _SUB), status or method
# (repr(): a number or a quoted text), reason or Request-URI, Call-ID, CSeq, the peer's
# address. Written by C code only (str.join, repr, hex) but for the Request-URIs' and
# addresses' texts: summarising each message and writing its JSON here was three quarters of
# a call record's cost. A ladder whose texts hold a separator, or what is no UTF-8, is not
# packed (Ladder.json() then).
PACKED_VERSION = "2"
_SEP = "\x1f"  # ASCII unit separator
_SUB = "\x1e"  # ASCII record separator
_HEAD_TYPES = {int, str}


def _hex(numbers: array[Any]) -> str:
    """The machine numbers of ``numbers``, little-endian, as hexadecimal text (exact, and a
    few times cheaper to write than the numbers in decimal)."""
    if sys.byteorder == "little":
        return numbers.tobytes().hex()
    swapped = array(numbers.typecode, numbers)  # pragma: no cover - big-endian hosts
    swapped.byteswap()  # pragma: no cover
    return swapped.tobytes().hex()  # pragma: no cover


def _unhex(typecode: str, text: str) -> array[Any]:
    numbers = array(typecode, bytes.fromhex(text))
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        numbers.byteswap()
    return numbers


# The texts of the Request-URIs and peer addresses written into packed ladders, remembered:
# each was a Python __str__ per message in the writer's thread (22 a call, an eighth of the
# thread's instructions). A URI is immutable and the parser shares one among the messages
# and calls that carry the same text: remembered by identity, with the object kept so that
# its id is not reused while remembered. An address's text is its transport, host and port
# (Destination.__str__): remembered by those, the objects themselves being made per message.
# Bounded (emptied when full: peers are few; a peer writing a new Request-URI for every call
# only refills it).
_URI_TEXTS: dict[int, tuple[object, str]] = {}
_ADDRESS_TEXTS: dict[tuple[str, str, int], str] = {}
_TEXTS_LIMIT = 256


def _uri_text(uri: object) -> str:
    """``str(uri)``, remembered (by identity) for the next packed ladders."""
    text = str(uri)
    if len(_URI_TEXTS) >= _TEXTS_LIMIT:
        _URI_TEXTS.clear()
    _URI_TEXTS[id(uri)] = (uri, text)
    return text


def forget_texts() -> None:
    """Empty the remembered texts; the service calls it when idle, before its collection
    (sbc/ops/idle.py). What a burst of calls added (the address of a peer first seen then, a
    new source port say, and its URIs) would stay alive ever after in the allocator's arenas the
    burst took, which it then cannot give back (docs/performance.md, Round 9: idle). The next
    calls remember theirs again."""
    _URI_TEXTS.clear()
    _ADDRESS_TEXTS.clear()


def _address_text(address: Destination) -> str:
    """``str(address)``, remembered (by transport, host and port) for the next ladders."""
    text = str(address)
    if len(_ADDRESS_TEXTS) >= _TEXTS_LIMIT:
        _ADDRESS_TEXTS.clear()
    _ADDRESS_TEXTS[(address.transport, address.host, address.port)] = text
    return text


def _pack_columns(fields: list[Any], times: array[float], idents: array[int]) -> str | None:
    heads = fields[1::_RAW_FIELDS]
    if not set(map(type, heads)) <= _HEAD_TYPES:
        return None
    # str() of the reasons (texts) and Request-URIs (no password: note()), and of the
    # peers' addresses, through the remembered texts (the same texts str() gives).
    uris = _URI_TEXTS
    tails: list[str] = []
    for tail in fields[2::_RAW_FIELDS]:
        if type(tail) is not str:
            known = uris.get(id(tail))
            tail = known[1] if known is not None and known[0] is tail else _uri_text(tail)
        tails.append(tail)
    texts = _ADDRESS_TEXTS
    addresses: list[str] = []
    for address in fields[5::_RAW_FIELDS]:
        if type(address) is Destination:
            text = texts.get((address.transport, address.host, address.port))
            addresses.append(text if text is not None else _address_text(address))
        else:
            addresses.append(str(address))
    parts = [
        PACKED_VERSION,
        _hex(times),
        _hex(idents),
        *map(_SUB.join, fields[0::_RAW_FIELDS]),  # where
        *map(repr, heads),  # status or method
        *tails,  # reason or Request-URI
        *fields[3::_RAW_FIELDS],  # Call-ID
        *fields[4::_RAW_FIELDS],  # CSeq
        *addresses,  # the peer's address
    ]
    text = _SEP.join(parts)
    n = len(times)
    if text.count(_SEP) != len(parts) - 1 or text.count(_SUB) != 4 * n:
        return None  # a separator in a text: it could not be read back
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (octets that were no UTF-8)
            return None
    return text


_KEYS = tuple(field.name for field in dataclasses.fields(LadderEntry))


def packed_ladder(entries: object) -> str | None:
    """The packed form of a call record's ladder (:meth:`Ladder.packed`), None when it has
    none (a plain sequence of entries, or a ladder already read)."""
    if type(entries) is LadderSnapshot:
        return entries.packed()
    return None


def _head(text: str) -> object:
    """A status or method as repr() wrote it."""
    if text.isdigit():
        return int(text)
    if len(text) > 1 and text[0] == text[-1] == "'" and not ("\\" in text or "'" in text[1:-1]):
        return text[1:-1]  # a method as it usually is: no quote or escape in it
    try:
        return ast.literal_eval(text)  # a text with escapes; a literal, never code
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError("not a packed ladder") from None


def unpacked_ladder(text: str) -> list[dict[str, Any]]:
    """The entries of a packed ladder (:meth:`Ladder.packed`) as :meth:`LadderEntry.as_dict`
    makes them: the same dictionaries as the JSON :func:`ladder_json` writes for the same
    messages, read back. Raises ValueError for a text that is no packed ladder."""
    parts = text.split(_SEP)
    if len(parts) < 3 or parts[0] != PACKED_VERSION:
        raise ValueError("not a packed ladder")
    times, idents = _unhex("d", parts[1]), _unhex("q", parts[2])
    n = len(times)
    if len(parts) != 3 + _RAW_FIELDS * n or len(idents) != n:
        raise ValueError("not a packed ladder")
    wheres, heads, tails, call_ids, cseqs, addresses = (
        parts[3 + k * n : 3 + (k + 1) * n] for k in range(_RAW_FIELDS)
    )
    # The summaries as the ladder would have made them, in order (retransmission marks).
    ladder = Ladder(n)
    out = []
    for i, at in enumerate(times):
        where = tuple(wheres[i].split(_SUB))
        head = _head(heads[i])
        if len(where) != 5 or type(head) not in _HEAD_TYPES:
            raise ValueError("not a packed ladder")
        raw = (at, where, head, tails[i], call_ids[i], cseqs[i], idents[i], addresses[i])
        out.append(dict(zip(_KEYS, _resolved(ladder, raw), strict=True)))  # type: ignore[arg-type]
    return out


def gap_index(count: int, omitted: int) -> int | None:
    """Where the omitted messages were, in a ladder of ``count`` entries that left out
    ``omitted`` (None when nothing was): before the tail, which is full once any was."""
    if omitted <= 0:
        return None
    return count - min(MAX_TAIL, count // 4)
