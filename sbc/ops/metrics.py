"""Prometheus metrics of one running bridge.

Every metric lives in the :class:`Metrics` object's own ``CollectorRegistry``: two bridges in one
process (tests do that) never share a counter, and nothing is registered in prometheus-client's
global default registry. The object is built once by the service (:mod:`sbc.ops.service`) and
handed to whoever updates it.

Two kinds of families:

* updated as things happen: registration, call events (delivered off the call path), call
  setup time and durations, transfers;
* read when scraped (:meth:`Metrics.watch`, a collector with nothing on the hot path): the
  engine's counters (SIP messages in and out by method or status and transport,
  retransmissions, live transactions), the relay's RTP counters (closed calls' totals plus the
  live ones) and port pool, whether Retell answers, the call records writer's counters, and
  the client library's process and platform collectors.
"""

from __future__ import annotations

import bisect
import platform
import time
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import metrics as _client_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sbc import __version__
from sbc.b2bua.events import CallEnded, CallEvent, CallRecord, CallRefused, CallStarted

__all__ = ["CONTENT_TYPE", "Metrics", "RouteRegistration", "failure_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Answered-call durations, seconds: from a short test call to a long support conversation.
DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0, 7200.0)
# INVITE received to call answered, seconds: Retell answers in about a second; an agent that
# rings for long, or a slow webhook before the answer, shows in the upper buckets.
SETUP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0)


# The outcome label of an ended call, as the key of its child.
_ANSWERED = ("answered",)
_UNANSWERED = ("unanswered",)


def failure_label(status: int | None, reason: str = "") -> str:
    """A bounded label value for a registration failure: the status code, or ``timeout`` /
    ``transport`` when no response came (reason texts would make the label set unbounded)."""
    if status is not None:
        return str(status)
    return "timeout" if "timed out" in reason.lower() else "transport"


