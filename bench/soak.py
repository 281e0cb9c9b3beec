"""Soak: thousands of calls of every kind through a real ``sbc run``; nothing may be left, RSS
must stay flat.

Run from the repository root:

    python bench/soak.py [--batches 5] [--calls 200] [--rate 20] [--hold 300] [--t1 0.5]
                         [--json FILE] [--tracemalloc FRAMES] [--keep]

What runs, each on a 127.0.0.0/8 address of its own and on free ports (see bench_calls.py,
whose process and SIPp helpers this reuses):

* SIPp as the 3CX registrar on 127.0.0.61 (UDP, ``pbx_registrar.xml``);
* SIPp as Retell on 127.0.0.63 over TCP (``soak_retell.xml``): what it does with a call is
  chosen by the caller's number, which sbc passes on in ``X-Caller-Number``;
* sbc, ``python -m sbc run`` on 127.0.0.62: relay media (RTP ports taken and given back per
  call), ``[transfer] mode = "refer"``, call records on (SQLite in the work directory),
  ``sip.t1`` from ``--t1`` (Timer J/K/L: 64 x T1 after the last message of a transaction),
  ``sip.idle_timeout`` from ``--idle-timeout`` so that the connection to Retell is closed
  between batches and must be counted back to zero;
* per batch, five SIPp callers as 3CX on 127.0.0.61 (UDP) at once, ``--calls`` calls each at
  ``--rate`` calls/s: **talk** (Retell answers, 3CX hangs up after ``--hold`` ms), **busy**
  (Retell 486), **down** (Retell 503), **cancel** (Retell rings, 3CX CANCELs), **transfer**
  (Retell answers, then REFERs the call to "sales"; 3CX challenges sbc's REFER, takes it,
  reports NOTIFY 200 and gets sbc's BYE).

After each batch: every caller must have completed all its calls; then sbc's ``/metrics`` is
polled until calls, dialogs, SIP transactions, stream connections, RTP ports and every
per-call or per-request table (``sbc_table_entries``) read 0 (``--settle`` s at most: Timer
J/L run 64 x T1 after a call's last transaction). RSS (VmRSS of the sbc process) is read right
after the callers finished (what is retained while timers run) and again once everything is
back to zero. Batch 1 is the warm-up (caches, pymalloc arenas, SQLite pages); the growth from
the end of batch 1 to the end of the last batch, divided by the calls placed in between, is
the figure that must stay near 0 (KiB per call).

``--tracemalloc FRAMES`` runs sbc under tracemalloc (slower) through a small wrapper around
``python -m sbc``: the traced Python heap is read right after each batch's calls and once
everything is back to 0 (SIGUSR1; unlike RSS it falls when memory is freed, so the difference
is what a call holds while its transactions' timers run), a snapshot is dumped at the end of
every batch (SIGUSR2), and the 15 allocation sites that grew most from the end of batch 1 to
the end of the last batch are printed.

Exit status 1 when a call failed, anything was left after a batch, or sbc died.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_calls import (  # bench/ is not a package: found through sys.path
    REPO,
    SCENARIOS,
    Children,
    free_port,
    http_get,
    parse_metrics,
    peer_sections,
    rss_mib,
    sbc_environment,
    sipp_binary,
    start_sipp,
    stat,
    wait_listening,
    wait_ready,
)

PBX = "127.0.0.61"  # SIPp: registrar and callers (3CX)
SBC = "127.0.0.62"  # sbc: SIP and admin HTTP
RETELL = "127.0.0.63"  # SIPp: Retell's SIP server
EXTENSION = "101"

# kind -> (caller scenario, caller number: its last 4 digits tell soak_retell.xml what to do)
KINDS: dict[str, tuple[str, str]] = {
    "talk": ("soak_pbx_talk.xml", "4155550200"),
    "busy": ("soak_pbx_rejected.xml", "4155550486"),
    "down": ("soak_pbx_rejected.xml", "4155550503"),
    "cancel": ("soak_pbx_cancel.xml", "4155550487"),
    "transfer": ("soak_pbx_transfer.xml", "4155550202"),
}

# Runs sbc like ``python -m sbc`` under tracemalloc; SIGUSR2 writes a snapshot to the file
# named by SOAK_SNAPSHOT (numbered). Bench only: sbc itself knows nothing of it.
TRACEMALLOC_WRAPPER = """
import os, runpy, signal, sys, tracemalloc
tracemalloc.start(int(os.environ["SOAK_TRACEMALLOC"]))
count = [0]
def dump(signum, frame):
    count[0] += 1
    tracemalloc.take_snapshot().dump(f"{os.environ['SOAK_SNAPSHOT']}.{count[0]}")
    open(f"{os.environ['SOAK_SNAPSHOT']}.{count[0]}.done", "w").close()
