"""Load test of the bridge with SIPp, side by side with the Sippy B2BUA, on loopback.

Run from the repository root (``sipp`` from Debian ``sip-tester``; ``b2bua_simple`` from PyPI
``sippy`` 2.5.0 for the Sippy side):

    python bench/load.py                       # the full run, both B2BUAs (about 20-25 minutes)
    python bench/load.py --quick --systems sbc # smoke run: a few calls per phase
    python bench/load.py --phases ramp --rates 100,200,400 --step-seconds 30 --json FILE

Each B2BUA sits between SIPp as 3CX and SIPp as Retell, each on a loopback address of its own
(3CX 127.0.0.81, the B2BUA 127.0.0.82, Retell 127.0.0.83), with the scenarios of
``sip-fixtures/load/``:

* sbc: ``python -m sbc run`` (uvloop when installed, as ``sbc run`` picks it), media
  ``passthrough``, log level ``info`` (JSON lines to a file), five X- headers per call, call
  records on (SQLite in the work directory). It registers with SIPp as the 3CX registrar
  (``pbx_registrar.xml``, UDP) and is ready when ``/readyz`` says 200. Calls come in over UDP
  (``--sbc-in tcp`` for TCP) and go out to Retell over TCP, as deployed (``--sbc-out udp``).
* Sippy: ``b2bua_simple -f -l 127.0.0.82 -p PORT -n 127.0.0.83:PORT``, UDP on both sides (it
  has no TCP), started as is (it logs every SIP message to stdout, here to a file).

A call is ``pbx_caller_short.xml`` (INVITE with SDP, 200, ACK, 1 s, BYE, 200) or, to hold
concurrency, ``pbx_caller_long.xml`` (held ``-d`` ms); the far end is ``retell_answerer.xml``
(200 at once, then expects the ACK and the BYE and answers it). A call counts only if both SIPp
ends report it successful: the caller checks the CSeq of both 200s, the answerer waits for the
BYE the B2BUA relays.

Three phases, each B2BUA started afresh for each step (so figures do not carry over), and the
B2BUAs alternated step by step in one run (the machine's drift hits both alike):

1. ``ramp``: after ``--warmup`` calls, ``--rates`` one after the other, each offered for
   ``--step-seconds`` (30 s) of short calls. A step passes when: both SIPp ends exit 0 with
   every offered call successful and none failed, retransmissions (both ends) at most 1 % of
   the calls, the INVITEs left at >= 95 % of the offered rate (first to last INVITE), the mean
   INVITE->200 at the caller <= 100 ms, and the B2BUA still running. A B2BUA stops ramping at
   its first failed step; the highest passed rate is its figure. For each step: the B2BUA's
   CPU (utime+stime of its process from /proc/PID/stat, first measured call to the end of both
   SIPp ends) per successful call, and the post-dial delay it adds: INVITE in to INVITE out,
   from the caller's timestamp just before its INVITE leaves and the answerer's when that call's
   INVITE arrives (SIPp's ``gettimeofday`` action, microseconds, written by a ``<log>`` action;
   calls matched by the X-PBX-Call-ID header sbc renders, or by the Call-ID Sippy keeps). So it
   includes both loopback hops and SIPp's own reaction time, the same for both B2BUAs; with
   ``--baseline`` (on, except with ``--quick``) each rate is also run SIPp to SIPp without a
   B2BUA, and the summary subtracts that run's percentiles.
2. ``hold``: ``--hold-calls`` long calls placed at ``--hold-rate``, each held until all are
   up plus ``--hold-margin`` (20 s). Once the answerer has seen every INVITE (its statistics
   file) and 3 s more, RSS
   of the B2BUA (/proc/PID/status VmRSS) minus its RSS after the warm-up, per held call. Then
   the calls end; every one must succeed at both ends.
3. ``memory``: ``--memory-calls`` short calls at ``--memory-rate``. RSS after the warm-up
   (idle), right after both SIPp ends finished (the calls' transactions still wait out their
   timers: Timer J is 64 x T1 = 32 s), and ``--linger`` s later (40 s: every timer expired).
   Memory retained per completed call = (RSS after - idle) / calls; after the linger, RSS
   against idle.

Prints one line per step and a summary with the ratios sbc/Sippy; ``--json FILE`` writes every
figure. Exit status 0 when every B2BUA passed at least one ramp step and its hold and memory
calls all succeeded; 1 otherwise (logs are then kept in the work directory). Loopback only,
bounded: each SIPp end has a time limit, and every process this script starts is killed with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script: share bench_calls.py's process and
# SIPp plumbing rather than repeat it.
from bench_calls import (
    ALL_HEADERS,
    LOAD_SECURITY,
    LOAD_SIP_LIMITS,
    Child,
    Children,
    cpu_seconds,
    describe_checkout,
    free_port,
    http_get,
    imported_from,
    machine,
    metric_sum,
    parse_metrics,
    peer_sections,
    read_stats,
    rss_mib,
    sbc_environment,
    sipp_binary,
    sipp_command,
    stat,
    wait_listening,
    wait_ready,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCENARIOS = REPO / "sip-fixtures" / "load"

PBX = "127.0.0.81"  # SIPp: 3CX registrar and caller
B2BUA = "127.0.0.82"  # sbc or Sippy
RETELL = "127.0.0.83"  # SIPp: Retell's SIP server
EXTENSION = "101"
RETELL_NUMBER = "+14155550100"
SYSTEMS = ("sbc", "sippy")

# The pass rule of a ramp step (issue 12).
MAX_RETRANS_SHARE = 0.01
MIN_RATE_SHARE = 0.95
MAX_MEAN_INVITE_200_MS = 100.0

DEFAULT_RATES = "50,100,200,300,400,500,600,800,1000,1200,1500,2000"


# --------------------------------------------------------------------------- SIPp runs


@dataclass
class Sipp:
    child: Child
    directory: Path

    @property
    def stat_file(self) -> Path:
        return self.directory / "stat.csv"

    @property
    def log_file(self) -> Path:
        return self.directory / "calls.log"

    def stats(self) -> dict[str, str]:
        return read_stats(self.stat_file)

    def finish(self, limit: float) -> int:
        """Wait for SIPp to end by itself; past ``limit``, stop it (SIGUSR1 writes its
        statistics) and count it as failed."""
        try:
            return self.child.proc.wait(max(limit, 0.1))
        except subprocess.TimeoutExpired:
            code = Children.stop(self.child, signal.SIGUSR1, grace=5.0)
            print(f"    {self.child.name}: still running after {limit:.0f} s, stopped", flush=True)
            return code if code else -1


def start_sipp(
    children: Children,
    name: str,
    scenario: str,
    workdir: Path,
    *,
    local_ip: str,
    port: int,
    transport: str,
    calls: int,
    time_limit: float,
    recv_timeout_ms: int,
    remote: str | None = None,
    extra: Sequence[str] = (),
) -> Sipp:
    directory = workdir / name
    directory.mkdir()
    command = sipp_command(
        SCENARIOS / scenario, directory, local_ip=local_ip, port=port, transport=transport,
        calls=calls, timeout_s=math.ceil(time_limit), remote=remote,
        extra=[
            "-key", "tp", "tcp" if transport.startswith("t") else "udp",
            "-recv_timeout", str(recv_timeout_ms),
            "-trace_logs", "-log_file", str(directory / "calls.log"),
            *extra,
        ],
    )  # fmt: skip
    child = children.start(name, command, cwd=directory, log=directory / "output.log")
    return Sipp(child, directory)


def read_stamps(path: Path) -> Iterator[list[str]]:
    """The lines of a SIPp ``<log>`` file split in words (SIPp prints the numbers of
    ``gettimeofday`` as floats: ``1796574015.000000 843262.000000``)."""
    if not path.exists():
        return
    with path.open(errors="replace") as lines:
        for line in lines:
            words = line.split()
            if words:
                yield words


def _stamp(seconds: str, micros: str) -> float:
    return int(float(seconds)) + int(float(micros)) / 1e6


@dataclass
class CallTimes:
    """Per call, from the two SIPp ends' logs: INVITE sent and 200 received at the caller,
    INVITE received at the answerer (keyed by the caller's Call-ID)."""

    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, caller_log: Path, answerer_log: Path) -> CallTimes:
        times = cls()
        for words in read_stamps(caller_log):
            if words[0] == "invite" and len(words) == 4:
                times.sent.setdefault(words[1], _stamp(words[2], words[3]))
            elif words[0] == "answered" and len(words) == 4:
                times.answered.setdefault(words[1], _stamp(words[2], words[3]))
        for words in read_stamps(answerer_log):
            if words[0] == "invite" and len(words) == 5:
                call_id, pbx_call_id = words[1], words[2]
                key = pbx_call_id if pbx_call_id != "-" else call_id
                times.arrived.setdefault(key, _stamp(words[3], words[4]))
        return times

    def invite_to_200_ms(self) -> list[float]:
        return [1e3 * (t - self.sent[c]) for c, t in self.answered.items() if c in self.sent]

    def post_dial_ms(self) -> list[float]:
        return [1e3 * (t - self.sent[c]) for c, t in self.arrived.items() if c in self.sent]

    def placed_rate(self) -> float | None:
        """Calls per second at which the INVITEs left, first to last."""
        if len(self.sent) < 2:
            return None
        span = max(self.sent.values()) - min(self.sent.values())
        return (len(self.sent) - 1) / span if span > 0 else None


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