class Metrics:
    """The bridge's metrics; implements the registration driver's ``RegistrationObserver`` and
    observes the call manager's events (:meth:`on_call_event`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.registered = Gauge(
            "sbc_registered",
            "1 while the bridge holds a registration with the PBX, else 0",
            registry=self.registry,
        )
        self.register_attempts = Counter(
            "sbc_register_attempts",
            "REGISTER requests sent to the PBX (challenge answers and refreshes included)",
            registry=self.registry,
        )
        self.register_failures = Counter(
            "sbc_register_failures",
            "Failed registration attempts, by status code (or timeout / transport)",
            ["reason"],
            registry=self.registry,
        )
        # The families every call updates are plain numbers exposed by collectors of our own
        # (PlainCounter, PlainGauge, PlainHistogram), the same samples as prometheus_client's
        # Counter, Gauge and Histogram: those take two locks and check their labels on every
        # update, about 74k instructions per call for the ten updates of a call.
        self.calls_active = PlainGauge(
            "sbc_calls_active", "Calls in progress through the bridge", registry=self.registry
        )
        self.calls_started = PlainCounter(
            "sbc_calls_started", "Calls the PBX offered to the bridge", registry=self.registry
        )
        self.calls_ended = PlainCounter(
            "sbc_calls_ended",
            "Finished calls, by whether Retell answered them",
            ["outcome"],
            registry=self.registry,
        )
        self.calls_refused = PlainCounter(
            "sbc_calls_refused",
            "INVITEs refused before a call was set up, by status sent",
            ["status"],
            registry=self.registry,
        )
        self.transfers = PlainCounter(
            "sbc_transfers",
            "Transfers the agent asked for, by mode (refer, invite) and outcome (transferred, "
            "failed, refused, aborted)",
            ["mode", "outcome"],
            registry=self.registry,
        )
        self.call_duration = PlainHistogram(
            "sbc_call_duration_seconds",
            "Duration of answered calls, answer to hang-up",
            DURATION_BUCKETS,
            registry=self.registry,
        )
        self.call_setup = PlainHistogram(
            "sbc_call_setup_seconds",
            "Time from the INVITE received to the call answered (answered calls)",
            SETUP_BUCKETS,
            registry=self.registry,
        )
        # The same by route ([[routes]]; "default" without): the families above stay the
        # process's totals (sbc_registered: 1 only while every route is registered).
        self.route_registered = Gauge(
            "sbc_route_registered",
            "1 while the route's extension holds a registration with the PBX, else 0",
            ["route"],
            registry=self.registry,
        )
        self.route_register_failures = Counter(
            "sbc_route_register_failures",
            "Failed registration attempts of the route's extension, by status code (or "
            "timeout / transport)",
            ["route", "reason"],
            registry=self.registry,
        )
        self.route_calls_started = PlainCounter(
            "sbc_route_calls_started",
            "Calls the route took (from the PBX to its extension, or from Retell)",
            ["route"],
            registry=self.registry,
        )
        self.route_calls_active = PlainGauge(
            "sbc_route_calls_active",
            "Calls in progress on the route",
            ["route"],
            registry=self.registry,
        )
        self.route_calls_ended = PlainCounter(
            "sbc_route_calls_ended",
            "Finished calls of the route, by whether the far end answered them",
            ["route", "outcome"],
            registry=self.registry,
        )
        self._routes_registered: dict[str, bool] = {}
        self.build = Info(
            "sbc_build", "The running sbc: its version and Python's", registry=self.registry
        )
        self.build.info({"version": __version__, "python": platform.python_version()})
        # The client library's process_* (CPU, memory, file descriptors, start time; Linux)
        # and python_info / python_gc_* families, on this registry rather than the global one.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(GC_COLLECTOR)
        self.sources = BridgeCollector()
        self.registry.register(self.sources)

    def watch(
        self,
        *,
        engine: Any = None,
        bridge: Any = None,
        media: Any = None,
        records: Any = None,
    ) -> None:
        """What the scrape-time families read (see :class:`BridgeCollector`)."""
        self.sources.engine = engine
        self.sources.bridge = bridge
        self.sources.media = media
        self.sources.records = records

    # -- the registration driver's observer protocol ---------------------------------------------
    def set_registered(self, value: bool) -> None:
        self.registered.set(1 if value else 0)

    def register_attempted(self) -> None:
        self.register_attempts.inc()

    def register_failed(self, status: int | None, reason: str) -> None:
        self.register_failures.labels(reason=failure_label(status, reason)).inc()

    def route_observer(self, route: str) -> RouteRegistration:
        """The registration observer of one route's driver (each route registers on its own).
        The route counts as not registered from now on, until its driver says otherwise."""
        self._routes_registered[route] = False
        self.route_registered.labels(route=route).set(0)
        self.registered.set(0)
        return RouteRegistration(self, route)

    def route_set_registered(self, route: str, value: bool) -> None:
        self._routes_registered[route] = value
        self.route_registered.labels(route=route).set(1 if value else 0)
        self.set_registered(all(self._routes_registered.values()))

    # -- call events (sbc.b2bua.events), delivered off the call path ---------------------------
    def on_call_event(self, event: CallEvent) -> None:
        if isinstance(event, CallStarted):
            self.call_started(event.call_uuid, event.route)
        elif isinstance(event, CallEnded):
            self.call_ended(event.record)
        elif isinstance(event, CallRefused):
            self.call_refused(event.status)

    def call_started(self, call_uuid: str, route: str = "") -> None:
        self.calls_started.inc()
        self.calls_active.inc()
        if route:
            key = (route,)
            self.route_calls_started.inc(key)
            self.route_calls_active.inc(key)

    def call_ended(self, record: CallRecord) -> None:
        self.calls_active.inc((), -1)
        answered = record.answered
        outcome = _ANSWERED if answered is not None else _UNANSWERED
        route = record.route
        if route:
            self.route_calls_active.inc((route,), -1)
            self.route_calls_ended.inc((route, outcome[0]))
        self.calls_ended.inc(outcome)
        if answered is not None:
            self.call_duration.observe(max(0.0, record.ended - answered))
            self.call_setup.observe(max(0.0, answered - record.started))
        for transfer in record.transfers:
            self.transfers.inc((transfer.mode, transfer.outcome))

    def call_refused(self, status: int) -> None:
        self.calls_refused.inc((str(status),))

    # -- exposition ------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this bridge."""
        return generate_latest(self.registry)


