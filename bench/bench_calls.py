"""Calls per second through the bridge: a real ``sbc run`` between SIPp as 3CX and SIPp as Retell.

Run from the repository root:

    python bench/bench_calls.py [--rate 100] [--seconds 10] [--hold 1000] [--repo PATH]
    python bench/bench_calls.py --compare PATH_A PATH_B [--rounds 3] [--json FILE]

What runs, each on a 127.0.0.0/8 address of its own and on free ports:

* SIPp as the 3CX registrar on 127.0.0.51 (UDP, ``bench/scenarios/pbx_registrar.xml``: every
  REGISTER answered 200, no challenge);
* SIPp as Retell on 127.0.0.53 over TCP (``-t t1``, ``bench/scenarios/retell_uas.xml``): answers
  each INVITE 200 with SDP at once, takes the ACK, then the BYE sbc relays, and answers it 200;
* sbc itself, ``python -m sbc run --config FILE`` on 127.0.0.52 with media mode ``passthrough``
  (no RTP handled, so the figures are the signalling and call layer), log level ``--log-level``
  (JSON lines to a file), five X- headers rendered per call, the PBX and Retell trusted by
  address, ``calls.max_concurrent`` far above the load. ``--repo PATH`` runs the sbc of another
  checkout: ``PYTHONPATH=PATH`` and the working directory outside any checkout, and the file
  ``import sbc`` resolves to under that environment is printed and must lie in PATH. Each round
  starts a fresh sbc and waits until ``GET /readyz`` says 200 (registered);
* SIPp as the 3CX caller on 127.0.0.51 over UDP (``-t u1``, ``bench/scenarios/pbx_caller.xml``):
  INVITE with SDP to the registered extension, 200, ACK, ``--hold`` ms, BYE, 200. First
  ``--warmup`` calls (not measured), then ``--rate`` calls/s for ``--seconds`` (``-m`` rate x
  seconds, ``-rp 1000``).

Measured from the start of the caller run after the warm-up until both SIPp ends have finished
plus 1 s: calls attempted, succeeded and failed at the caller and at Retell (SIPp's
``-trace_stat`` files), SIPp's retransmissions, the CPU of the sbc process (utime+stime from
/proc/PID/stat) in seconds, as a share of one core and in ms per successful call, the mean (and
p50/p95/max) time from the first INVITE to its 200 at the caller (from the caller's
``-trace_msg`` file, whose stamps have microseconds: SIPp's own response times, its ``setup``
rtd, also shown, count on a clock that advances in 4 ms steps on this kernel), sbc's RSS before
and after (and again ``--linger`` seconds later), and what sbc's /metrics says afterwards (calls
active, started, refused). Also sbc's CPU while registered and idle, over 3 s before the
warm-up.

``--compare A B`` runs the same load against both checkouts in alternation (A B A B A B for
the default ``--rounds 3``), prints one row per round and per checkout (CPU summed over its
rounds and divided by its successful calls; INVITE->200 averaged over all its calls), the ratios
B/A, and the ratio of each A/B pair of rounds (their spread is the noise of the run). The
machine is shared: compare ratios from one run, not figures from different runs. Also shown:
sbc's CPU over the two SIPp processes' CPU in the same window (``RUSAGE_CHILDREN``). SIPp does the
same work against either tree as long as both exchange the same messages, so this ratio cancels
much of what a busy or slowed-down machine does to both (in six identical rounds on the 2-vCPU
VM, sbc CPU per call ranged over +-12 %, sbc CPU / SIPp CPU over +-3 %). Exit status 1 when any
call failed or a SIPp end did not finish cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCENARIOS = BENCH / "scenarios"

PBX = "127.0.0.51"  # SIPp: registrar and caller (3CX)
SBC = "127.0.0.52"  # sbc: SIP and admin HTTP
RETELL = "127.0.0.53"  # SIPp: Retell's SIP server
EXTENSION = "101"
RETELL_NUMBER = "+14155550100"

PR_SET_PDEATHSIG = 1
IDLE_SECONDS = 3.0  # sbc's CPU while registered and without calls, measured before the calls


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this benchmark dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        if not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Children:
    """Every process a round starts; :meth:`stop_all` ends them (SIGTERM, then SIGKILL)."""

    started: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        cwd: Path,
        log: Path,
        env: dict[str, str] | None = None,
    ) -> Child:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log)
        self.started.append(child)
        return child

    @staticmethod
    def stop(child: Child, sig: int = signal.SIGTERM, grace: float = 5.0) -> int:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
        return child.proc.returncode

    def stop_all(self) -> None:
        for child in reversed(self.started):
            with contextlib.suppress(Exception):
                self.stop(child, grace=10.0 if child.name == "sbc" else 3.0)
        self.started.clear()


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped


# --------------------------------------------------------------------------- probes


def free_port(host: str, udp_too: bool = True) -> int:
    """A port free on ``host`` for TCP (and for UDP when ``udp_too``)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            if not udp_too:
                return port
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _hex_ip(host: str) -> str:
    return "".join(f"{int(part):02X}" for part in reversed(host.split(".")))


