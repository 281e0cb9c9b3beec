"""The built-in RTP relay: two RTP/RTCP socket pairs per call, one facing each side (side a the
caller's leg, side b the far leg: the agent, or after a transfer the human).

A packet that arrives on the socket facing a side is sent, bytes untouched, out of the socket of
the same kind (RTP or RTCP) facing the other side, to that side's remote address.

Symmetric RTP latching (RFC 4961 gives the rule that makes it work: peers send from the port they
receive on): a side's remote address starts as the one its SDP names (``c=`` and ``m=``; RTCP from
RFC 3605 ``a=rtcp`` or port + 1) and follows the source of the packets received on that side's
socket during ``learning_window`` seconds from the first one, so a PBX behind NAT that writes a
private address in its SDP still gets audio. After the window, a packet from any other source is
dropped: this closes the "RTP Bleed" hole of relays that re-latch at any time. A new SDP address
for the side (re-INVITE) opens a new window. Nothing here logs per packet.

The first packet from another source after the window also *locks* the socket: it is
``connect()``-ed to the latched source, so that Linux delivers only that source's datagrams to it.
The rest of a flood is then dropped by the kernel (counted in its UDP NoPorts,
``sbc_udp_kernel_drops``) instead of filling the socket's receive buffer and costing the event
loop a callback per packet, and the flooded call keeps its own audio too. Locking on the first
stray packet rather than when the window ends costs nothing per forwarded packet and no timer. A
new window disconnects the socket again (``connect`` to AF_UNSPEC; where that cannot be done the
lock is re-aimed at the new SDP address). What reaches user space from another source (before
the lock, or queued when it was made) is counted in ``dropped``.

DTMF injection (:meth:`RelaySession.send_dtmf`, the SIP INFO to RFC 4733 conversion): the events
go out of the RTP socket facing the side, to its latched remote, inside the audio stream the relay
forwards there (RFC 4733 §2.1: one RTP stream, so the SSRC of that audio, its timestamp clock and
one sequence-number space). Injected packets need sequence numbers of their own, so from the first
injection on that side the relay numbers every RTP packet it sends there from a per-side output
counter (``seq_next``), forwarded audio and events alike. Chosen over adding an offset to the
sender's numbers: an offset gives a late (reordered) audio packet from before an injection the
number an injected packet already took, a counter cannot collide by construction. The price is
that loss and reordering upstream no longer show as sequence gaps on that side (timestamps are
untouched, so playout is unaffected). Until a side gets its first event, its packets are forwarded
untouched; the per-packet cost of the feature is then one attribute test and one store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any, cast

from sbc.media.base import (
    DEFAULT_CODECS,
    DEFAULT_PTIME_MS,
    SIDES,
    MediaBackend,
    MediaSession,
    Side,
    audio_ports,
    clamp_dtmf_duration,
    media_address,
    other_side,
    rtcp_address,
    telephone_event,
)
from sbc.media.ports import BoundPair, PortPool
from sbc.media.rtp import DTMF_EVENTS, dtmf_packets, read_timestamp, with_sequence
from sbc.sdp.model import SessionDescription
from sbc.sdp.offer_answer import rewrite_connection

CLOSE_TIMEOUT = 1.0
# RFC 4733 §2.5.1.2: event packets go at the audio packetization interval, 50 ms at most apart.
_EVENT_INTERVAL_MS = (10, 50)


class _SockAddr(ctypes.Structure):
    _fields_ = (("family", ctypes.c_ushort), ("data", ctypes.c_char * 14))


def _load_connect() -> Any:
    try:
        connect = ctypes.CDLL(None, use_errno=True).connect
    except (OSError, AttributeError):
        return None
    connect.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
    connect.restype = ctypes.c_int
    return connect


# libc's connect(2), for the AF_UNSPEC disconnect Python's socket module cannot express.
_LIBC_CONNECT = _load_connect()
_UNSPEC = _SockAddr(socket.AF_UNSPEC)


def _disconnect(sock: socket.socket) -> bool:
    """Dissolve a UDP socket's association (connect(2) to AF_UNSPEC); False if impossible."""
    if _LIBC_CONNECT is None:
        return False
    fileno = sock.fileno()
    if fileno < 0:
        return False
    return bool(_LIBC_CONNECT(fileno, ctypes.byref(_UNSPEC), ctypes.sizeof(_UNSPEC)) == 0)


def _usable(address: tuple[str, int] | None) -> tuple[str, int] | None:
    """An SDP address the relay can send to: an IP literal with a non-zero port."""
    if address is None or address[1] == 0:
        return None
    try:
        ipaddress.ip_address(address[0])
    except ValueError:
        return None  # a host name: wait for latching rather than resolve per packet
    return address