# --------------------------------------------------------------------------- the B2BUAs


@dataclass(frozen=True)
class Options:
    python: str
    repo: Path
    sippy: str | None
    sbc_in: str  # "u1" or "t1"
    sbc_out: str  # "tcp" or "udp"
    log_level: str
    warmup: int


def sbc_config(workdir: Path, sip_port: int, registrar: int, retell: int, admin: int,
               options: Options) -> str:  # fmt: skip
    records = workdir / "calls.sqlite3"  # records on, as deployed, but not in /var/lib/sbc
    return f"""\
# bench/load.py: sbc between SIPp as 3CX ({PBX}) and SIPp as Retell ({RETELL})
[sip]
bind = "{B2BUA}"
port = {sip_port}
{LOAD_SIP_LIMITS}

{peer_sections(PBX, registrar, "load", RETELL, retell, options.sbc_out)}
{ALL_HEADERS}
[media]
mode = "passthrough"

{LOAD_SECURITY}
[records]
path = "{records}"

[admin]
listen = "{B2BUA}:{admin}"

[log]
level = "{options.log_level}"
format = "json"
"""


@dataclass
class Bridge:
    """One B2BUA between a fresh SIPp answerer (and, for sbc, registrar)."""

    system: str
    process: Child | None  # None: the caller reaches the answerer directly (the baseline)
    host: str
    sip_port: int
    admin_port: int | None
    answerer: Sipp
    in_transport: str

    def calls_active(self) -> float | None:
        if self.admin_port is None:
            return None
        try:
            status, body = http_get(B2BUA, self.admin_port, "/metrics")
        except OSError:
            return None
        return metric_sum(parse_metrics(body), "sbc_calls_active") if status == 200 else None


