"""The limit families of the metrics endpoint: every limit hit by name, large requests over
TCP, the relay's drops by reason, and the kernel's UDP drop counters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from sbc.net.engine import EngineStats
from sbc.net.transport import TransportStats
from sbc.ops.metrics import Metrics, kernel_udp_drops


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }


class FakeRelay:
    pool = SimpleNamespace(in_use=0, capacity=10)

    def counters(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {}

    def drops(self) -> dict[tuple[str, str], int]:
        return {("a", "foreign_source"): 5000, ("b", "no_route"): 2}


def test_every_limit_hit_is_a_labelled_counter() -> None:
    transport = TransportStats(oversized=2, read_timeouts=3)
    for limit in ("headers", "via", "via", "uri", "connections", "connections_per_source"):
        transport.count_limit(limit)
    engine_stats = EngineStats(transactions_refused=4, large_over_tcp=6, large_tcp_fallbacks=1)
    engine = SimpleNamespace(
        stats=engine_stats,
        layer=[],
        transports=SimpleNamespace(stats=transport, connection_count=0),
    )
    bridge = SimpleNamespace(
        refused_per_source=7, events=SimpleNamespace(dropped=0), reachability={}
    )
    metrics = Metrics()
    metrics.watch(engine=engine, bridge=bridge, media=FakeRelay())
    got = samples(metrics)
    hits = {
        dict(labels)["limit"]: count
        for (name, labels), count in got.items()
        if name == "sbc_limit_hits_total"
    }
    assert hits == {
        "headers": 1,
        "via": 2,
        "uri": 1,
        "connections": 1,
        "connections_per_source": 1,
        "message_size": 2,
        "read_timeout": 3,
        "transactions_per_source": 4,
        "calls_per_source": 7,
    }
    assert got[("sbc_sip_large_requests_total", (("outcome", "tcp"),))] == 6
    assert got[("sbc_sip_large_requests_total", (("outcome", "udp_fallback"),))] == 1
    dropped = "sbc_rtp_dropped_total"
    assert got[(dropped, (("reason", "foreign_source"), ("side", "a")))] == 5000
    assert got[(dropped, (("reason", "no_route"), ("side", "b")))] == 2


def test_kernel_udp_drops_read_from_snmp_files(tmp_path: Path) -> None:
    snmp = tmp_path / "snmp"
    snmp.write_text(
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n"
        "Udp: 100 17 0 90 3\n"
    )
    snmp6 = tmp_path / "snmp6"
    snmp6.write_text("Udp6InDatagrams \t5\nUdp6NoPorts \t4\nUdp6RcvbufErrors \t1\n")
    files = ((str(snmp), "Udp:"), (str(snmp6), "Udp6"), (str(tmp_path / "absent"), "Udp:"))
    assert kernel_udp_drops(files) == {"no_port": 21, "rcvbuf": 4}
    assert kernel_udp_drops(()) == {}
