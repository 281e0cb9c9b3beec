"""Prometheus metrics of one running bridge.

Every metric lives in the :class:`Metrics` object's own ``CollectorRegistry``: two bridges in one
process (tests do that) never share a counter, and nothing is registered in prometheus-client's
global default registry. The object is built once by the service (:mod:`sbc.ops.service`) and
handed to whoever updates it.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from sbc.b2bua.events import CallEnded, CallEvent, CallRecord, CallRefused, CallStarted

__all__ = ["CONTENT_TYPE", "Metrics", "failure_label"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Answered-call durations, seconds: from a short test call to a long support conversation.
DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0, 7200.0)


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
        self.calls_active = Gauge(
            "sbc_calls_active", "Calls in progress through the bridge", registry=self.registry
        )
        self.calls_started = Counter(
            "sbc_calls_started", "Calls the PBX offered to the bridge", registry=self.registry
        )
        self.calls_ended = Counter(
            "sbc_calls_ended",
            "Finished calls, by whether Retell answered them",
            ["outcome"],
            registry=self.registry,
        )
        self.calls_refused = Counter(
            "sbc_calls_refused",
            "INVITEs refused before a call was set up, by status sent",
            ["status"],
            registry=self.registry,
        )
        self.transfers = Counter(
            "sbc_transfers",
            "Transfers the agent asked for, by mode (refer, invite) and outcome (transferred, "
            "failed, refused, aborted)",
            ["mode", "outcome"],
            registry=self.registry,
        )
        self.call_duration = Histogram(
            "sbc_call_duration_seconds",
            "Duration of answered calls, answer to hang-up",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    # -- the registration driver's observer protocol ---------------------------------------------
    def set_registered(self, value: bool) -> None:
        self.registered.set(1 if value else 0)

    def register_attempted(self) -> None:
        self.register_attempts.inc()

    def register_failed(self, status: int | None, reason: str) -> None:
        self.register_failures.labels(reason=failure_label(status, reason)).inc()

    # -- call events (sbc.b2bua.events), delivered off the call path ---------------------------
    def on_call_event(self, event: CallEvent) -> None:
        if isinstance(event, CallStarted):
            self.call_started(event.call_uuid)
        elif isinstance(event, CallEnded):
            self.call_ended(event.record)
        elif isinstance(event, CallRefused):
            self.call_refused(event.status)

    def call_started(self, call_uuid: str) -> None:
        self.calls_started.inc()
        self.calls_active.inc()

    def call_ended(self, record: CallRecord) -> None:
        self.calls_active.dec()
        answered = record.answered is not None
        self.calls_ended.labels(outcome="answered" if answered else "unanswered").inc()
        if record.answered is not None:
            self.call_duration.observe(max(0.0, record.ended - record.answered))
        for transfer in record.transfers:
            self.transfers.labels(mode=transfer.mode, outcome=transfer.outcome).inc()

    def call_refused(self, status: int) -> None:
        self.calls_refused.labels(status=str(status)).inc()

    # -- exposition ------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric of this bridge."""
        return generate_latest(self.registry)
