"""Where a message comes from or goes to, and the transport configuration.

A :class:`Destination` is the shell's own address type. The transaction layer in
:mod:`sbc.sip.transaction` treats it as opaque: it stores the ``source`` of a request and hands it
back as the destination of the responses, and hands back the ``dest`` given with a request for
each (re)transmission.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from sbc.sip.errors import BadRequest
from sbc.sip.parser import DEFAULT_LIMITS, ParseLimits
from sbc.sip.quickinit import quick_init, quick_maker
from sbc.sip.uri import SipUri

TRANSPORTS = ("udp", "tcp", "tls")
# RFC 3261 §19.1.2: default ports.
DEFAULT_PORTS = {"udp": 5060, "tcp": 5060, "tls": 5061}
# RFC 3261 §18.2.1 / §20.42: the transport token of a Via.
VIA_TRANSPORT = {"udp": "UDP", "tcp": "TCP", "tls": "TLS"}


@quick_init
@dataclass(frozen=True, slots=True)
class Destination:
    """A resolved peer: transport, IP literal (no brackets) and port.

    ``connection_id`` names the stream connection a request arrived on; responses go back over it
    (RFC 3261 §18.2.2). ``server_name`` is the host name a TLS certificate is checked against.
    ``local`` names the UDP socket of sbc's own that a datagram arrived on or leaves from
    (``TransportConfig.udp_sockets``); None: the SIP port's socket.
    """

    transport: str
    host: str
    port: int
    connection_id: int | None = None
    server_name: str | None = None
    local: str | None = None

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request should go before DNS: a host name or literal, an optional port, and the
    transport (RFC 3263 §4.1 picks it from the URI's ``transport`` parameter or the scheme)."""

    host: str
    port: int | None
    transport: str


# Every request sbc sends makes a Target (target_of_uri) and, for a literal host, a Destination
# (Resolver.resolve_cached): three of each a call, made by makers (sbc/sip/quickinit.py: the
# class's own objects, without the type call and __init__ frame).
make_target: Callable[[str, int | None, str], Target] = quick_maker(Target)
make_destination: Callable[[str, str, int, int | None, str | None, str | None], Destination] = (
    quick_maker(Destination)
)


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> str | None:
    """The address ``host`` spells (brackets of IPv6 references dropped), or None for names.

    Remembered: every request sbc sends resolves its peer's host through here, and the hosts
    are few (the PBX, Retell, the Contacts of their dialogs), while ``ipaddress`` parses the
    text anew each time."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def target_of_uri(uri: SipUri, default_transport: str = "udp") -> Target:
    """RFC 3263 §4.1: the transport of a SIP URI, then its host and port.

    ``transport=`` is compared case-insensitively (RFC 3261 §19.1.4; SIPp writes ``UDP``). A
    ``sips`` URI means TLS over TCP. ``maddr`` overrides the host (RFC 3261 §19.1.1).
    """
    transport = uri.transport
    if uri.is_secure:
        transport = "tls"
    elif transport is None:
        transport = default_transport
    if transport not in TRANSPORTS:
        raise BadRequest(f"unsupported transport {transport!r} in {uri}")
    host = uri.param("maddr") or uri.host
    return make_target(host, uri.port, transport)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """What the transports need from the settings (the ops layer maps settings to this)."""

    bind: str = "127.0.0.1"
    port: int = 5060
    advertised_address: str | None = None
    advertised_port: int | None = None
    udp: bool = True
    tcp: bool = True
    tls_port: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify: bool = True
    tls_ca_file: str | None = None
    max_message_size: int = 16384
    parse_limits: ParseLimits = DEFAULT_LIMITS  # header lines, Via entries, Request-URI length
    udp_buffer_size: int = 2 * 1024 * 1024  # SO_RCVBUF/SO_SNDBUF; bursts drop less (kernel caps)
    # Further UDP sockets by name, each (name, port; 0: the kernel picks one), bound to `bind`:
    # requests sent with that name (``SipEngine.send_request(local=...)``) leave from it, their
    # Via names it, and so their responses are read from it, apart from the SIP port's queue.
    udp_sockets: tuple[tuple[str, int], ...] = ()
    read_timeout: float = 10.0
    max_connections: int = 1024
    max_connections_per_ip: int = 64
    idle_timeout: float = 120.0
    # Server transactions not answered yet per source address; over it new requests get a
    # stateless 503.
    max_transactions_per_source: int = 1000
    # RFC 3261 §18.1.1: requests over 1300 bytes to a UDP peer try TCP first (engine.py).
    large_requests_over_tcp: bool = True
    # RFC 5626 §4.4.1: CRLFCRLF pings on our outbound connections (None: off), and how long to
    # wait for the pong before closing (the RFC's 10 s).
    keepalive_interval: float | None = None
    keepalive_timeout: float = 10.0
    connect_timeout: float = 5.0
    dns_timeout: float = 3.0
    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    user_agent: str = "sbc"

    @property
    def via_host(self) -> str:
        host = self.advertised_address or self.bind
        if ":" in host and not host.startswith("["):
            return f"[{host}]"
        return host

    def via_port(self, transport: str) -> int:
        if transport == "tls" and self.tls_port is not None:
            return self.tls_port
        return self.advertised_port or self.port
