"""Load test of the bridge with SIPp, side by side with the Sippy B2BUA, on loopback.

Run from the repository root (``sipp`` from Debian ``sip-tester``; ``b2bua_simple`` from PyPI
``sippy`` 2.5.0 for the Sippy side):

    python bench/load.py                       # the full run, both B2BUAs (about 20-25 minutes)
    python bench/load.py --quick --systems sbc # smoke run: a few calls per phase
    python bench/load.py --phases ramp --rates 100,200,400 --step-seconds 30 --json FILE
    python bench/load.py --systems sbc --sbc-out tcp,udp --phases ramp  # both transports out
    python bench/load.py --phases relay        # the media relay targets only (rtpengine too)

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

Four phases (the first three load SIP), each B2BUA started afresh for each step (so figures do
not carry over), and the B2BUAs alternated step by step in one run (the machine's drift hits
both alike):

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
4. ``relay``: bench/bench_media.py's measurement (``bench_media.measure``), in this script's
   interpreter: per ``--relay-steps`` N (500,750), N concurrent G.711-shaped calls (50 RTP
   packets/s each way) for ``--relay-seconds`` (10) straight between the generator's ends (the
   baseline), then through sbc's relay (``RelayBackend``, a process of its own) and rtpengine
   (userspace, ``--table=-1``). A backend's capacity: the most calls it relayed with zero loss
   and p99 latency added over the baseline under 1 ms.

With ``--sbc-out tcp,udp`` the ramp runs sbc both ways (columns "sbc" and "sbc-udp"); hold and
memory use the first. After the ramp, sbc (TCP out) runs once more at half its highest passed
rate when no step had that rate (``--no-half-rate``: not), with its baseline: the post-dial
target is read there.

``--allocator jemalloc`` or ``mimalloc`` runs sbc with ``PYTHONMALLOC=malloc`` and that
library preloaded (Debian ``libjemalloc2``, ``libmimalloc2.0``; the variables of
``ALLOCATORS``); ``pymalloc``, CPython's own, by default. Neither brought RSS back to idle
+ 5 % (docs/performance.md, "Round 6: allocator"): the service ships with pymalloc.

Prints one line per step and a summary with the ratios sbc/Sippy, then the targets table: each
target of issue 12 (and the media issue's relay targets) with this run's figure and PASS, FAIL
or "not run"; ``--json FILE`` writes every figure (``targets``, ``relay`` included). Exit
status 0 when every B2BUA passed at least one ramp step and its hold and memory calls all
succeeded (the targets do not count: they are figures to read); 1 otherwise (logs are then kept
in the work directory). Loopback only, bounded: each SIPp end has a time limit, and every
process this script starts is killed with it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# bench/ is on sys.path when this file runs as a script: share bench_calls.py's process and
# SIPp plumbing rather than repeat it.
from bench_calls import (
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
    read_stats,
    rss_mib,
    sbc_environment,
    sipp_binary,
    sipp_command,
    stat,
    wait_listening,
    wait_ready,
)
from bench_calls import sbc_config as bench_calls_config

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


# --------------------------------------------------------------------------- where time went


def _proc_times(pid: int) -> tuple[float, float] | None:
    """utime and stime of ``pid`` in seconds; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def udp_sockets() -> dict[tuple[str, int], tuple[int, int]]:
    """Every IPv4 UDP socket of the machine: (address, port) -> (receive queue in bytes,
    datagrams the kernel dropped on it), from /proc/net/udp (its ``drops`` column counts
    what did not fit in the socket's receive buffer, SO_RCVBUF)."""
    out: dict[tuple[str, int], tuple[int, int]] = {}
    with contextlib.suppress(OSError), open("/proc/net/udp") as table:
        next(table)
        for line in table:
            words = line.split()
            host, port = words[1].split(":")
            address = socket.inet_ntoa(struct.pack("<I", int(host, 16)))
            rx_queue = int(words[4].split(":")[1], 16)
            out[(address, int(port, 16))] = (rx_queue, int(words[-1]))
    return out


def kernel_udp() -> dict[str, int]:
    """The kernel's UDP counters (/proc/net/snmp): machine-wide, other work's included."""
    with contextlib.suppress(OSError):
        lines = Path("/proc/net/snmp").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("Udp:"):
                return dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=False))
    return {}


def sipp_socket(sipp: Sipp) -> tuple[str, int] | None:
    """The SIP address SIPp was started on (its -i and -p)."""
    args = [str(a) for a in sipp.child.proc.args]
    try:
        return args[args.index("-i") + 1], int(args[args.index("-p") + 1])
    except (ValueError, IndexError):
        return None