class RouteRegistration:
    """One route's registration driver reports here (``RegistrationObserver``): the route's
    families, and the process's totals through :class:`Metrics`."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.metrics = metrics
        self.route = route

    def set_registered(self, value: bool) -> None:
        self.metrics.route_set_registered(self.route, value)

    def register_attempted(self) -> None:
        self.metrics.register_attempted()

    def register_failed(self, status: int | None, reason: str) -> None:
        self.metrics.register_failed(status, reason)
        label = failure_label(status, reason)
        self.metrics.route_register_failures.labels(route=self.route, reason=label).inc()


def _created_enabled() -> bool:
    """Whether prometheus_client writes ``_created`` samples (its PROMETHEUS_DISABLE_CREATED_SERIES
    setting, or ``disable_created_metrics()``): the plain families follow it too."""
    return bool(getattr(_client_metrics, "_use_created", True))


class _PlainFamily(Collector):
    """A family of plain numbers keyed by label values (``()`` without labels), registered on
    ``registry`` as its own collector, so that it is exposed where prometheus_client's metric of
    the same name was. Updated from the event loop only (the call events); a scrape copies."""

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._start()
        registry.register(self)

    def _start(self) -> None:
        """The family's numbers before any update (its kind's)."""

    def describe(self) -> Iterable[Metric]:
        return [Metric(self.name, self.documentation, self.kind)]

    def labels(self, values: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self.labelnames, values, strict=True))


class _PlainKeyed(_PlainFamily):
    """A family of one number per label set (counters and gauges): ``inc`` adds to it.

    Each number is the one cell (a C double) of an array made with its label set, not a
    number object in the dict: each update made a new int or float kept until the next, and
    the last ones, made at the end of a burst of calls, were alive long after it in the arenas
    the burst took, which Python's allocator then could not give back (docs/performance.md,
    Round 8: idle). Exact for counts up to 2**53."""

    def _start(self) -> None:
        self.values: dict[tuple[str, ...], array[float]] = {}
        if not self.labelnames:
            # A family without labels has its one number from the start, as prometheus_client's.
            self._first((), 0)

    def inc(self, key: tuple[str, ...] = (), amount: int | float = 1) -> None:
        cell = self.values.get(key)
        if cell is not None:
            cell[0] += amount
        else:
            self._first(key, amount)

    def _first(self, key: tuple[str, ...], amount: int | float) -> None:
        """A label set's first update."""
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: labels {self.labelnames}, got {key}")
        self.values[key] = array("d", (amount,))

    def value(self, key: tuple[str, ...] = ()) -> float:
        cell = self.values.get(key)
        return 0.0 if cell is None else cell[0]


class PlainCounter(_PlainKeyed):
    """A counter: the samples of prometheus_client's ``Counter`` (``_total``, and ``_created``:
    when the family was made, or a label set first counted)."""

    kind = "counter"

    def _start(self) -> None:
        self.created: dict[tuple[str, ...], float] = {}
        super()._start()

    def _first(self, key: tuple[str, ...], amount: int | float) -> None:
        super()._first(key, amount)
        self.created[key] = time.time()

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        created = _created_enabled()
        total = self.name + "_total"
        for key, cell in list(self.values.items()):
            labels = self.labels(key)
            metric.add_sample(total, labels, cell[0])
            if created:
                metric.add_sample(self.name + "_created", dict(labels), self.created[key])
        return [metric]


class PlainGauge(_PlainKeyed):
    """A gauge: the samples of prometheus_client's ``Gauge`` (a label set appears once
    first changed; a family without labels shows 0 from the start)."""

    kind = "gauge"

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        for key, cell in list(self.values.items()):
            metric.add_sample(self.name, self.labels(key), cell[0])
        return [metric]


