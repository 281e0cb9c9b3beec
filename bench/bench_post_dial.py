"""Post-dial delay inside one process: INVITE sent by 3CX to INVITE arrived at Retell, per call.

Run from the repository root (``PYTHONPATH`` naming the checkout to measure):

    python bench/bench_post_dial.py [--calls 400] [--burst 1] [--warmup 50] [--repeat 3]
    python bench/bench_post_dial.py --burst 2      # INVITEs two at a time, as SIPp sends them

The same service and peers as ``bench_bridge.py`` (the whole sbc on one event loop with a
3CX peer over UDP and a Retell peer over TCP, loopback, call records on, info log lines to
/dev/null), but what it measures is the delay sbc puts between a call's INVITE and the INVITE
of its far leg: the 3CX peer stamps ``perf_counter`` just before its ``sendto``, the Retell
peer when the bytes of that INVITE arrive (before it reads them). Nothing else runs on the
loop, so this is sbc's own path (its work before the far INVITE leaves plus the loop's
hand-offs), without SIPp and the machine's other work; ``bench/load.py`` measures the same
delay under load.

``--burst N`` sends N INVITEs back to back (one ``sendto`` after the other), waits for their
200s, then ACKs and BYEs them: the delay of each position in the burst shows what a call's
INVITE waits for when others arrive with it. Printed per position: p50, p90 and the largest
delay over all rounds, and over all calls p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_bridge as bb  # noqa: E402

# Per Call-ID: (perf_counter, the loop thread's CPU time, the process's CPU time).
SENT: dict[str, tuple[float, float, float]] = {}
ARRIVED: dict[str, tuple[float, float, float]] = {}
# Per Call-ID: perf_counter when sbc's transport had written the far INVITE (the peer on the
# same loop reads it only once the loop's pass is over: this is sbc's part alone).
LEFT: dict[str, float] = {}


def stamp_far_invites() -> None:
    """Wrap sbc's ``Transports.send`` to note when each far INVITE was written."""
    from sbc.net import transport

    send = transport.Transports.send

    def stamped(self: Any, dest: Any, message: Any) -> None:
        send(self, dest, message)
        if getattr(message, "method", None) == "INVITE":
            pbx_call_id = message.headers.get("X-PBX-Call-ID")
            if pbx_call_id is not None:
                LEFT.setdefault(pbx_call_id, time.perf_counter())

    transport.Transports.send = stamped  # type: ignore[method-assign]


def stamp() -> tuple[float, float, float]:
    return time.perf_counter(), time.thread_time(), time.process_time()


class Pbx(bb.Pbx):  # type: ignore[misc]
    """3CX: as bench_bridge's, with the INVITE's send time kept per Call-ID."""

    def send_invite(self, data: str, call_id: str, sbc: tuple[str, int]) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting[(call_id, "INVITE")] = future
        assert self.transport is not None
        payload = data.encode()
        SENT[call_id] = stamp()
        self.transport.sendto(payload, sbc)
        return future