class RelaySocket(asyncio.DatagramProtocol):
    """One relay socket facing ``side`` for RTP or RTCP: latching state and counters."""

    __slots__ = (
        "_loop",
        "_seq",
        "_ssrc",
        "bytes",
        "dropped",
        "errors",
        "first_at",
        "injected",
        "is_rtp",
        "last",
        "last_rtp",
        "locked",
        "lost",
        "lost_future",
        "muted",
        "packets",
        "peer",
        "port",
        "remote",
        "renumber",
        "retired",
        "sdp_remote",
        "send_allowed",
        "seq_gaps",
        "seq_next",
        "side",
        "sock",
        "transport",
        "unroutable",
        "window",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        side: Side,
        *,
        is_rtp: bool,
        sock: Any,
        port: int,
        window: float,
    ) -> None:
        self._loop = loop
        self.side = side
        self.is_rtp = is_rtp
        self.sock = sock
        self.port = port
        self.window = window
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: RelaySocket | None = None
        self.remote: tuple[str, int] | None = None
        self.sdp_remote: tuple[str, int] | None = None
        self.retired: set[tuple[str, int]] = set()  # sources replaced by a new SDP: never again
        self.first_at: float | None = None
        # Set once the socket is connect()-ed to `remote` after the window (module docstring).
        self.locked = False
        self.send_allowed = True  # False while the SDP sent to `side` is recvonly/inactive
        self.lost_future: asyncio.Future[None] = loop.create_future()
        self.packets = 0
        self.bytes = 0
        self.dropped = 0
        self.unroutable = 0
        self.muted = 0
        self.errors = 0
        self.seq_gaps = 0
        self.lost = 0
        self.last: float | None = None
        self._seq = -1
        self._ssrc = b""
        self.last_rtp: bytes | None = None  # the last RTP packet received (its SSRC, timestamp)
        self.renumber = False  # True from the first injection toward this side (module docstring)
        self.seq_next = 0  # with renumber: the sequence number of the next packet sent
        self.injected = 0

    # -- asyncio.DatagramProtocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector transport does not subclass DatagramTransport: cast, no check.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost_future.done():
            self.lost_future.set_result(None)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors of earlier sendto() calls (port unreachable while a peer starts up).
        self.errors += 1

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        now = self._loop.time()
        remote = self.remote
        if remote is None or addr[0] != remote[0] or addr[1] != remote[1]:
            first = self.first_at
            source = (addr[0], addr[1])
            late = first is not None and now - first > self.window
            if late or source in self.retired:
                # RTP Bleed: only the latched source after the window; and never a source the
                # side's SDP moved away from (the agent still talking after a transfer).
                self.dropped += 1
                if late and not self.locked and remote is not None:
                    self._lock(remote)
                return
            self.remote = source
        if self.first_at is None:
            self.first_at = now
        self.packets += 1
        self.bytes += len(data)
        self.last = now
        # RFC 5761 §4: RTCP muxed on the RTP port has packet type 192-223; not counted as RTP.
        rtp = self.is_rtp and len(data) >= 12 and data[0] >> 6 == 2 and not 192 <= data[1] <= 223
        if rtp:
            self._count_sequence((data[2] << 8) | data[3], data[8:12])
            self.last_rtp = data
        peer = self.peer
        if peer is None or peer.remote is None or peer.transport is None:
            self.unroutable += 1
            return
        if not peer.send_allowed and not (len(data) > 1 and 192 <= data[1] <= 223):
            self.muted += 1  # RFC 3264 §6.1: the other side is on hold; its RTCP still flows
            return
        if rtp and peer.renumber:
            seq = peer.seq_next  # only after an injection toward that side (module docstring)
            peer.seq_next = (seq + 1) & 0xFFFF
            renumbered = bytearray(data)
            renumbered[2] = seq >> 8
            renumbered[3] = seq & 0xFF
            peer.transport.sendto(renumbered, peer.remote)
            return
        peer.transport.sendto(data, peer.remote)

    # -- relay logic ----------------------------------------------------------------------------

    def _count_sequence(self, seq: int, ssrc: bytes) -> None:
        if ssrc != self._ssrc:
            self._ssrc = ssrc
            self._seq = seq
            return
        # RFC 3550 §A.1: 16-bit sequence numbers wrap; a delta of 2^15 or more is old/duplicate.
        delta = (seq - self._seq) & 0xFFFF
        if delta == 0 or delta >= 0x8000:
            return
        if delta > 1:
            self.seq_gaps += 1
            self.lost += delta - 1
        self._seq = seq

    def next_sequence(self) -> int:
        """The sequence number the next RTP packet received here will be forwarded with (before
        renumbering starts on the other side): one past the last in order, random before any."""
        return (self._seq + 1) & 0xFFFF if self._seq >= 0 else random.randrange(0x10000)

    def inject(self, packet: bytes) -> bool:
        """Send ``packet`` (RTP) to this side's remote with the side's next output sequence number;
        False when it cannot go (no remote yet, closed, or on hold: RFC 3264 §6.1)."""
        if self.remote is None or self.transport is None or not self.send_allowed:
            return False
        seq = self.seq_next
        self.seq_next = (seq + 1) & 0xFFFF
        self.transport.sendto(with_sequence(packet, seq), self.remote)
        self.injected += 1
        return True

    def _lock(self, remote: tuple[str, int]) -> None:
        """Let only ``remote``'s datagrams reach the socket (module docstring)."""
        try:
            self.sock.connect(remote)
        except (OSError, AttributeError):
            return  # user-space filtering goes on (AttributeError: a test's socket stand-in)
        self.locked = True

    def unlock(self) -> None:
        """Undo the lock (a new window): every source may reach the socket again."""
        if self.locked and _disconnect(self.sock):
            self.locked = False

    def set_sdp_remote(self, address: tuple[str, int] | None) -> None:
        """The side's SDP names ``address``; a new one restarts latching (and retires the
        source latched so far), the same keeps it."""
        address = _usable(address)
        if address is None or address == self.sdp_remote:
            return
        if self.first_at is not None and self.remote is not None and self.remote != address:
            self.retired.add(self.remote)  # the source media came from until now
        self.retired.discard(address)
        self.unlock()
        if self.locked:
            # Cannot disconnect: re-aim the lock at the new address (no NAT re-latching).
            with contextlib.suppress(OSError):
                self.sock.connect(address)
        self.sdp_remote = address
        self.remote = address
        self.first_at = None

    def counters(self) -> dict[str, Any]:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "unroutable": self.unroutable,
            "muted": self.muted,
            "errors": self.errors,
            "seq_gaps": self.seq_gaps,
            "lost": self.lost,
            "injected": self.injected,
            "locked": self.locked,  # only the latched source reaches the socket (docstring)
            "last": self.last,
            "remote": None if self.remote is None else f"{self.remote[0]}:{self.remote[1]}",
        }


