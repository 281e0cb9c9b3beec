"""The pool of RTP/RTCP port pairs the relay binds (RFC 3550 §11: RTP even, RTCP the next odd).

``allocate``/``release`` are the bookkeeping; ``bind_pair`` also binds both UDP sockets and
skips a pair that another process holds (it goes back to the end of the free list, to be tried
again later). Ports are handed out least recently released first, so that a port just freed is
not reused at once and stray packets of an ended call do not reach the next one.
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass

from sbc.sip.errors import ServiceUnavailable


class PortsExhausted(ServiceUnavailable):
    """No free RTP/RTCP pair: the call is answered 503."""


@dataclass(frozen=True, slots=True)
class BoundPair:
    """Two bound, non-blocking UDP sockets: RTP on ``port`` (even), RTCP on ``port + 1``."""

    port: int
    rtp: socket.socket
    rtcp: socket.socket

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class PortPool:
    """Even RTP ports ``p`` with ``min_port <= p`` and ``p + 1 <= max_port``.

    ``in_use`` and ``available`` count pairs (one pair is two ports).
    """

    def __init__(self, min_port: int, max_port: int) -> None:
        first = min_port + (min_port % 2)
        if first < 2 or max_port > 65535 or first + 1 > max_port:
            raise ValueError(f"no RTP/RTCP pair in {min_port}-{max_port}")
        self._free: deque[int] = deque(range(first, max_port, 2))
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return len(self._free) + len(self._used)

    @property
    def in_use(self) -> int:
        return len(self._used)

    @property
    def available(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Reserve the least recently released pair; return its even (RTP) port."""
        if not self._free:
            raise PortsExhausted("no free RTP port pair")
        port = self._free.popleft()
        self._used.add(port)
        return port

    def release(self, port: int) -> None:
        """Give a pair back; ``port`` must be one that :meth:`allocate` returned."""
        if port not in self._used:
            raise ValueError(f"port {port} is not allocated")
        self._used.remove(port)
        self._free.append(port)

    def bind_pair(self, host: str) -> BoundPair:
        """Allocate a pair and bind both sockets on ``host``; raise :class:`PortsExhausted`.

        A pair that cannot be bound (held by another process) is released to the end of the
        free list and the next one is tried, at most once each.
        """
        family = _family(host)
        for _ in range(len(self._free)):
            port = self.allocate()
            try:
                return _bind(family, host, port)
            except OSError:
                self.release(port)
        raise PortsExhausted("no bindable RTP port pair")


def _bind(family: socket.AddressFamily, host: str, port: int) -> BoundPair:
    rtp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rtcp = socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        rtp.close()
        raise
    try:
        rtp.bind((host, port))
        rtcp.bind((host, port + 1))
        rtp.setblocking(False)
        rtcp.setblocking(False)
    except OSError:
        rtp.close()
        rtcp.close()
        raise
    return BoundPair(port, rtp, rtcp)
