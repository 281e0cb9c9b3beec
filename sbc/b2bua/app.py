"""The service: builds the bridge from the settings, runs it, shuts it down cleanly.

:func:`serve` is the whole life of the process, in order:

1. build (:class:`Service`): metrics, the SIP engine (transports + transactions), the
   registration driver, the admin HTTP endpoint, and the call handling ("the bridge");
2. start them; set ``ready`` once SIP listens and the first REGISTER is on its way;
3. wait for SIGTERM/SIGINT (or the ``stop`` event of a test);
4. stop: unregister (Expires: 0, answer awaited ~2 s), stop the bridge, the engine, the admin
   endpoint; return 0.

The bridge plugs in through :data:`BRIDGE_MODULE`: when ``sbc.b2bua.calls`` exists it must offer
``create_bridge(service: Service) -> Bridge``, where ``Bridge`` has
``async def handle_request(incoming: IncomingRequest) -> None`` (every new server transaction
that is not an out-of-dialog OPTIONS, which the engine answers) and ``async def stop() -> None``
(ends calls at shutdown). Without it, :func:`answer_without_bridge` answers requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import ipaddress
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog

from sbc.b2bua.registration import RegistrationDriver
from sbc.net.addresses import TransportConfig
from sbc.net.engine import IncomingRequest, SipEngine
from sbc.ops.admin import AdminServer
from sbc.ops.metrics import Metrics
from sbc.ops.settings import Settings
from sbc.sip.registration import RegistrationConfig
from sbc.sip.uri import SipUri

__all__ = [
    "BRIDGE_MODULE",
    "Bridge",
    "Service",
    "answer_without_bridge",
    "registration_config",
    "run",
    "serve",
    "transport_config",
]

log = structlog.get_logger(__name__)

BRIDGE_MODULE = "sbc.b2bua.calls"
UNREGISTER_WAIT = 2.0  # seconds to wait for the answer to Expires: 0 at shutdown


class Bridge(Protocol):
    """What :data:`BRIDGE_MODULE`'s ``create_bridge(service)`` returns."""

    async def handle_request(self, incoming: IncomingRequest) -> None: ...

    async def stop(self) -> None: ...


# -- settings -> the plain configs of the layers below -------------------------------------------


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def local_address_toward(host: str, port: int) -> str:
    """The local IP the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(sockaddr)
            return str(probe.getsockname()[0])
    except OSError as exc:
        raise RuntimeError(
            f"cannot tell which local address reaches pbx.host {host!r} ({exc}); "
            "set sip.advertised_address or bind sip.bind to a specific address"
        ) from exc


def advertised_host(settings: Settings) -> str:
    """Address written in Via and Contact: the configured one, else the bind address, else
    (bound to a wildcard) the local address that routes to the PBX."""
    sip = settings.sip
    if sip.advertised_address:
        return sip.advertised_address
    if not _is_wildcard(sip.bind):
        return sip.bind
    return local_address_toward(settings.pbx.host, settings.pbx.port)


def transport_config(settings: Settings, advertised: str | None = None) -> TransportConfig:
    sip = settings.sip
    return TransportConfig(
        bind=sip.bind,
        port=sip.port,
        advertised_address=advertised or sip.advertised_address,
        tls_port=sip.tls_port,
        tls_cert=str(sip.tls_cert) if sip.tls_cert else None,
        tls_key=str(sip.tls_key) if sip.tls_key else None,
        max_message_size=sip.max_message_size,
        read_timeout=sip.read_timeout,
        max_connections=sip.max_connections,
        max_connections_per_ip=sip.max_connections_per_ip,
        idle_timeout=sip.idle_timeout,
        t1=sip.t1,
        t2=sip.t2,
        t4=sip.t4,
        user_agent=sip.user_agent,
    )


def _transport_params(transport: str) -> tuple[tuple[str, str | None], ...]:
    return () if transport == "udp" else (("transport", transport),)


def registrar_target(settings: Settings) -> SipUri:
    """Where REGISTERs (and keep-alives) go: the PBX host, port and transport."""
    pbx = settings.pbx
    return SipUri("sip", None, None, pbx.host, pbx.port, _transport_params(pbx.transport))


def registration_config(settings: Settings, contact_host: str) -> RegistrationConfig:
    """RFC 3261 §10.2: Request-URI = the domain, From/To = the extension's AOR, Contact = where
    3CX reaches us; the digest user is 3CX's Authentication ID."""
    pbx, sip = settings.pbx, settings.sip
    domain = pbx.sip_domain
    params = _transport_params(pbx.transport)
    registrar_port = pbx.port if domain == pbx.host else None
    port = sip.tls_port if pbx.transport == "tls" and sip.tls_port else sip.port
    return RegistrationConfig(
        registrar=SipUri("sip", None, None, domain, registrar_port, params),
        aor=SipUri("sip", pbx.extension, None, domain),
        contact=SipUri("sip", pbx.extension, None, contact_host, port, params),
        username=pbx.auth_id,
        password=pbx.password.get_secret_value(),
        transport=pbx.transport,
        expires=pbx.register_expires,
        backoff_base=pbx.register_backoff_base,
        backoff_max=pbx.register_backoff_max,
        # Learn the public address from 3CX's received/rport only when none was configured.
        rewrite_contact=sip.advertised_address is None,
        # A little over Timer F (64*T1): the engine's own 408 normally comes first.
        request_timeout=64 * sip.t1 + 2.0,
        user_agent=sip.user_agent,
    )