def _factory(relay_socket: RelaySocket) -> Callable[[], RelaySocket]:
    return lambda: relay_socket


class RelaySession(MediaSession):
    """One call's four relay sockets; created by :meth:`RelayBackend.allocate`."""

    def __init__(
        self,
        call_id: str,
        backend: RelayBackend,
        pairs: dict[Side, BoundPair],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(call_id, codecs=backend.codecs)
        self._backend = backend
        self._pairs = pairs
        self._loop = loop
        self.created = loop.time()
        self.rtp: dict[Side, RelaySocket] = {}
        self.rtcp: dict[Side, RelaySocket] = {}
        for side in SIDES:
            pair = pairs[side]
            window = backend.learning_window
            self.rtp[side] = RelaySocket(
                loop, side, is_rtp=True, sock=pair.rtp, port=pair.port, window=window
            )
            self.rtcp[side] = RelaySocket(
                loop, side, is_rtp=False, sock=pair.rtcp, port=pair.port + 1, window=window
            )
        for side in SIDES:
            self.rtp[side].peer = self.rtp[other_side(side)]
            self.rtcp[side].peer = self.rtcp[other_side(side)]
        self._dtmf: dict[Side, asyncio.Task[None]] = {}
        self._dtmf_ssrc: dict[Side, int] = {}
        self._dtmf_end: dict[Side, int] = {}  # RTP timestamp just past the last event sent
        self.dtmf_events: dict[Side, int] = dict.fromkeys(SIDES, 0)
        self.dtmf_refused: dict[Side, int] = dict.fromkeys(SIDES, 0)

    def _sockets(self) -> list[RelaySocket]:
        return [*self.rtp.values(), *self.rtcp.values()]

    async def start(self) -> None:
        for relay_socket in self._sockets():
            await self._loop.create_datagram_endpoint(
                _factory(relay_socket), sock=relay_socket.sock
            )

    def port(self, side: Side) -> int:
        """The RTP port of the socket facing ``side`` (RTCP is the next one)."""
        return self._pairs[side].port

    # -- MediaSession ---------------------------------------------------------------------------

    async def offer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        filtered = self.filter(sdp)
        self._learn(side, filtered)
        return self._forward(side, filtered)

    async def answer(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        self._check_open()
        self._learn(side, sdp)
        return self._forward(side, sdp)

    def _forward(self, side: Side, sdp: SessionDescription) -> SessionDescription:
        to = other_side(side)
        address = self._backend.advertised_address
        out = rewrite_connection(sdp, address, audio_ports(sdp, self.port(to)))
        return self._stamp(to, out, address)

    def _learn(self, side: Side, sdp: SessionDescription) -> None:
        super()._learn(side, sdp)
        self.rtp[side].set_sdp_remote(media_address(sdp))
        self.rtcp[side].set_sdp_remote(rtcp_address(sdp))

    def _set_sending(self, side: Side, allowed: bool) -> None:
        self.rtp[side].send_allowed = allowed

    def local_endpoint(self, side: Side) -> tuple[str, int] | None:
        return self._backend.advertised_address, self.port(side)

    async def send_dtmf(self, side: Side, digit: str, duration_ms: int) -> bool:
        """Schedule ``digit`` toward ``side`` as RFC 4733 events in the payload type ``side``
        declared for telephone-event; a digit queues behind one still playing on that side (two
        DTMF tones never overlap). Audio keeps flowing meanwhile (RFC 4733 §2.5.1.6). False
        when ``side`` negotiated no telephone-event, has no address yet, is on hold, or ``digit``
        is not DTMF."""
        out = self.rtp[side]
        fmt = telephone_event(self._received.get(side))
        digit = digit.upper()
        if (
            self.closed
            or fmt is None
            or digit not in DTMF_EVENTS
            or out.remote is None
            or not out.send_allowed
        ):
            self.dtmf_refused[side] += 1
            return False
        previous = self._dtmf.get(side)
        play = self._play_dtmf(side, digit, clamp_dtmf_duration(duration_ms), fmt, previous)
        self._dtmf[side] = self._loop.create_task(play)
        self.dtmf_events[side] += 1
        return True

    async def _play_dtmf(
        self,
        side: Side,
        digit: str,
        duration_ms: int,
        fmt: tuple[int, int],
        previous: asyncio.Task[None] | None,
    ) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        out, source = self.rtp[side], self.rtp[other_side(side)]
        payload_type, clock_rate = fmt
        received = self._received[side].audio()
        ptime = (received.ptime if received is not None else None) or DEFAULT_PTIME_MS
        interval = min(max(ptime, _EVENT_INTERVAL_MS[0]), _EVENT_INTERVAL_MS[1])
        step = clock_rate * interval // 1000
        last = source.last_rtp
        if last is not None:
            # RFC 4733 §2.5.1.2: the event timestamp is the media time the event starts at: that
            # of the audio packet after the last one forwarded, in that audio's SSRC (§2.1).
            ssrc = int.from_bytes(last[8:12], "big")
            timestamp = (read_timestamp(last) + step) & 0xFFFFFFFF
        else:
            ssrc = self._dtmf_ssrc.setdefault(side, random.randrange(1, 2**32))
            timestamp = random.randrange(2**32)
        end = self._dtmf_end.get(side)
        if end is not None and (timestamp - end) & 0xFFFFFFFF >= 0x80000000:
            timestamp = end  # no audio since the last event: each event needs its own start time
        packets = dtmf_packets(
            digit,
            payload_type=payload_type,
            ssrc=ssrc,
            first_sequence=0,  # renumbered as each goes out, between forwarded audio packets
            timestamp=timestamp,
            duration_ms=duration_ms,
            packet_ms=interval,
            clock_rate=clock_rate,
        )
        self._dtmf_end[side] = (timestamp + clock_rate * duration_ms // 1000 + step) & 0xFFFFFFFF
        if not out.renumber:
            out.seq_next = source.next_sequence()
            out.renumber = True
        start = self._loop.time()
        for index, packet in enumerate(packets):
            delay = start + index * interval / 1000 - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # close() cancels the task here
            out.inject(packet)

    def last_activity(self, side: Side) -> float | None:
        times = [t for t in (self.rtp[side].last, self.rtcp[side].last) if t is not None]
        return max(times, default=self.created)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "relay",
            "call_id": self.call_id,
            "sides": {
                side: {
                    "local_port": self.port(side),
                    "rtp": self.rtp[side].counters(),
                    "rtcp": self.rtcp[side].counters(),
                    "dtmf_events": self.dtmf_events[side],
                    "dtmf_refused": self.dtmf_refused[side],
                }
                for side in SIDES
            },
        }

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self._dtmf.values():
            task.cancel()
        try:
            waits: list[asyncio.Future[None]] = []
            for relay_socket in self._sockets():
                if relay_socket.transport is None:
                    relay_socket.sock.close()
                else:
                    relay_socket.transport.close()
                    waits.append(relay_socket.lost_future)
            if waits:
                # connection_lost runs on the next loop iteration and closes the socket first.
                await asyncio.wait(waits, timeout=CLOSE_TIMEOUT)
        finally:
            for relay_socket in self._sockets():
                # The two sockets of a stream point at each other (and each at its closed
                # transport): a cycle that would keep them and their transports alive until a
                # full garbage collection, long after the call (found by bench/soak.py).
                relay_socket.peer = None
                relay_socket.transport = None
            for pair in self._pairs.values():
                self._backend.pool.release(pair.port)
            self._backend.retire(self)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("media session is closed")


class RelayBackend(MediaBackend):
    """Relays every call's media through ``pool`` ports bound on ``bind_host``.

    ``advertised_address`` is what SDP sent to both sides names (the public address when
    ``bind_host`` is a wildcard or behind 1:1 NAT).
    """

    def __init__(
        self,
        bind_host: str,
        advertised_address: str,
        pool: PortPool,
        learning_window: float = 3.0,
        *,
        codecs: Sequence[str] = DEFAULT_CODECS,
    ) -> None:
        self.bind_host = bind_host
        self.advertised_address = advertised_address
        self.pool = pool
        self.learning_window = learning_window
        self.codecs = tuple(codecs)
        self.sessions: set[RelaySession] = set()
        # Packets and bytes received by the sessions already closed, by (side, "rtp"/"rtcp").
        self._ended: dict[tuple[Side, str], tuple[int, int]] = {}
        # Packets the closed sessions dropped, by (side, reason) (see drops()).
        self._ended_drops: dict[tuple[Side, str], int] = {}

    def drops(self) -> dict[tuple[Side, str], int]:
        """Packets (RTP and RTCP) dropped on the sockets facing each side, over the backend's
        whole life, by reason: ``foreign_source`` (not the latched source after the learning
        window, or a source the side's SDP moved away from: RTP Bleed) and ``no_route`` (the
        call has no address on the other side yet). Packets to a port of the pool that no call
        holds never reach sbc: the kernel drops them (``sbc_udp_no_port_datagrams``)."""
        totals = dict(self._ended_drops)
        for session in self.sessions:
            _add_drops(totals, session)
        return totals

    def counters(self) -> dict[tuple[Side, str], tuple[int, int]]:
        """(packets, bytes) received from each side, RTP and RTCP apart, over the backend's
        whole life: the closed sessions' totals plus the live ones' counters (metrics)."""
        totals = dict(self._ended)
        for session in self.sessions:
            _add_counters(totals, session)
        return totals

    def retire(self, session: RelaySession) -> None:
        """``session`` is closed (no packet can reach its sockets any more): its counters go
        into the running totals, and it leaves :attr:`sessions`."""
        if session in self.sessions:
            self.sessions.discard(session)
            _add_counters(self._ended, session)
            _add_drops(self._ended_drops, session)

    async def allocate(self, call_id: str) -> RelaySession:
        loop = asyncio.get_running_loop()
        pairs: dict[Side, BoundPair] = {}
        try:
            for side in SIDES:
                pairs[side] = self.pool.bind_pair(self.bind_host)
        except BaseException:
            for pair in pairs.values():
                pair.close()
                self.pool.release(pair.port)
            raise
        session = RelaySession(call_id, self, pairs, loop)
        self.sessions.add(session)
        try:
            await session.start()
        except BaseException:
            await session.close()
            raise
        return session

    async def close(self) -> None:
        for session in list(self.sessions):
            await session.close()


def _add_counters(totals: dict[tuple[Side, str], tuple[int, int]], session: RelaySession) -> None:
    for kind, sockets in (("rtp", session.rtp), ("rtcp", session.rtcp)):
        for side, relay_socket in sockets.items():
            packets, size = totals.get((side, kind), (0, 0))
            totals[(side, kind)] = (packets + relay_socket.packets, size + relay_socket.bytes)


def _add_drops(totals: dict[tuple[Side, str], int], session: RelaySession) -> None:
    for sockets in (session.rtp, session.rtcp):
        for side, relay_socket in sockets.items():
            for reason, count in (
                ("foreign_source", relay_socket.dropped),
                ("no_route", relay_socket.unroutable),
            ):
                totals[(side, reason)] = totals.get((side, reason), 0) + count
