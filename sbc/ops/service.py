"""The service: builds the bridge from the settings, runs it, shuts it down cleanly.

:func:`serve` is the whole life of the process, in order:

1. build (:class:`Service`): metrics, the SIP engine (transports + transactions), one
   registration driver per route (``[[routes]]``; without it, the one implicit route), the
   admin HTTP endpoint, the media backend and the call manager
   (:class:`~sbc.b2bua.calls.CallManager`, "the bridge");
2. start them (admin, media, SIP, registration); set ``ready`` once SIP listens and the first
   REGISTER is on its way. A part that cannot start (port in use, rtpengine not answering) is a
   :class:`StartupError` naming it; whatever had started is stopped again. Under systemd
   (``Type=notify``, :mod:`sbc.ops.systemd`) ``READY=1`` follows once the first registration
   attempt ended (registered, or failed and retrying), ``WATCHDOG=1`` every half
   ``WatchdogSec=``;
3. run until SIGTERM/SIGINT (or the ``stop`` event of a test); SIGHUP reloads the settings
   (:meth:`Service.reload`: ``[headers]``, ``[transfer]``, ``[calls]`` and a few timers apply to
   new calls; a file that fails validation changes nothing; one log line says which);
4. stop (``STOPPING=1``): drain (new INVITEs 503 with Retry-After, calls in progress run up to
   ``calls.drain_timeout``; a second SIGTERM/SIGINT cuts it short), end the calls left (BYE,
   CANCEL), flush the call events, unregister (Expires: 0, answer awaited ~2 s; nothing is sent
   when nothing is registered), stop the engine, the media backend and the admin endpoint;
   return 0.

This module is also where the pydantic settings become the plain frozen configs of the layers
below (``TransportConfig``, ``RegistrationConfig``, ``BridgeConfig``, ``NumberPlan``, the media
backend): ``sbc.b2bua`` and lower never import ``sbc.ops``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import structlog
from pydantic import BaseModel

from sbc.b2bua.calls import CallManager
from sbc.b2bua.ladder import forget_texts
from sbc.b2bua.messages import BridgeConfig, PbxTarget, RetellTarget
from sbc.b2bua.numbers import NumberPlan
from sbc.b2bua.registration import RegistrationDriver, RegistrationObserver
from sbc.b2bua.templates import compile_headers
from sbc.b2bua.transfer_rules import TransferConfig
from sbc.media.base import MediaBackend, PassthroughBackend
from sbc.media.ports import PortPool
from sbc.media.relay import RelayBackend
from sbc.media.rtpengine import RtpengineBackend, RtpengineError
from sbc.net.addresses import TransportConfig
from sbc.net.engine import SipEngine
from sbc.net.guard import Guard, GuardConfig
from sbc.ops import sip_trace
from sbc.ops.admin import AdminServer
from sbc.ops.idle import IDLE_CHECK_EVERY, collect_when_idle, warm_free_lists
from sbc.ops.metrics import Metrics
from sbc.ops.records import RecordsError, RecordWriter
from sbc.ops.records_pg import PostgresRecordWriter
from sbc.ops.settings import (
    CallsSettings,
    ConfigError,
    PbxSettings,
    RecordsSettings,
    Route,
    Settings,
)
from sbc.ops.systemd import Notifier
from sbc.sip.digest import Credentials
from sbc.sip.parser import ParseLimits
from sbc.sip.registration import RegistrationConfig
from sbc.sip.uri import SipUri

__all__ = [
    "LIVE_KEYS",
    "LIVE_SECTIONS",
    "RTPENGINE_POLL_INTERVAL",
    "Service",
    "StartupError",
    "advertised_host",
    "bridge_config",
    "bridge_configs",
    "local_address_toward",
    "media_backend",
    "number_plan",
    "pbx_networks",
    "registrar_target",
    "registration_config",
    "run",
    "serve",
    "transport_config",
]

log = structlog.get_logger(__name__)

UNREGISTER_WAIT = 2.0  # seconds to wait for the answer to Expires: 0 at shutdown
# Seconds the last call records get to reach the disk at shutdown (10,000 queued rows take ~2 s).
RECORDS_FLUSH_WAIT = 30.0
# How often rtpengine is asked for each call's packet counters: the media timeout (a call whose
# legs sent no RTP for media.media_timeout seconds is ended) sees media no later than this.
RTPENGINE_POLL_INTERVAL = 5.0
EXIT_STARTUP_FAILED = 1

# What a reload (SIGHUP) applies: these sections whole, and these single keys. Anything else
# that changed (addresses, ports, credentials, media mode, admin, log) is named in the reload's
# log line and waits for a restart.
LIVE_SECTIONS = ("headers", "transfer", "calls")
LIVE_KEYS = ("retell.answer_timeout", "media.media_timeout")

Network = IPv4Network | IPv6Network


class StartupError(Exception):
    """A part of the service could not start; the message says which and why."""


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
        parse_limits=ParseLimits(
            max_headers=sip.max_headers, max_via=sip.max_via, max_uri_length=sip.max_uri_length
        ),
        max_transactions_per_source=sip.max_transactions_per_source,
        large_requests_over_tcp=sip.large_requests_over_tcp,
        udp_buffer_size=sip.udp_buffer_size,
        udp_sockets=retell_udp_sockets(settings),
        t1=sip.t1,
        t2=sip.t2,
        t4=sip.t4,
        user_agent=sip.user_agent,
    )


def retell_udp_sockets(settings: Settings) -> tuple[tuple[str, int], ...]:
    """Retell's own UDP socket (``retell.local_udp_port``), named as the legs toward Retell
    ask for it (``Leg.socket``): only when Retell is reached over UDP."""
    retell = settings.retell
    if retell.local_udp_port is None:
        return ()
    if retell.transport != "udp":
        # Nothing would leave from it: said once at start, so a port the operator set for
        # nothing is not mistaken for one in use (a firewall rule for it, say).
        log.warning(
            "retell_local_udp_port_unused",
            port=retell.local_udp_port,
            transport=retell.transport,
            detail='only with retell.transport = "udp"',
        )
        return ()
    return (("retell", retell.local_udp_port),)


def _transport_params(transport: str) -> tuple[tuple[str, str | None], ...]:
    return () if transport == "udp" else (("transport", transport),)


def registrar_target(settings: Settings) -> SipUri:
    """Where REGISTERs (and keep-alives) go: the PBX host, port and transport."""
    pbx = settings.pbx
    return SipUri("sip", None, None, pbx.host, pbx.port, _transport_params(pbx.transport))


def registration_config(
    settings: Settings, contact_host: str, route: Route | None = None
) -> RegistrationConfig:
    """RFC 3261 §10.2: Request-URI = the domain, From/To = the extension's AOR, Contact = where
    3CX reaches us; the digest user is 3CX's Authentication ID. ``route``: whose extension and
    credentials (default: the first route)."""
    pbx, sip = settings.pbx, settings.sip
    route = route or settings.effective_routes()[0]
    domain = pbx.sip_domain
    params = _transport_params(pbx.transport)
    registrar_port = pbx.port if domain == pbx.host else None
    port = sip.tls_port if pbx.transport == "tls" and sip.tls_port else sip.port
    return RegistrationConfig(
        registrar=SipUri("sip", None, None, domain, registrar_port, params),
        aor=SipUri("sip", route.extension, None, domain),
        contact=SipUri("sip", route.extension, None, contact_host, port, params),
        username=route.auth_id,
        password=route.password.get_secret_value(),
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


def pbx_networks(pbx: PbxSettings) -> tuple[Network, ...]:
    """Where the PBX's INVITEs may come from: ``pbx.trusted``, else the PBX host's own
    addresses (resolved once, at start)."""
    if pbx.trusted:
        return tuple(pbx.trusted)
    try:
        infos = socket.getaddrinfo(pbx.host, pbx.port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        # Not fatal: registration retries on its own; calls are refused (403) meanwhile.
        log.warning("pbx_host_unresolved", host=pbx.host, error=str(exc))
        return ()
    hosts = {str(info[4][0]) for info in infos}
    return tuple(ipaddress.ip_network(host) for host in sorted(hosts))


def guard_config(settings: Settings, pbx_trusted: tuple[Network, ...]) -> GuardConfig:
    """The edge guard's config: ``[security]`` and the networks requests may come from (the
    PBX's, resolved once by :func:`pbx_networks`, and Retell's)."""
    security = settings.security
    return GuardConfig(
        trusted=(*pbx_trusted, *settings.retell.trusted),
        untrusted=security.untrusted,
        rate_limit=security.rate_limit,
        trusted_rate_limit=security.trusted_rate_limit,
        rate_window=security.rate_window,
        ban_time=security.ban_time,
        max_sources=security.max_sources,
        new_call_rate=security.new_call_rate,
        new_call_burst=security.new_call_burst,
        new_call_retry_after=security.new_call_retry_after,
    )


def number_plan(calls: CallsSettings) -> NumberPlan:
    return NumberPlan(
        country_code=calls.country_code,
        national_prefix=calls.national_prefix,
        international_prefix=calls.international_prefix,
        national_lengths=calls.national_lengths,
    )


def bridge_config(
    settings: Settings, trusted: tuple[Network, ...] | None = None, route: Route | None = None
) -> BridgeConfig:
    """The call manager's plain config of ``route`` (default: the first route); ``trusted``
    defaults to :func:`pbx_networks` (which may resolve ``pbx.host``). Raises TemplateError on
    a bad header template."""
    pbx, retell, calls, sip = settings.pbx, settings.retell, settings.calls, settings.sip
    route = route or settings.effective_routes()[0]
    return BridgeConfig(
        extension=route.extension,
        retell=RetellTarget(retell.host, retell.port, retell.transport, route.number),
        trusted=pbx_networks(pbx) if trusted is None else trusted,
        answer_timeout=retell.answer_timeout,
        max_concurrent=route.max_concurrent,
        max_calls_per_source=calls.max_calls_per_source,
        max_duration=calls.max_duration,
        retry_after=calls.retry_after,
        number_plan=number_plan(calls),
        headers=compile_headers(dict(route.headers), calls.passthrough_x_headers),
        user_agent=sip.user_agent,
        pbx_credentials=Credentials(route.auth_id, route.password.get_secret_value()),
        pbx=PbxTarget(pbx.host, pbx.port, pbx.transport, pbx.sip_domain),
        retell_credentials=retell_credentials(settings),
        retell_trusted=tuple(retell.trusted),
        transfer=TransferConfig(
            mode=route.transfer.mode,
            allow=route.transfer.allow,
            targets=route.transfer.targets,
            ring_timeout=route.transfer.ring_timeout,
        ),
        media_timeout=settings.media.media_timeout,
        t1=sip.t1,
        t2=sip.t2,
        route=route.name,
        max_total=calls.max_concurrent,
    )


def bridge_configs(
    settings: Settings, trusted: tuple[Network, ...] | None = None
) -> tuple[BridgeConfig, ...]:
    """One :func:`bridge_config` per route, in the order of the settings (the first is the
    call manager's ``config``); ``pbx.host`` is resolved once for all of them."""
    networks = pbx_networks(settings.pbx) if trusted is None else trusted
    return tuple(
        bridge_config(settings, trusted=networks, route=route)
        for route in settings.effective_routes()
    )


def retell_credentials(settings: Settings) -> Credentials | None:
    """The trunk credentials of the number at Retell (both directions), when configured."""
    retell = settings.retell
    if not retell.auth_username or retell.auth_password is None:
        return None
    return Credentials(retell.auth_username, retell.auth_password.get_secret_value())


def media_backend(settings: Settings, advertised: str) -> MediaBackend:
    """The media layer for ``[media] mode``; ``advertised`` is the address SDP names in relay
    mode. An rtpengine backend still has to be started (:meth:`RtpengineBackend.start`)."""
    media = settings.media
    if media.mode == "passthrough":
        return PassthroughBackend(media.codecs)
    if media.mode == "rtpengine":
        address = media.rtpengine_address
        if address is None:  # the settings refuse this; kept for a clear error anyway
            raise StartupError("media.mode = 'rtpengine' needs media.rtpengine (host:port)")
        return RtpengineBackend(
            address,
            codecs=media.codecs,
            poll_interval=min(RTPENGINE_POLL_INTERVAL, media.media_timeout / 4),
            inject_dtmf=media.rtpengine_inject_dtmf,
        )
    return RelayBackend(
        settings.sip.bind,
        advertised.strip("[]"),
        PortPool(media.rtp_port_min, media.rtp_port_max),
        media.learning_window,
        codecs=media.codecs,
    )


# -- the service ----------------------------------------------------------------------------------


class Service:
    """Every part of one running bridge, built from the settings (nothing global)."""

    def __init__(self, settings: Settings, *, keep_records: int = 100) -> None:
        """``keep_records``: finished calls' records kept in memory (``bridge.records``)."""
        self.settings = settings
        self.metrics = Metrics()
        contact_host = advertised_host(settings)
        # Resolved once: the edge guard and the call manager trust the same PBX addresses.
        pbx_trusted = pbx_networks(settings.pbx)
        self.guard = Guard(guard_config(settings, pbx_trusted))
        self.engine = SipEngine(transport_config(settings, contact_host), guard=self.guard)
        # One registration per route, each with its own Call-ID, refresh and backoff: a route
        # whose credentials fail keeps retrying alone while the others take calls.
        self.registrations: dict[str, RegistrationDriver] = {}
        for route in settings.effective_routes():
            observer: RegistrationObserver = self.metrics.route_observer(route.name)
            self.registrations[route.name] = RegistrationDriver(
                self.engine,
                registration_config(settings, contact_host, route),
                target=registrar_target(settings),
                keepalive=settings.pbx.keepalive,
                keepalive_interval=settings.sip.keepalive_interval,
                observer=observer,
            )
            driver = self.registrations[route.name]
            driver.log = driver.log.bind(route=route.name)  # its lines name the route
        # The first route's (the only one without [[routes]]): what reads a single one.
        self.registration = next(iter(self.registrations.values()))
        self.admin = AdminServer(
            settings.admin.host,
            settings.admin.port,
            metrics=self.metrics,
            ready_checks={"registered": lambda: self.registered},
            token=settings.admin.bearer_token(),
            route_checks={
                name: _registered_check(driver) for name, driver in self.registrations.items()
            },
        )
        self.media = media_backend(settings, self.engine.config.via_host)
        # Call records (sbc/ops/records.py); counters for metrics: records.written,
        # records.failed, records.dropped (queue full; bridge.events.dropped: all observers').
        records = settings.records
        self.records: RecordWriter | None = records_writer(records)
        configs = bridge_configs(settings, trusted=pbx_trusted)
        self.bridge = CallManager(
            self.engine,
            configs[0],
            self.media,
            ladder_messages=records.ladder_messages if self.records is not None else 0,
            routes=configs,
            keep_records=keep_records,
        )
        self.bridge.events.subscribe(self.metrics.on_call_event, inline=True)  # counters only
        if self.records is not None:
            self.records.subscribe(self.bridge.events, records.queue)
        self.bridge.attach()
        self.admin.bridge = self.bridge  # GET /calls, DELETE /calls/{call_uuid}
        self.metrics.watch(
            engine=self.engine, bridge=self.bridge, media=self.media, records=self.records
        )
        if settings.log.trace_sip:
            sip_trace.install(self.engine, force=settings.log.sip_trace is True)
        self.engine.on_request = self.bridge.handle_request
        self._started: list[Callable[[], Awaitable[None]]] = []

    async def start(self) -> None:
        """Start the parts in order; on failure, stop what was started and re-raise (a part
        that cannot start raises :class:`StartupError`)."""
        settings = self.settings
        try:
            if self.records is not None:
                # First in, last out: closed once the calls ended and their events were flushed.
                await _starting(
                    f"call records at {self.records.target}",
                    self.records.start(),
                    self.records.close,
                )
                self._started.append(self._close_records)
            await _starting(
                f"admin HTTP on {settings.admin.listen}", self.admin.start(), self.admin.stop
            )
            self._started.append(self.admin.stop)
            if isinstance(self.media, RtpengineBackend):
                await _starting(
                    f"rtpengine at {settings.media.rtpengine} (NG control socket)",
                    self.media.start(),
                    self.media.close,
                )
                self._started.append(self.media.close)
            listeners = f"SIP listener on {settings.sip.bind}:{settings.sip.port}"
            for _, port in self.engine.config.udp_sockets:
                listeners += f" (and Retell's UDP socket on port {port})"
            await _starting(
                listeners,
                self.engine.start(),
                self.engine.stop,
            )
            self._started.append(self.engine.stop)
            # Stopped in reverse: the calls end (BYE, CANCEL; the media and the call events
            # closed), then the registration is removed, then the engine stops.
            self._started.append(self._stop_registrations)
            self._started.append(self.bridge.stop)
            for registration in self.registrations.values():
                await registration.start()
        except BaseException:
            await self.stop()
            raise

    @property
    def registered(self) -> bool:
        """Every route holds its registration."""
        return all(r.registered for r in self.registrations.values())

    async def wait_settled(self) -> None:
        """Every route's first registration attempt ended (registered, or failed)."""
        await asyncio.gather(*(r.wait_settled() for r in self.registrations.values()))

    async def _stop_registrations(self) -> None:
        """Unregister every route at once (each waits up to UNREGISTER_WAIT for its answer)."""
        await asyncio.gather(*(r.stop(UNREGISTER_WAIT) for r in self.registrations.values()))

    async def _close_records(self) -> None:
        """Every call event delivered (the calls have ended by now), then the last row
        written: nothing queued is lost on SIGTERM. Bounded: a disk that stopped answering
        leaves the rows still queued unwritten (logged) rather than the process running."""
        records = self.records
        assert records is not None
        try:
            await asyncio.wait_for(self.bridge.events.flush(), RECORDS_FLUSH_WAIT)
        except TimeoutError:
            log.error("call_records_flush_timeout", after=RECORDS_FLUSH_WAIT)
        await records.close()
        if records.dropped:
            log.warning("call_records_dropped", dropped=records.dropped, written=records.written)

    async def drain(self) -> None:
        """Refuse new calls (503 with Retry-After) and give the calls in progress up to
        ``calls.drain_timeout`` to end by themselves (:meth:`stop` ends the rest)."""
        await self.bridge.drain(self.settings.calls.drain_timeout)

    def reload(self, new: Settings) -> tuple[list[str], list[str]]:
        """Apply what may change live of ``new`` (:data:`LIVE_SECTIONS`, :data:`LIVE_KEYS`) to
        the calls that start from now on; calls in progress keep their settings. Returns the
        keys applied and the keys that changed but wait for a restart."""
        old = self.settings
        changed = _changed_keys(old, new)
        live = [key for key in changed if _is_live(key)]
        frozen = [key for key in changed if not _is_live(key)]
        update: dict[str, Any] = {name: getattr(new, name) for name in LIVE_SECTIONS}
        for key in LIVE_KEYS:
            section, name = key.split(".")
            current = update.get(section, getattr(old, section))
            value = getattr(getattr(new, section), name)
            update[section] = current.model_copy(update={name: value})
        # [[routes]] (added, removed or changed) is not in LIVE_SECTIONS: the running routes
        # stay as they are, their keys are reported as waiting for a restart, and the live
        # sections apply to every route that falls back to them.
        merged = old.model_copy(update=update)
        # The trusted networks were resolved at start (pbx.host); they stay.
        configs = bridge_configs(merged, trusted=self.bridge.config.trusted)
        self.bridge.reconfigure(configs[0], configs)
        self.settings = merged
        return live, frozen

    async def stop(self) -> None:
        """Reverse order: the calls first (BYE, CANCEL), then the registration (Expires: 0),
        the engine, the media backend and the admin endpoint last."""
        while self._started:
            stop = self._started.pop()
            try:
                await stop()
            except Exception:
                log.exception("stop_failed", part=getattr(stop, "__qualname__", repr(stop)))


def _registered_check(driver: RegistrationDriver) -> Callable[[], bool]:
    return lambda: driver.registered


def _flat(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _flat(getattr(value, name), f"{prefix}.{name}" if prefix else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _flat(item, f"{prefix}.{key}")
    elif prefix == "routes" and isinstance(value, tuple):
        # By name, so that a reload names the route that changed (routes.sales.number).
        for route in value:
            yield from _flat(route, f"{prefix}.{route.name}")
    else:
        yield prefix, value


def _changed_keys(old: Settings, new: Settings) -> list[str]:
    """Dotted keys whose values differ (a table's entries one by one, added or removed)."""
    before, after = dict(_flat(old, "")), dict(_flat(new, ""))
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _is_live(key: str) -> bool:
    return key.split(".")[0] in LIVE_SECTIONS or key in LIVE_KEYS


def records_writer(records: RecordsSettings) -> RecordWriter | None:
    """The call records' writer of ``[records]``: PostgreSQL with ``url``, else the SQLite
    file of ``path``; None when records are off."""
    if records.url is not None:
        password = None if records.password is None else records.password.get_secret_value()
        return PostgresRecordWriter(
            records.url,
            password=password,
            keep_days=records.keep_days,
            instance=records.instance,
        )
    database = records.database()
    if database is None:
        return None
    return RecordWriter(database, keep_days=records.keep_days, instance=records.instance)


async def _starting(
    what: str, starting: Awaitable[None], undo: Callable[[], Awaitable[None]]
) -> None:
    """Await one part's start; its expected failures become a StartupError naming the part
    (after ``undo`` released whatever that part had half opened)."""
    try:
        await starting
    except (OSError, RtpengineError, RecordsError) as exc:
        with contextlib.suppress(Exception):
            await undo()
        raise StartupError(f"cannot start {what}: {exc}") from exc


def _install_signal_handlers(handlers: dict[int, Callable[[], None]]) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig, handler in handlers.items():
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)

    def remove() -> None:
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return remove


class _Lifecycle:
    """What the signals do to one running service: stop (twice: hurry), reload."""

    def __init__(
        self,
        service: Service,
        stop: asyncio.Event,
        notifier: Notifier,
        loader: Callable[[], Settings] | None,
    ) -> None:
        self.service = service
        self.stop = stop
        self.hurry = asyncio.Event()
        self.notifier = notifier
        self.loader = loader

    def stop_requested(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.info("shutdown_hurried", signal=sig.name, detail="calls in progress end now")
            self.hurry.set()
            return
        log.info("shutdown_requested", signal=sig.name)
        self.stop.set()

    def reload_requested(self) -> None:
        """SIGHUP: read the settings again and apply what may change live; a file that fails
        validation changes nothing. Either way one log line says what happened."""
        if self.loader is None:
            log.warning("config_reload_unavailable", detail="no settings file to read again")
            return
        if self.stop.is_set():
            log.info("config_reload_ignored", detail="shutting down")
            return
        self.notifier.reloading()
        try:
            self._reload(self.loader)
        finally:
            self.notifier.ready(_status(self.service))

    def _reload(self, loader: Callable[[], Settings]) -> None:
        try:
            live, frozen = self.service.reload(loader())
        except (ConfigError, ValueError) as exc:  # a TemplateError is a ValueError
            problems = exc.problems if isinstance(exc, ConfigError) else (str(exc),)
            log.error(
                "config_reload_refused", problems=list(problems), detail="the running settings stay"
            )
            return
        fields: dict[str, Any] = {"applied": live}
        if frozen:
            fields["not_applied"] = frozen
            fields["detail"] = "these settings cannot change while running: restart sbc"
        (log.warning if frozen else log.info)("config_reloaded", **fields)


def _status(service: Service) -> str:
    """One line for ``systemctl status``."""
    settings = service.settings
    pbx = f"{settings.pbx.host}:{settings.pbx.port}/{settings.pbx.transport}"
    state = "registered" if service.registered else "registering"
    extensions = ", ".join(r.config.aor.user or "" for r in service.registrations.values())
    return f"{state} with {pbx} as {extensions}; {service.bridge.active} calls"


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _first(*awaitables: Awaitable[Any], limit: float | None = None) -> None:
    """Return when the first of ``awaitables`` is done (or after ``limit`` seconds)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    loader: Callable[[], Settings] | None = None,
    notifier: Notifier | None = None,
) -> int:
    """Run the bridge until SIGTERM/SIGINT (or ``stop`` is set); returns the exit status:
    0 after a clean stop, :data:`EXIT_STARTUP_FAILED` (logged as ``sbc_start_failed``) when a
    part could not start. ``loader`` reads the settings again on SIGHUP (none: SIGHUP is
    logged and ignored); ``notifier`` talks to systemd (default: from ``$NOTIFY_SOCKET``)."""
    stop_event = stop if stop is not None else asyncio.Event()
    notify = notifier if notifier is not None else Notifier()
    # Nothing reads the records kept in memory in a running service (they go to the store),
    # and what a burst of calls leaves alive keeps the memory of the burst (CallManager).
    service = Service(settings, keep_records=0)
    life = _Lifecycle(service, stop_event, notify, loader)
    remove_handlers = _install_signal_handlers(
        {
            signal.SIGTERM: lambda: life.stop_requested(signal.SIGTERM),
            signal.SIGINT: lambda: life.stop_requested(signal.SIGINT),
            signal.SIGHUP: life.reload_requested,
        }
    )
    interval = notify.watchdog_interval
    watchdog = asyncio.ensure_future(_watchdog(notify, interval)) if interval else None
    started = False
    idle: asyncio.Future[None] | None = None
    try:
        try:
            await service.start()
        except StartupError as exc:
            log.error("sbc_start_failed", error=str(exc))
            return EXIT_STARTUP_FAILED
        started = True
        # After a burst of calls, the memory back to what it was (sbc/ops/idle.py): the loop's
        # free lists filled before any call, one full collection once the calls are over.
        warm_free_lists(asyncio.get_running_loop())

        def release() -> None:  # what the calls' tables and memos kept (sbc/ops/idle.py)
            service.engine.release_tables()
            forget_texts()

        async def rest() -> None:  # what the records' task and thread kept (sbc/ops/idle.py)
            await service.bridge.events.rest()
            if service.records is not None:
                await service.records.release_memory()

        idle = asyncio.ensure_future(
            collect_when_idle(
                lambda: service.bridge.active,
                service.metrics.calls_started.value,
                quiet=64 * settings.sip.t1 + IDLE_CHECK_EVERY,
                release=release,
                shrink=rest,
            )
        )
        if ready is not None:
            ready.set()
        # READY=1 once the first registration attempt ended (registered, or failed and
        # retrying): `systemctl start` then returns with the registration's outcome known.
        await _first(
            service.wait_settled(),
            stop_event.wait(),
            limit=service.registration.config.request_timeout + 1.0,
        )
        notify.ready(_status(service))
        await stop_event.wait()
        notify.stopping(f"draining {service.bridge.active} calls")
        await _first(service.drain(), life.hurry.wait())
    finally:
        if not started:
            notify.stopping("start failed")
        await service.stop()
        remove_handlers()
        if watchdog is not None:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)
        if idle is not None:
            idle.cancel()
            await asyncio.gather(idle, return_exceptions=True)
        notify.close()
    return 0


def run(settings: Settings) -> int:
    """Blocking entry point (``sbc run`` uses the CLI's own runner around :func:`serve`)."""
    return asyncio.run(serve(settings))
