"""One party's audio in the demo and the tests: RTP on one UDP socket, every packet counted."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

from sbc.demo.tones import PACKET_MS, SAMPLES_PER_PACKET, tone_frequency
from sbc.media.rtp import RtpFormatError, RtpHeader, RtpPacket, build_rtp, dtmf_packets, parse_rtp

__all__ = ["PCMU", "TELEPHONE_EVENT", "RtpStream", "heard_frequency", "same_packets"]

PCMU = 0
TELEPHONE_EVENT = 101


class RtpStream(asyncio.DatagramProtocol):
    """One party's RTP on one UDP socket: sends a tone to ``remote`` every 20 ms (from the
    socket it receives on, RFC 4961 symmetric RTP) and keeps every packet it sent and got."""

    def __init__(self, frames: Sequence[bytes], payload_type: int = PCMU) -> None:
        self.frames = list(frames)
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32)
        self._sequence = secrets.randbelow(1 << 16)
        self._timestamp = secrets.randbits(32)
        self.sent: list[RtpPacket] = []
        self.received: list[RtpPacket] = []
        self.not_rtp = 0
        self.sources: set[tuple[str, int]] = set()
        self.remote: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: deque[bytes] = deque()  # DTMF packets go out before the next frame
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @classmethod
    async def open(cls, host: str, frames: Sequence[bytes]) -> RtpStream:
        stream = cls(frames)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: stream, local_addr=(host, 0))
        return stream

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    # -- asyncio.DatagramProtocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sources.add((str(addr[0]), int(addr[1])))
        try:
            self.received.append(parse_rtp(data))
        except RtpFormatError:
            self.not_rtp += 1
        self._changed.set()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the far end is not up yet

    # -- sending --------------------------------------------------------------------------------
    def start(self, remote: tuple[str, int]) -> None:
        """Send to ``remote`` every 20 ms until :meth:`stop_sending`."""
        self.remote = remote
        if self._task is None:
            self._task = asyncio.ensure_future(self._send_loop())

    def send_dtmf(self, digit: str) -> None:
        """Queue ``digit`` as RFC 4733 telephone-event packets (same SSRC and sequence space)."""
        packets = dtmf_packets(
            digit,
            payload_type=TELEPHONE_EVENT,
            ssrc=self.ssrc,
            first_sequence=self._sequence,
            timestamp=self._timestamp,
        )
        self._sequence = (self._sequence + len(packets)) & 0xFFFF
        self._pending.extend(packets)

    def stop_sending(self) -> None:
        """Send nothing more (the task is cancelled while it waits for its next tick)."""
        if self._task is not None:
            self._task.cancel()

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        index = 0
        next_at = loop.time()
        while True:
            if self._pending:
                data = self._pending.popleft()
            else:
                header = RtpHeader(self.payload_type, self._sequence, self._timestamp, self.ssrc)
                data = build_rtp(header, self.frames[index % len(self.frames)])
                self._sequence = (self._sequence + 1) & 0xFFFF
                index += 1
            # RFC 4733 §2.5.1: audio time goes on during an event; its packets keep their start.
            self._timestamp = (self._timestamp + SAMPLES_PER_PACKET) & 0xFFFFFFFF
            if self.transport is not None and self.remote is not None:
                self.transport.sendto(data, self.remote)
                self.sent.append(parse_rtp(data))
            next_at += PACKET_MS / 1000
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    # -- results --------------------------------------------------------------------------------
    async def wait_received(self, count: int) -> None:
        """Return once ``count`` packets have arrived (bound it with ``asyncio.timeout``)."""
        while len(self.received) < count:
            self._changed.clear()
            await self._changed.wait()

    def events_received(self) -> list[RtpPacket]:
        return [p for p in self.received if p.header.payload_type == TELEPHONE_EVENT]

    def received_from(self, ssrc: int) -> list[RtpPacket]:
        """The packets received from the stream with synchronisation source ``ssrc``."""
        return [p for p in self.received if p.header.ssrc == ssrc]

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.transport is not None:
            self.transport.close()
            self.transport = None


def same_packets(sent: Sequence[RtpPacket], received: Sequence[RtpPacket]) -> bool:
    """The same packets in the same order: sequence numbers, payload types and payload bytes."""
    return [(p.header.sequence, p.header.payload_type, p.payload) for p in sent] == [
        (p.header.sequence, p.header.payload_type, p.payload) for p in received
    ]


def heard_frequency(packets: Sequence[RtpPacket]) -> float | None:
    """The frequency (Hz) of the tone in the PCMU packets among ``packets``, in their order."""
    return tone_frequency(p.payload for p in packets if p.header.payload_type == PCMU)