class Retell(bb.Retell):  # type: ignore[misc]
    """Retell: as bench_bridge's, with each INVITE's arrival time kept per X-PBX-Call-ID."""

    def data_received(self, data: bytes) -> None:
        now = stamp()
        start = 0
        # The INVITEs in these bytes (a TCP read may carry several), by the header sbc
        # renders with the PBX's Call-ID.
        while (at := data.find(b"X-PBX-Call-ID: ", start)) >= 0:
            end = data.find(b"\r\n", at)
            ARRIVED.setdefault(data[at + 15 : end].decode(), now)
            start = end
        super().data_received(data)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(calls: int, burst: int, warmup: int, repeat: int, records: bool, log: TextIO) -> None:
    from sbc.ops.logging import configure_logging
    from sbc.ops.service import Service
    from sbc.ops.settings import load_settings

    loop = asyncio.get_running_loop()
    sip_port = bb.free_port(bb.SBC)
    pbx_port = bb.free_port(bb.PBX)
    retell_port = bb.free_port(bb.RETELL, udp_too=False)
    positions: dict[int, list[float]] = {i: [] for i in range(burst)}
    written: dict[int, list[float]] = {i: [] for i in range(burst)}
    stamp_far_invites()
    # (wall, loop thread CPU, process CPU) between send and arrival, ms
    spans: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = bb.write_config(Path(tmp), sip_port, pbx_port, retell_port, "info")
        if not records:
            text = config.read_text()
            start = text.index("[records]")
            config.write_text(text[:start] + text[text.index("[", start + 1) :])
        settings = load_settings(config)
        configure_logging(settings.log.level, settings.log.format, stream=log, batched=True)
        pbx = Pbx()
        await loop.create_datagram_endpoint(lambda: pbx, local_addr=(bb.PBX, pbx_port))
        server = await loop.create_server(lambda: Retell(retell_port), bb.RETELL, retell_port)
        service = Service(settings)
        await service.start()
        try:
            await asyncio.wait_for(pbx.registered.wait(), 10.0)
            numbers = itertools.count(1)
            sbc = (bb.SBC, sip_port)

            async def one_burst() -> list[str]:
                fields = [{"pbx": bb.PBX, "pbx_port": pbx_port, "n": next(numbers)}]
                for _ in range(burst - 1):
                    fields.append({**fields[0], "n": next(numbers)})
                sdps = [bb.PBX_SDP.format(**f) for f in fields]
                invites = [
                    bb.INVITE.format(
                        ext=bb.EXTENSION, sbc=bb.SBC, sbc_port=sip_port, length=len(s), sdp=s, **f
                    )
                    for f, s in zip(fields, sdps, strict=True)
                ]
                call_ids = [f"{f['n']}-bench@{bb.PBX}" for f in fields]
                futures = [
                    pbx.send_invite(invite, call_id, sbc)
                    for invite, call_id in zip(invites, call_ids, strict=True)
                ]
                oks = await asyncio.wait_for(asyncio.gather(*futures), 10.0)
                byes = []
                for f, call_id, ok in zip(fields, call_ids, oks, strict=True):
                    if not ok.startswith("SIP/2.0 200"):
                        raise RuntimeError(f"{call_id}: {ok.splitlines()[0]}")
                    to, contact = bb._TO.search(ok), bb._CONTACT.search(ok)
                    assert to is not None and contact is not None
                    dialog = {"target": contact.group(1), "to": to.group(0).rstrip("\r"), **f}
                    assert pbx.transport is not None
                    ack = bb.IN_DIALOG.format(method="ACK", cseq=1, **dialog)
                    pbx.transport.sendto(ack.encode(), sbc)
                    bye = bb.IN_DIALOG.format(method="BYE", cseq=2, **dialog)
                    byes.append(pbx.request(bye, call_id, "BYE", sbc))
                await asyncio.gather(*byes)
                return call_ids

            for _ in range(max(1, warmup // burst)):
                await one_burst()
            await service.wait_settled()
            for _ in range(repeat):
                gc.collect()
                for _ in range(max(1, calls // burst)):
                    for i, call_id in enumerate(await one_burst()):
                        span = tuple(
                            1e3 * (b - a)
                            for a, b in zip(SENT[call_id], ARRIVED[call_id], strict=True)
                        )
                        positions[i].append(span[0])
                        written[i].append(1e3 * (LEFT[call_id] - SENT[call_id][0]))
                        spans.append(span)  # type: ignore[arg-type]
                await asyncio.wait_for(service.bridge.wait_idle(), 10.0)
        finally:
            await service.stop()
            server.close()
            assert pbx.transport is not None
            pbx.transport.close()
    every: list[float] = []
    for i, delays in positions.items():
        every += delays
        print(
            f"position {i + 1} of {burst}: {len(delays)} calls, post-dial p50 "
            f"{statistics.median(delays):.3f} p90 {percentile(delays, 0.9):.3f} "
            f"max {max(delays):.3f} ms; far INVITE written by sbc p50 "
            f"{statistics.median(written[i]):.3f} p90 {percentile(written[i], 0.9):.3f} ms"
        )
    print(
        f"all {len(every)} calls: post-dial p50 {statistics.median(every):.3f} "
        f"p99 {percentile(every, 0.99):.3f} ms"
    )
    # The slowest 1 %: was the loop's thread working (its CPU time), another thread of the
    # process (the process's CPU time beyond the loop's), or neither (the process waited for
    # a core, or for nothing)?
    slow = sorted(spans, reverse=True)[: max(1, len(spans) // 100)]
    wall, own, process = (statistics.fmean(s[k] for s in slow) for k in range(3))
    print(
        f"slowest 1 % ({len(slow)} calls), mean: wall {wall:.3f} ms, loop thread CPU "
        f"{own:.3f} ms, other threads' CPU {process - own:.3f} ms, neither {wall - process:.3f} ms"
    )
    wall, own, process = (statistics.median(s[k] for s in spans) for k in range(3))
    print(
        f"median call: wall {wall:.3f} ms, loop thread CPU {own:.3f} ms, process CPU {process:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=400, help="calls per round")
    parser.add_argument("--burst", type=int, default=1, help="INVITEs sent back to back")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--records", action=argparse.BooleanOptionalAction, default=True, help="call records"
    )
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval (s) for the run"
    )
    args = parser.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    with open(os.devnull, "w") as log:
        import uvloop

        coro: Any = run(args.calls, args.burst, args.warmup, args.repeat, args.records, log)
        uvloop.run(coro)


if __name__ == "__main__":
    main()
