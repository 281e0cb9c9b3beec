"""The media interface the call layer uses; relay, passthrough and rtpengine implement it.

A call's media session has two sides: side ``"a"`` faces the caller's leg (the one whose offer
came first), side ``"b"`` the far leg (the agent, or after a transfer the human). The call layer
hands every SDP it receives on a leg to the call's :class:`MediaSession` under that leg's side and
sends what comes back on the leg of the *other* side:

* ``offer(side, sdp)``: ``sdp`` is an offer received on ``side``. Returns the offer to send on the
  other side: codecs filtered to the backend's list (:class:`~sbc.sdp.model.NoCommonCodec`, a
  488, when none is left), and for a relaying backend every address and port replaced by the
  relay's socket facing the other side.
* ``answer(side, sdp)``: ``sdp`` is the answer received on ``side`` to the offer that came from the
  other side. Returns the answer to send on the other side, rewritten the same way.
* ``reoffer(side, sdp)``: a re-offer received on ``side`` that the bridge answers itself (hold,
  resume, session refresh: never forwarded to the other side, PEERS.md). Returns the answer to
  send back on ``side``: negotiated codec kept, direction mirrored (RFC 3264 §6.1), address and
  port those the bridge already gave ``side``. It also learns any new media address of ``side``.

Direction is honoured: while the last SDP the bridge sent on a side says ``recvonly`` or
``inactive`` (e.g. its answer to the caller's hold), a relaying backend sends no RTP to that side
(RTCP still flows, RFC 3264 §5.1).

DTMF: ``send_dtmf(side, digit, duration_ms)`` plays one digit toward ``side`` as RFC 4733
telephone-event packets (the bridge's SIP INFO to RFC 4733 conversion: Retell takes no INFO).
It returns False, sending nothing, when the backend cannot inject media (passthrough) or ``side``
negotiated no telephone-event; the caller then only logs the digit.

Every SDP sent on a side carries the bridge's own ``o=`` line for that side (username ``sbc``, a
session id per side), whose version goes up by one exactly when the SDP differs from the previous
one sent on that side (RFC 3264 §8). ``close()`` releases everything and may be called any number
of times; the session is unusable afterwards.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from sbc.sdp.model import MediaDescription, Origin, SessionDescription
from sbc.sdp.offer_answer import answer_for_hold, filter_codecs

# The SDP parser's quick makers (what the constructors give, a slot store a field on a plain
# twin instead of a constructor frame and descriptor calls): for the two SDPs and two origins
# each call stamps. (media may import sbc.sdp, not sbc.sip.quickinit: tests/unit/test_layers.py)
from sbc.sdp.parser import make_origin, make_session
from sbc.sip.errors import RequestPending

Side = Literal["a", "b"]
SIDES: tuple[Side, Side] = ("a", "b")
DEFAULT_CODECS: tuple[str, ...] = ("PCMU", "PCMA", "G722", "telephone-event")
DTMF_MIN_MS = 40
DTMF_MAX_MS = 5000
DEFAULT_PTIME_MS = 20
ORIGIN_USERNAME = "sbc"
_SENDING = ("sendrecv", "sendonly")


def other_side(side: Side) -> Side:
    """The side that is not ``side``: ``"b"`` (the far leg) for ``"a"`` (the caller's leg), and
    the other way round."""
    return "b" if side == "a" else "a"


def media_address(sd: SessionDescription) -> tuple[str, int] | None:
    """``(address, port)`` of the first active audio stream, None when there is none or it is
    on hold with RFC 2543's ``c=0.0.0.0`` (RFC 3264 §8.4)."""
    m = sd.audio()
    if m is None:
        return None
    conn = sd.connection_for(m)
    if conn is None or conn.is_hold:
        return None
    return conn.address.split("/")[0], m.port


def rtcp_address(sd: SessionDescription) -> tuple[str, int] | None:
    """Where the sender of ``sd`` wants RTCP: RFC 3605 ``a=rtcp``, the RTP port with
    ``a=rtcp-mux`` (RFC 5761 §5.1.1), else RTP port + 1 (RFC 3550 §11)."""
    rtp = media_address(sd)
    m = sd.audio()
    if rtp is None or m is None:
        return None
    if m.rtcp_mux:
        return rtp
    attr = m.rtcp
    if attr is None:
        return rtp[0], rtp[1] + 1
    return (attr.address or rtp[0]), attr.port


def same_media(one: SessionDescription, other: SessionDescription) -> bool:
    """Whether two SDPs ask for the same audio: address, port, formats with their rtpmaps, and
    direction of the first active audio stream (session name, o= line, other attributes aside)."""

    def key(sd: SessionDescription) -> tuple[object, ...] | None:
        m = sd.audio()
        if m is None:
            return None
        codecs = tuple((rm.payload_type, rm.encoding.lower(), rm.clock_rate) for rm in m.codecs())
        return (media_address(sd), m.formats, codecs, sd.direction(m))

    return key(one) == key(other)


def telephone_event(sd: SessionDescription | None) -> tuple[int, int] | None:
    """``(payload type, clock rate)`` of the telephone-event format in ``sd``'s first active
    audio stream, None when it lists none.

    RFC 4733 §7.1.1: the event clock rate is that of the audio it travels with, so a format whose
    rate matches the stream's first audio codec is preferred (G.722 keeps an 8000 Hz RTP clock,
    RFC 3551 §4.5.2).
    """
    m = None if sd is None else sd.audio()
    if m is None or m.port == 0:
        return None
    events: list[tuple[int, int]] = []
    audio_rate: int | None = None
    for rm in m.codecs():
        if rm.encoding.lower() == "telephone-event":
            events.append((rm.payload_type, rm.clock_rate))
        elif audio_rate is None:
            audio_rate = rm.clock_rate
    for pt, rate in events:
        if rate == audio_rate:
            return pt, rate
    return events[0] if events else None


def clamp_dtmf_duration(duration_ms: int) -> int:
    """A SIP INFO duration bounded to what is sent: 40 ms to 5 s."""
    return min(max(duration_ms, DTMF_MIN_MS), DTMF_MAX_MS)


def _with_origin(sd: SessionDescription, origin: Origin) -> SessionDescription:
    """``dataclasses.replace(sd, origin=origin)`` in one maker call: ``replace`` walks
    the fields and builds keyword arguments (about 3 us; twice per call). Every field is
    named here; tests/unit/test_cpu_fast.py checks that against ``fields()``."""
    return make_session(
        origin,
        sd.session_name,
        sd.connection,
        sd.bandwidths,
        sd.timings,
        sd.attributes,
        sd.media,
        sd.version,
        sd.extra_head,
        sd.extra_tail,
    )


class MediaSession(ABC):
    """The media of one call (see the module docstring for the offer/answer semantics)."""

    # Slots for the pass-through session, held for the whole call with nothing else: no dict
    # per call. Subclasses without __slots__ (the relay, rtpengine) still get one.
    __slots__ = ("__weakref__", "_received", "_sent", "call_id", "closed", "codecs")

    def __init__(self, call_id: str, *, codecs: Sequence[str] = DEFAULT_CODECS) -> None:
        self.call_id = call_id
        self.codecs = tuple(codecs)
        self.closed = False
        self._received: dict[Side, SessionDescription] = {}
        # The last SDP sent on each side; its o= line is the bridge's origin for that side.
        self._sent: dict[Side, SessionDescription] = {}

    # -- what backends implement -------------------------------------------------------------

    @abstractmethod
    async def offer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        """The offer to send on the other side for ``sdp``, an offer received on ``side``."""

    @abstractmethod
    async def answer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        """The answer to send on the other side for ``sdp``, an answer received on ``side``."""

    @abstractmethod
    def local_endpoint(self, side: Side) -> tuple[str, int] | None:
        """``(address, rtp port)`` the bridge gave ``side`` to send its media to, None before
        any SDP was sent on ``side``."""

    @abstractmethod
    def last_activity(self, side: Side) -> float | None:
        """``loop.time()`` of the last RTP/RTCP packet received from ``side`` (the session's
        creation time before the first one); None when the backend cannot see media, which
        then never times out."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Counters for logs and call records:
        ``{"backend", "call_id", "sides": {"a": {...}, "b": {...}}}``."""

    @abstractmethod
    async def close(self) -> None:
        """Release sockets and ports; idempotent."""

    async def send_dtmf(self, side: Side, digit: str, duration_ms: int) -> bool:
        """Play ``digit`` (``0``-``9``, ``*``, ``#``, ``A``-``D``) toward ``side`` as RFC 4733
        events lasting ``duration_ms`` (clamped to 40 ms - 5 s). True when it was scheduled;
        False (nothing sent) when this backend cannot inject media, which is the default."""
        return False

    def _learn(self, side: Side, sdp: SessionDescription) -> None:
        """Hook: ``sdp`` came from ``side``; a relay updates where it sends that side's media."""
        self._received[side] = sdp

    # -- shared by every backend -------------------------------------------------------------

    async def reoffer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        """Answer, at the bridge, a re-offer received on ``side`` (hold, resume, refresh).

        Raise :class:`~sbc.sip.errors.RequestPending` (491) when no SDP was exchanged on ``side``
        yet (RFC 3261 §14.2), :class:`~sbc.sdp.model.NoCommonCodec` (488) when the re-offer
        dropped the negotiated codec.
        """
        previous = self._sent.get(side)
        endpoint = self.local_endpoint(side)
        if previous is None or endpoint is None:
            raise RequestPending("re-offer before the first offer/answer completed")
        answer = answer_for_hold(
            sdp,
            endpoint[0],
            endpoint[1],
            session_version=previous.origin.sess_version,
            previous=previous,
        )
        self._learn(side, sdp)
        return self._stamp(side, answer, previous.origin.address)

    async def transfer_offer(self) -> SessionDescription:
        """The offer for a new party that takes side b's place (a transfer by INVITE): what
        side a offered, offered again toward side b. Side b's current peer keeps its media
        until :meth:`transfer_answer`. 491 (RequestPending) before side a's first SDP."""
        received = self._received.get("a")
        if received is None:
            raise RequestPending("transfer before side a's first SDP")
        return await self.offer("a", received)

    async def transfer_answer(self, sdp: SessionDescription) -> SessionDescription | None:
        """The new party's answer: side b now faces it (a relay re-latches there). Returns the
        SDP side a must be re-offered when what it was told changes (pass-through: the media
        address; any backend: another codec), None when side a needs no re-INVITE."""
        previous = self._sent.get("a")
        answer = await self.answer("b", sdp)
        if previous is None or not same_media(previous, answer):
            return answer
        # Same address, port, formats and direction: side a keeps what it has (RFC 3264 §8:
        # no new version for an unchanged session).
        self._sent["a"] = previous
        return None

    def filter(self, sdp: SessionDescription) -> SessionDescription:
        """``sdp`` with only this session's codecs (488 when none is left).

        Whether filtering changes an SDP at all depends only on the shape of its streams
        (kind, profile, disabled or not, formats, attributes), which a peer repeats call
        after call with other addresses and ports: an SDP whose shape was already seen to
        pass unchanged is returned as it is, without parsing its rtpmaps again."""
        key = (self.codecs, *[_stream_shape(m) for m in sdp.media])
        unchanged = _UNCHANGED_BY_FILTER.get(key)
        if unchanged:
            return sdp
        filtered = filter_codecs(sdp, self.codecs)
        if unchanged is None:
            if len(_UNCHANGED_BY_FILTER) >= _UNCHANGED_BY_FILTER_MAX:
                _UNCHANGED_BY_FILTER.clear()
            _UNCHANGED_BY_FILTER[key] = filtered == sdp
        return filtered

    def _stamp(self, side: Side, sd: SessionDescription, address: str) -> SessionDescription:
        """Put the bridge's ``o=`` line for ``side`` on ``sd``, bumping the version only when
        ``sd`` differs from the last SDP sent on ``side`` (RFC 3264 §8)."""
        previous = self._sent.get(side)
        if previous is None:
            sess_id = _session_id()
            addrtype = "IP6" if ":" in address else "IP4"
            origin = make_origin(ORIGIN_USERNAME, str(sess_id), sess_id, "IN", addrtype, address)
        else:
            origin = previous.origin
        stamped = _with_origin(sd, origin)
        if previous is not None and _with_origin(previous, origin) != stamped:
            origin = replace(origin, sess_version=origin.sess_version + 1)
            stamped = _with_origin(sd, origin)
        self._sent[side] = stamped
        if type(self)._set_sending is MediaSession._set_sending:
            return stamped  # nothing listens (pass-through): no need to find the direction
        audio = stamped.audio()
        # RFC 3264 §6.1: a stream we marked recvonly or inactive toward `side` gets no RTP from us.
        self._set_sending(side, audio is not None and stamped.direction(audio) in _SENDING)
        return stamped

    def _set_sending(self, side: Side, allowed: bool) -> None:  # noqa: B027 - optional hook
        """Hook: whether the bridge may send RTP to ``side``, per the last SDP sent on it."""


def _session_id() -> int:
    """A random ``o=`` session id, uniform over 1 .. 2**31 - 1 (what ``randrange(1, 2**31)``
    draws), from 31 random bits with 0 drawn again: randrange's checks and helpers were four
    Python calls, two per call."""
    sess_id = random.getrandbits(31)
    while sess_id == 0:
        sess_id = random.getrandbits(31)
    return sess_id


def _stream_shape(m: MediaDescription) -> tuple[object, ...]:
    """What :func:`~sbc.sdp.offer_answer.filter_codecs` reads of a stream (not its address)."""
    return (m.media, m.proto, m.port == 0, m.formats, m.attributes)


# Stream shapes (with the codec list) -> whether filter_codecs leaves them as they are; a
# few entries per peer, cleared whole when full (bounded whatever peers send).
_UNCHANGED_BY_FILTER: dict[tuple[object, ...], bool] = {}
_UNCHANGED_BY_FILTER_MAX = 256


class MediaBackend(ABC):
    """Creates one :class:`MediaSession` per call."""

    # True when allocate() and its sessions' offer() never wait (no I/O): a call then sends
    # leg b's INVITE in the dispatch of its own INVITE (Call.start), not a loop pass later.
    immediate = False

    @abstractmethod
    async def allocate(self, call_id: str) -> MediaSession:
        """A new session for ``call_id``; may raise ``PortsExhausted`` (503)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Stop the backend (sessions still open are closed by their owners)."""


def _first_audio_index(sd: SessionDescription) -> int | None:
    m = sd.audio()
    return None if m is None else sd.media.index(m)


def audio_ports(sd: SessionDescription, port: int) -> list[int]:
    """m= ports for :func:`~sbc.sdp.offer_answer.rewrite_connection`: ``port`` for the first
    active audio stream, 0 (disabled) for every other one."""
    index = _first_audio_index(sd)
    return [port if i == index else 0 for i in range(len(sd.media))]


class PassthroughSession(MediaSession):
    """SDP filtered to the codec list and re-stamped; media addresses untouched (RTP flows
    directly between the peers of side a and side b)."""

    __slots__ = ()

    async def offer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        filtered = self.filter(sdp)
        self._learn(side, filtered)
        return self._stamp(other_side(side), filtered, sdp.origin.address)

    async def answer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        self._learn(side, sdp)
        return self._stamp(other_side(side), sdp, sdp.origin.address)

    def local_endpoint(self, side: Side) -> tuple[str, int] | None:
        # Media goes straight to the other side's peer: its address is what `side` was given.
        received = self._received.get(other_side(side))
        return None if received is None else media_address(received)

    def last_activity(self, side: Side) -> float | None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"backend": "passthrough", "call_id": self.call_id, "sides": {}}

    async def close(self) -> None:
        self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("media session is closed")


class PassthroughBackend(MediaBackend):
    """No media handling at all: the SDP is only filtered to ``codecs``."""

    immediate = True  # nothing to set up: the SDP is rewritten in place

    def __init__(self, codecs: Sequence[str] = DEFAULT_CODECS) -> None:
        self.codecs = tuple(codecs)

    async def allocate(self, call_id: str) -> MediaSession:
        return PassthroughSession(call_id, codecs=self.codecs)


__all__ = [
    "DEFAULT_CODECS",
    "DEFAULT_PTIME_MS",
    "DTMF_MAX_MS",
    "DTMF_MIN_MS",
    "SIDES",
    "MediaBackend",
    "MediaSession",
    "PassthroughBackend",
    "PassthroughSession",
    "Side",
    "audio_ports",
    "clamp_dtmf_duration",
    "media_address",
    "other_side",
    "rtcp_address",
    "same_media",
    "telephone_event",
]