class PlainHistogram(_PlainFamily):
    """A histogram without labels: the samples of prometheus_client's ``Histogram``
    (cumulative ``_bucket`` per bound and ``+Inf``, ``_count``, ``_sum``, ``_created``)."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Iterable[float],
        *,
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name, documentation, registry=registry)
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets not in order")
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self._les = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]
        # Per bucket, not cumulative; the counts and the sum in arrays made here, not number
        # objects made by each observation (see _PlainKeyed).
        self.counts = array("q", bytes(8 * len(bounds)))
        self._sum = array("d", (0.0,))
        self.created = time.time()

    @property
    def sum(self) -> float:
        return self._sum[0]

    def observe(self, amount: float) -> None:
        self._sum[0] += amount
        # The first bound at or above the amount (none for NaN, which Histogram counts in no
        # bucket either).
        if amount == amount:
            self.counts[bisect.bisect_left(self.bounds, amount)] += 1

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self.name, self.documentation, self.kind)
        acc = 0.0
        bucket = self.name + "_bucket"
        for le, count in zip(self._les, list(self.counts), strict=True):
            acc += count
            metric.add_sample(bucket, {"le": le}, acc)
        metric.add_sample(self.name + "_count", {}, acc)
        if self.bounds[0] >= 0:
            metric.add_sample(self.name + "_sum", {}, self.sum)
        if _created_enabled():
            metric.add_sample(self.name + "_created", {}, self.created)
        return [metric]


class BridgeCollector(Collector):
    """The families read at scrape time from the parts of a running bridge; a part that is not
    there (None; no relay in pass-through mode; no call records) leaves its families empty.

    * ``engine`` (:class:`~sbc.net.engine.SipEngine`): ``stats.messages`` (a dict the engine
      increments per message: the only hot-path cost), ``stats.retransmissions``, and the
      transaction layer's size;
    * ``bridge`` (:class:`~sbc.b2bua.calls.CallManager`): ``reachability`` of Retell and
      ``events.dropped``;
    * ``media``: a relay backend's ``counters()`` and ``pool``;
    * ``records``: the call records writer's ``written`` and ``failed`` (and ``dropped``, if it
      counts its own).
    """

    def __init__(self) -> None:
        self.engine: Any = None
        self.bridge: Any = None
        self.media: Any = None
        self.records: Any = None

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families(fill=True))

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        yield from self._sip(fill)
        yield from self._guard(fill)
        yield from self._rtp(fill)
        yield from self._limits(fill)
        yield from self._peers_and_records(fill)
        yield from self._tables(fill)

    def _sip(self, fill: bool) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sbc_sip_requests",
            "SIP requests received (in) and sent (out), retransmissions included, by method",
            labels=["direction", "method", "transport"],
        )
        responses = CounterMetricFamily(
            "sbc_sip_responses",
            "SIP responses received (in) and sent (out), retransmissions included, by status",
            labels=["direction", "status", "transport"],
        )
        retransmissions = CounterMetricFamily(
            "sbc_sip_retransmissions",
            "SIP messages sbc sent again for want of an answer (requests on Timers A/E, final "
            "responses on Timer G, a 2xx until its ACK)",
        )
        transactions = GaugeMetricFamily(
            "sbc_sip_transactions", "SIP transactions in progress (client and server)"
        )
        engine = self.engine
        if fill and engine is not None:
            for (direction, what, transport), count in list(engine.stats.messages.items()):
                if isinstance(what, int):
                    responses.add_metric([direction, str(what), transport], count)
                else:
                    requests.add_metric([direction, what, transport], count)
            retransmissions.add_metric([], engine.stats.retransmissions)
            transactions.add_metric([], len(engine.layer))
        yield from (requests, responses, retransmissions, transactions)

    def _guard(self, fill: bool) -> Iterator[Metric]:
        """The edge guard's counters (``engine.guard``, sbc/net/guard.py)."""
        dropped = CounterMetricFamily(
            "sbc_guard_dropped",
            "Datagrams and requests the edge guard dropped unanswered: from an untrusted source "
            "(untrusted), from a banned one (banned), a trusted source's out-of-dialog request "
            "above its rate limit (trusted_rate)",
            labels=["reason"],
        )
        rejected = CounterMetricFamily(
            "sbc_guard_rejected", "Requests from untrusted sources answered 403 (reject mode)"
        )
        refused = CounterMetricFamily(
            "sbc_guard_connections_refused",
            "Inbound TCP/TLS connections closed at once: untrusted (drop mode) or banned source",
        )
        bans = CounterMetricFamily(
            "sbc_guard_bans", "Untrusted sources banned for exceeding security.rate_limit"
        )
        banned = GaugeMetricFamily("sbc_guard_banned", "Sources banned right now")
        tracked = GaugeMetricFamily(
            "sbc_guard_sources", "Source addresses the guard tracks (at most max_sources)"
        )
        limited = CounterMetricFamily(
            "sbc_guard_new_calls_limited",
            "New INVITEs answered 503 with Retry-After for the global new-call rate cap",
        )
        guard = getattr(self.engine, "guard", None)
        if fill and guard is not None:
            stats = guard.stats
            dropped.add_metric(["untrusted"], stats.dropped_untrusted)
            dropped.add_metric(["banned"], stats.dropped_banned)
            dropped.add_metric(["trusted_rate"], stats.dropped_trusted_rate)
            rejected.add_metric([], stats.rejected)
            refused.add_metric([], stats.connections_refused)
            bans.add_metric([], stats.bans)
            banned.add_metric([], guard.banned())
            tracked.add_metric([], guard.tracked)
            limited.add_metric([], stats.new_calls_limited)
        yield from (dropped, rejected, refused, bans, banned, tracked, limited)

    def _rtp(self, fill: bool) -> Iterator[Metric]:
        packets = CounterMetricFamily(
            "sbc_rtp_packets",
            "RTP and RTCP packets the relay received from each side (a: the caller's leg, "
            "b: the far leg), ended and live calls",
            labels=["side", "stream"],
        )
        size = CounterMetricFamily(
            "sbc_rtp_bytes",
            "Bytes of the RTP and RTCP packets the relay received from each side",
            labels=["side", "stream"],
        )
        in_use = GaugeMetricFamily("sbc_rtp_ports_in_use", "RTP and RTCP ports held by calls")
        capacity = GaugeMetricFamily("sbc_rtp_ports_capacity", "RTP and RTCP ports of the pool")
        counters = getattr(self.media, "counters", None)
        pool = getattr(self.media, "pool", None)
        if fill and counters is not None:
            for (side, stream), (count, total) in sorted(counters().items()):
                packets.add_metric([side, stream], count)
                size.add_metric([side, stream], total)
        if fill and pool is not None:
            in_use.add_metric([], 2 * pool.in_use)  # pairs: RTP and RTCP
            capacity.add_metric([], 2 * pool.capacity)
        yield from (packets, size, in_use, capacity)

    def _limits(self, fill: bool) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "sbc_limit_hits",
            "Messages, connections and calls refused by a configured limit, by limit: headers, "
            "via, uri (parse-time limits), message_size, connections, connections_per_source, "
            "read_timeout (a stream message not finished in time), transactions_per_source, "
            "calls_per_source",
            labels=["limit"],
        )
        large = CounterMetricFamily(
            "sbc_sip_large_requests",
            "Requests over 1300 bytes to a UDP peer sent over TCP first (RFC 3261 §18.1.1): "
            "tcp counts the attempts, udp_fallback those sent over UDP after TCP failed",
            labels=["outcome"],
        )
        dropped = CounterMetricFamily(
            "sbc_rtp_dropped",
            "RTP and RTCP packets the relay dropped on the sockets facing each side, by reason: "
            "foreign_source (not the latched source after the learning window), no_route (the "
            "call has no address on the other side yet)",
            labels=["side", "reason"],
        )
        kernel = CounterMetricFamily(
            "sbc_udp_kernel_drops",
            "UDP datagrams the host's kernel dropped (all processes; Linux /proc/net/snmp and "
            "snmp6): no_port (to a port nobody holds, such as an RTP port of no call), "
            "rcvbuf (a socket's receive buffer was full)",
            labels=["reason"],
        )
        engine = self.engine
        transports = getattr(engine, "transports", None)
        if fill and engine is not None and transports is not None:
            transport = transports.stats
            counts = dict(transport.limit_exceeded)
            counts["message_size"] = transport.oversized
            counts["read_timeout"] = transport.read_timeouts
            counts["transactions_per_source"] = engine.stats.transactions_refused
            bridge = self.bridge
            if bridge is not None:
                counts["calls_per_source"] = getattr(bridge, "refused_per_source", 0)
            for limit, count in sorted(counts.items()):
                hits.add_metric([limit], count)
            large.add_metric(["tcp"], engine.stats.large_over_tcp)
            large.add_metric(["udp_fallback"], engine.stats.large_tcp_fallbacks)
        drops = getattr(self.media, "drops", None)
        if fill and drops is not None:
            for (side, reason), count in sorted(drops().items()):
                dropped.add_metric([side, reason], count)
        if fill:
            for reason, count in kernel_udp_drops().items():
                kernel.add_metric([reason], count)
        yield from (hits, large, dropped, kernel)

    def _peers_and_records(self, fill: bool) -> Iterator[Metric]:
        reachable = GaugeMetricFamily(
            "sbc_retell_reachable",
            "1 while Retell answers sbc's INVITEs (any response), 0 after one ended in a "
            "transport failure or timeout, until Retell answers again",
        )
        dropped_events = CounterMetricFamily(
            "sbc_call_events_dropped",
            "Call events dropped because an observer (call records, metrics) fell behind",
        )
        written = CounterMetricFamily("sbc_call_records_written", "Call records written")
        dropped = CounterMetricFamily(
            "sbc_call_records_dropped",
            "Call records lost: the write failed (write_failed) or the writer's queue was full "
            "(queue_full)",
            labels=["reason"],
        )
        bridge = self.bridge
        if fill and bridge is not None:
            retell = _retell_reachability(bridge)
            if retell is not None:
                reachable.add_metric([], 1 if retell.reachable else 0)
            dropped_events.add_metric([], bridge.events.dropped)
        records = self.records
        if fill and records is not None:
            written.add_metric([], records.written)
            dropped.add_metric(["write_failed"], records.failed)
            dropped.add_metric(["queue_full"], getattr(records, "dropped", 0))
        yield from (reachable, dropped_events, written, dropped)

    def _tables(self, fill: bool) -> Iterator[Metric]:
        # What must return to zero once calls and their transaction timers have ended (the
        # soak, bench/soak.py, reads these): dialogs and stream connections, and the size of
        # every per-call or per-request table, so a leak names the table it is in.
        dialogs = GaugeMetricFamily("sbc_sip_dialogs", "SIP dialogs held by calls in progress")
        connections = GaugeMetricFamily(
            "sbc_sip_connections", "TCP and TLS connections open (inbound and outbound)"
        )
        entries = GaugeMetricFamily(
            "sbc_table_entries",
            "Entries of sbc's per-call and per-request tables (0 once idle; transaction_timers "
            "once the longest transaction timer has run out)",
            labels=["table"],
        )
        transports = getattr(self.engine, "transports", None)
        engine_tables = getattr(self.engine, "table_sizes", None)
        bridge_tables = getattr(self.bridge, "table_sizes", None)
        if fill and transports is not None:
            connections.add_metric([], transports.connection_count)
        if fill and engine_tables is not None:
            for table, size in engine_tables().items():
                entries.add_metric([table], size)
        if fill and bridge_tables is not None:
            dialogs.add_metric([], self.bridge.dialogs)
            for table, size in bridge_tables().items():
                entries.add_metric([table], size)
        sessions = getattr(self.media, "sessions", None)
        if fill and sessions is not None:
            entries.add_metric(["media_sessions"], len(sessions))
        yield from (dialogs, connections, entries)


