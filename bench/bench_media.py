"""Media relay capacity and added latency: the built-in relay against rtpengine (userspace).

Run from the repository root (root is needed only for the large socket buffers, which it asks
for with SO_RCVBUFFORCE; without root the kernel caps them at net.core.rmem_max):

    python bench/bench_media.py                       # relay, then rtpengine, N = 100,200,500,...
    python bench/bench_media.py --steps 100,500 --seconds 10 --backends relay

What runs:
* the relay under test: `sbc.media.relay.RelayBackend` in a process of its own (uvloop when
  installed), driven over a pipe (allocate, offer, answer per call); or `rtpengine` started with
  `--table=-1` (userspace forwarding only) and driven by `sbc.media.rtpengine.RtpengineBackend`
  over the NG protocol. Both see exactly the same SDP and the same traffic;
* the load generator: `--workers` processes, each with one UDP socket standing for all its
  calls' PBX ends and one for all their Retell ends (the SDP of every call names them; what comes
  back is told apart by SSRC). Every call sends G.711-sized RTP (12-byte header + 160-byte
  payload) 50 times a second each way, calls spread evenly over the 20 ms period. The first 8
  payload bytes carry the send time (CLOCK_MONOTONIC, shared by all processes), so the receiver
  measures one-way latency;
* a direct-path baseline in the same run: the same generator at the same N, each end sending
  straight to the other. Added latency = through-relay percentile minus direct percentile.

For each N (the steps) it runs the baseline and then each backend back to back (so all see the
same background load), `--seconds` of traffic each, then drains (until 300 ms pass without a
packet, 2 s at most), and reports packets sent, received, lost (sent - received), out of
sequence, late (60 ms or more: a jitter buffer would drop them), latency p50/p99/max, the CPU of
the process under test (utime+stime from /proc/PID/stat, in % of one core over the traffic
seconds; kernel softirq time spent delivering its packets is not in it), the generator's CPU
seconds, and how busy the machine was just before the run ("box before", from /proc/stat: each
run first waits up to 30 s for a window under 25% of one core, as other jobs share the box).
"Held" means zero loss; a backend stops stepping after its first step with loss or with p99 over
100 ms (queues growing). Nothing logs per packet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sbc.media.base import media_address
from sbc.media.ports import PortPool
from sbc.media.rtpengine import NgClient, RtpengineBackend
from sbc.sdp.parser import parse_sdp

PERIOD_NS = 20_000_000  # 20 ms: one G.711 packet per direction per call
PAYLOAD = 160
SLACK_NS = 1_000_000  # a packet may leave up to 1 ms before its slot
HEADER = struct.Struct("!BBHIIQ")  # RTP fixed header + 8-byte send time at payload start
PACKET_SIZE = 12 + PAYLOAD
BUCKET_NS = 5_000  # latency histogram resolution: 5 us
BUCKETS = 40_000  # up to 200 ms; later arrivals fall in the last bucket
SOCKET_BUFFER = 32 * 1024 * 1024

RELAY_HOST = "127.0.0.82"
RTPENGINE_HOST = "127.0.0.81"
PBX_HOST = "127.0.0.83"
RETELL_HOST = "127.0.0.84"


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def sdp_for(host: str, port: int, who: str) -> str:
    return (
        "v=0\r\n"
        f"o={who} 1 1 IN IP4 {host}\r\n"
        f"s={who}\r\n"
        f"c=IN IP4 {host}\r\n"
        "t=0 0\r\n"
        f"m=audio {port} RTP/AVP 0 101\r\n"
        "a=rtpmap:0 PCMU/8000\r\n"
        "a=rtpmap:101 telephone-event/8000\r\n"
        "a=fmtp:101 0-15\r\n"
        "a=ptime:20\r\n"
        "a=sendrecv\r\n"
    )


def busy_cores() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


QUIET_BUSY = 25.0  # % of one core: the box counts as quiet below this
QUIET_WAIT = 30.0  # seconds to wait for a quiet box before a run (then it runs anyway)


def background_load(window: float = 0.5, wait: float | None = None) -> float:
    """Busy % (100 = one core) of the whole machine while this benchmark sends nothing: what
    other processes take from the box. Waits (``wait`` s, QUIET_WAIT by default, at most) for a
    quiet window, so that runs on a shared machine start when the others are idle; returns the
    last window's load."""
    deadline = time.monotonic() + (QUIET_WAIT if wait is None else wait)
    while True:
        busy0, total0 = busy_cores()
        time.sleep(window)
        busy1, total1 = busy_cores()
        load = 100.0 * (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)
        if load < QUIET_BUSY or time.monotonic() > deadline:
            return load


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (all threads) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- load generator worker ---------------------------------------------------------------------