def listening(host: str, port: int, tcp: bool) -> bool:
    """Whether ``host:port`` is bound (UDP) or listening (TCP), read from /proc/net."""
    want = f"{_hex_ip(host)}:{port:04X}"
    table = Path("/proc/net/tcp" if tcp else "/proc/net/udp").read_text().splitlines()[1:]
    for line in table:
        fields = line.split()
        if fields[1] == want and (not tcp or fields[3] == "0A"):  # 0A: TCP_LISTEN
            return True
    return False


def wait_listening(child: Child, host: str, port: int, tcp: bool, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not listening(host, port, tcp):
        if not child.running():
            raise RuntimeError(
                f"{child.name} exited ({child.proc.returncode}) before listening on "
                f"{host}:{port}:\n{child.tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name} not listening on {host}:{port} after {limit} s")
        time.sleep(0.02)


def http_get(host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)  # no proxy lookup
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value}; comments skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float | None:
    """The sum over every label set of ``name`` (None if absent)."""
    values = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


# --------------------------------------------------------------------------- checkouts


def sbc_environment(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBC_")}
    env["PYTHONPATH"] = str(repo)
    env.pop("PYTHONSTARTUP", None)
    return env


def imported_from(python: str, repo: Path, cwd: Path) -> Path:
    """The file ``import sbc`` resolves to with ``PYTHONPATH=repo``; it must lie in ``repo``."""
    done = subprocess.run(
        [python, "-c", "import sbc; print(sbc.__file__)"],
        env=sbc_environment(repo),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot import sbc from {repo}:\n{done.stderr}")
    path = Path(done.stdout.strip()).resolve()
    if not path.is_relative_to(repo.resolve()):
        raise RuntimeError(f"import sbc with PYTHONPATH={repo} gives {path}, not that checkout")
    return path


def describe_checkout(repo: Path) -> str:
    """Commit, and how many tracked files differ from it (read-only git, no index lock)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "-uno"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
    except (subprocess.SubprocessError, OSError):
        return "not a git checkout"
    return f"{head} + {len(changed)} modified files" if changed else head


# --------------------------------------------------------------------------- SIPp


def sipp_binary() -> str:
    found = shutil.which("sipp")
    if found is None:
        raise SystemExit("sipp not found on PATH (Debian package sip-tester)")
    return found


def read_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp ``-trace_stat`` file as {column: value}."""
    if not path.exists():
        return {}
    rows = [r for r in csv.reader(path.read_text(errors="replace").splitlines(), delimiter=";")]
    rows = [r for r in rows if r]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1], strict=False))


def stat(stats: dict[str, str], name: str) -> int:
    value = stats.get(name, "") or "0"
    try:
        return int(value)
    except ValueError:
        return 0


_SEPARATOR = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\s*$")


def invite_to_200(message_file: Path) -> list[float]:
    """Milliseconds from each call's first INVITE sent to the first 200 for it received, read
    from the caller's ``-trace_msg`` file (stamped to the microsecond; SIPp's own response
    times count on a clock that advances in 4 ms steps here)."""
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    stamp, received, start, call_id, method, state = 0.0, False, "", "", "", "none"

    def close_block() -> None:
        if state != "headers" or not call_id:
            return
        if not received and start.startswith("INVITE "):
            sent.setdefault(call_id, stamp)
        elif received and start.startswith("SIP/2.0 200") and method == "INVITE":
            answered.setdefault(call_id, stamp)

    if not message_file.exists():
        return []
    with message_file.open(errors="replace") as lines:
        for line in lines:
            mark = _SEPARATOR.match(line)
            if mark:
                close_block()
                stamp = datetime.fromisoformat(mark.group(1)).timestamp()
                start, call_id, method, state = "", "", "", "direction"
            elif state == "direction":
                received = "received" in line.lower()
                state = "start"
            elif state == "start":
                if line.strip():
                    start, state = line.strip(), "headers"
            elif state == "headers":
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("call-id", "i"):
                    call_id = value.strip()
                elif name == "cseq":
                    method = value.split()[-1].upper() if value.split() else ""
        close_block()
    return [1e3 * (answered[c] - sent[c]) for c in answered if c in sent]