class StepProbe:
    """Where a ramp step's time and datagrams went, sampled every ``interval`` s in a thread
    while it runs: the CPU (utime, stime) of each process named (the B2BUA and both SIPp
    ends: a SIPp end near a full core is the limit, not the B2BUA), and per UDP socket named
    the largest receive queue seen and the datagrams the kernel dropped on it (a full
    SO_RCVBUF); plus the kernel's UDP counters over the step. A process's last sample is
    taken at most ``interval`` s before it exits."""

    def __init__(self, processes: dict[str, int], sockets: dict[str, tuple[str, int]],
                 interval: float = 0.25) -> None:  # fmt: skip
        self.processes = processes
        self.sockets = sockets
        self.interval = interval
        self._first: dict[str, tuple[float, float]] = {}
        self._last: dict[str, tuple[float, float]] = {}
        self._drops_first: dict[str, int] = {}
        self._drops_last: dict[str, int] = {}
        self._queue_max: dict[str, int] = {}
        self._kernel_first = kernel_udp()
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="step-probe", daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _sample(self) -> None:
        for name, pid in self.processes.items():
            times = _proc_times(pid)
            if times is not None:
                self._first.setdefault(name, times)
                self._last[name] = times
        table = udp_sockets()
        for name, address in self.sockets.items():
            seen = table.get(address)
            if seen is not None:
                queue, drops = seen
                self._drops_first.setdefault(name, drops)
                self._drops_last[name] = drops
                self._queue_max[name] = max(self._queue_max.get(name, 0), queue)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._sample()
        self._stop.set()
        self._thread.join()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        kernel = kernel_udp()
        cpu = {}
        for name, (user, system) in self._last.items():
            user0, system0 = self._first[name]
            cpu[name] = {
                "user_s": user - user0,
                "system_s": system - system0,
                "share": (user - user0 + system - system0) / elapsed,
            }
        return {
            "probe_seconds": elapsed,
            "cpu": cpu,
            "udp_drops": {n: self._drops_last[n] - self._drops_first[n] for n in self._drops_last},
            "udp_queue_max_bytes": dict(self._queue_max),
            "kernel_udp": {
                k: kernel.get(k, 0) - self._kernel_first.get(k, 0)
                for k in ("InDatagrams", "RcvbufErrors", "SndbufErrors", "InErrors")
            },
        }


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
    udp_buffer: int | None = None  # sbc's sip.udp_buffer_size (None: its default)
    # sbc's retell.local_udp_port when Retell is over UDP (None: unset, one socket for all)
    retell_udp_port: int | None = None
    allocator: str = "pymalloc"  # ALLOCATORS: what serves sbc's Python objects


# --allocator: the environment sbc runs with (docs/performance.md, "Round 6: allocator").
# pymalloc is CPython's own; the others hand every allocation to a malloc that gives pages
# back (pymalloc gives back whole 1 MiB arenas only).
LIBDIR = Path("/usr/lib/x86_64-linux-gnu")
ALLOCATORS: dict[str, dict[str, str]] = {
    "pymalloc": {},
    "jemalloc": {  # Debian libjemalloc2
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": str(LIBDIR / "libjemalloc.so.2"),
        "MALLOC_CONF": "background_thread:true,dirty_decay_ms:2000,muzzy_decay_ms:0",
    },
    "mimalloc": {  # Debian libmimalloc2.0, its defaults (decommit_delay 25 ms)
        "PYTHONMALLOC": "malloc",
        "LD_PRELOAD": str(LIBDIR / "libmimalloc.so.2"),
    },
}

ALLOCATOR_PACKAGES = {"jemalloc": "libjemalloc2", "mimalloc": "libmimalloc2.0"}