signal.signal(signal.SIGUSR2, dump)
reads = [0]
def traced(signum, frame):
    reads[0] += 1
    path = f"{os.environ['SOAK_SNAPSHOT']}.mem.{reads[0]}"
    with open(path + ".tmp", "w") as out:
        out.write(str(tracemalloc.get_traced_memory()[0]))
    os.replace(path + ".tmp", path)
signal.signal(signal.SIGUSR1, traced)
sys.argv = ["sbc", *sys.argv[1:]]
runpy.run_module("sbc", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class SoakLoad:
    batches: int = 5
    calls: int = 200  # per kind and batch
    rate: float = 20.0  # calls/s per kind
    hold_ms: int = 300
    t1: float = 0.5
    idle_timeout: float = 5.0
    settle: float = 90.0
    log_level: str = "warning"
    python: str = sys.executable
    tracemalloc: int = 0

    @property
    def per_batch(self) -> int:
        return self.calls * len(KINDS)


def sbc_config(
    sip_port: int,
    registrar_port: int,
    retell_port: int,
    admin_port: int,
    load: SoakLoad,
    work: Path,
) -> str:
    return f"""\
# bench/soak.py: sbc between SIPp as 3CX ({PBX}) and SIPp as Retell ({RETELL})
[sip]
bind = "{SBC}"
port = {sip_port}
t1 = {load.t1}
t2 = {max(4.0, load.t1)}
idle_timeout = {load.idle_timeout}

{peer_sections(PBX, registrar_port, "soak", RETELL, retell_port)}
[headers]
X-Caller-Number = "{{caller_number}}"
X-Call-UUID = "{{call_uuid}}"

[media]
mode = "relay"
rtp_port_min = 30000
rtp_port_max = 39999

[transfer]
mode = "refer"
allow = "^8[0-9]{{2}}$"
targets = {{ sales = "800" }}

[records]
path = "{work / "calls.sqlite3"}"

[admin]
listen = "{SBC}:{admin_port}"

[log]
level = "{load.log_level}"
format = "json"
"""


# The gauges that must all read 0 once a batch and its timers are over.
ZERO_GAUGES = (
    "sbc_calls_active",
    "sbc_sip_transactions",
    "sbc_sip_dialogs",
    "sbc_sip_connections",
    "sbc_rtp_ports_in_use",
)


def leftovers(admin_port: int) -> dict[str, float]:
    """Every count that must be 0 when sbc is idle (absent ones reported as -1)."""
    status, body = http_get(SBC, admin_port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    metrics = parse_metrics(body)
    out = {name: metrics.get(name, -1.0) for name in ZERO_GAUGES}
    prefix = 'sbc_table_entries{table="'
    for key, value in metrics.items():
        if key.startswith(prefix):
            out[key[len(prefix) : -2]] = value
    return out


def counters(admin_port: int) -> dict[str, float]:
    """What sbc counted: calls started, ended by outcome, transfers by outcome; and the
    garbage collector's runs by generation."""
    _, body = http_get(SBC, admin_port, "/metrics")
    metrics = parse_metrics(body)
    wanted = (
        "sbc_calls_started_total",
        "sbc_calls_ended_total",
        "sbc_transfers_total",
        "python_gc_collections_total",  # by generation: were ended calls waiting for gen 2?
    )
    return {k: v for k, v in metrics.items() if k.startswith(wanted)}


def nonzero_only(counts: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in counts.items() if v}


def wait_zero(admin_port: int, limit: float) -> tuple[dict[str, float], float]:
    """Poll /metrics until every leftover is 0; returns the last reading and the wait."""
    started = time.monotonic()
    while True:
        left = leftovers(admin_port)
        if not any(left.values()):
            return left, time.monotonic() - started
        if time.monotonic() - started > limit:
            return left, time.monotonic() - started
        time.sleep(0.25)  # the timers run in another process: nothing to wait on but time


def traced_mib(sbc_pid: int, base: Path, index: int, limit: float = 30.0) -> float:
    """Python's traced heap in sbc (tracemalloc wrapper, SIGUSR1 read ``index``), MiB: unlike
    RSS it falls when memory is freed, so it shows what is held while timers run."""
    path = Path(f"{base}.mem.{index}")
    os.kill(sbc_pid, signal.SIGUSR1)
    deadline = time.monotonic() + limit
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc reading {index} after {limit} s")
        time.sleep(0.05)
    return int(path.read_text()) / 2**20


def snapshot(sbc_pid: int, base: Path, index: int, limit: float = 60.0) -> Path:
    """Ask the tracemalloc wrapper for snapshot ``index`` and wait until it is written."""
    done = Path(f"{base}.{index}.done")
    os.kill(sbc_pid, signal.SIGUSR2)
    deadline = time.monotonic() + limit
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot {index} after {limit} s")
        time.sleep(0.1)
    return Path(f"{base}.{index}")


def top_growth(first: Path, last: Path, count: int = 15) -> list[str]:
    before = tracemalloc.Snapshot.load(str(first))
    after = tracemalloc.Snapshot.load(str(last))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    lines = []
    for stat_ in stats[:count]:
        newest_first = list(stat_.traceback)[::-1][:6]  # a Traceback lists the oldest first
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in newest_first)
        lines.append(f"{stat_.size_diff / 1024:+9.1f} KiB {stat_.count_diff:+7d} blocks  {frames}")
    return lines


def run_soak(load: SoakLoad, workdir: Path, repo: Path = REPO, echo: bool = True) -> dict[str, Any]:
    """One soak; returns its figures (see the module docstring). Raises nothing for failed
    calls or leftovers: they are in the result (``failures``)."""

    def say(text: str) -> None:
        if echo:
            print(text, flush=True)

    children = Children()
    batches: list[dict[str, Any]] = []
    failures: list[str] = []
    result: dict[str, Any] = {"load": vars(load), "batches": batches, "failures": failures}
    try:
        registrar_port = free_port(PBX)
        registrar = start_sipp(
            children, "registrar", "pbx_registrar.xml", workdir, local_ip=PBX,
            port=registrar_port, transport="u1", calls=1, time_limit=3600,
        )  # fmt: skip
        wait_listening(registrar.child, PBX, registrar_port, tcp=False)
        retell_port = free_port(RETELL, udp_too=False)
        total = load.batches * load.per_batch
        retell = start_sipp(
            children, "retell", "soak_retell.xml", workdir, local_ip=RETELL, port=retell_port,
            transport="t1", calls=total, time_limit=3600, extra=("-max_socket", "1000"),
        )  # fmt: skip
        wait_listening(retell.child, RETELL, retell_port, tcp=True)

        sip_port, admin_port = free_port(SBC), free_port(SBC, udp_too=False)
        config = workdir / "sbc.toml"
        config.write_text(
            sbc_config(sip_port, registrar_port, retell_port, admin_port, load, workdir)
        )
        env = sbc_environment(repo)
        if load.tracemalloc:
            env["SOAK_TRACEMALLOC"] = str(load.tracemalloc)
            env["SOAK_SNAPSHOT"] = str(workdir / "snapshot")
            command = [load.python, "-c", TRACEMALLOC_WRAPPER, "run", "--config", str(config)]
        else:
            command = [load.python, "-m", "sbc", "run", "--config", str(config)]
        sbc = children.start("sbc", command, cwd=workdir, log=workdir / "sbc.log", env=env)
        wait_ready(sbc, admin_port, limit=60.0, host=SBC)
        time.sleep(1.0)
        result["rss_idle_mib"] = rss_mib(sbc.proc.pid)
        say(
            f"sbc pid {sbc.proc.pid} idle: RSS {result['rss_idle_mib']:.2f} MiB; "
            f"{load.batches} batches x {load.per_batch} calls ({load.calls} per kind: "
            f"{', '.join(KINDS)}), {load.rate:g}/s per kind, T1 {load.t1} s; work dir {workdir}"
        )
        snapshots: list[Path] = []

        for number in range(1, load.batches + 1):
            started = time.monotonic()
            callers = {}
            for kind, (scenario, caller_number) in KINDS.items():
                callers[kind] = start_sipp(
                    children, f"b{number}-{kind}", scenario, workdir, local_ip=PBX,
                    port=free_port(PBX), transport="u1", calls=load.calls,
                    time_limit=load.calls / load.rate + 120, remote=f"{SBC}:{sip_port}",
                    extra=(
                        "-s", EXTENSION, "-key", "number", caller_number,
                        "-r", f"{load.rate:g}", "-rp", "1000", "-d", str(load.hold_ms),
                        "-l", str(int(load.rate * 10) + 50),
                    ),
                )  # fmt: skip
            outcome: dict[str, dict[str, int]] = {}
            for kind, sipp in callers.items():
                code = sipp.finish(load.calls / load.rate + 120)
                stats = sipp.stats()
                ok, failed = stat(stats, "SuccessfulCall(C)"), stat(stats, "FailedCall(C)")
                outcome[kind] = {"exit": code, "ok": ok, "failed": failed}
                if code != 0 or ok != load.calls or failed:
                    failures.append(f"batch {number} {kind}: exit {code}, {ok} ok, {failed} failed")
            calls_seconds = time.monotonic() - started
            if not sbc.running():
                failures.append(f"sbc exited ({sbc.proc.returncode}) during batch {number}")
                break
            rss_busy = rss_mib(sbc.proc.pid)
            heap_busy = heap_idle = None
            if load.tracemalloc:
                heap_busy = traced_mib(sbc.proc.pid, workdir / "snapshot", 2 * number - 1)
            left, waited = wait_zero(admin_port, load.settle)
            rss_idle = rss_mib(sbc.proc.pid)
            if load.tracemalloc:
                heap_idle = traced_mib(sbc.proc.pid, workdir / "snapshot", 2 * number)
            nonzero = {k: v for k, v in left.items() if v}
            if nonzero:
                failures.append(f"batch {number}: left after {waited:.0f} s: {nonzero}")
            batch = {
                "batch": number,
                "calls": load.per_batch,
                "outcome": outcome,
                "calls_seconds": calls_seconds,
                "settle_seconds": waited,
                "rss_after_calls_mib": rss_busy,
                "rss_settled_mib": rss_idle,
                "traced_after_calls_mib": heap_busy,
                "traced_settled_mib": heap_idle,
                "leftovers": left,
            }
            batches.append(batch)
            if load.tracemalloc:
                snapshots.append(snapshot(sbc.proc.pid, workdir / "snapshot", number))
            ok_total = sum(o["ok"] for o in outcome.values())
            kinds = ", ".join(f"{kind} {o['ok']}" for kind, o in outcome.items())
            say(
                f"batch {number}: {ok_total}/{load.per_batch} calls ok in {calls_seconds:.1f} s "
                f"({kinds}); RSS right after "
                f"{rss_busy:.2f} MiB, all back to 0 after {waited:.1f} s: "
                f"{nonzero or 'yes'}; RSS then {rss_idle:.2f} MiB"
            )

        result["counters"] = counters(admin_port) if sbc.running() else {}
        # Retell gone: the connection to it must close too, and everything stay at 0.
        retell_exit = retell.finish(0.1)  # it has taken every call: stopped if still running
        left, waited = wait_zero(admin_port, load.settle)
        result["leftovers_end"] = left
        if any(left.values()):
            failures.append(f"after Retell stopped: left {nonzero_only(left)}")
        retell_stats = retell.stats()
        result["retell"] = {
            "exit": retell_exit,
            "ok": stat(retell_stats, "SuccessfulCall(C)"),
            "failed": stat(retell_stats, "FailedCall(C)"),
        }
        if result["retell"]["ok"] != len(batches) * load.per_batch or result["retell"]["failed"]:
            failures.append(f"Retell: {result['retell']}")
        if snapshots and len(snapshots) >= 2:
            result["tracemalloc_top"] = top_growth(snapshots[0], snapshots[-1])
        result["sbc_alive"] = sbc.running()
        if not sbc.running():
            failures.append("sbc died")
        Children.stop(sbc, grace=10.0)
    finally:
        children.stop_all()
    figures(result, load)
    return result


def figures(result: dict[str, Any], load: SoakLoad) -> None:
    """KiB per call: retained while timers run, and left once everything is back to 0."""
    batches = result["batches"]
    if not batches:
        return
    first = batches[0]
    per_batch = load.per_batch
    result["kib_per_call_first_batch"] = (
        1024 * (first["rss_settled_mib"] - result["rss_idle_mib"]) / per_batch
    )
    result["kib_per_call_retained_while_timers_run"] = [
        1024 * (b["rss_after_calls_mib"] - b["rss_settled_mib"]) / per_batch for b in batches
    ]
    if batches[0]["traced_settled_mib"] is not None:
        result["traced_kib_per_call_while_timers_run"] = [
            1024 * (b["traced_after_calls_mib"] - b["traced_settled_mib"]) / per_batch
            for b in batches
        ]
    if len(batches) >= 2:
        last = batches[-1]
        calls = per_batch * (len(batches) - 1)
        result["kib_per_call_after_warmup"] = (
            1024 * (last["rss_settled_mib"] - first["rss_settled_mib"]) / calls
        )
        steps = [
            b["rss_settled_mib"] - a["rss_settled_mib"] for a, b in itertools.pairwise(batches)
        ]
        result["rss_step_mib"] = steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=5, help="batches (5; the first warms up)")
    parser.add_argument("--calls", type=int, default=200, help="calls per kind and batch (200)")
    parser.add_argument("--rate", type=float, default=20.0, help="calls/s per kind (20)")
    parser.add_argument("--hold", type=int, default=300, help="talk calls: ms to BYE (300)")
    parser.add_argument("--t1", type=float, default=0.5, help="sbc's sip.t1 in s (0.5)")
    parser.add_argument(
        "--idle-timeout", type=float, default=5.0, help="sbc's sip.idle_timeout in s (5)"
    )
    parser.add_argument("--settle", type=float, default=90.0, help="s to wait for zero (90)")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="(off)")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout to run")
    parser.add_argument("--python", default=sys.executable, help="interpreter running sbc")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures there")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.calls < 1 or args.rate <= 0:
        parser.error("--batches, --calls and --rate must be positive")
    if args.calls * len(KINDS) * args.batches > 50_000:
        parser.error("at most 50,000 calls in all")
    sipp_binary()
    for scenario in {s for s, _ in KINDS.values()} | {"soak_retell.xml", "pbx_registrar.xml"}:
        if not (SCENARIOS / scenario).is_file():
            raise SystemExit(f"missing scenario {SCENARIOS / scenario}")
    load = SoakLoad(
        batches=args.batches, calls=args.calls, rate=args.rate, hold_ms=args.hold, t1=args.t1,
        idle_timeout=args.idle_timeout, settle=args.settle, python=args.python,
        tracemalloc=args.tracemalloc,
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    keep = args.keep
    try:
        result = run_soak(load, workdir, args.repo.resolve())
        report(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        if result["failures"]:
            keep = True
            print("FAILED:\n  " + "\n  ".join(result["failures"]), file=sys.stderr)
            return 1
        return 0
    except BaseException:
        keep = True
        raise
    finally:
        if keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    batches = result["batches"]
    print(
        f"\nRSS MiB: idle {result['rss_idle_mib']:.2f}; settled after each batch: "
        + ", ".join(f"{b['rss_settled_mib']:.2f}" for b in batches)
        + "; right after each batch's calls: "
        + ", ".join(f"{b['rss_after_calls_mib']:.2f}" for b in batches)
    )
    if "kib_per_call_first_batch" in result:
        first = result["kib_per_call_first_batch"]
        print(f"KiB per call, batch 1 (warm-up) over idle: {first:.2f}")
        retained = result["kib_per_call_retained_while_timers_run"]
        print(
            "KiB per call retained while timers run (after calls - settled), by batch: "
            + ", ".join(f"{v:.2f}" for v in retained)
        )
    if "kib_per_call_after_warmup" in result:
        print(
            f"KiB per call from the end of batch 1 to the end of batch {len(batches)}: "
            f"{result['kib_per_call_after_warmup']:.3f} (steps MiB: "
            + ", ".join(f"{s:+.2f}" for s in result["rss_step_mib"])
            + ")"
        )
    if "traced_kib_per_call_while_timers_run" in result:
        print(
            "Python heap (tracemalloc) MiB right after each batch's calls -> settled: "
            + ", ".join(
                f"{b['traced_after_calls_mib']:.2f} -> {b['traced_settled_mib']:.2f}"
                for b in batches
            )
            + "; KiB per call held while timers run: "
            + ", ".join(f"{v:.2f}" for v in result["traced_kib_per_call_while_timers_run"])
        )
    print(f"counted by sbc: {json.dumps(result.get('counters', {}))}")
    left = nonzero_only(result.get("leftovers_end", {}))
    print(f"Retell SIPp: {result.get('retell')}; left at the end: {left or 'nothing'}")
    for line in result.get("tracemalloc_top", []):
        print("  " + line)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise SystemExit(main())