def sipp_duration_ms(value: str) -> float | None:
    """SIPp's ``HH:MM:SS:uuuuuu`` (statistics file) in milliseconds."""
    parts = value.split(":")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    hours, minutes, seconds, micros = (int(p) for p in parts)
    return 1e3 * (3600 * hours + 60 * minutes + seconds) + micros / 1e3


@dataclass
class Sipp:
    child: Child
    directory: Path
    stat_file: Path
    started: float

    def finish(self, limit: float) -> int:
        """Wait for SIPp to exit by itself; on ``limit``, stop it (SIGUSR1: let calls end,
        write the statistics) and report it as failed."""
        try:
            return self.child.proc.wait(max(limit, 0.1))
        except subprocess.TimeoutExpired:
            code = Children.stop(self.child, signal.SIGUSR1, grace=5.0)
            print(f"  {self.child.name}: still running after {limit:.0f} s, stopped", flush=True)
            return code if code else -1

    def stats(self) -> dict[str, str]:
        return read_stats(self.stat_file)


def sipp_command(scenario: Path, directory: Path, *, local_ip: str, port: int, transport: str,
                 calls: int, timeout_s: int, remote: str | None = None,
                 extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """SIPp's command line for the bench scripts: ``calls`` calls of ``scenario`` from
    ``local_ip:port``, failed after ``timeout_s``, its statistics and errors in ``directory``."""
    return [
        sipp_binary(),
        "-sf", str(scenario),
        *([remote] if remote else []),
        "-t", transport,
        "-i", local_ip,
        "-p", str(port),
        "-cp", str(free_port("0.0.0.0", udp_too=True)),  # SIPp binds its control socket everywhere
        "-m", str(calls),
        "-timeout", f"{timeout_s}s",
        "-timeout_error",
        "-buff_size", "4194304",
        "-trace_stat", "-stf", str(directory / "stat.csv"), "-fd", "1",
        "-trace_err", "-error_file", str(directory / "errors.log"),
        "-nostdin",
        *extra,
    ]  # fmt: skip


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
    remote: str | None = None,
    extra: Sequence[str] = (),
) -> Sipp:
    directory = workdir / name
    directory.mkdir()
    stat_file = directory / "stat.csv"
    command = sipp_command(
        SCENARIOS / scenario, directory, local_ip=local_ip, port=port, transport=transport,
        calls=calls, timeout_s=int(time_limit), remote=remote, extra=extra,
    )  # fmt: skip
    child = children.start(name, command, cwd=directory, log=directory / "output.log")
    return Sipp(child, directory, stat_file, time.monotonic())


# --------------------------------------------------------------------------- one round


@dataclass(frozen=True)
class Load:
    rate: float
    seconds: float
    hold_ms: int
    warmup: int
    log_level: str
    python: str
    linger: float

    @property
    def calls(self) -> int:
        return max(1, round(self.rate * self.seconds))

    @property
    def limit(self) -> int:
        """SIPp -l: calls in flight at most, well above rate x call length."""
        return int(self.rate * (self.hold_ms / 1000 + 5)) + 100


def peer_sections(pbx: str, registrar_port: int, password: str, retell: str, retell_port: int,
                  retell_transport: str = "tcp", number: str = RETELL_NUMBER) -> str:  # fmt: skip
    """sbc's [pbx], [retell] and [calls] sections, shared by the bench scripts: SIPp as 3CX's
    registrar at ``pbx`` (UDP, trusted, no keepalive), SIPp as Retell at ``retell`` (trusted) and no
    cap on calls."""
    return f"""\
[pbx]
host = "{pbx}"
port = {registrar_port}
transport = "udp"
extension = "{EXTENSION}"
password = "{password}"
register_expires = 3600
trusted = ["{pbx}/32"]
keepalive = "off"

[retell]
host = "{retell}"
port = {retell_port}
transport = "{retell_transport}"
number = "{number}"
trusted = ["{retell}/32"]
answer_timeout = 30

[calls]
max_concurrent = 100000
max_duration = 3600
"""