def worker_main(conn: Connection, index: int) -> None:
    """One generator process: two sockets, the calls the orchestrator gives it."""
    pbx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    retell = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for sock, host in ((pbx, PBX_HOST), (retell, RETELL_HOST)):
        _big_buffers(sock)
        sock.bind((host, 0))
        sock.setblocking(False)
    conn.send((pbx.getsockname(), retell.getsockname()))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, targets, start_ns, seconds, first_ssrc = msg
        conn.send(run_traffic(pbx, retell, targets, start_ns, seconds, first_ssrc))


def run_traffic(
    pbx: socket.socket,
    retell: socket.socket,
    targets: list[tuple[tuple[str, int], tuple[str, int]]],
    start_ns: int,
    seconds: float,
    first_ssrc: int,
) -> dict[str, Any]:
    """Send `seconds` of 50 packets/s each way for every call (pbx sends to targets[i][0],
    retell to targets[i][1]), receive everything, drain, and return counters."""
    n = len(targets)
    ticks = int(seconds * 1_000_000_000 // PERIOD_NS)
    warmup_ticks = min(50, ticks // 5)  # 1 s of warm-up left out of the latency figures
    pack_into = HEADER.pack_into
    unpack_from = HEADER.unpack_from
    monotonic_ns = time.monotonic_ns
    bufs = [bytearray(b"\xd5" * PACKET_SIZE) for _ in range(2)]
    hist = [0] * BUCKETS
    received = [0, 0]  # [at retell (pbx->retell), at pbx (retell->pbx)]
    expected = [0] * (2 * n)  # next sequence number per (call, direction)
    reordered = 0
    foreign = 0
    offsets = [start_ns + (i * PERIOD_NS) // max(n, 1) for i in range(n)]
    recv_buf = bytearray(2048)
    socks = (retell, pbx)
    cpu0 = time.process_time()

    def drain() -> None:
        nonlocal reordered, foreign
        for direction, sock in enumerate(socks):
            while True:
                try:
                    size = sock.recv_into(recv_buf)
                except BlockingIOError:
                    break
                now = monotonic_ns()
                if size != PACKET_SIZE:
                    foreign += 1
                    continue
                _, _, seq, _, ssrc, sent_at = unpack_from(recv_buf)
                slot = ssrc - first_ssrc
                if not 0 <= slot < 2 * n or slot % 2 != direction:
                    foreign += 1
                    continue
                received[direction] += 1
                if seq != expected[slot]:
                    reordered += 1
                expected[slot] = (seq + 1) & 0xFFFF
                if seq >= warmup_ticks:
                    bucket = (now - sent_at) // BUCKET_NS
                    hist[bucket if bucket < BUCKETS else BUCKETS - 1] += 1

    tick = 0
    j = 0
    sent = 0
    while tick < ticks:
        due = offsets[j] + tick * PERIOD_NS
        now = monotonic_ns()
        # Packets due within the next SLACK are sent now (each carries its own send time, so
        # latency stays exact): the generator wakes about once per SLACK, not once per packet.
        if due > now + SLACK_NS:
            drain()
            now = monotonic_ns()
            if due > now + SLACK_NS:
                select.select(socks, (), (), (due - now - SLACK_NS) / 1e9)
                continue
        ssrc = first_ssrc + 2 * j
        to_retell, to_pbx = targets[j]
        stamp = monotonic_ns()
        buf = bufs[0]
        pack_into(buf, 0, 0x80, 0, tick & 0xFFFF, (tick * 160) & 0xFFFFFFFF, ssrc, stamp)
        pbx.sendto(buf, to_retell)
        buf = bufs[1]
        pack_into(buf, 0, 0x80, 0, tick & 0xFFFF, (tick * 160) & 0xFFFFFFFF, ssrc + 1, stamp)
        retell.sendto(buf, to_pbx)
        sent += 2
        j += 1
        if not j & 31:
            drain()  # keep receiving when sends are back to back
        if j == n:
            j = 0
            tick += 1
    # Drain: until nothing came for 300 ms (2 s at most).
    end = monotonic_ns() + 2_000_000_000
    while monotonic_ns() < end:
        ready, _, _ = select.select(socks, (), (), 0.3)
        if not ready:
            break
        drain()
    return {
        "sent": sent,
        "received": received[0] + received[1],
        "reordered": reordered,
        "foreign": foreign,
        "hist": _compress(hist),
        "cpu": time.process_time() - cpu0,
    }


def _compress(hist: list[int]) -> dict[int, int]:
    return {i: c for i, c in enumerate(hist) if c}


# --- the relay process -------------------------------------------------------------------------


def relay_main(conn: Connection, port_min: int, port_max: int, want_uvloop: bool) -> None:
    """RelayBackend in its own process, on uvloop when installed, driven over `conn`."""
    from sbc.media.relay import RelayBackend

    loop: asyncio.AbstractEventLoop
    try:
        if not want_uvloop:
            raise ImportError
        import uvloop

        loop = uvloop.new_event_loop()
        loop_name = "uvloop"
    except ImportError:
        loop = asyncio.new_event_loop()
        loop_name = "asyncio"
    asyncio.set_event_loop(loop)
    backend = RelayBackend(RELAY_HOST, RELAY_HOST, PortPool(port_min, port_max))
    sessions: list[Any] = []
    done = asyncio.Event()

    async def setup(calls: list[tuple[str, str, str]]) -> list[Any]:
        out = []
        for call_id, pbx_sdp, retell_sdp in calls:
            session = await backend.allocate(call_id)
            sessions.append(session)
            to_retell = await session.offer("a", parse_sdp(pbx_sdp))
            to_pbx = await session.answer("b", parse_sdp(retell_sdp))
            out.append((media_address(to_pbx), media_address(to_retell)))
        return out

    async def teardown() -> dict[str, int]:
        totals = {"dropped": 0, "errors": 0, "packets": 0}
        for session in sessions:
            for side in session.stats()["sides"].values():
                for key in totals:
                    totals[key] += side["rtp"].get(key, 0)
            await session.close()
        sessions.clear()
        return totals

    async def handle(msg: tuple[Any, ...]) -> Any:
        if msg[0] == "setup":
            return await setup(msg[1])
        if msg[0] == "teardown":
            return await teardown()
        await backend.close()
        done.set()
        return None

    def reader() -> None:
        conn.send(("ready", loop_name))
        while True:
            msg = conn.recv()
            conn.send(asyncio.run_coroutine_threadsafe(handle(msg), loop).result())
            if msg[0] == "stop":
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    loop.run_until_complete(done.wait())
    thread.join(5)  # its last reply ("stop") is sent before the process ends
    loop.close()


# --- backends as the orchestrator sees them ----------------------------------------------------


class RelayUnderTest:
    name = "relay"

    def __init__(self, ctx: Any, calls_max: int, want_uvloop: bool) -> None:
        self.conn, child = ctx.Pipe()
        ports = (30000, 30000 + 4 * calls_max + 8)
        self.proc = ctx.Process(target=relay_main, args=(child, *ports, want_uvloop))
        self.proc.start()
        self.loop_name = self.conn.recv()[1]
        self.pid = self.proc.pid

    def setup(self, calls: list[tuple[str, str, str]]) -> list[Any]:
        self.conn.send(("setup", calls))
        return cast(list[Any], self.conn.recv())

    def teardown(self) -> dict[str, int]:
        self.conn.send(("teardown",))
        return cast(dict[str, int], self.conn.recv())

    def stop(self) -> None:
        self.conn.send(("stop",))
        self.conn.recv()
        self.proc.join(10)


class RtpengineUnderTest:
    name = "rtpengine"
    loop_name = "rtpengine userspace (--table=-1)"

    def __init__(self, calls_max: int, ng_port: int, log: Path) -> None:
        binary = shutil.which("rtpengine")
        if binary is None:
            raise SystemExit("rtpengine not installed (Debian package rtpengine-daemon)")
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                binary,
                "--foreground",
                "--log-stderr",
                "--log-level=4",  # warnings only: nothing per call or per packet
                "--table=-1",
                f"--interface={RTPENGINE_HOST}",
                f"--listen-ng={RTPENGINE_HOST}:{ng_port}",
                "--port-min=20000",
                f"--port-max={min(65000, 20000 + 8 * calls_max + 100)}",
                "--delete-delay=0",
                "--timeout=600",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.backend = RtpengineBackend((RTPENGINE_HOST, ng_port), timeout=1.0, tries=3)
        self.sessions: list[Any] = []
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._wait_up((RTPENGINE_HOST, ng_port)))
        self.loop.run_until_complete(self.backend.start())

    async def _wait_up(self, address: tuple[str, int]) -> None:
        async with NgClient(address, timeout=0.1, tries=100) as probe:  # 10 s at most
            await probe.ping()

    def setup(self, calls: list[tuple[str, str, str]]) -> list[Any]:
        async def one(call_id: str, pbx_sdp: str, retell_sdp: str) -> Any:
            session = await self.backend.allocate(call_id)
            self.sessions.append(session)
            to_retell = await session.offer("a", parse_sdp(pbx_sdp))
            to_pbx = await session.answer("b", parse_sdp(retell_sdp))
            return media_address(to_pbx), media_address(to_retell)

        async def all_calls() -> list[Any]:
            out: list[Any] = []
            for i in range(0, len(calls), 50):  # 50 NG exchanges in flight at most
                out += await asyncio.gather(*(one(*c) for c in calls[i : i + 50]))
            return out

        return self.loop.run_until_complete(all_calls())

    def teardown(self) -> dict[str, int]:
        async def close_all() -> dict[str, int]:
            totals = {"packets": 0, "errors": 0}
            for session in self.sessions:
                await session.close()
                t = session.stats()["totals"]
                totals["packets"] += t["packets"]
                totals["errors"] += t["errors"]
            self.sessions.clear()
            return totals

        return self.loop.run_until_complete(close_all())

    def stop(self) -> None:
        self.loop.run_until_complete(self.backend.close())
        self.loop.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


# --- orchestration -----------------------------------------------------------------------------


@dataclass
class StepResult:
    backend: str
    calls: int
    sent: int = 0
    received: int = 0
    reordered: int = 0
    foreign: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    late: int = 0  # arrived 60 ms or more after sending: a jitter buffer would drop them
    background: float = 0.0  # machine busy % (of one core) in the 1 s before the step
    relay_cpu: float | None = None
    generator_cpu: float = 0.0
    relay_counters: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - self.received


def percentile(hist: dict[int, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank = q * total
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return (bucket + 0.5) * BUCKET_NS / 1000
    return float("nan")  # pragma: no cover


class Generator:
    def __init__(self, ctx: Any, workers: int) -> None:
        self.conns: list[Connection] = []
        self.procs = []
        self.addresses: list[tuple[tuple[str, int], tuple[str, int]]] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i))
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
            self.addresses.append(parent.recv())

    def split(self, n: int) -> list[int]:
        w = len(self.conns)
        return [n // w + (1 if i < n % w else 0) for i in range(w)]

    def run(self, targets: list[list[Any]], seconds: float, first_ssrc: int) -> list[Any]:
        start = time.monotonic_ns() + 300_000_000
        for i, conn in enumerate(self.conns):
            conn.send(("run", targets[i], start, seconds, first_ssrc + 100_000 * i))
        return [conn.recv() for conn in self.conns]

    def stop(self) -> None:
        for conn in self.conns:
            conn.send(("stop",))
        for proc in self.procs:
            proc.join(10)


def merge(backend: str, calls: int, results: list[dict[str, Any]]) -> StepResult:
    out = StepResult(backend, calls)
    hist: dict[int, int] = {}
    for r in results:
        out.sent += r["sent"]
        out.received += r["received"]
        out.reordered += r["reordered"]
        out.foreign += r["foreign"]
        out.generator_cpu += r["cpu"]
        for b, c in r["hist"].items():
            hist[b] = hist.get(b, 0) + c
    out.p50_us = percentile(hist, 0.50)
    out.p99_us = percentile(hist, 0.99)
    out.max_us = (max(hist) + 1) * BUCKET_NS / 1000 if hist else float("nan")
    out.late = sum(c for b, c in hist.items() if b * BUCKET_NS >= 60_000_000)
    return out


def run_direct(gen: Generator, n: int, seconds: float, quiet_wait: float | None = None
               ) -> StepResult:  # fmt: skip
    """Baseline: each end sends straight to the other end's socket."""
    counts = gen.split(n)
    targets = [[(addr[1], addr[0])] * counts[i] for i, addr in enumerate(gen.addresses)]
    background = background_load(wait=quiet_wait)
    out = merge("direct", n, gen.run(targets, seconds, 1_000_000))
    out.background = background
    return out


def run_through(gen: Generator, under: Any, n: int, seconds: float, step: int,
                quiet_wait: float | None = None) -> StepResult:  # fmt: skip
    counts = gen.split(n)
    targets: list[list[Any]] = []
    for w, (pbx_addr, retell_addr) in enumerate(gen.addresses):
        calls = [
            (
                f"bench-{step}-{w}-{i}",
                sdp_for(pbx_addr[0], pbx_addr[1], "3cxPS"),
                sdp_for(retell_addr[0], retell_addr[1], "LiveKit"),
            )
            for i in range(counts[w])
        ]
        targets.append([tuple(t) for t in under.setup(calls)])
    # CPU of the process under test while traffic flows (it is idle before and after, so the
    # delta over the run divided by the traffic seconds is its load). Per process, not from
    # /proc/stat: machine-wide figures under-count such loads several times.
    background = background_load(wait=quiet_wait)
    cpu0 = cpu_seconds(under.pid)
    results = gen.run(targets, seconds, 1_000_000)
    cpu1 = cpu_seconds(under.pid)
    out = merge(under.name, n, results)
    out.relay_cpu = 100.0 * (cpu1 - cpu0) / seconds
    out.relay_counters = under.teardown()
    out.background = background
    return out


def fmt(r: StepResult, direct: StepResult | None) -> str:
    added = ""
    if direct is not None:
        added = (
            f" added p50 {r.p50_us - direct.p50_us:7.1f} us p99 {r.p99_us - direct.p99_us:7.1f} us"
        )
    cpu = "" if r.relay_cpu is None else f" cpu {r.relay_cpu:5.1f}%"
    cpu += f" (box before: {r.background:5.1f}%)"
    return (
        f"{r.backend:9} N={r.calls:5} sent {r.sent:8} recv {r.received:8} lost {r.lost:6}"
        f" reord {r.reordered:4} p50 {r.p50_us:7.1f} us p99 {r.p99_us:8.1f} us"
        f" max {r.max_us:8.1f} us late {r.late}{added}{cpu} gen-cpu {r.generator_cpu:5.1f}s"
    )


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


ADDED_P99_LIMIT_US = 1000.0  # the media issue's latency criterion: p99 added under 1 ms


@dataclass
class MediaRun:
    """Every step of one measurement, the direct baselines by N, and per backend the most calls
    held with zero loss (``zero_loss``) and also with p99 added under 1 ms
    (``zero_loss_p99_added_under_1ms``: its capacity by the media issue's criterion)."""

    results: list[StepResult]
    directs: dict[int, StepResult]
    held: dict[str, dict[str, int | None]]

    def added_p99_us(self, r: StepResult) -> float:
        return r.p99_us - self.directs[r.calls].p99_us


def measure(
    steps: list[int],
    seconds: float,
    backends: list[str],
    *,
    workers: int = 1,
    relay_loop: str = "uvloop",
    quiet_wait: float | None = None,
    rtpengine_log: Path = Path("/tmp/bench-rtpengine.log"),
) -> MediaRun:
    """Run the steps (baseline, then each backend, per N), printing a line per run. Shared with
    bench/load.py's relay phase."""
    ctx = mp.get_context("spawn")
    gen = Generator(ctx, workers)
    directs: dict[int, StepResult] = {}
    results: list[StepResult] = []
    live: dict[str, Any] = {}
    try:
        for name in backends:
            if name == "relay":
                live[name] = RelayUnderTest(ctx, max(steps), relay_loop == "uvloop")
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind((RTPENGINE_HOST, 0))  # a free port outside the RTP range
                    ng_port = probe.getsockname()[1]
                live[name] = RtpengineUnderTest(max(steps), ng_port, rtpengine_log)
            print(f"{name}: {live[name].loop_name}, pid {live[name].pid}", flush=True)
        # Each step runs the baseline and every backend back to back, so that all of them see
        # the same background load of the machine.
        for step, n in enumerate(steps):
            if not live:
                break
            directs[n] = run_direct(gen, n, seconds, quiet_wait)
            results.append(directs[n])
            print(fmt(directs[n], None), flush=True)
            for name, under in list(live.items()):
                r = run_through(gen, under, n, seconds, step, quiet_wait)
                results.append(r)
                print(fmt(r, directs[n]), f"counters: {r.relay_counters}", flush=True)
                if r.lost or r.p99_us > 100_000:
                    # Losing packets, or queues growing: the next step would too.
                    live.pop(name).stop()
    finally:
        for under in live.values():
            under.stop()
        gen.stop()
    run = MediaRun(results, directs, {})
    for name in backends:
        zero_loss = [r for r in results if r.backend == name and r.lost == 0]
        fast = [r for r in zero_loss if run.added_p99_us(r) < ADDED_P99_LIMIT_US]
        run.held[name] = {
            "zero_loss": max((r.calls for r in zero_loss), default=None),
            "zero_loss_p99_added_under_1ms": max((r.calls for r in fast), default=None),
        }
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="100,200,300,500,750,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--backends", default="relay,rtpengine")
    parser.add_argument("--json", type=Path, help="write all results as JSON here")
    parser.add_argument(
        "--relay-loop", choices=("uvloop", "asyncio"), default="uvloop", help="relay's event loop"
    )
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    backends = args.backends.split(",")
    info = machine()
    print(f"machine: {info}", flush=True)
    run = measure(steps, args.seconds, backends, workers=args.workers, relay_loop=args.relay_loop)
    print(f"max calls held: {run.held}", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args) | {"json": str(args.json)},
                    "results": [r.__dict__ | {"lost": r.lost} for r in run.results],
                    "held": run.held,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
