"""The metrics the call events feed: parsed back with prometheus_client's own text parser."""

from __future__ import annotations

import dataclasses
from ipaddress import ip_network
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from sbc.b2bua.events import CallEnded, CallRecord, CallRefused, CallStarted
from sbc.b2bua.transfer import TransferRecord
from sbc.net.guard import Guard, GuardConfig
from sbc.ops.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def record(*transfers: TransferRecord, answered: float | None = 10.0) -> CallRecord:
    return CallRecord(
        call_uuid="u",
        pbx_call_id="p",
        retell_call_id="r",
        caller="+1",
        called="101",
        started=0.0,
        answered=answered,
        ended=70.0,
        pbx_status=200,
        retell_status=200,
        end_reason="transferred",
        transfers=transfers,
    )


def test_call_events_are_counted() -> None:
    metrics = Metrics()
    metrics.on_call_event(CallStarted("u1"))
    metrics.on_call_event(CallStarted("u2"))
    metrics.on_call_event(CallRefused(403))
    ok = TransferRecord("800", "invite", "transferred", 200, 4.2)
    busy = TransferRecord("800", "refer", "failed", 486, None)
    metrics.on_call_event(CallEnded(record(busy, ok)))
    metrics.on_call_event(CallEnded(record(answered=None)))
    got = samples(metrics)
    assert got[("sbc_calls_started_total", ())] == 2
    assert got[("sbc_calls_active", ())] == 0
    assert got[("sbc_calls_refused_total", (("status", "403"),))] == 1
    assert got[("sbc_calls_ended_total", (("outcome", "answered"),))] == 1
    assert got[("sbc_calls_ended_total", (("outcome", "unanswered"),))] == 1
    assert got[("sbc_transfers_total", (("mode", "invite"), ("outcome", "transferred")))] == 1
    assert got[("sbc_transfers_total", (("mode", "refer"), ("outcome", "failed")))] == 1
    assert got[("sbc_call_duration_seconds_sum", ())] == 60.0


def test_edge_guard_counters_are_read_when_scraped() -> None:
    now = [0.0]
    guard = Guard(
        GuardConfig(trusted=(ip_network("10.0.0.0/8"),), rate_limit=2), clock=lambda: now[0]
    )
    for _ in range(5):
        guard.admit_datagram("192.0.2.1")  # 2 dropped as untrusted, then a ban: 3 as banned
    guard.admit_connection("192.0.2.1")
    metrics = Metrics()
    stats = SimpleNamespace(messages={}, retransmissions=0)
    metrics.watch(engine=SimpleNamespace(guard=guard, stats=stats, layer=()))
    got = samples(metrics)
    assert got[("sbc_guard_dropped_total", (("reason", "untrusted"),))] == 2
    assert got[("sbc_guard_dropped_total", (("reason", "banned"),))] == 4
    assert got[("sbc_guard_dropped_total", (("reason", "trusted_rate"),))] == 0
    assert got[("sbc_guard_bans_total", ())] == 1
    assert got[("sbc_guard_banned", ())] == 1
    assert got[("sbc_guard_connections_refused_total", ())] == 1
    assert got[("sbc_guard_sources", ())] == 1
    assert got[("sbc_guard_rejected_total", ())] == 0
    assert got[("sbc_guard_new_calls_limited_total", ())] == 0


def test_route_counters_stay_apart_over_many_calls() -> None:
    """Each route and outcome has its own children, however many events updated them."""
    metrics = Metrics()
    for i in range(3):
        metrics.on_call_event(CallStarted(f"a{i}", route="sales"))
    metrics.on_call_event(CallStarted("b0", route="support"))
    for i in range(2):
        done = record(answered=None if i else 10.0)
        metrics.on_call_event(
            CallEnded(dataclasses.replace(done, call_uuid=f"a{i}", route="sales"))
        )
    metrics.on_call_event(CallRefused(503))
    metrics.on_call_event(CallRefused(503))
    got = samples(metrics)
    assert got[("sbc_route_calls_started_total", (("route", "sales"),))] == 3
    assert got[("sbc_route_calls_started_total", (("route", "support"),))] == 1
    assert got[("sbc_route_calls_active", (("route", "sales"),))] == 1
    assert got[("sbc_route_calls_active", (("route", "support"),))] == 1
    ended = "sbc_route_calls_ended_total"
    assert got[(ended, (("outcome", "answered"), ("route", "sales")))] == 1
    assert got[(ended, (("outcome", "unanswered"), ("route", "sales")))] == 1
    assert got[("sbc_calls_ended_total", (("outcome", "answered"),))] == 1
    assert got[("sbc_calls_refused_total", (("status", "503"),))] == 2
    assert got[("sbc_calls_active", ())] == 2