# The [headers] section of bench_calls.py's and load.py's sbc: every header sbc can add.
ALL_HEADERS = """\
[headers]
X-Caller-Number = "{caller_number}"
X-Caller-Name = "{caller_name}"
X-Called = "{called}"
X-PBX-Call-ID = "{pbx_call_id}"
X-Call-UUID = "{call_uuid}"
"""


# The limits a bench lifts: one trusted PBX sends far above what the edge guard's defaults admit
# (250 new calls/s; 1,000 out-of-dialog requests per 2 s from a trusted source; 1,000 unanswered
# transactions per source). An operator sizing a bridge for such a rate raises them the same way.
# Without this, a run above 250 calls/s measures the guard's 503s, not the bridge.
LOAD_SECURITY = """\
[security]
new_call_rate = 0
trusted_rate_limit = 10000000
"""
LOAD_SIP_LIMITS = "max_transactions_per_source = 1000000"


def sbc_config(
    sip_port: int,
    registrar_port: int,
    retell_port: int,
    admin_port: int,
    log_level: str,
    *,
    records: Path | None = None,
    pbx: str = PBX,
    bind: str = SBC,
    retell: str = RETELL,
    password: str = "bench",
    retell_transport: str = "tcp",
    script: str = "bench/bench_calls.py",
) -> str:
    """The sbc.toml of the call benchmarks (bench_calls, bench_bridge, load): sbc at ``bind``
    between SIPp as 3CX at ``pbx`` and SIPp as Retell at ``retell``, media passed through, call
    records at ``records`` (None: off; never sbc's default, the state directory, which every
    run of every tree would share)."""
    peers = peer_sections(pbx, registrar_port, password, retell, retell_port, retell_transport)
    records_section = f'[records]\npath = "{records or ""}"\n\n'
    return f"""\
# {script}: sbc between SIPp as 3CX ({pbx}) and SIPp as Retell ({retell})
[sip]
bind = "{bind}"
port = {sip_port}
{LOAD_SIP_LIMITS}

{peers}
{ALL_HEADERS}
[media]
mode = "passthrough"

{LOAD_SECURITY}
{records_section}[admin]
listen = "{bind}:{admin_port}"

[log]
level = "{log_level}"
format = "json"
"""


