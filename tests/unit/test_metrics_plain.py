"""The call families are plain numbers (PlainCounter, PlainGauge, PlainHistogram): their
exposition must be byte for byte what prometheus_client's Counter, Gauge and Histogram write
for the same updates, so dashboards and alerts see no change."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as client_metrics
from prometheus_client.exposition import generate_latest

from sbc.b2bua.events import CallEnded, CallEvent, CallRecord, CallRefused, CallStarted
from sbc.b2bua.transfer import TransferRecord
from sbc.ops.metrics import (
    DURATION_BUCKETS,
    SETUP_BUCKETS,
    Metrics,
    PlainCounter,
    PlainGauge,
    PlainHistogram,
)


class Reference:
    """The call families as they were: prometheus_client objects, updated as Metrics did."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.calls_active = Gauge(
            "sbc_calls_active", "Calls in progress through the bridge", registry=r
        )
        self.calls_started = Counter(
            "sbc_calls_started", "Calls the PBX offered to the bridge", registry=r
        )
        self.calls_ended = Counter(
            "sbc_calls_ended",
            "Finished calls, by whether Retell answered them",
            ["outcome"],
            registry=r,
        )
        self.calls_refused = Counter(
            "sbc_calls_refused",
            "INVITEs refused before a call was set up, by status sent",
            ["status"],
            registry=r,
        )
        self.transfers = Counter(
            "sbc_transfers",
            "Transfers the agent asked for, by mode (refer, invite) and outcome (transferred, "
            "failed, refused, aborted)",
            ["mode", "outcome"],
            registry=r,
        )
        self.call_duration = Histogram(
            "sbc_call_duration_seconds",
            "Duration of answered calls, answer to hang-up",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.call_setup = Histogram(
            "sbc_call_setup_seconds",
            "Time from the INVITE received to the call answered (answered calls)",
            buckets=SETUP_BUCKETS,
            registry=r,
        )
        self.route_calls_started = Counter(
            "sbc_route_calls_started",
            "Calls the route took (from the PBX to its extension, or from Retell)",
            ["route"],
            registry=r,
        )
        self.route_calls_active = Gauge(
            "sbc_route_calls_active", "Calls in progress on the route", ["route"], registry=r
        )
        self.route_calls_ended = Counter(
            "sbc_route_calls_ended",
            "Finished calls of the route, by whether the far end answered them",
            ["route", "outcome"],
            registry=r,
        )

    def on_call_event(self, event: CallEvent) -> None:
        if isinstance(event, CallStarted):
            self.calls_started.inc()
            self.calls_active.inc()
            if event.route:
                self.route_calls_started.labels(event.route).inc()
                self.route_calls_active.labels(event.route).inc()
        elif isinstance(event, CallEnded):
            record = event.record
            self.calls_active.dec()
            outcome = "answered" if record.answered is not None else "unanswered"
            if record.route:
                self.route_calls_active.labels(record.route).dec()
                self.route_calls_ended.labels(record.route, outcome).inc()
            self.calls_ended.labels(outcome).inc()
            if record.answered is not None:
                self.call_duration.observe(max(0.0, record.ended - record.answered))
                self.call_setup.observe(max(0.0, record.answered - record.started))
            for transfer in record.transfers:
                self.transfers.labels(transfer.mode, transfer.outcome).inc()
        elif isinstance(event, CallRefused):
            self.calls_refused.labels(str(event.status)).inc()


def ended(
    route: str, answered: float | None, ended_at: float, *transfers: TransferRecord
) -> CallEnded:
    return CallEnded(
        CallRecord(
            call_uuid="u",
            pbx_call_id="p",
            retell_call_id="r",
            caller="+1",
            called="101",
            started=100.0,
            answered=answered,
            ended=ended_at,
            pbx_status=200,
            retell_status=200,
            end_reason="bye",
            transfers=transfers,
            route=route,
        )
    )


# Durations and setup times on and between bucket bounds, zero, huge, and a clock that went back.
EVENTS: list[CallEvent] = [
    CallStarted("a", route="sales"),
    CallStarted("b", route="support"),
    CallStarted("c"),
    CallRefused(503),
    ended("sales", 100.1, 105.0),  # setup on the 0.1 bound, duration on the 5 bound
    ended("support", None, 101.0),
    CallStarted("d", route="sales"),
    CallRefused(403),
    CallRefused(503),
    ended("", 103.3, 99.0, TransferRecord("800", "invite", "transferred", 200, 4.2)),
    ended(
        "sales",
        190.0,
        9000.0,
        TransferRecord("800", "refer", "failed", 486, None),
        TransferRecord("801", "invite", "transferred", 200, 1.0),
    ),
    CallStarted("e", route="support"),
    ended("support", 100.0, 100.0),
]


CALL_FAMILIES = (
    "sbc_calls_active",
    "sbc_calls_started",
    "sbc_calls_ended",
    "sbc_calls_refused",
    "sbc_transfers",
    "sbc_call_duration_seconds",
    "sbc_call_setup_seconds",
    "sbc_route_calls_started",
    "sbc_route_calls_active",
    "sbc_route_calls_ended",
)


def call_lines(text: bytes) -> list[str]:
    """The lines of the call families, in their order (HELP, TYPE and samples)."""
    out = []
    for line in text.decode().splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0].split(" ")[0]
        if any(name == f or name.startswith(f + "_") for f in CALL_FAMILIES):
            out.append(line)
    return out