def start_bridge(
    system: str,
    children: Children,
    workdir: Path,
    options: Options,
    *,
    answerer_calls: int,
    time_limit: float,
    recv_timeout_ms: int,
) -> Bridge:
    out = "t1" if system == "sbc" and options.sbc_out == "tcp" else "u1"
    retell_port = free_port(RETELL, udp_too=out == "u1")
    answerer = start_sipp(
        children, "answerer", "retell_answerer.xml", workdir,
        local_ip=RETELL, port=retell_port, transport=out, calls=answerer_calls,
        time_limit=time_limit, recv_timeout_ms=recv_timeout_ms,
        extra=("-max_socket", "1000"),
    )  # fmt: skip
    wait_listening(answerer.child, RETELL, retell_port, tcp=out == "t1")
    if system == "direct":
        return Bridge(system, None, RETELL, retell_port, None, answerer, "u1")
    sip_port = free_port(B2BUA)
    if system == "sippy":
        assert options.sippy is not None
        process = children.start(
            "sippy",
            [options.sippy, "-f", "-l", B2BUA, "-p", str(sip_port), "-n",
             f"{RETELL}:{retell_port}"],
            cwd=workdir,
            log=workdir / "sippy.log",
        )  # fmt: skip
        wait_listening(process, B2BUA, sip_port, tcp=False)
        return Bridge(system, process, B2BUA, sip_port, None, answerer, "u1")
    registrar_port = free_port(PBX)
    registrar = start_sipp(
        children, "registrar", "pbx_registrar.xml", workdir,
        local_ip=PBX, port=registrar_port, transport="u1", calls=1,
        time_limit=time_limit, recv_timeout_ms=int(time_limit * 1000),
    )  # fmt: skip
    wait_listening(registrar.child, PBX, registrar_port, tcp=False)
    admin_port = free_port(B2BUA, udp_too=False)
    config = workdir / "sbc.toml"
    config.write_text(
        sbc_config(workdir, sip_port, registrar_port, retell_port, admin_port, options)
    )
    process = children.start(
        "sbc",
        [options.python, "-m", "sbc", "run", "--config", str(config)],
        cwd=workdir,
        log=workdir / "sbc.log",
        env=sbc_environment(options.repo),
    )
    wait_ready(process, admin_port, limit=30.0, host=B2BUA)
    return Bridge(system, process, B2BUA, sip_port, admin_port, answerer, options.sbc_in)