def allocator_environment(name: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` for sbc with allocator ``name``: its variables set, any inherited one of them
    dropped (a PYTHONMALLOC or LD_PRELOAD in the harness's own environment must not leak into
    the pymalloc runs it is compared with)."""
    env = {k: v for k, v in env.items() if k not in ("PYTHONMALLOC", "LD_PRELOAD", "MALLOC_CONF")}
    return env | ALLOCATORS[name]


def sbc_process_environment(options: Options) -> dict[str, str]:
    """The environment sbc is started with: this checkout first on its path, the allocator's."""
    return allocator_environment(options.allocator, sbc_environment(options.repo))


def missing_allocator(name: str) -> str | None:
    """The preloaded library that does not exist (ld.so would only warn and run without it, and
    the run would measure pymalloc's neighbour, glibc's malloc, under the wrong name)."""
    library = ALLOCATORS[name].get("LD_PRELOAD")
    return library if library is not None and not Path(library).is_file() else None


def sbc_config(workdir: Path, sip_port: int, registrar: int, retell: int, admin: int,
               options: Options) -> str:  # fmt: skip
    config = bench_calls_config(
        sip_port,
        registrar,
        retell,
        admin,
        options.log_level,
        records=workdir / "calls.sqlite3",  # records on, as deployed, but not in /var/lib/sbc
        pbx=PBX,
        bind=B2BUA,
        retell=RETELL,
        password="load",
        retell_transport=options.sbc_out,
        script="bench/load.py",
    )
    if options.udp_buffer is not None:
        config = config.replace("[sip]\n", f"[sip]\nudp_buffer_size = {options.udp_buffer}\n", 1)
    if options.retell_udp_port is not None and options.sbc_out == "udp":
        port = options.retell_udp_port
        config = config.replace("[retell]\n", f"[retell]\nlocal_udp_port = {port}\n", 1)
    return config


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
    retell_socket: int | None = None  # sbc's own UDP port for Retell (--retell-socket)

    def calls_active(self) -> float | None:
        return self.metric("sbc_calls_active")

    def metric(self, name: str) -> float | None:
        """The sum of sbc's metric ``name`` over its label sets (None: no sbc or no answer)."""
        if self.admin_port is None:
            return None
        try:
            status, body = http_get(B2BUA, self.admin_port, "/metrics")
        except OSError:
            return None
        return metric_sum(parse_metrics(body), name) if status == 200 else None


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
    if options.retell_udp_port is not None and options.sbc_out == "udp":
        # A free port of its own each start (not 0): the step probe watches that socket too.
        options = replace(options, retell_udp_port=free_port(B2BUA))
    config = workdir / "sbc.toml"
    config.write_text(
        sbc_config(workdir, sip_port, registrar_port, retell_port, admin_port, options)
    )
    process = children.start(
        "sbc",
        [options.python, "-m", "sbc", "run", "--config", str(config)],
        cwd=workdir,
        log=workdir / "sbc.log",
        env=sbc_process_environment(options),
    )
    wait_ready(process, admin_port, limit=30.0, host=B2BUA)
    return Bridge(system, process, B2BUA, sip_port, admin_port, answerer, options.sbc_in,
                  options.retell_udp_port if options.sbc_out == "udp" else None)  # fmt: skip


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
        resent_before = bridge.metric("sbc_sip_retransmissions_total")
        started = time.monotonic()
        caller = place_calls(bridge, children, workdir, "caller", calls=calls, rate=rate)
        probe = step_probe(bridge, caller, pid)
        caller_exit = caller.finish(limit)
        answerer_exit = bridge.answerer.finish(30.0)
        elapsed = time.monotonic() - started
        where = probe.stop()
        cpu = cpu_seconds(pid) - cpu_before if pid else 0.0
        rss_after = rss_mib(pid) if pid else 0.0
        alive = bridge.process.running() if bridge.process else True
        resent_after = bridge.metric("sbc_sip_retransmissions_total")
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
        # Retransmissions sbc sent itself (Timers A, E, G: its peers were slow to answer or to
        # ACK), against the SIPp ends' counts above.
        b2bua_retransmissions=(
            resent_after - resent_before
            if resent_after is not None and resent_before is not None
            else None
        ),
        **where,
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


def step_probe(bridge: Bridge, caller: Sipp, pid: int | None) -> StepProbe:
    """A :class:`StepProbe` of the B2BUA and both SIPp ends and of their SIP sockets (UDP)."""
    processes = {"caller": caller.child.proc.pid, "answerer": bridge.answerer.child.proc.pid}
    sockets = {}
    if pid is not None:
        processes = {"b2bua": pid, **processes}
        sockets["b2bua"] = (bridge.host, bridge.sip_port)
        if bridge.retell_socket is not None:
            sockets["b2bua-retell"] = (bridge.host, bridge.retell_socket)
    for name, sipp in (("caller", caller), ("answerer", bridge.answerer)):
        address = sipp_socket(sipp)
        if address is not None:
            sockets[name] = address
    return StepProbe(processes, sockets)


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


def relay_phase(steps: list[int], seconds: float, backends: list[str], workers: int,
                quiet_wait: float, workdir: Path) -> dict[str, Any]:  # fmt: skip
    """bench/bench_media.py's measurement in this run: per N of ``steps``, G.711-shaped RTP
    (50 packets/s each way per call) straight between the generator's ends (the baseline),
    then through each backend ("relay": sbc's RelayBackend in a process of its own;
    "rtpengine": userspace forwarding), ``seconds`` each. It runs in this script's interpreter
    with this repository's sbc (not --python)."""
    import bench_media  # here, not at the top: only this phase needs sbc importable

    run = bench_media.measure(
        steps, seconds, backends, workers=workers, quiet_wait=quiet_wait,
        rtpengine_log=workdir / "rtpengine.log",
    )  # fmt: skip
    results = []
    for r in run.results:
        row = dict(r.__dict__, lost=r.lost, added_p50_us=None, added_p99_us=None)
        if r.backend != "direct":
            row["added_p50_us"] = r.p50_us - run.directs[r.calls].p50_us
            row["added_p99_us"] = run.added_p99_us(r)
        results.append(row)
    return {
        "steps": steps,
        "seconds": seconds,
        "backends": backends,
        "results": results,
        "held": run.held,
        "quiet_busy": bench_media.QUIET_BUSY,  # % of one core: a quiet machine before a run
        # The most calls relayed with zero loss and p99 added under 1 ms, per backend.
        "capacity": {
            name: held["zero_loss_p99_added_under_1ms"] for name, held in run.held.items()
        },
    }


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
        f"  ramp {label_of(r):5} {r['rate']:g}/s x {r['seconds']:g} s: {verdict}\n"
        f"    {print_counts(r)}\n"
        f"    placed {_num(r['placed_rate'], '.1f')}/s; {cpu}; "
        f"INVITE->200 mean {_ms(r['invite_200_ms_mean'])} p50 {_ms(r['invite_200_ms_p50'])} "
        f"p99 {_ms(r['invite_200_ms_p99'])} ms; post-dial delay p50 "
        f"{_ms(r['post_dial_ms_p50'])} p99 {_ms(r['post_dial_ms_p99'])} ms "
        f"({r['post_dial_samples']} calls)",
        flush=True,
    )
    if "cpu" in r:
        print(f"    {print_where(r)}", flush=True)


def print_where(r: dict[str, Any]) -> str:
    """CPU share of each process (system time in brackets), kernel drops per UDP socket,
    retransmissions by the B2BUA."""
    seconds = max(r["probe_seconds"], 1e-9)
    cpu = ", ".join(
        f"{name} {100 * c['share']:.0f} % ({100 * c['system_s'] / seconds:.0f} sys)"
        for name, c in r["cpu"].items()
    )
    queues = r["udp_queue_max_bytes"]
    drops = ", ".join(
        f"{name} {dropped} (queue max {queues.get(name, 0) // 1024} KiB)"
        for name, dropped in r["udp_drops"].items()
    )
    kernel = r["kernel_udp"]
    resent = r.get("b2bua_retransmissions")
    return (
        f"CPU of a core: {cpu}; UDP drops: {drops or '-'} (kernel RcvbufErrors "
        f"{kernel.get('RcvbufErrors', 0)}, SndbufErrors {kernel.get('SndbufErrors', 0)}); "
        f"B2BUA retransmissions {'-' if resent is None else f'{resent:.0f}'}"
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


def label_of(step: dict[str, Any]) -> str:
    return str(step.get("label", step["system"]))


def summarise(system: str, steps: list[dict[str, Any]], hold: dict[str, Any] | None,
              memory: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """The figures of one ramped B2BUA (``system`` is its label: "sbc", "sippy", or "sbc-udp"
    for a second --sbc-out) and of its hold and memory phases."""
    mine = [s for s in steps if label_of(s) == system]
    passed = [s for s in mine if s["passed"]]
    best = max(passed, key=lambda s: s["rate"]) if passed else None
    half = None
    if best is not None:
        # The step run at exactly half the highest rate (main() adds it when the ramp had
        # none), else the passed step nearest to it.
        exact = [s for s in mine if s["rate"] == best["rate"] / 2]
        half = exact[0] if exact else min(passed, key=lambda s: abs(s["rate"] - best["rate"] / 2))

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
        "sbc_out": mine[0].get("sbc_out") if mine else None,
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
        "half_rate_exact": bool(half and best and half["rate"] == best["rate"] / 2),
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


def print_relay(relay: dict[str, Any]) -> None:
    print(
        f"  relay {','.join(relay['backends'])} at {','.join(map(str, relay['steps']))} calls, "
        f"{relay['seconds']:g} s each: calls held with zero loss and p99 added under 1 ms: "
        + ", ".join(f"{name} {_num(n, '.0f')}" for name, n in relay["capacity"].items()),
        flush=True,
    )


def print_summary(summaries: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    systems = list(summaries)
    ratios: dict[str, float | None] = {}
    compare = all(s in systems for s in SYSTEMS)
    header = "| figure | " + " | ".join(systems)
    if compare:
        header += " | sbc/Sippy"
    print("\n" + header + " |")
    print("|---" * (len(systems) + 1 + compare) + "|")
    for key, label, spec in SUMMARY_ROWS:
        values = [summaries[s][key] for s in systems]
        row = f"| {label} | " + " | ".join(_num(v, spec) for v in values)
        if compare:
            a, b = summaries["sbc"][key], summaries["sippy"][key]
            ratios[key] = a / b if a is not None and b else None
            row += f" | {_num(ratios[key], '.3f')}"
        print(row + " |")
    return ratios


# --------------------------------------------------------------------------- targets (issue 12)

TARGET_RATE = 1000.0  # calls/s sustained, UDP in -> TCP out
TARGET_CPU_MS = 0.9  # sbc CPU per call at that rate
TARGET_POST_DIAL_P99_MS = 5.0  # added by sbc, at half the highest rate
TARGET_RETAINED_KIB = 8.0  # per completed call while its timers run
TARGET_LINGER_OVER_IDLE = 1.05  # RSS once the timers expired
TARGET_HELD_CALLS = 20_000
TARGET_HELD_KIB = 16.0  # RSS per held call, under
TARGET_RELAY_CALLS = 500  # G.711 calls relayed with zero loss and p99 added under 1 ms
TARGET_RELAY_SHARE = 0.5  # of rtpengine's userspace capacity, by the same criterion


def _target(name: str, figure: str, passed: bool | None) -> dict[str, Any]:
    """``passed`` None: not measured in this run (phase not run, or nothing to compare)."""
    return {"target": name, "figure": figure, "passed": passed}


def targets(
    summaries: dict[str, dict[str, Any]],
    holds: dict[str, dict[str, Any]],
    memories: dict[str, dict[str, Any]],
    relay: dict[str, Any] | None,
    baseline: bool,
    sbc_in: str,
) -> list[dict[str, Any]]:
    """Every target of issue 12 (and of the media issue, for the relay) with this run's figure.
    The rate, CPU and post-dial rows read sbc with TCP out (as deployed), hold and memory the
    first --sbc-out."""
    found: list[dict[str, Any]] = []
    by_out = {s["sbc_out"]: s for k, s in summaries.items() if k.startswith("sbc") and s["steps"]}
    tcp = by_out.get("tcp")
    rate_name = f"rate >= {TARGET_RATE:,.0f} calls/s ({sbc_in.upper()} in -> TCP out)"
    cpu_name = f"CPU per call <= {TARGET_CPU_MS} ms at that rate"
    pdd_name = f"post-dial p99 added < {TARGET_POST_DIAL_P99_MS:g} ms at half that rate"
    if tcp is None:
        for name in (rate_name, cpu_name, pdd_name):
            found.append(_target(name, "ramp with TCP out not run", None))
    else:
        rate = tcp["max_rate"]
        figure = f"{_num(rate, '.0f')} calls/s"
        if rate is not None and tcp["first_failed_rate"] is None:
            figure += " (every step passed: the ceiling is higher)"
        found.append(_target(rate_name, figure, rate is not None and rate >= TARGET_RATE))
        cpu = tcp["cpu_ms_per_call"]
        found.append(
            _target(
                cpu_name,
                f"{_num(cpu, '.3f')} ms at {_num(rate, '.0f')}/s",
                cpu is not None
                and rate is not None
                and rate >= TARGET_RATE
                and cpu <= TARGET_CPU_MS,
            )
        )
        p99 = tcp["half_post_dial_added_ms_p99" if baseline else "half_post_dial_ms_p99"]
        how = "minus SIPp to SIPp" if baseline else "no baseline: SIPp's own delay included"
        found.append(
            _target(
                pdd_name,
                f"{_num(p99, '.3f')} ms at {_num(tcp['half_rate'], '.0f')}/s ({how})",
                None if p99 is None else p99 < TARGET_POST_DIAL_P99_MS,
            )
        )
    found += memory_targets(memories.get("sbc"), holds.get("sbc"))
    udp = by_out.get("udp")
    name = "UDP -> UDP rate no lower than UDP -> TCP"
    if tcp is None or udp is None:
        found.append(_target(name, "needs --sbc-out tcp,udp", None))
    else:
        a, b = udp["max_rate"], tcp["max_rate"]
        passed = a is not None and (b is None or a >= b)
        found.append(_target(name, f"{_num(a, '.0f')} vs {_num(b, '.0f')} calls/s", passed))
    found += relay_targets(relay)
    return found


def memory_targets(memory: dict[str, Any] | None, hold: dict[str, Any] | None
                   ) -> list[dict[str, Any]]:  # fmt: skip
    found = []
    retained_name = f"retained per completed call <= {TARGET_RETAINED_KIB:g} KiB (timers running)"
    linger_name = f"RSS back to idle + {100 * (TARGET_LINGER_OVER_IDLE - 1):.0f} % after the timers"
    if memory is None:
        found.append(_target(retained_name, "memory phase not run", None))
        found.append(_target(linger_name, "memory phase not run", None))
    else:
        retained = memory["rss_kib_retained_per_call"]
        figure = f"{retained:.2f} KiB ({memory['calls']} calls"
        figure += ")" if memory["passed"] else ", some FAILED)"
        passed = bool(memory["passed"] and retained <= TARGET_RETAINED_KIB)
        found.append(_target(retained_name, figure, passed))
        over = memory["rss_after_linger_over_idle"]
        if over is None:
            found.append(_target(linger_name, "no linger", None))
        else:
            figure = f"{over:.3f} x idle, {memory['linger_s']:g} s after the calls"
            passed = bool(memory["passed"] and over <= TARGET_LINGER_OVER_IDLE)
            found.append(_target(linger_name, figure, passed))
    name = f"held calls >= {TARGET_HELD_CALLS:,}, < {TARGET_HELD_KIB:g} KiB RSS each, none failed"
    if hold is None:
        found.append(_target(name, "hold phase not run", None))
    else:
        kib = hold["rss_kib_per_held_call"]
        figure = f"{hold['calls']:,} held, {kib:.2f} KiB each"
        figure += ", none failed" if hold["passed"] else ", FAILED"
        passed = bool(
            hold["passed"] and hold["calls"] >= TARGET_HELD_CALLS and kib < TARGET_HELD_KIB
        )
        found.append(_target(name, figure, passed))
    return found


def relay_targets(relay: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The media issue's two targets from the relay phase: capacity = the most calls relayed
    with zero loss and p99 added (over the direct path) under 1 ms."""
    first = f"relay: {TARGET_RELAY_CALLS} calls, zero loss, p99 added < 1 ms"
    second = f"relay capacity >= {TARGET_RELAY_SHARE:g} x rtpengine's (same criterion)"
    if relay is None:
        return [
            _target(first, "relay phase not run", None),
            _target(second, "relay phase not run", None),
        ]
    cap = relay["capacity"]
    # bench_media waits for a quiet machine before each run but runs anyway after the wait:
    # say so, as other jobs' load shows up as added latency.
    busy = max((r["background"] for r in relay["results"]), default=0.0)
    quiet = busy <= relay["quiet_busy"]
    note = "" if quiet else f" (machine busy before a run: {busy:.0f} % of a core)"
    found = []
    if "relay" not in cap:
        found.append(_target(first, "relay backend not run", None))
    else:
        figure = (
            f"holds {_num(cap['relay'], '.0f')} calls"
            + "".join(
                f"; {r['calls']}: lost {r['lost']}, p99 added {r['added_p99_us']:.0f} us"
                for r in relay["results"]
                if r["backend"] == "relay"
            )
            + note
        )
        passed = cap["relay"] is not None and cap["relay"] >= TARGET_RELAY_CALLS
        found.append(_target(first, figure, passed))
    if "relay" not in cap or "rtpengine" not in cap:
        found.append(_target(second, "needs --relay-backends relay,rtpengine", None))
    else:
        mine, theirs = cap["relay"], cap["rtpengine"]
        figure = f"relay {_num(mine, '.0f')} vs rtpengine {_num(theirs, '.0f')} calls"
        if theirs is not None and theirs == max(relay["steps"]):
            figure += " (rtpengine held every step: its ceiling may be higher)"
        figure += note
        passed = mine is not None and (theirs is None or mine >= TARGET_RELAY_SHARE * theirs)
        found.append(_target(second, figure, passed))
    return found


def print_targets(found: list[dict[str, Any]]) -> None:
    print("\n| target | this run | result |\n|---|---|---|")
    for t in found:
        verdict = "not run" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
        print(f"| {t['target']} | {t['figure']} | {verdict} |")


# --------------------------------------------------------------------------- main


def rates_list(text: str) -> list[float]:
    try:
        rates = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("positive rates, comma-separated")
    return rates


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of ``choices``, in their order."""

    def parse(text: str) -> list[str]:
        chosen = [part.strip() for part in text.split(",") if part.strip()]
        if not chosen or any(part not in choices for part in chosen):
            raise argparse.ArgumentTypeError(f"a comma-separated choice of {', '.join(choices)}")
        return [c for c in choices if c in chosen]

    return parse


PHASES = ("ramp", "hold", "memory", "relay")


def outs_list(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(part not in ("tcp", "udp") for part in chosen):
        raise argparse.ArgumentTypeError("tcp, udp or both (tcp,udp), comma-separated")
    return list(dict.fromkeys(chosen))


def counts_list(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if not counts or counts[0] <= 0:
        raise argparse.ArgumentTypeError("positive call counts, comma-separated")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", type=choice_list(SYSTEMS), default=list(SYSTEMS),
                        help="B2BUAs to load: sbc,sippy (both)")  # fmt: skip
    parser.add_argument("--phases", type=choice_list(PHASES), default=list(PHASES),
                        help="ramp,hold,memory,relay (all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 calls/s for 2 s, 40 held calls, 30 for memory, "
                             "no linger, 2 warm-up calls, 20 relayed calls for 1 s "
                             "(explicit options still win)")  # fmt: skip
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
    parser.add_argument("--sbc-out", type=outs_list, default=["tcp"],
                        help="sbc -> Retell transport (tcp, as deployed); tcp,udp ramps both "
                             "(hold and memory use the first)")  # fmt: skip
    parser.add_argument("--udp-buffer", type=int, metavar="BYTES",
                        help="sbc's sip.udp_buffer_size (its default when not given)")  # fmt: skip
    parser.add_argument("--retell-socket", action="store_true",
                        help="with --sbc-out udp: sbc's requests to Retell leave from a UDP "
                             "socket of their own (retell.local_udp_port)")  # fmt: skip
    parser.add_argument("--half-rate", action=argparse.BooleanOptionalAction, default=True,
                        help="after the ramp, run sbc (TCP out) at half its highest rate when "
                             "no step had that rate: the post-dial target's rate (on)")  # fmt: skip
    parser.add_argument("--relay-steps", type=counts_list,
                        help="relay phase: concurrent calls per step (500,750)")  # fmt: skip
    parser.add_argument("--relay-seconds", type=float, help="relay phase: s per run (10)")
    parser.add_argument("--relay-backends", default="relay,rtpengine",
                        help="relay phase: relay,rtpengine (both)")  # fmt: skip
    parser.add_argument("--relay-workers", type=int, default=1,
                        help="relay phase: load generator processes (1)")  # fmt: skip
    parser.add_argument("--relay-quiet-wait", type=float,
                        help="relay phase: s to wait for a quiet machine before each run "
                             "(30; 0 with --quick)")  # fmt: skip
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="interpreter running sbc")
    parser.add_argument("--allocator", choices=list(ALLOCATORS), default="pymalloc",
                        help="sbc's memory allocator: pymalloc (CPython's, the default), or "
                             "PYTHONMALLOC=malloc with jemalloc or mimalloc preloaded "
                             "(Debian libjemalloc2, libmimalloc2.0)")  # fmt: skip
    parser.add_argument("--sippy", help="b2bua_simple to run (found on PATH or next to python)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure there")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    return parser


def apply_defaults(args: argparse.Namespace) -> None:
    quick = {
        "rates": [10.0], "step_seconds": 2.0, "hold_calls": 40, "hold_rate": 40.0,
        "hold_margin": 4.0,
        "memory_calls": 30, "memory_rate": 30.0, "linger": 0.0, "warmup": 2, "baseline": False,
        "relay_steps": [20], "relay_seconds": 1.0, "relay_quiet_wait": 0.0,
    }  # fmt: skip
    full = {
        "rates": rates_list(DEFAULT_RATES), "step_seconds": 30.0, "hold_calls": 20_000,
        "hold_rate": 250.0, "hold_margin": 20.0, "memory_calls": 3000, "memory_rate": 100.0,
        "linger": 40.0, "warmup": 20, "baseline": True,
        "relay_steps": [500, 750], "relay_seconds": 10.0, "relay_quiet_wait": 30.0,
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
    relay_backends = [part.strip() for part in args.relay_backends.split(",") if part.strip()]
    if not relay_backends or any(b not in ("relay", "rtpengine") for b in relay_backends):
        parser.error("--relay-backends: relay, rtpengine or both")
    if args.relay_seconds <= 0 or args.relay_workers <= 0 or args.relay_quiet_wait < 0:
        parser.error(
            "--relay-seconds and --relay-workers positive, --relay-quiet-wait not negative"
        )
    if "relay" in args.phases and "rtpengine" in relay_backends and not shutil.which("rtpengine"):
        raise SystemExit(
            "rtpengine not found (Debian rtpengine-daemon): install it, or --relay-backends relay"
        )
    if (library := missing_allocator(args.allocator)) is not None:
        raise SystemExit(f"--allocator {args.allocator}: {library} not found (Debian "
                         f"{ALLOCATOR_PACKAGES[args.allocator]})")  # fmt: skip
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
        sbc_out=args.sbc_out[0],
        log_level=args.log_level,
        warmup=args.warmup,
        udp_buffer=args.udp_buffer,
        retell_udp_port=0 if args.retell_socket else None,
        allocator=args.allocator,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    steps: list[dict[str, Any]] = []
    holds: dict[str, dict[str, Any]] = {}
    memories: dict[str, dict[str, Any]] = {}
    relay: dict[str, Any] | None = None
    # The ramped B2BUAs by label: sbc with the first --sbc-out is "sbc" (hold and memory use
    # it too), with a second one "sbc-udp" or "sbc-tcp".
    variants: dict[str, tuple[str, Options]] = {}
    for system in args.systems:
        if system != "sbc":
            variants[system] = (system, options)
            continue
        for i, out in enumerate(args.sbc_out):
            variants["sbc" if i == 0 else f"sbc-{out}"] = ("sbc", replace(options, sbc_out=out))
    try:
        module = imported_from(options.python, REPO, workdir)
        info = machine()
        print(
            f"{info['time_utc']} UTC, {info['nproc']} CPUs, Python {info['python']}, "
            f"{info['sipp']}, load {' '.join(info['load_average'])}; sbc "
            f"{describe_checkout(REPO)} ({module}), in {args.sbc_in} out "
            f"{','.join(args.sbc_out)}, log {args.log_level}, UDP buffer "
            f"{args.udp_buffer if args.udp_buffer is not None else 'default'}, Retell's own "
            f"UDP socket {'on' if args.retell_socket else 'off'}, allocator {args.allocator}; "
            f"Sippy {sippy or '-'}; "
            f"work dir {workdir}",
            flush=True,
        )
        counter = iter(range(1, 10_000))

        def step(label: str, rate: float) -> dict[str, Any]:
            system, chosen = variants.get(label, (label, options))
            step_dir = workdir / f"{next(counter):02d}-ramp-{label}-{rate:g}"
            step_dir.mkdir()
            result = ramp_step(system, rate, args.step_seconds, chosen, step_dir)
            result["label"] = label
            result["sbc_out"] = chosen.sbc_out if system == "sbc" else "udp"
            steps.append(result)
            print_step(result)
            return result

        if "ramp" in args.phases:
            ramping = list(variants)
            for rate in args.rates:
                for label in (["direct"] if args.baseline else []) + list(ramping):
                    if not step(label, rate)["passed"] and label in ramping:
                        ramping.remove(label)
                if not ramping:
                    break
            # The post-dial target is read at half the highest rate sbc (TCP out) passed: run
            # that rate if the ramp had no step there (with its baseline).
            tcp = [
                k for k, (system, o) in variants.items() if system == "sbc" and o.sbc_out == "tcp"
            ]
            if args.half_rate and tcp:
                passed = [s["rate"] for s in steps if s.get("label") == tcp[0] and s["passed"]]
                half = max(passed) / 2 if passed else None
                ran = {(s.get("label"), s["rate"]) for s in steps}
                if half is not None and (tcp[0], half) not in ran:
                    print(f"  half the highest rate of {tcp[0]}: {half:g}/s", flush=True)
                    if args.baseline and ("direct", half) not in ran:
                        step("direct", half)
                    step(tcp[0], half)
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
        if "relay" in args.phases:
            phase_dir = workdir / f"{next(counter):02d}-relay"
            phase_dir.mkdir()
            relay = relay_phase(
                args.relay_steps, args.relay_seconds, relay_backends, args.relay_workers,
                args.relay_quiet_wait, phase_dir,
            )  # fmt: skip
            print_relay(relay)
        summaries = {k: summarise(k, steps, holds.get(k), memories.get(k)) for k in variants}
        ratios = print_summary(summaries) if {"ramp", "hold", "memory"} & set(args.phases) else {}
        found = targets(summaries, holds, memories, relay, args.baseline, args.sbc_in)
        print_targets(found)
        failed = [
            s
            for s in variants
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
                        "relay": relay,
                        "summary": summaries,
                        "targets": found,
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