@pytest.mark.parametrize("created", [True, False])
def test_metrics_expose_the_call_families_as_prometheus_client_did(
    monkeypatch: pytest.MonkeyPatch, created: bool
) -> None:
    monkeypatch.setattr(client_metrics, "_use_created", created)
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)
    ours, reference = Metrics(), Reference()
    for i, event in enumerate(EVENTS):
        # A child first used at event i was created then, in both.
        monkeypatch.setattr(time, "time", lambda i=i: 1_700_000_100.5 + i)
        ours.on_call_event(event)
        reference.on_call_event(event)
    got = call_lines(ours.render())
    want = call_lines(generate_latest(reference.registry))
    assert len(want) > 60
    assert got == want
    assert any("_created" in line for line in want) is created


def test_the_call_families_keep_their_place_among_the_others() -> None:
    # The families' order as prometheus_client's own objects gave it (a4c21fe).
    types = [
        line.split()[2]
        for line in Metrics().render().decode().splitlines()
        if line.startswith("# TYPE ")
    ]
    assert types[:20] == [
        "sbc_registered",
        "sbc_register_attempts_total",
        "sbc_register_attempts_created",
        "sbc_register_failures_total",
        "sbc_calls_active",
        "sbc_calls_started_total",
        "sbc_calls_started_created",
        "sbc_calls_ended_total",
        "sbc_calls_refused_total",
        "sbc_transfers_total",
        "sbc_call_duration_seconds",
        "sbc_call_duration_seconds_created",
        "sbc_call_setup_seconds",
        "sbc_call_setup_seconds_created",
        "sbc_route_registered",
        "sbc_route_register_failures_total",
        "sbc_route_calls_started_total",
        "sbc_route_calls_active",
        "sbc_route_calls_ended_total",
        "sbc_build_info",
    ]


def test_plain_families_count_as_the_client_library_does() -> None:
    registry = CollectorRegistry()
    counter = PlainCounter("x_things", "things", ["kind"], registry=registry)
    counter.inc(("a",))
    counter.inc(("a",), 2)
    assert counter.value(("a",)) == 3.0
    assert counter.value(("b",)) == 0.0
    with pytest.raises(ValueError, match="labels"):
        counter.inc(("a", "b"))
    gauge = PlainGauge("x_level", "level", registry=registry)
    gauge.inc((), -2)
    assert gauge.value() == -2.0
    with pytest.raises(ValueError, match="labels"):
        PlainGauge("x_by", "by", ["k"], registry=registry).inc(())
    histogram = PlainHistogram("x_seconds", "s", (1.0, 2.0), registry=registry)
    for amount in (0.5, 1.0, 1.5, 2.0, 3.0, math.nan):
        histogram.observe(amount)
    assert list(histogram.counts) == [2, 2, 1]  # NaN in no bucket, as Histogram does
    assert math.isnan(histogram.sum)
    with pytest.raises(ValueError, match="order"):
        PlainHistogram("x_bad", "bad", (2.0, 1.0), registry=registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PlainCounter("x_things", "again", registry=registry)