_SNMP_FILES = (("/proc/net/snmp", "Udp:"), ("/proc/net/snmp6", "Udp6"))


def kernel_udp_drops(files: tuple[tuple[str, str], ...] = _SNMP_FILES) -> dict[str, int]:
    """The kernel's UDP NoPorts and RcvbufErrors counters, IPv4 and IPv6 summed; empty where
    the files do not exist (not Linux)."""
    totals: dict[str, int] = {}
    names = {"NoPorts": "no_port", "RcvbufErrors": "rcvbuf"}
    for path, prefix in files:
        try:
            with open(path, encoding="ascii") as handle:
                lines = handle.read().splitlines()
        except OSError:
            continue
        if prefix == "Udp:":
            # Two lines: "Udp: Name Name ..." then "Udp: value value ...".
            rows = [line.split()[1:] for line in lines if line.startswith(prefix)]
            pairs = zip(rows[0], rows[1], strict=False) if len(rows) >= 2 else iter(())
        else:
            # One "Udp6NoPorts   123" per line.
            pairs = (
                (fields[0][len(prefix) :], fields[1])
                for fields in (line.split() for line in lines)
                if len(fields) == 2 and fields[0].startswith(prefix)
            )
        for name, value in pairs:
            label = names.get(name)
            if label is not None and value.isdigit():
                totals[label] = totals.get(label, 0) + int(value)
    return totals


def _retell_reachability(bridge: Any) -> Any:
    """The call manager's view of Retell (``reachability``, keyed by peer), if it keeps one."""
    for peer, state in getattr(bridge, "reachability", {}).items():
        if getattr(peer, "value", peer) == "retell":
            return state
    return None