def place_calls(
    bridge: Bridge,
    children: Children,
    workdir: Path,
    name: str,
    *,
    calls: int,
    rate: float,
    long_ms: int | None = None,
    recv_timeout_ms: int = 32_000,
) -> Sipp:
    """SIPp as 3CX placing ``calls`` short calls (or long ones held ``long_ms``) at ``rate``."""
    hold_s = (long_ms if long_ms is not None else 1000) / 1000
    extra = [
        "-s", EXTENSION,
        "-r", f"{rate:g}",
        "-rp", "1000",
        "-l", str(int(rate * (hold_s + 10)) + calls // 10 + 100),
    ]  # fmt: skip
    if long_ms is not None:
        extra += ["-d", str(long_ms)]
    if bridge.in_transport == "t1":
        extra += ["-max_socket", "1000"]
    return start_sipp(
        children,
        name,
        "pbx_caller_long.xml" if long_ms is not None else "pbx_caller_short.xml",
        workdir,
        local_ip=PBX,
        port=free_port(PBX),
        transport=bridge.in_transport,
        calls=calls,
        time_limit=calls / rate + hold_s + 120,
        recv_timeout_ms=recv_timeout_ms,
        remote=f"{bridge.host}:{bridge.sip_port}",
        extra=extra,
    )


def warm_up(bridge: Bridge, children: Children, workdir: Path, calls: int) -> None:
    if calls <= 0:
        return
    rate = min(20.0, float(calls))
    caller = place_calls(bridge, children, workdir, "warmup", calls=calls, rate=rate)
    code = caller.finish(calls / rate + 60)
    stats = caller.stats()
    if code != 0 or stat(stats, "SuccessfulCall(C)") != calls:
        errors = (caller.directory / "errors.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"{bridge.system}: warm-up calls failed (SIPp exit {code}): "
            f"{stat(stats, 'SuccessfulCall(C)')}/{calls} ok\n{errors}\n"
            f"{bridge.process.tail() if bridge.process else ''}"
        )


def ends(caller: Sipp, caller_exit: int, answerer: Sipp, answerer_exit: int, warmup: int,
         offered: int) -> dict[str, Any]:  # fmt: skip
    """Both SIPp ends' counts for the measured calls (the answerer also saw the warm-up)."""
    c, a = caller.stats(), answerer.stats()
    result = {
        "offered": offered,
        "caller_exit": caller_exit,
        "caller_ok": stat(c, "SuccessfulCall(C)"),
        "caller_failed": stat(c, "FailedCall(C)"),
        "caller_retransmissions": stat(c, "Retransmissions(C)"),
        "answerer_exit": answerer_exit,
        "answerer_ok": stat(a, "SuccessfulCall(C)") - warmup,
        "answerer_failed": stat(a, "FailedCall(C)"),
        "answerer_retransmissions": stat(a, "Retransmissions(C)"),
    }
    result["all_ok"] = bool(
        caller_exit == 0
        and answerer_exit == 0
        and result["caller_ok"] == offered
        and result["answerer_ok"] == offered
        and result["caller_failed"] == 0
        and result["answerer_failed"] == 0
    )
    return result


# --------------------------------------------------------------------------- phases


def ramp_step(system: str, rate: float, seconds: float, options: Options, workdir: Path
              ) -> dict[str, Any]:  # fmt: skip
    children = Children()
    calls = max(2, round(rate * seconds))
    limit = calls / rate + 180
    try:
        bridge = start_bridge(
            system, children, workdir, options,
            answerer_calls=options.warmup + calls, time_limit=limit + 60,
            recv_timeout_ms=32_000,
        )  # fmt: skip
        warm_up(bridge, children, workdir, options.warmup)
        pid = bridge.process.proc.pid if bridge.process else None
        time.sleep(0.5)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        rss_before = rss_mib(pid) if pid else 0.0
        started = time.monotonic()
        caller = place_calls(bridge, children, workdir, "caller", calls=calls, rate=rate)
        caller_exit = caller.finish(limit)
        answerer_exit = bridge.answerer.finish(30.0)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
        rss_after = rss_mib(pid) if pid else 0.0
        alive = bridge.process.running() if bridge.process else True
    finally:
        children.stop_all()
    result = ends(caller, caller_exit, bridge.answerer, answerer_exit, options.warmup, calls)
    times = CallTimes.read(caller.log_file, bridge.answerer.log_file)
    rtts, pdd = times.invite_to_200_ms(), times.post_dial_ms()
    placed = times.placed_rate()
    retrans = result["caller_retransmissions"] + result["answerer_retransmissions"]
    result.update(
        system=system,
        rate=rate,
        seconds=seconds,
        elapsed=elapsed,
        cpu_seconds=cpu,
        cpu_share=cpu / elapsed,
        cpu_ms_per_call=1e3 * cpu / max(result["caller_ok"], 1),
        rss_mib_before=rss_before,
        rss_mib_after=rss_after,
        alive=alive,
        placed_rate=placed,
        retransmission_share=retrans / calls,
        invite_200_ms_mean=mean(rtts),
        invite_200_ms_p50=percentile(rtts, 0.50),
        invite_200_ms_p99=percentile(rtts, 0.99),
        invite_200_samples=len(rtts),
        post_dial_ms_p50=percentile(pdd, 0.50),
        post_dial_ms_p99=percentile(pdd, 0.99),
        post_dial_ms_max=max(pdd) if pdd else None,
        post_dial_samples=len(pdd),
    )
    reasons = []
    if not result["all_ok"]:
        reasons.append("failed calls")
    if result["retransmission_share"] > MAX_RETRANS_SHARE:
        reasons.append(f"retransmissions {100 * result['retransmission_share']:.1f} %")
    if placed is None or placed < MIN_RATE_SHARE * rate:
        reasons.append(f"placed {placed or 0:.0f}/s")
    if (
        result["invite_200_ms_mean"] is None
        or result["invite_200_ms_mean"] > MAX_MEAN_INVITE_200_MS
    ):
        reasons.append(f"mean INVITE->200 {_ms(result['invite_200_ms_mean'])} ms")
    if not alive:
        reasons.append("B2BUA died")
    result["passed"] = not reasons
    result["why_failed"] = reasons
    return result


def idle_bridge(
    system: str,
    children: Children,
    workdir: Path,
    options: Options,
    calls: int,
    time_limit: float,
    recv_timeout_ms: int,
) -> tuple[Bridge, Child, float]:
    """A warmed-up B2BUA (not the baseline) whose answerer takes ``calls`` more calls: the bridge,
    its process and its RSS (MiB) at rest before them."""
    bridge = start_bridge(
        system, children, workdir, options,
        answerer_calls=options.warmup + calls, time_limit=time_limit,
        recv_timeout_ms=recv_timeout_ms,
    )  # fmt: skip
    warm_up(bridge, children, workdir, options.warmup)
    assert bridge.process is not None
    time.sleep(0.5)
    return bridge, bridge.process, rss_mib(bridge.process.proc.pid)


def hold_phase(system: str, calls: int, rate: float, margin: float, options: Options,
               workdir: Path) -> dict[str, Any]:  # fmt: skip
    children = Children()
    placing = calls / rate
    hold_ms = int(1000 * (placing + margin))
    limit = placing + hold_ms / 1000 + 180
    held_at: float | None = None
    try:
        bridge, process, rss_idle = idle_bridge(
            system, children, workdir, options, calls, limit + 60, hold_ms + 32_000
        )
        pid = process.proc.pid
        started = time.monotonic()
        caller = place_calls(
            bridge, children, workdir, "caller", calls=calls, rate=rate, long_ms=hold_ms,
            recv_timeout_ms=hold_ms + 32_000,
        )  # fmt: skip
        # Every INVITE has reached the far end once the answerer counted them all (its
        # statistics file is rewritten every second); a little more for the 200s and ACKs.
        settle = min(3.0, margin / 3)
        deadline = started + hold_ms / 1000 - 2 * settle
        while time.monotonic() < deadline:
            seen = stat(bridge.answerer.stats(), "IncomingCall(C)") - options.warmup
            if seen >= calls or not caller.child.running():
                break
            time.sleep(0.5)
        time.sleep(settle)
        held_at = time.monotonic() - started
        rss_held = rss_mib(pid)
        active = bridge.calls_active()
        caller_exit = caller.finish(limit)
        answerer_exit = bridge.answerer.finish(30.0)
        alive = process.running()
    finally:
        children.stop_all()
    result = ends(caller, caller_exit, bridge.answerer, answerer_exit, options.warmup, calls)
    # The sample counts only if it was taken while every call was still up: before the first
    # call's BYE (placed at 0 s, held hold_ms).
    in_time = held_at is not None and held_at < hold_ms / 1000
    result.update(
        system=system,
        calls=calls,
        rate=rate,
        hold_ms=hold_ms,
        sampled_at_s=held_at,
        sampled_while_held=in_time,
        calls_active_metric=active,
        rss_mib_idle=rss_idle,
        rss_mib_held=rss_held,
        rss_kib_per_held_call=1024 * (rss_held - rss_idle) / calls,
        alive=alive,
    )
    result["passed"] = bool(result["all_ok"] and in_time and alive)
    return result


def memory_phase(system: str, calls: int, rate: float, linger: float, options: Options,
                 workdir: Path) -> dict[str, Any]:  # fmt: skip
    children = Children()
    limit = calls / rate + 180
    rss_lingered: float | None = None
    try:
        bridge, process, rss_idle = idle_bridge(
            system, children, workdir, options, calls, limit + 60, 32_000
        )
        pid = process.proc.pid
        caller = place_calls(bridge, children, workdir, "caller", calls=calls, rate=rate)
        caller_exit = caller.finish(limit)
        answerer_exit = bridge.answerer.finish(30.0)
        rss_after = rss_mib(pid)
        if linger > 0:
            time.sleep(linger)
            rss_lingered = rss_mib(pid)
        alive = process.running()
    finally:
        children.stop_all()
    result = ends(caller, caller_exit, bridge.answerer, answerer_exit, options.warmup, calls)
    result.update(
        system=system,
        calls=calls,
        rate=rate,
        linger_s=linger,
        rss_mib_idle=rss_idle,
        rss_mib_after=rss_after,
        rss_kib_retained_per_call=1024 * (rss_after - rss_idle) / calls,
        rss_mib_after_linger=rss_lingered,
        rss_after_linger_over_idle=rss_lingered / rss_idle if rss_lingered else None,
        rss_kib_retained_per_call_after_linger=(
            1024 * (rss_lingered - rss_idle) / calls if rss_lingered else None
        ),
        alive=alive,
    )
    result["passed"] = bool(result["all_ok"] and alive)
    return result


# --------------------------------------------------------------------------- reporting


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def print_counts(r: dict[str, Any]) -> str:
    return (
        f"caller ok/failed {r['caller_ok']}/{r['caller_failed']} (exit {r['caller_exit']}, "
        f"retrans {r['caller_retransmissions']}), answerer ok/failed "
        f"{r['answerer_ok']}/{r['answerer_failed']} (exit {r['answerer_exit']}, retrans "
        f"{r['answerer_retransmissions']})"
    )


def print_step(r: dict[str, Any]) -> None:
    verdict = "PASS" if r["passed"] else "FAIL (" + ", ".join(r["why_failed"]) + ")"
    cpu = (
        "no B2BUA (SIPp to SIPp)"
        if r["system"] == "direct"
        else f"CPU {r['cpu_seconds']:.2f} s ({100 * r['cpu_share']:.0f} % of a core) = "
        f"{r['cpu_ms_per_call']:.3f} ms/call; RSS {r['rss_mib_before']:.1f} -> "
        f"{r['rss_mib_after']:.1f} MiB"
    )
    print(
        f"  ramp {r['system']:5} {r['rate']:g}/s x {r['seconds']:g} s: {verdict}\n"
        f"    {print_counts(r)}\n"
        f"    placed {_num(r['placed_rate'], '.1f')}/s; {cpu}; "
        f"INVITE->200 mean {_ms(r['invite_200_ms_mean'])} p50 {_ms(r['invite_200_ms_p50'])} "
        f"p99 {_ms(r['invite_200_ms_p99'])} ms; post-dial delay p50 "
        f"{_ms(r['post_dial_ms_p50'])} p99 {_ms(r['post_dial_ms_p99'])} ms "
        f"({r['post_dial_samples']} calls)",
        flush=True,
    )


def print_hold(r: dict[str, Any]) -> None:
    print(
        f"  hold {r['system']:5} {r['calls']} calls at {r['rate']:g}/s, held {r['hold_ms']} ms: "
        f"{'PASS' if r['passed'] else 'FAIL'}\n    {print_counts(r)}\n"
        f"    RSS idle {r['rss_mib_idle']:.1f} MiB, with all held {r['rss_mib_held']:.1f} MiB "
        f"(sampled at {_num(r['sampled_at_s'], '.1f')} s, while held: "
        f"{r['sampled_while_held']}; sbc_calls_active {r['calls_active_metric']}) = "
        f"{r['rss_kib_per_held_call']:.2f} KiB per held call",
        flush=True,
    )


def print_memory(r: dict[str, Any]) -> None:
    lingered = ""
    if r["rss_mib_after_linger"] is not None:
        lingered = (
            f"; {r['linger_s']:g} s later {r['rss_mib_after_linger']:.1f} MiB "
            f"({100 * (r['rss_after_linger_over_idle'] - 1):+.1f} % over idle)"
        )
    print(
        f"  memory {r['system']:5} {r['calls']} calls at {r['rate']:g}/s: "
        f"{'PASS' if r['passed'] else 'FAIL'}\n    {print_counts(r)}\n"
        f"    RSS idle {r['rss_mib_idle']:.1f} MiB, after the calls {r['rss_mib_after']:.1f} "
        f"MiB = {r['rss_kib_retained_per_call']:.2f} KiB retained per call{lingered}",
        flush=True,
    )


def summarise(system: str, steps: list[dict[str, Any]], hold: dict[str, Any] | None,
              memory: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    mine = [s for s in steps if s["system"] == system]
    passed = [s for s in mine if s["passed"]]
    best = max(passed, key=lambda s: s["rate"]) if passed else None
    half = None
    if best is not None:
        half = min(passed, key=lambda s: abs(s["rate"] - best["rate"] / 2))

    def baseline(step: dict[str, Any] | None, key: str) -> float | None:
        """The same step's post-dial percentile minus SIPp-to-SIPp's at the same rate."""
        direct = [
            s for s in steps if s["system"] == "direct" and step and s["rate"] == step["rate"]
        ]
        if step is None or not direct or step[key] is None or direct[0][key] is None:
            return None
        return float(step[key] - direct[0][key])

    return {
        "system": system,
        "steps": len(mine),
        "max_rate": best["rate"] if best else None,
        # None when every step passed: the ramp ran out of rates, the ceiling is higher.
        "first_failed_rate": min((s["rate"] for s in mine if not s["passed"]), default=None),
        "cpu_ms_per_call": best["cpu_ms_per_call"] if best else None,
        "invite_200_ms_mean": best["invite_200_ms_mean"] if best else None,
        "post_dial_ms_p50": best["post_dial_ms_p50"] if best else None,
        "post_dial_ms_p99": best["post_dial_ms_p99"] if best else None,
        "post_dial_added_ms_p50": baseline(best, "post_dial_ms_p50"),
        "post_dial_added_ms_p99": baseline(best, "post_dial_ms_p99"),
        "half_rate": half["rate"] if half else None,
        "half_post_dial_ms_p50": half["post_dial_ms_p50"] if half else None,
        "half_post_dial_ms_p99": half["post_dial_ms_p99"] if half else None,
        "half_post_dial_added_ms_p50": baseline(half, "post_dial_ms_p50"),
        "half_post_dial_added_ms_p99": baseline(half, "post_dial_ms_p99"),
        "held_calls": hold["calls"] if hold and hold["passed"] else None,
        "rss_kib_per_held_call": hold["rss_kib_per_held_call"] if hold else None,
        "rss_kib_retained_per_call": memory["rss_kib_retained_per_call"] if memory else None,
        "rss_after_linger_over_idle": memory["rss_after_linger_over_idle"] if memory else None,
        "rss_kib_retained_per_call_after_linger": (
            memory["rss_kib_retained_per_call_after_linger"] if memory else None
        ),
    }


SUMMARY_ROWS = (
    ("max_rate", "highest rate passed, calls/s", ".0f"),
    ("first_failed_rate", "first rate failed (- : none, add rates), calls/s", ".0f"),
    ("cpu_ms_per_call", "CPU per call at that rate, ms", ".3f"),
    ("invite_200_ms_mean", "mean INVITE->200 at that rate, ms", ".2f"),
    ("post_dial_ms_p50", "post-dial delay p50 at that rate, ms", ".3f"),
    ("post_dial_ms_p99", "post-dial delay p99 at that rate, ms", ".3f"),
    ("post_dial_added_ms_p50", "  minus SIPp to SIPp (baseline), p50, ms", ".3f"),
    ("post_dial_added_ms_p99", "  minus SIPp to SIPp (baseline), p99, ms", ".3f"),
    ("half_rate", "rate nearest half the highest, calls/s", ".0f"),
    ("half_post_dial_ms_p50", "post-dial delay p50 there, ms", ".3f"),
    ("half_post_dial_ms_p99", "post-dial delay p99 there, ms", ".3f"),
    ("half_post_dial_added_ms_p50", "  minus SIPp to SIPp (baseline), p50, ms", ".3f"),
    ("half_post_dial_added_ms_p99", "  minus SIPp to SIPp (baseline), p99, ms", ".3f"),
    ("held_calls", "concurrent calls held, none failed", ".0f"),
    ("rss_kib_per_held_call", "RSS per held call, KiB", ".2f"),
    ("rss_kib_retained_per_call", "retained per completed call (timers running), KiB", ".2f"),
    ("rss_after_linger_over_idle", "RSS after the timers expired / idle", ".3f"),
    ("rss_kib_retained_per_call_after_linger", "retained per call after they expired, KiB", ".2f"),
)


def print_summary(summaries: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    systems = list(summaries)
    ratios: dict[str, float | None] = {}
    header = "| figure | " + " | ".join(systems)
    if systems == list(SYSTEMS):
        header += " | sbc/Sippy"
    print("\n" + header + " |")
    print("|---" * (len(systems) + 1 + (systems == list(SYSTEMS))) + "|")
    for key, label, spec in SUMMARY_ROWS:
        values = [summaries[s][key] for s in systems]
        row = f"| {label} | " + " | ".join(_num(v, spec) for v in values)
        if systems == list(SYSTEMS):
            a, b = values
            ratios[key] = a / b if a is not None and b else None
            row += f" | {_num(ratios[key], '.3f')}"
        print(row + " |")
    return ratios


# --------------------------------------------------------------------------- main


def rates_list(text: str) -> list[float]:
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("positive rates, comma-separated")
    return rates


def systems_list(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(part not in SYSTEMS for part in chosen):
        raise argparse.ArgumentTypeError(f"a comma-separated choice of {', '.join(SYSTEMS)}")
    return [s for s in SYSTEMS if s in chosen]


PHASES = ("ramp", "hold", "memory")


def phases_list(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(part not in PHASES for part in chosen):
        raise argparse.ArgumentTypeError(f"a comma-separated choice of {', '.join(PHASES)}")
    return [p for p in PHASES if p in chosen]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", type=systems_list, default=list(SYSTEMS),
                        help="B2BUAs to load: sbc,sippy (both)")  # fmt: skip
    parser.add_argument("--phases", type=phases_list, default=list(PHASES),
                        help="ramp,hold,memory (all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 calls/s for 2 s, 40 held calls, 30 for memory, "
                             "no linger, 2 warm-up calls (explicit options still win)")  # fmt: skip
    parser.add_argument("--rates", type=rates_list, help=f"ramp steps, calls/s ({DEFAULT_RATES})")
    parser.add_argument("--step-seconds", type=float, help="seconds per ramp step (30)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction,
                        help="each ramp rate also SIPp to SIPp, no B2BUA: the post-dial delay "
                             "SIPp itself accounts for (on; off with --quick)")  # fmt: skip
    parser.add_argument("--hold-calls", type=int, help="long calls held at once (20000)")
    parser.add_argument("--hold-rate", type=float, help="calls/s placing them (250)")
    parser.add_argument("--hold-margin", type=float,
                        help="s the calls stay up after the last is placed (20)")  # fmt: skip
    parser.add_argument("--memory-calls", type=int, help="short calls of the memory phase (3000)")
    parser.add_argument("--memory-rate", type=float, help="their calls/s (100)")
    parser.add_argument("--linger", type=float, help="s after them before RSS again (40)")
    parser.add_argument("--warmup", type=int, help="unmeasured calls at each start (20)")
    parser.add_argument("--sbc-in", choices=("udp", "tcp"), default="udp",
                        help="3CX -> sbc transport (udp)")  # fmt: skip
    parser.add_argument("--sbc-out", choices=("tcp", "udp"), default="tcp",
                        help="sbc -> Retell transport (tcp, as deployed)")  # fmt: skip
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="interpreter running sbc")
    parser.add_argument("--sippy", help="b2bua_simple to run (found on PATH or next to python)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure there")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return parser


def apply_defaults(args: argparse.Namespace) -> None:
    quick = {
        "rates": [10.0], "step_seconds": 2.0, "hold_calls": 40, "hold_rate": 40.0,
        "hold_margin": 4.0,
        "memory_calls": 30, "memory_rate": 30.0, "linger": 0.0, "warmup": 2, "baseline": False,
    }  # fmt: skip
    full = {
        "rates": rates_list(DEFAULT_RATES), "step_seconds": 30.0, "hold_calls": 20_000,
        "hold_rate": 250.0, "hold_margin": 20.0, "memory_calls": 3000, "memory_rate": 100.0,
        "linger": 40.0, "warmup": 20, "baseline": True,
    }  # fmt: skip
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def find_sippy(explicit: str | None, python: str) -> str | None:
    if explicit:
        return explicit
    beside = Path(python).parent / "b2bua_simple"
    return str(beside) if beside.is_file() else shutil.which("b2bua_simple")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args)
    if args.step_seconds <= 0 or args.hold_calls <= 0 or args.memory_calls <= 0:
        parser.error("--step-seconds, --hold-calls and --memory-calls must be positive")
    if args.hold_rate <= 0 or args.memory_rate <= 0 or args.linger < 0 or args.warmup < 0:
        parser.error("rates must be positive, --linger and --warmup not negative")
    sipp_binary()
    for scenario in ("pbx_registrar.xml", "pbx_caller_short.xml", "pbx_caller_long.xml",
                     "retell_answerer.xml"):  # fmt: skip
        if not (SCENARIOS / scenario).is_file():
            raise SystemExit(f"missing scenario {SCENARIOS / scenario}")
    sippy = find_sippy(args.sippy, args.python) if "sippy" in args.systems else None
    if "sippy" in args.systems and sippy is None:
        raise SystemExit(
            "b2bua_simple not found: install sippy==2.5.0 in a venv of its own and pass"
            " --sippy VENV/bin/b2bua_simple, or --systems sbc"
        )
    options = Options(
        python=args.python,
        repo=REPO,
        sippy=sippy,
        sbc_in="t1" if args.sbc_in == "tcp" else "u1",
        sbc_out=args.sbc_out,
        log_level=args.log_level,
        warmup=args.warmup,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    steps: list[dict[str, Any]] = []
    holds: dict[str, dict[str, Any]] = {}
    memories: dict[str, dict[str, Any]] = {}
    try:
        module = imported_from(options.python, REPO, workdir)
        info = machine()
        print(
            f"{info['time_utc']} UTC, {info['nproc']} CPUs, Python {info['python']}, "
            f"{info['sipp']}, load {' '.join(info['load_average'])}; sbc "
            f"{describe_checkout(REPO)} ({module}), in {args.sbc_in} out {args.sbc_out}, log "
            f"{args.log_level}; Sippy {sippy or '-'}; work dir {workdir}",
            flush=True,
        )
        counter = iter(range(1, 10_000))
        if "ramp" in args.phases:
            ramping = list(args.systems)
            for rate in args.rates:
                for system in (["direct"] if args.baseline else []) + list(ramping):
                    step_dir = workdir / f"{next(counter):02d}-ramp-{system}-{rate:g}"
                    step_dir.mkdir()
                    result = ramp_step(system, rate, args.step_seconds, options, step_dir)
                    steps.append(result)
                    print_step(result)
                    if not result["passed"] and system in ramping:
                        ramping.remove(system)
                if not ramping:
                    break
        if "hold" in args.phases:
            for system in args.systems:
                phase_dir = workdir / f"{next(counter):02d}-hold-{system}"
                phase_dir.mkdir()
                holds[system] = hold_phase(
                    system, args.hold_calls, args.hold_rate, args.hold_margin, options, phase_dir
                )
                print_hold(holds[system])
        if "memory" in args.phases:
            for system in args.systems:
                phase_dir = workdir / f"{next(counter):02d}-memory-{system}"
                phase_dir.mkdir()
                memories[system] = memory_phase(
                    system, args.memory_calls, args.memory_rate, args.linger, options, phase_dir
                )
                print_memory(memories[system])
        summaries = {s: summarise(s, steps, holds.get(s), memories.get(s)) for s in args.systems}
        ratios = print_summary(summaries)
        failed = [
            s
            for s in args.systems
            if ("ramp" in args.phases and summaries[s]["max_rate"] is None)
            or (s in holds and not holds[s]["passed"])
            or (s in memories and not memories[s]["passed"])
        ]
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": info,
                        "checkout": describe_checkout(REPO),
                        "options": {
                            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                        },
                        "steps": steps,
                        "hold": holds,
                        "memory": memories,
                        "summary": summaries,
                        "ratios_sbc_over_sippy": ratios,
                        "failed": failed,
                    },
                    indent=2,
                )
                + "\n"
            )
        if failed:
            print(f"\nFAILED: {', '.join(failed)} (no ramp step passed, or held or memory calls "
                  f"failed); logs in {workdir}", file=sys.stderr)  # fmt: skip
            args.keep = True
        return 1 if failed else 0
    except BaseException:
        args.keep = True  # the logs say what went wrong
        raise
    finally:
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)


if __name__ == "__main__":
    raise SystemExit(main())