def wait_ready(sbc: Child, admin_port: int, limit: float = 20.0, host: str = SBC) -> None:
    """Until sbc's ``GET /readyz`` at ``host`` says 200 (registered with the SIPp registrar)."""
    deadline = time.monotonic() + limit
    last = "no answer"
    while time.monotonic() < deadline:
        if not sbc.running():
            raise RuntimeError(f"sbc exited ({sbc.proc.returncode}) on start:\n{sbc.tail()}")
        try:
            status, body = http_get(host, admin_port, "/readyz", timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"{status} {body.strip()}"
        time.sleep(0.05)
    raise RuntimeError(f"sbc not ready after {limit} s (/readyz: {last}):\n{sbc.tail()}")


def sbc_metrics(admin_port: int) -> dict[str, float | None]:
    try:
        status, body = http_get(SBC, admin_port, "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    metrics = parse_metrics(body)
    return {
        "calls_active": metric_sum(metrics, "sbc_calls_active"),
        "calls_started": metric_sum(metrics, "sbc_calls_started_total"),
        "calls_refused": metric_sum(metrics, "sbc_calls_refused_total"),
    }


def run_round(repo: Path, load: Load, label: str, workdir: Path) -> dict[str, Any]:
    """Fresh registrar, Retell, sbc; warm-up calls; the measured calls. Everything stopped after."""
    children = Children()
    warmup, calls = load.warmup, load.calls
    call_seconds = load.hold_ms / 1000
    try:
        registrar_port = free_port(PBX)
        registrar = start_sipp(
            children,
            "registrar",
            "pbx_registrar.xml",
            workdir,
            local_ip=PBX,
            port=registrar_port,
            transport="u1",
            calls=1,
            time_limit=load.seconds + 600,
        )
        wait_listening(registrar.child, PBX, registrar_port, tcp=False)

        retell_port = free_port(RETELL, udp_too=False)
        retell = start_sipp(
            children,
            "retell",
            "retell_uas.xml",
            workdir,
            local_ip=RETELL,
            port=retell_port,
            transport="t1",
            calls=warmup + calls,
            time_limit=load.seconds + 600,
            extra=("-max_socket", "1000"),
        )
        wait_listening(retell.child, RETELL, retell_port, tcp=True)

        sip_port, admin_port = free_port(SBC), free_port(SBC, udp_too=False)
        config = workdir / "sbc.toml"
        config.write_text(
            sbc_config(
                sip_port,
                registrar_port,
                retell_port,
                admin_port,
                load.log_level,
                # Records on, as deployed, in this run's own file: the state directory's would
                # be shared by every run and every tree compared (and grew to 2.2 GB).
                records=workdir / "calls.sqlite3",
            )
        )
        sbc = children.start(
            "sbc",
            [load.python, "-m", "sbc", "run", "--config", str(config)],
            cwd=workdir,
            log=workdir / "sbc.log",
            env=sbc_environment(repo),
        )
        wait_ready(sbc, admin_port)
        time.sleep(0.5)
        idle_before, idle_started = cpu_seconds(sbc.proc.pid), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle_share = (cpu_seconds(sbc.proc.pid) - idle_before) / (time.monotonic() - idle_started)

        def caller(name: str, count: int, rate: float) -> Sipp:
            return start_sipp(
                children,
                name,
                "pbx_caller.xml",
                workdir,
                local_ip=PBX,
                port=free_port(PBX),
                transport="u1",
                calls=count,
                time_limit=count / rate + call_seconds + 120,
                remote=f"{SBC}:{sip_port}",
                extra=(
                    "-s", EXTENSION,
                    "-r", f"{rate:g}",
                    "-rp", "1000",
                    "-l", str(load.limit),
                    "-d", str(load.hold_ms),
                    "-trace_msg",
                    "-message_file", str(workdir / name / "messages.log"),
                ),
            )  # fmt: skip

        warm: dict[str, str] = {}
        if warmup:
            warm_caller = caller("warmup", warmup, min(load.rate, 20.0))
            warm_exit = warm_caller.finish(warmup / min(load.rate, 20.0) + call_seconds + 60)
            warm = warm_caller.stats()
            if warm_exit != 0 or stat(warm, "SuccessfulCall(C)") != warmup:
                raise RuntimeError(
                    f"warm-up calls failed (SIPp exit {warm_exit}): {warm}\n"
                    f"{(warm_caller.directory / 'errors.log').read_text(errors='replace')[-2000:]}"
                    f"\nsbc log:\n{sbc.tail()}"
                )
        time.sleep(0.5)

        load_before = load_average()
        cpu_before, rss_before = cpu_seconds(sbc.proc.pid), rss_mib(sbc.proc.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        pbx = caller("caller", calls, load.rate)
        pbx_exit = pbx.finish(calls / load.rate + call_seconds + 180)
        pbx_done = time.monotonic()
        retell_exit = retell.finish(30.0)
        elapsed = time.monotonic() - started
        time.sleep(1.0)  # the last transactions and call teardown in sbc
        cpu = cpu_seconds(sbc.proc.pid) - cpu_before
        rss_after = rss_mib(sbc.proc.pid)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = load_average()
        metrics = sbc_metrics(admin_port)
        rss_lingered: float | None = None
        if load.linger > 0 and sbc.running():
            time.sleep(load.linger)  # transactions end (Timer J: 64 T1 = 32 s), memory freed
            rss_lingered = rss_mib(sbc.proc.pid)
        sbc_alive = sbc.running()

        caller_stats, retell_stats = pbx.stats(), retell.stats()
        rtts = invite_to_200(pbx.directory / "messages.log")
        sbc_exit = Children.stop(sbc, grace=10.0)
    finally:
        children.stop_all()

    ok = stat(caller_stats, "SuccessfulCall(C)")
    retell_ok = stat(retell_stats, "SuccessfulCall(C)") - warmup
    rtts_sorted = sorted(rtts)

    def percentile(q: float) -> float | None:
        if not rtts_sorted:
            return None
        return rtts_sorted[min(len(rtts_sorted) - 1, int(q * len(rtts_sorted)))]

    sipp_cpu = (children_after.ru_utime - children_before.ru_utime) + (
        children_after.ru_stime - children_before.ru_stime
    )
    return {
        "label": label,
        "repo": str(repo),
        "offered": calls,
        "rate": load.rate,
        "caller_exit": pbx_exit,
        "caller_attempted": stat(caller_stats, "OutgoingCall(C)"),
        "caller_ok": ok,
        "caller_failed": stat(caller_stats, "FailedCall(C)"),
        "caller_retransmissions": stat(caller_stats, "Retransmissions(C)"),
        "caller_dead_messages": stat(caller_stats, "DeadCallMsgs(C)"),
        "retell_exit": retell_exit,
        "retell_attempted": stat(retell_stats, "IncomingCall(C)") - warmup,
        "retell_ok": retell_ok,
        "retell_failed": stat(retell_stats, "FailedCall(C)"),
        "retell_retransmissions": stat(retell_stats, "Retransmissions(C)"),
        "caller_seconds": pbx_done - started,
        "elapsed": elapsed,
        "sbc_cpu_seconds": cpu,
        "sbc_cpu_share": cpu / elapsed,
        "sbc_cpu_ms_per_call": 1e3 * cpu / max(ok, 1),
        "sbc_idle_share": idle_share,
        "invite_200_ms_mean": statistics.fmean(rtts) if rtts else None,
        "invite_200_ms_p50": percentile(0.50),
        "invite_200_ms_p95": percentile(0.95),
        "invite_200_ms_max": rtts_sorted[-1] if rtts_sorted else None,
        "invite_200_samples": len(rtts),
        "sipp_rtd_setup_ms_mean": sipp_duration_ms(caller_stats.get("ResponseTimesetup(C)", "")),
        "sbc_rss_mib_before": rss_before,
        "sbc_rss_mib_after": rss_after,
        "sbc_rss_mib_after_linger": rss_lingered,
        "sbc_metrics_after": metrics,
        "sbc_alive_after": sbc_alive,
        "sbc_exit": sbc_exit,
        "sipp_cpu_seconds": sipp_cpu,
        "sbc_cpu_per_sipp_cpu": cpu / sipp_cpu if sipp_cpu > 0 else None,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def round_failed(result: dict[str, Any]) -> bool:
    offered = result["offered"]
    return bool(
        result["caller_exit"] != 0
        or result["retell_exit"] != 0
        or result["caller_ok"] != offered
        or result["caller_failed"]
        or result["retell_ok"] != offered
        or result["retell_failed"]
        or not result["sbc_alive_after"]
    )


# --------------------------------------------------------------------------- reporting


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_round(result: dict[str, Any]) -> None:
    m = result["sbc_metrics_after"]
    lingered = ""
    if result["sbc_rss_mib_after_linger"] is not None:
        lingered = f" (-> {result['sbc_rss_mib_after_linger']:.1f} MiB after the linger)"
    print(
        f"  [{result['label']}] rate={result['rate']:g}/s offered={result['offered']} "
        f"caller ok/failed={result['caller_ok']}/{result['caller_failed']} "
        f"(exit {result['caller_exit']}, retrans {result['caller_retransmissions']}) "
        f"retell attempted/ok/failed={result['retell_attempted']}/{result['retell_ok']}/"
        f"{result['retell_failed']} (exit {result['retell_exit']}, retrans "
        f"{result['retell_retransmissions']})\n"
        f"  [{result['label']}] sbc cpu={result['sbc_cpu_seconds']:.2f}s "
        f"({100 * result['sbc_cpu_share']:.0f}% of a core over {result['elapsed']:.1f}s) "
        f"= {result['sbc_cpu_ms_per_call']:.2f} ms/call (idle before: "
        f"{100 * result['sbc_idle_share']:.1f}% of a core), SIPp CPU "
        f"{result['sipp_cpu_seconds']:.2f}s; INVITE->200 mean "
        f"{_ms(result['invite_200_ms_mean'])} ms p50 {_ms(result['invite_200_ms_p50'])} "
        f"p95 {_ms(result['invite_200_ms_p95'])} max {_ms(result['invite_200_ms_max'])} "
        f"({result['invite_200_samples']} calls; SIPp's rtd "
        f"{_ms(result['sipp_rtd_setup_ms_mean'])}); rss {result['sbc_rss_mib_before']:.1f} -> "
        f"{result['sbc_rss_mib_after']:.1f} MiB{lingered}; after: active={m.get('calls_active')} "
        f"started={m.get('calls_started')} refused={m.get('calls_refused')}; "
        f"load {result['load_average_before']:.2f} -> {result['load_average_after']:.2f}",
        flush=True,
    )


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per checkout: CPU over all its rounds per successful call, INVITE->200 over all calls
    (and the median of the rounds' medians, which a few stalls of a shared machine move less)."""
    ok = sum(r["caller_ok"] for r in results)
    medians = [r["invite_200_ms_p50"] for r in results if r["invite_200_ms_p50"] is not None]
    cpu = sum(r["sbc_cpu_seconds"] for r in results)
    sipp = sum(r["sipp_cpu_seconds"] for r in results)
    samples = sum(r["invite_200_samples"] for r in results)
    weighted = sum(
        r["invite_200_ms_mean"] * r["invite_200_samples"]
        for r in results
        if r["invite_200_ms_mean"] is not None
    )
    return {
        "rounds": len(results),
        "calls_ok": ok,
        "calls_failed": sum(r["caller_failed"] for r in results),
        "retell_failed": sum(r["retell_failed"] for r in results),
        "retransmissions": sum(
            r["caller_retransmissions"] + r["retell_retransmissions"] for r in results
        ),
        "sbc_cpu_seconds": cpu,
        "sbc_cpu_ms_per_call": 1e3 * cpu / max(ok, 1),
        "sbc_cpu_ms_per_call_rounds": [r["sbc_cpu_ms_per_call"] for r in results],
        "sbc_cpu_per_sipp_cpu": cpu / sipp if sipp > 0 else None,
        "invite_200_ms_mean": weighted / samples if samples else None,
        "invite_200_ms_mean_rounds": [r["invite_200_ms_mean"] for r in results],
        "invite_200_ms_p50": statistics.median(medians) if medians else None,
        "sbc_rss_mib_after_max": max(r["sbc_rss_mib_after"] for r in results),
    }


def pair_ratios(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """B/A of each round's pair (the i-th A round against the i-th B round)."""
    a_rounds = [r for r in results if r["label"] == "A"]
    b_rounds = [r for r in results if r["label"] == "B"]
    out: dict[str, list[float]] = {}
    for key in ("sbc_cpu_ms_per_call", "sbc_cpu_per_sipp_cpu", "invite_200_ms_mean"):
        pairs = zip(a_rounds, b_rounds, strict=False)
        out[key] = [b[key] / a[key] for a, b in pairs if a[key] and b[key]]
    return out


def print_table(summaries: dict[str, dict[str, Any]], checkouts: dict[str, str]) -> None:
    print()
    print("| checkout | rounds | calls ok | failed | retrans | sbc CPU ms/call (rounds) "
          "| sbc CPU / SIPp CPU | INVITE->200 mean ms (rounds) | INVITE->200 median ms "
          "| RSS after MiB |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, s in summaries.items():
        per_round = ", ".join(f"{v:.2f}" for v in s["sbc_cpu_ms_per_call_rounds"])
        rtt_rounds = ", ".join(_ms(v) for v in s["invite_200_ms_mean_rounds"])
        print(
            f"| {label} {checkouts[label]} | {s['rounds']} | {s['calls_ok']} "
            f"| {s['calls_failed'] + s['retell_failed']} | {s['retransmissions']} "
            f"| {s['sbc_cpu_ms_per_call']:.2f} ({per_round}) | {_ratio(s['sbc_cpu_per_sipp_cpu'])} "
            f"| {_ms(s['invite_200_ms_mean'])} ({rtt_rounds}) | {_ms(s['invite_200_ms_p50'])} "
            f"| {s['sbc_rss_mib_after_max']:.1f} |"
        )


def machine() -> dict[str, Any]:
    sipp_version = (
        subprocess.run([sipp_binary(), "-v"], capture_output=True, text=True, timeout=10)
        .stdout.strip()
        .splitlines()
    )
    return {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sipp": sipp_version[0].strip() if sipp_version else "?",
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }


# --------------------------------------------------------------------------- main


def checkout_path(text: str) -> Path:
    path = Path(text).resolve()
    if not (path / "sbc" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no sbc/__init__.py there")
    return path


def rounds_order(labels: Sequence[str], rounds: int) -> Iterator[str]:
    for _ in range(rounds):
        yield from labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second (100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of calls (10)")
    parser.add_argument("--hold", type=int, default=1000, help="ms from ACK to BYE (1000)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured calls first (20)")
    parser.add_argument(
        "--linger", type=float, default=0.0, help="s to wait after the calls, then RSS again (0)"
    )
    parser.add_argument("--repo", type=checkout_path, default=REPO, help="checkout to run")
    parser.add_argument(
        "--compare", nargs=2, type=checkout_path, metavar=("PATH_A", "PATH_B"),
        help="run both checkouts alternately and print the ratios B/A",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, help="rounds per checkout (1; 3 with --compare)")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter running sbc")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures there")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.hold < 0 or args.warmup < 0:
        parser.error("--rate and --seconds must be positive, --hold and --warmup not negative")
    sipp_binary()
    for scenario in ("pbx_registrar.xml", "pbx_caller.xml", "retell_uas.xml"):
        if not (SCENARIOS / scenario).is_file():
            raise SystemExit(f"missing scenario {SCENARIOS / scenario}")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    load = Load(
        args.rate, args.seconds, args.hold, args.warmup, args.log_level, args.python, args.linger
    )
    repos = {"A": args.compare[0], "B": args.compare[1]} if args.compare else {"A": args.repo}
    rounds = args.rounds or (3 if args.compare else 1)

    workdir = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    results: list[dict[str, Any]] = []
    try:
        checkouts: dict[str, str] = {}
        for label, repo in repos.items():
            module = imported_from(load.python, repo, workdir)
            checkouts[label] = f"{repo} ({describe_checkout(repo)})"
            print(f"{label}: {checkouts[label]}: import sbc -> {module}", flush=True)
        info = machine()
        print(
            f"{info['time_utc']} UTC, {info['nproc']} CPUs, Python {info['python']}, "
            f"{info['sipp']}, load {' '.join(info['load_average'])}; rate {load.rate:g}/s x "
            f"{load.seconds:g} s = {load.calls} calls, hold {load.hold_ms} ms, warm-up "
            f"{load.warmup}, log level {load.log_level}; work dir {workdir}",
            flush=True,
        )
        for index, label in enumerate(rounds_order(list(repos), rounds)):
            round_dir = workdir / f"round{index + 1}-{label}"
            round_dir.mkdir()
            result = run_round(repos[label], load, label, round_dir)
            results.append(result)
            print_round(result)
        summaries = {
            label: summarise([r for r in results if r["label"] == label]) for label in repos
        }
        print_table(summaries, checkouts)
        ratios: dict[str, float | None] = {}
        if args.compare:
            a, b = summaries["A"], summaries["B"]
            keys = (
                "sbc_cpu_ms_per_call",
                "sbc_cpu_per_sipp_cpu",
                "invite_200_ms_mean",
                "invite_200_ms_p50",
            )
            for key in keys:
                ratios[key] = b[key] / a[key] if a[key] and b[key] is not None else None
            pairs = pair_ratios(results)
            print(
                f"\nB/A: sbc CPU per call {_ratio(ratios['sbc_cpu_ms_per_call'])} "
                f"(sbc CPU / SIPp CPU {_ratio(ratios['sbc_cpu_per_sipp_cpu'])}), "
                f"mean INVITE->200 {_ratio(ratios['invite_200_ms_mean'])} "
                f"(median INVITE->200 {_ratio(ratios['invite_200_ms_p50'])})"
            )
            print(
                "B/A round by round (A1 B1, A2 B2, ...): CPU per call "
                + ", ".join(f"{v:.3f}" for v in pairs["sbc_cpu_ms_per_call"])
                + " (sbc CPU / SIPp CPU "
                + ", ".join(f"{v:.3f}" for v in pairs["sbc_cpu_per_sipp_cpu"])
                + ")"
                + "; mean INVITE->200 "
                + ", ".join(f"{v:.3f}" for v in pairs["invite_200_ms_mean"])
            )
        failed = [r for r in results if round_failed(r)]
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": info,
                        "load": {**vars(load), "calls": load.calls, "rounds": rounds},
                        "checkouts": checkouts,
                        "rounds": results,
                        "summary": summaries,
                        "ratios_b_over_a": ratios,
                        "ratios_b_over_a_by_round": pair_ratios(results) if args.compare else {},
                        "failed_rounds": len(failed),
                    },
                    indent=2,
                )
                + "\n"
            )
        if failed:
            print(f"\nFAILED: {len(failed)} round(s) with failed calls or a SIPp end that did "
                  f"not finish cleanly; logs in {workdir}", file=sys.stderr)  # fmt: skip
            args.keep = True
        return 1 if failed else 0
    except BaseException:
        args.keep = True  # the logs say what went wrong
        raise
    finally:
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