# -- requests when no bridge is installed ---------------------------------------------------------


async def answer_without_bridge(incoming: IncomingRequest) -> None:
    """Answer what reaches the extension when call handling is not part of this build."""
    method = incoming.method
    if method == "NOTIFY":
        # 3CX sends voicemail NOTIFYs (message-summary) outside any dialog: accept them.
        incoming.respond(200)
    elif method == "INVITE":
        incoming.respond(480)
    elif method in ("BYE", "CANCEL", "UPDATE", "INFO", "PRACK", "REFER"):
        incoming.respond(481)  # RFC 3261 §12.2.2: no such dialog
    else:
        incoming.respond(405, headers=(("Allow", "OPTIONS, NOTIFY"),))


# -- the service ----------------------------------------------------------------------------------


class Service:
    """Every part of one running bridge, built from the settings (nothing global)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        contact_host = advertised_host(settings)
        self.engine = SipEngine(transport_config(settings, contact_host))
        self.registration = RegistrationDriver(
            self.engine,
            registration_config(settings, contact_host),
            target=registrar_target(settings),
            keepalive=settings.pbx.keepalive,
            keepalive_interval=settings.sip.keepalive_interval,
            observer=self.metrics,
        )
        self.admin = AdminServer(
            settings.admin.host,
            settings.admin.port,
            metrics=self.metrics,
            ready_checks={"registered": lambda: self.registration.registered},
        )
        self.bridge: Bridge | None = None
        self._started: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        """Start the parts in order; on failure, stop what was started and re-raise."""
        try:
            await self.admin.start()
            self._started.append(self.admin.stop)
            await self.engine.start()
            self._started.append(self.engine.stop)
            self.bridge = _create_bridge(self)
            self.engine.on_request = (
                self.bridge.handle_request if self.bridge is not None else answer_without_bridge
            )
            if self.bridge is not None:
                self._started.append(self.bridge.stop)
            await self.registration.start()
            self._started.append(lambda: self.registration.stop(UNREGISTER_WAIT))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Reverse order: unregister first (no new calls), then the bridge, the engine, and the
        admin endpoint last."""
        while self._started:
            stop = self._started.pop()
            try:
                await stop()
            except Exception:
                log.exception("stop_failed", part=getattr(stop, "__qualname__", repr(stop)))


def _create_bridge(service: Service) -> Bridge | None:
    try:
        module = importlib.import_module(BRIDGE_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != BRIDGE_MODULE:
            raise
        log.warning("call_handling_not_installed", module=BRIDGE_MODULE)
        return None
    factory: Callable[[Service], Bridge] = module.create_bridge
    return factory(service)


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _signalled, stop, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)

    def remove() -> None:
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return remove


def _signalled(stop: asyncio.Event, sig: int) -> None:
    log.info("shutdown_requested", signal=signal.Signals(sig).name)
    stop.set()


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run the bridge until SIGTERM/SIGINT (or ``stop`` is set); returns the exit status."""
    stop_event = stop if stop is not None else asyncio.Event()
    service = Service(settings)
    remove_handlers = _install_signal_handlers(stop_event)
    try:
        await service.start()
        if ready is not None:
            ready.set()
        await stop_event.wait()
    finally:
        await service.stop()
        remove_handlers()
    return 0


def run(settings: Settings) -> int:
    """Blocking entry point (``sbc run`` uses the CLI's own runner around :func:`serve`)."""
    result: Any = asyncio.run(serve(settings))
    return int(result)
