"""SIP over UDP, TCP and TLS on asyncio (RFC 3261 §18).

One :class:`Transports` object owns the UDP endpoint, the stream listeners and the table of open
stream connections, inbound and outbound. It frames bytes into messages (datagrams with
``parse_message``, streams with a ``StreamParser`` per connection) and hands each message with
its :class:`~sbc.net.addresses.Destination` to ``on_message``; it serializes and writes what it is
given to :meth:`Transports.send`. Which address a message goes to is decided above it, in the
engine; this module only reuses connections (RFC 3261 §18.1.1) and opens new ones.

Streams are guarded against slow or hostile peers: a per-message read deadline (a peer that
dribbles a message is closed when it runs out), a maximum message size, a cap on connections per
source address and in total, an idle timeout, and CRLF keep-alive pongs (RFC 5626 §4.4.1).
``asyncio.Protocol`` is used rather than streams: one callback per segment, no task per
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import socket
import ssl
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from sbc.net.addresses import Destination, TransportConfig
from sbc.sip.errors import LimitExceeded, MessageTooLarge, SipError
from sbc.sip.message import Request, Response
from sbc.sip.parser import StreamMessageTooLarge, StreamParser, parse_message
from sbc.sip.serializer import serialize

log = structlog.get_logger(__name__)

Message = Request | Response
MessageHandler = Callable[[Message, Destination], None]
OversizedHandler = Callable[[Message, Destination], None]
SendFailureHandler = Callable[[Destination, list[Message], str], None]

_PONG = b"\r\n"
_UDP_SOURCES_LIMIT = 4096


def count_of(counter: itertools.count[int]) -> int:
    """How many times ``next()`` was called on ``counter`` (an ``itertools.count()`` from 0, or
    from the value it was made with): what it would return next, read from its repr."""
    return int(repr(counter)[6:-1])


def counted(attribute: str, doc: str | None = None) -> property:
    """An int property over the ``itertools.count`` in ``attribute`` (read with
    :func:`count_of`; set: a new count from the value), for the stats classes' per-message
    counters (see EngineStats and TransportStats)."""

    def read(self: Any) -> int:
        return count_of(getattr(self, attribute))

    def write(self: Any, value: int) -> None:
        setattr(self, attribute, itertools.count(value))

    return property(read, write, doc=doc)


@dataclass(slots=True)
class TransportStats:
    """Counters for the metrics endpoint; plain integers, no locking (one event loop).

    Those updated for every message are :func:`itertools.count` objects (``datagrams``,
    ``sent``; ``stream`` is an array's one cell, added to once per read), read through the
    properties below: as ints in attributes, each ``+= 1`` made a new int object (above 256)
    kept until the next, and the last ones, made at the end of a burst of calls, were alive
    long after it in the arenas the burst took, which Python's allocator then could not give
    back (docs/performance.md, Round 8: idle)."""

    datagrams: itertools.count[int] = field(default_factory=itertools.count)
    sent: itertools.count[int] = field(default_factory=itertools.count)
    stream: array[int] = field(default_factory=lambda: array("q", (0,)))
    datagrams_dropped: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0
    connections_opened: int = 0
    connect_failures: int = 0
    read_timeouts: int = 0
    idle_closes: int = 0
    oversized: int = 0
    stream_errors: int = 0
    pongs_sent: int = 0
    pings_sent: int = 0
    pong_timeouts: int = 0
    # Refusals by limit name: a parse-time limit (sbc.sip.parser.ParseLimits: "headers", "via",
    # "uri"; datagrams are dropped, stream connections closed) or a connection limit
    # ("connections", "connections_per_source"; the connection is aborted).
    limit_exceeded: dict[str, int] = field(default_factory=dict)

    def count_limit(self, limit: str) -> None:
        self.limit_exceeded[limit] = self.limit_exceeded.get(limit, 0) + 1

    datagrams_received = counted("datagrams")
    messages_sent = counted("sent")

    @property
    def stream_messages_received(self) -> int:
        return self.stream[0]

    @stream_messages_received.setter
    def stream_messages_received(self, value: int) -> None:
        self.stream[0] = value


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: Transports, local: str | None = None) -> None:
        self._owner = owner
        # The loop calls the owner's handler itself: one Python frame less per datagram. A
        # named socket's datagrams carry its name in their source (responses leave from it).
        handler = owner._datagram_received
        if local is not None:
            handler = functools.partial(handler, local=local)
        self.datagram_received = handler  # type: ignore[method-assign]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._owner._datagram_received(data, addr)  # replaced per instance in __init__

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier datagram; Linux gives no address, so nothing to map.
        log.debug("udp_error", error=str(exc))


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, inbound or outbound."""

    def __init__(self, owner: Transports, transport_name: str, *, outbound: bool) -> None:
        self.id = next(owner._ids)
        self.transport_name = transport_name
        self.outbound = outbound
        self.peer: tuple[str, int] = ("", 0)
        self._destination: Destination | None = None
        self.closed = False
        self._owner = owner
        self._config = owner.config
        self._parser = StreamParser(owner.config.max_message_size, owner.config.parse_limits)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._read_deadline: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        # When the connection last carried anything, and last received anything: C doubles in
        # an array. Float attributes replaced at every message would keep the float of a
        # burst's last message, made in the arenas the burst took, which Python's allocator
        # then cannot give back (docs/performance.md, Round 8b: idle).
        self._times = array("d", (self._loop.time(),) * 2)
        # Why the connection went, once it has: the error when the peer reset it (or the network
        # failed it) while neither side was closing it; None after an orderly close by either
        # side or sbc's own close (idle, limits, stop). The B2BUA ends the calls it carried.
        self.lost_error: Exception | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered subclasses of asyncio.Transport: cast.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        self._destination = None
        if not self._owner._register(self):
            self.closed = True
            self._transport.abort()
            return
        self._arm_idle()
        if self.outbound and self._config.keepalive_interval:
            self._arm_keepalive()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        times = self._times
        times[0] = times[1] = self._loop.time()
        if self._pong_deadline is not None:
            # RFC 5626 §4.4.1: anything from the peer (its CRLF pong, a message) proves it alive.
            self._pong_deadline.cancel()
            self._pong_deadline = None
        try:
            messages = self._parser.feed(data)
        except MessageTooLarge as exc:
            # The stream cannot be resynchronised: refuse by closing (RFC 3261 §18.3). When the
            # head parsed, a request is answered 513 first (the engine writes it on this
            # connection; close() flushes what was written before it closes).
            self._owner.stats.oversized += 1
            log.info("stream_message_too_large", peer=self.peer, detail=exc.detail)
            handler = self._owner.on_oversized
            if isinstance(exc, StreamMessageTooLarge) and exc.message is not None and handler:
                handler(exc.message, self.destination)
            self.close()
            return
        except LimitExceeded as exc:
            self._owner.stats.count_limit(exc.limit)
            log.info("stream_limit_exceeded", peer=self.peer, limit=exc.limit, detail=exc.detail)
            self.close()
            return
        except SipError as exc:
            self._owner.stats.stream_errors += 1
            log.info("stream_parse_error", peer=self.peer, detail=exc.detail)
            self.close()
            return
        pongs = self._parser.take_pongs()
        if pongs:
            # RFC 5626 §4.4.1: each CRLFCRLF ping is answered with one CRLF pong.
            self._owner.stats.pongs_sent += pongs
            self.write(_PONG * pongs)
        if messages and self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None
        if self._parser.in_message and self._read_deadline is None:
            # The deadline runs from the first octet of a message, not from the last segment:
            # a peer that dribbles one byte at a time still runs out of time.
            self._read_deadline = self._loop.call_later(
                self._config.read_timeout, self._read_timed_out
            )
        if messages:
            source = self.destination
            handler = self._owner._on_message
            self._owner.stats.stream[0] += len(messages)
            for message in messages:
                if self.closed:
                    break
                handler(message, source)

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.lost_error = exc
        self.closed = True
        self._cancel_timers()
        self._owner._unregister(self)

    # -- API --------------------------------------------------------------------------------
    @property
    def last_activity(self) -> float:
        """Loop time the connection last received or sent anything."""
        return self._times[0]

    @property
    def last_received(self) -> float:
        """Loop time the connection last received anything (a message, a CRLF pong)."""
        return self._times[1]

    @property
    def destination(self) -> Destination:
        # One per connection (peer and id are set once it is made), shared by its messages:
        # each would otherwise be kept by the transaction of its message.
        dest = self._destination
        if dest is None:
            dest = Destination(self.transport_name, self.peer[0], self.peer[1], self.id)
            self._destination = dest
        return dest

    def write(self, data: bytes) -> bool:
        if self.closed or self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(data)
        self._times[0] = self._loop.time()
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    # -- timers ---------------------------------------------------------------------------------
    def _read_timed_out(self) -> None:
        self._read_deadline = None
        self._owner.stats.read_timeouts += 1
        log.info("stream_read_timeout", peer=self.peer, buffered=self._parser.buffered)
        self.abort()

    def _arm_idle(self) -> None:
        self._idle_timer = self._loop.call_at(
            self.last_activity + self._config.idle_timeout, self._idle_check
        )

    def _idle_check(self) -> None:
        # Lazy re-arm: traffic only updates last_activity, the timer checks when it fires.
        self._idle_timer = None
        if self.closed:
            return
        if self._loop.time() - self.last_activity >= self._config.idle_timeout:
            self._owner.stats.idle_closes += 1
            log.debug("stream_idle_close", peer=self.peer)
            self.close()
            return
        self._arm_idle()

    def _arm_keepalive(self) -> None:
        interval = self._config.keepalive_interval
        assert interval is not None
        self._keepalive_timer = self._loop.call_at(
            self.last_received + interval, self._keepalive_due
        )

    def _keepalive_due(self) -> None:
        """RFC 5626 §4.4.1: a CRLFCRLF ping on a quiet outbound connection; no pong within
        ``keepalive_timeout`` means the peer or the path is gone, so the connection is closed."""
        self._keepalive_timer = None
        if self.closed:
            return
        interval = self._config.keepalive_interval
        assert interval is not None
        if self._loop.time() - self.last_received >= interval and self._pong_deadline is None:
            self.write(b"\r\n\r\n")
            self._owner.stats.pings_sent += 1
            self._pong_deadline = self._loop.call_later(
                self._config.keepalive_timeout, self._pong_missing
            )
            self._keepalive_timer = self._loop.call_later(interval, self._keepalive_due)
            return
        self._arm_keepalive()

    def _pong_missing(self) -> None:
        self._pong_deadline = None
        self._owner.stats.pong_timeouts += 1
        log.info("stream_keepalive_timeout", peer=self.peer)
        self.abort()

    def _cancel_timers(self) -> None:
        for name in ("_read_deadline", "_idle_timer", "_keepalive_timer", "_pong_deadline"):
            handle = getattr(self, name)
            if handle is not None:
                handle.cancel()
                setattr(self, name, None)


@dataclass(slots=True)
class _PendingConnect:
    messages: list[Message]
    dest: Destination
    task: asyncio.Task[None] | None = None


class Transports:
    """UDP endpoint, TCP/TLS listeners and the connection table.

    ``on_message(message, source)`` gets every framed message; ``on_send_failure(dest, messages,
    reason)`` gets what could not be sent because no connection could be opened.
    """

    def __init__(
        self,
        config: TransportConfig,
        on_message: MessageHandler,
        on_send_failure: SendFailureHandler,
        *,
        client_ssl: ssl.SSLContext | None = None,
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        self.stats = TransportStats()
        self._on_message = on_message
        self._on_send_failure = on_send_failure
        self._ids = itertools.count(1)
        self._udp: asyncio.DatagramTransport | None = None
        # The named UDP sockets (config.udp_sockets) once open, and their bound addresses.
        self._udp_named: dict[str, asyncio.DatagramTransport] = {}
        self.udp_named_addresses: dict[str, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        self._by_id: dict[int, StreamConnection] = {}
        self._by_address: dict[tuple[str, str, int], StreamConnection] = {}
        self._per_ip: dict[str, int] = {}
        self._inbound = 0
        self._pending: dict[tuple[str, str, int], _PendingConnect] = {}
        self._client_ssl = client_ssl
        self._server_ssl = server_ssl
        # One Destination per UDP peer address, shared by its messages (it is immutable):
        # each would otherwise live as long as the transaction of its message.
        self._udp_sources: dict[tuple[Any, ...], Destination] = {}
        # Called after a stream connection closed (metrics, tests, the B2BUA's interest in a peer).
        self.on_connection_lost: Callable[[StreamConnection], None] | None = None
        # Called with a datagram's message when it exceeds max_message_size (the engine: 513).
        self.on_oversized: OversizedHandler | None = None
        # The edge guard's source checks (sbc/net/guard.py), set by the engine: a datagram is
        # dropped before parsing, an inbound connection closed at once, when they say False.
        self.admit_datagram: Callable[[str], bool] | None = None
        self.admit_connection: Callable[[str], bool] | None = None
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self.tls_address: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.udp:
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(cfg.bind, cfg.port)
            )
            self._udp = udp
            self.udp_address = udp.get_extra_info("sockname")[:2]
            self._size_buffers(udp)
            for name, port in cfg.udp_sockets:
                named, _ = await loop.create_datagram_endpoint(
                    lambda name=name: _UdpProtocol(self, name),  # type: ignore[misc]
                    local_addr=(cfg.bind, port),
                )
                self._udp_named[name] = named
                self.udp_named_addresses[name] = named.get_extra_info("sockname")[:2]
                self._size_buffers(named)
        if cfg.tcp:
            server = await loop.create_server(
                lambda: StreamConnection(self, "tcp", outbound=False),
                cfg.bind,
                cfg.port,
                reuse_address=True,
            )
            self._servers.append(server)
            self.tcp_address = server.sockets[0].getsockname()[:2]
        if cfg.tls_port is not None:
            if self._server_ssl is None:
                self._server_ssl = server_context(cfg)
            server = await loop.create_server(
                lambda: StreamConnection(self, "tls", outbound=False),
                cfg.bind,
                cfg.tls_port,
                ssl=self._server_ssl,
                # A peer stalling its handshake holds no counted connection yet (connection_made
                # comes after the handshake): bound it by the read deadline, not asyncio's 60 s.
                ssl_handshake_timeout=cfg.read_timeout,
                reuse_address=True,
            )
            self._servers.append(server)
            self.tls_address = server.sockets[0].getsockname()[:2]

    def _size_buffers(self, udp: asyncio.DatagramTransport) -> None:
        sock = udp.get_extra_info("socket")
        if sock is not None and self.config.udp_buffer_size:
            # A burst larger than the default buffer (about 200 KiB) is silently dropped.
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, self.config.udp_buffer_size)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for pending in list(self._pending.values()):
            if pending.task is not None:
                pending.task.cancel()
        tasks = [p.task for p in self._pending.values() if p.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pending.clear()
        for conn in list(self._by_id.values()):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        for named in self._udp_named.values():
            named.close()
        self._udp_named.clear()
        self.udp_named_addresses.clear()
        # Let the transports deliver connection_lost before the loop goes away.
        await asyncio.sleep(0)

    # -- connection table ------------------------------------------------------------------
    def _register(self, conn: StreamConnection) -> bool:
        ip = conn.peer[0]
        if not conn.outbound:
            cfg = self.config
            admit = self.admit_connection
            if admit is not None and not admit(ip):
                self.stats.connections_refused += 1
                return False
            if self._inbound >= cfg.max_connections:
                limit = "connections"
            elif self._per_ip.get(ip, 0) >= cfg.max_connections_per_ip:
                limit = "connections_per_source"
            else:
                limit = ""
            if limit:
                self.stats.connections_refused += 1
                self.stats.count_limit(limit)
                log.debug("stream_connection_refused", peer=conn.peer)
                return False
            self._inbound += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            self.stats.connections_accepted += 1
        else:
            self.stats.connections_opened += 1
        self._by_id[conn.id] = conn
        self._by_address[(conn.transport_name, ip, conn.peer[1])] = conn
        return True

    def _unregister(self, conn: StreamConnection) -> None:
        if self._by_id.pop(conn.id, None) is None:
            return
        key = (conn.transport_name, conn.peer[0], conn.peer[1])
        if self._by_address.get(key) is conn:
            del self._by_address[key]
        if not conn.outbound:
            self._inbound -= 1
            left = self._per_ip.get(conn.peer[0], 1) - 1
            if left:
                self._per_ip[conn.peer[0]] = left
            else:
                self._per_ip.pop(conn.peer[0], None)
        if self.on_connection_lost is not None:
            self.on_connection_lost(conn)

    def connection(self, connection_id: int) -> StreamConnection | None:
        conn = self._by_id.get(connection_id)
        return None if conn is None or conn.closed else conn

    def connection_to(self, transport: str, host: str, port: int) -> StreamConnection | None:
        conn = self._by_address.get((transport, host, port))
        return None if conn is None or conn.closed else conn

    @property
    def connection_count(self) -> int:
        return len(self._by_id)

    # -- receiving --------------------------------------------------------------------------
    def _datagram_received(
        self, data: bytes, addr: tuple[Any, ...], local: str | None = None
    ) -> None:
        next(self.stats.datagrams)
        admit = self.admit_datagram
        if admit is not None and not admit(addr[0]):
            return  # first, so that what the guard drops costs no parsing (not even a strip)
        if (not data or data[0] == 13 or data[0] == 10) and not data.strip(b"\r\n"):
            # RFC 5626 §4.4.1 / §3.5.1: a CRLF keep-alive on UDP, nothing to answer. (A
            # message starts with a letter: no copy of it made by strip() to find that out.)
            return
        try:
            message = parse_message(data, self.config.parse_limits)
        except LimitExceeded as exc:
            self.stats.datagrams_dropped += 1
            self.stats.count_limit(exc.limit)
            log.debug("datagram_over_limit", peer=addr[:2], limit=exc.limit)
            return
        except SipError as exc:
            # Nothing parsed means no Via to answer to: drop and count.
            self.stats.datagrams_dropped += 1
            log.debug("datagram_dropped", peer=addr[:2], detail=exc.detail)
            return
        # A named socket's sources are kept apart: the same peer is another Destination there.
        key = addr if local is None else (local, addr)
        source = self._udp_sources.get(key)
        if source is None:
            source = Destination("udp", str(addr[0]), int(addr[1]), None, None, local)
            if len(self._udp_sources) >= _UDP_SOURCES_LIMIT:
                self._udp_sources.clear()
            self._udp_sources[key] = source
        if len(data) > self.config.max_message_size:
            # Same limit as on streams; a request is answered 513 by the engine.
            self.stats.oversized += 1
            if self.on_oversized is not None:
                self.on_oversized(message, source)
            return
        self._on_message(message, source)

    # -- sending ---------------------------------------------------------------------------
    def send(self, dest: Destination, message: Message) -> None:
        """Write ``message`` to ``dest``; open a connection when none is open to it.

        Over streams the connection named by ``dest.connection_id`` is used while it is open,
        then any open connection to the same transport, address and port (RFC 3261 §18.1.1).
        """
        if dest.transport == "udp":
            udp = self._udp if dest.local is None else self._udp_named.get(dest.local)
            if udp is None:
                self._on_send_failure(dest, [message], "udp disabled")
                return
            udp.sendto(serialize(message), (dest.host, dest.port))
            next(self.stats.sent)
            return
        conn = None
        if dest.connection_id is not None:
            conn = self.connection(dest.connection_id)
        if conn is None:
            # connection_to() without its frame (write() checks that it is open): a resolved
            # destination, without connection id, is how every request to Retell is sent.
            conn = self._by_address.get((dest.transport, dest.host, dest.port))
        if conn is not None and conn.write(serialize(message)):
            next(self.stats.sent)
            return
        key = (dest.transport, dest.host, dest.port)
        pending = self._pending.get(key)
        if pending is not None:
            pending.messages.append(message)
            return
        pending = _PendingConnect([message], dest)
        self._pending[key] = pending
        pending.task = asyncio.get_running_loop().create_task(self._connect(key, pending))

    def send_raw(self, dest: Destination, data: bytes) -> bool:
        """Write bytes that are not a SIP message (a CRLF keep-alive, RFC 5626 §4.4.1) to
        ``dest`` over UDP or an open connection; never opens one. False when nothing was sent."""
        if dest.transport == "udp":
            udp = self._udp if dest.local is None else self._udp_named.get(dest.local)
            if udp is None:
                return False
            udp.sendto(data, (dest.host, dest.port))
            return True
        conn = self.connection(dest.connection_id) if dest.connection_id is not None else None
        if conn is None:
            conn = self.connection_to(dest.transport, dest.host, dest.port)
        return conn is not None and conn.write(data)

    def _source_for(self, host: str) -> tuple[str, int] | None:
        """The local address of an outbound connection: the bind address when it is a specific
        one (a peer that filters by source address, a multi-homed host), else the kernel's
        choice; never across address families."""
        try:
            bind = ipaddress.ip_address(self.config.bind.strip("[]"))
        except ValueError:
            return None
        if bind.is_unspecified:
            return None
        try:
            if ipaddress.ip_address(host.strip("[]")).version != bind.version:
                return None
        except ValueError:
            pass  # a host name: resolved by create_connection, bound to our address family
        return (str(bind), 0)

    async def _connect(self, key: tuple[str, str, int], pending: _PendingConnect) -> None:
        dest = pending.dest
        loop = asyncio.get_running_loop()
        conn: StreamConnection | None = None
        reason = ""
        try:
            context: ssl.SSLContext | None = None
            server_hostname: str | None = None
            if dest.transport == "tls":
                if self._client_ssl is None:
                    self._client_ssl = client_context(self.config)
                context = self._client_ssl
                server_hostname = dest.server_name or dest.host
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(self, dest.transport, outbound=True),
                    dest.host,
                    dest.port,
                    ssl=context,
                    server_hostname=server_hostname,
                    local_addr=self._source_for(dest.host),
                ),
                self.config.connect_timeout,
            )
            conn = protocol
        except TimeoutError:
            reason = "connect timeout"
        except (OSError, ssl.SSLError) as exc:
            reason = f"connect failed: {exc}"
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
        if conn is None or conn.closed:
            self.stats.connect_failures += 1
            log.info("stream_connect_failed", dest=str(dest), reason=reason or "closed")
            self._on_send_failure(dest, pending.messages, reason or "closed")
            return
        for message in pending.messages:
            if conn.write(serialize(message)):
                next(self.stats.sent)


def client_context(config: TransportConfig) -> ssl.SSLContext:
    """TLS 1.2+ with the peer's certificate and host name verified (unless configured off)."""
    context = ssl.create_default_context(cafile=config.tls_ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.tls_cert and config.tls_key:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def server_context(config: TransportConfig) -> ssl.SSLContext:
    if not (config.tls_cert and config.tls_key):
        raise ValueError("a TLS port needs tls_cert and tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
