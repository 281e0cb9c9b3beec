"""bench/load.py's targets table: each target of issue 12 judged at its boundary from the figures
of a run (no SIPp here: the figures are made up, the verdicts are what the lead reads)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.scripts import bench_script


@pytest.fixture(scope="module")
def load() -> ModuleType:
    return bench_script("load.py", "bench_load")


def ramped(out: str, rate: float | None, **figures: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "sbc_out": out,
        "steps": 3,
        "max_rate": rate,
        "first_failed_rate": None if rate is None else rate * 1.2,
        "cpu_ms_per_call": 0.5,
        "half_rate": None if rate is None else rate / 2,
        "half_post_dial_ms_p99": 6.0,
        "half_post_dial_added_ms_p99": 1.0,
    }
    return summary | figures


def memory(retained: float, over: float | None, passed: bool = True) -> dict[str, Any]:
    return {
        "calls": 3000,
        "passed": passed,
        "linger_s": 40.0,
        "rss_kib_retained_per_call": retained,
        "rss_after_linger_over_idle": over,
    }


def hold(calls: int, kib: float, passed: bool = True) -> dict[str, Any]:
    return {"calls": calls, "passed": passed, "rss_kib_per_held_call": kib}


def relay(capacity: dict[str, int | None], steps: tuple[int, ...] = (500, 750)) -> dict[str, Any]:
    return {"steps": list(steps), "capacity": capacity, "results": [], "quiet_busy": 25.0}


def verdicts(load: ModuleType, **kwargs: Any) -> list[bool | None]:
    arguments: dict[str, Any] = {
        "summaries": {},
        "holds": {},
        "memories": {},
        "relay": None,
        "baseline": True,
        "sbc_in": "udp",
    }
    found = load.targets(**(arguments | kwargs))
    assert len(found) == 9
    return [t["passed"] for t in found]


def test_nothing_run_is_not_run_rather_than_failed(load: ModuleType) -> None:
    assert verdicts(load) == [None] * 9


@pytest.mark.parametrize(
    ("rate", "cpu", "added_p99", "expected"),
    [
        (1000.0, 0.9, 4.99, [True, True, True]),
        (999.0, 0.5, 1.0, [False, False, True]),  # CPU counts only at a passing rate
        (1200.0, 0.91, 5.0, [True, False, False]),
        (None, None, None, [False, False, None]),  # no step passed
    ],
)
def test_rate_cpu_and_post_dial_targets_at_their_boundaries(
    load: ModuleType,
    rate: float | None,
    cpu: float | None,
    added_p99: float | None,
    expected: list[bool | None],
) -> None:
    summaries = {
        "sbc": ramped("tcp", rate, cpu_ms_per_call=cpu, half_post_dial_added_ms_p99=added_p99)
    }
    assert verdicts(load, summaries=summaries)[:3] == expected


def test_post_dial_target_reads_the_raw_p99_without_a_baseline(load: ModuleType) -> None:
    summaries = {"sbc": ramped("tcp", 1000.0)}  # p99 6 ms raw, 1 ms over the baseline
    assert verdicts(load, summaries=summaries)[2] is True
    assert verdicts(load, summaries=summaries, baseline=False)[2] is False


def test_rate_targets_read_tcp_out_and_compare_udp_with_it(load: ModuleType) -> None:
    udp_only = {"sbc": ramped("udp", 1500.0)}
    assert verdicts(load, summaries=udp_only)[:3] == [None, None, None]
    assert verdicts(load, summaries=udp_only)[6] is None
    both = {"sbc": ramped("tcp", 1000.0), "sbc-udp": ramped("udp", 1000.0)}
    assert verdicts(load, summaries=both)[6] is True
    both["sbc-udp"] = ramped("udp", 800.0)
    assert verdicts(load, summaries=both)[6] is False
    # Sippy's figures never stand in for sbc's.
    assert verdicts(load, summaries={"sippy": ramped("udp", 2000.0)})[0] is None


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (memory(8.0, 1.05), [True, True]),
        (memory(8.01, 1.051), [False, False]),
        (memory(2.0, None), [True, None]),  # no linger: not measured
        (memory(2.0, 1.0, passed=False), [False, False]),  # failed calls fail both
    ],
)
def test_memory_targets(load: ModuleType, phase: dict[str, Any], expected: list[bool]) -> None:
    assert verdicts(load, memories={"sbc": phase})[3:5] == expected


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (hold(20_000, 15.99), True),
        (hold(20_000, 16.0), False),
        (hold(19_999, 10.0), False),
        (hold(20_000, 10.0, passed=False), False),
    ],
)
def test_held_calls_target(load: ModuleType, phase: dict[str, Any], expected: bool) -> None:
    assert verdicts(load, holds={"sbc": phase})[5] is expected


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [
        ({"relay": 500, "rtpengine": 750}, [True, True]),
        ({"relay": 750, "rtpengine": 750}, [True, True]),
        ({"relay": 300, "rtpengine": 750}, [False, False]),
        ({"relay": None, "rtpengine": 500}, [False, False]),
        ({"relay": 500, "rtpengine": None}, [True, True]),  # rtpengine held no step
        ({"relay": 750}, [True, None]),  # nothing to compare with
    ],
)
def test_relay_targets(
    load: ModuleType, capacity: dict[str, int | None], expected: list[bool | None]
) -> None:
    assert verdicts(load, relay=relay(capacity))[7:] == expected


def test_summary_reads_post_dial_at_the_step_run_at_exactly_half(load: ModuleType) -> None:
    def step(rate: float, passed: bool, p99: float) -> dict[str, Any]:
        return {
            "system": "sbc",
            "label": "sbc",
            "sbc_out": "tcp",
            "rate": rate,
            "passed": passed,
            "post_dial_ms_p50": p99 / 2,
            "post_dial_ms_p99": p99,
            "cpu_ms_per_call": 1.0,
            "invite_200_ms_mean": 2.0,
        }

    steps = [step(400, True, 3.0), step(600, True, 9.0), step(800, False, 90.0)]
    nearest = load.summarise("sbc", steps, None, None)
    assert (nearest["half_rate"], nearest["half_rate_exact"]) == (400, False)
    steps.append(step(300, True, 2.0))  # what main() adds after the ramp
    exact = load.summarise("sbc", steps, None, None)
    assert (exact["half_rate"], exact["half_rate_exact"]) == (300, True)
    assert exact["half_post_dial_ms_p99"] == 2.0
    assert (exact["max_rate"], exact["first_failed_rate"], exact["sbc_out"]) == (600, 800, "tcp")


def test_relay_figures_say_when_the_machine_was_busy(load: ModuleType) -> None:
    phase = relay({"relay": 500, "rtpengine": 750}, steps=(500,))
    phase["results"] = [
        {"backend": "direct", "calls": 500, "background": 10.0},
        {"backend": "relay", "calls": 500, "background": 20.0, "lost": 0, "added_p99_us": 60.0},
    ]
    figures = [t["figure"] for t in load.relay_targets(phase)]
    assert figures[0] == "holds 500 calls; 500: lost 0, p99 added 60 us"
    assert "busy" not in figures[1]
    phase["results"][0]["background"] = 180.0
    figures = [t["figure"] for t in load.relay_targets(phase)]
    assert all(f.endswith("(machine busy before a run: 180 % of a core)") for f in figures)
