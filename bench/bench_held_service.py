"""Bytes one held call keeps in the whole service (``sbc run``), in process, by site.

    python bench/bench_held_service.py --calls 2000 [--top 25] [--frames 1] [--t1 0.5]
    python bench/bench_held_service.py --calls 5000 --rss          # RSS instead, no tracemalloc

What runs: the service and the two hand-written peers of ``bench/bench_bridge.py`` (3CX over
UDP, Retell over TCP, the SIPp scenarios' messages), configured as ``bench/load.py`` configures
sbc (pass-through media, info logs as JSON lines to /dev/null, call records, ladders). N calls
are placed one after the other (INVITE, 200, ACK) and held; then the traced heap grown per held
call is read twice: at once (every call's two INVITE transactions still waiting out Timers L
and M, as for the last half minute of calls in ``load.py``'s hold phase) and once those timers
have run (64*T1 later: ``--t1`` shortens the wait; the call layer's own timers scale with it),
each time with the sites that grew most. The bench's own list of the calls' To and Contact
(for their BYEs at the end) is counted apart. Then every call is hung up by the PBX and the
bench checks that Retell saw each INVITE, ACK and BYE.

``bench_held.py`` measures the call layer alone against a scripted engine; this one adds what
the engine, the manager (its routing tables, the ladders), the transaction layer, logging and
metrics keep per held call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import os
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_bridge import (  # noqa: E402
    _CONTACT,
    _TO,
    EXTENSION,
    IN_DIALOG,
    INVITE,
    PBX,
    PBX_SDP,
    RETELL,
    SBC,
    Pbx,
    Retell,
    write_config,
)
from bench_calls import free_port  # noqa: E402


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _short(filename: str) -> str:
    return filename.removeprefix(f"{ROOT}{os.sep}")


def _report(label: str, grown: int, calls: int, ours: int, stats: list[Any], top: int) -> None:
    print(f"{label}: {(grown - ours) / calls:.0f} bytes per held call ({calls} calls; the bench's")
    print(f"  own list of them {ours / calls:.0f} more, not counted)")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        where = f"{frame.filename}:{frame.lineno}"
        if len(stat.traceback) > 1:  # (format() reads the sources: linecache, not per call)
            where = "\n      ".join(stat.traceback.format())
        print(
            f"  {stat.size_diff / calls:8.0f} B/call {stat.count_diff / calls:6.2f} blocks  {where}"
        )


async def run(args: argparse.Namespace, log: TextIO) -> None:
    from sbc.ops.logging import configure_logging
    from sbc.ops.service import Service
    from sbc.ops.settings import load_settings

    loop = asyncio.get_running_loop()
    Retell.seen = {}
    sip_port = free_port(SBC)
    pbx_port = free_port(PBX)
    retell_port = free_port(RETELL, udp_too=False)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), sip_port, pbx_port, retell_port, args.log_level)
        text = config.read_text().replace("[sip]\n", f"[sip]\nt1 = {args.t1}\n", 1)
        for setting in args.set:  # SECTION.KEY=VALUE (TOML), into a section the config has
            name, _, value = setting.partition("=")
            section, _, key = name.partition(".")
            if f"[{section}]\n" not in text:
                raise SystemExit(f"--set {setting}: no [{section}] in the bench's config")
            text = text.replace(f"[{section}]\n", f"[{section}]\n{key} = {value}\n", 1)
        config.write_text(text)
        settings = load_settings(config)
        configure_logging(settings.log.level, settings.log.format, stream=log)
        pbx = Pbx()
        await loop.create_datagram_endpoint(lambda: pbx, local_addr=(PBX, pbx_port))
        server = await loop.create_server(lambda: Retell(retell_port), RETELL, retell_port)
        service = Service(settings)
        await service.start()
        numbers = itertools.count(1)
        sbc = (SBC, sip_port)
        held: list[tuple[int, str, str]] = []

        async def place() -> tuple[int, str, str]:
            n = next(numbers)
            fields = {"pbx": PBX, "pbx_port": pbx_port, "n": n}
            sdp = PBX_SDP.format(**fields)
            invite = INVITE.format(
                ext=EXTENSION, sbc=SBC, sbc_port=sip_port, length=len(sdp), sdp=sdp, **fields
            )
            ok = await pbx.request(invite, f"{n}-bench@{PBX}", "INVITE", sbc)
            if not ok.startswith("SIP/2.0 200"):
                raise RuntimeError(f"call {n}: {ok.splitlines()[0]}")
            to, contact = _TO.search(ok), _CONTACT.search(ok)
            assert to is not None and contact is not None
            call = (n, contact.group(1), to.group(0).rstrip("\r"))
            ack = IN_DIALOG.format(method="ACK", cseq=1, target=call[1], to=call[2], **fields)
            assert pbx.transport is not None
            pbx.transport.sendto(ack.encode(), sbc)
            return call

        async def hang_up(call: tuple[int, str, str]) -> None:
            n, target, to = call
            fields = {"pbx": PBX, "pbx_port": pbx_port, "n": n}
            bye = IN_DIALOG.format(method="BYE", cseq=2, target=target, to=to, **fields)
            done = await pbx.request(bye, f"{n}-bench@{PBX}", "BYE", sbc)
            if not done.startswith("SIP/2.0 200"):
                raise RuntimeError(f"call {n}: BYE {done.splitlines()[0]}")

        async def settle(seconds: float) -> None:
            # Let ACKs land and timers fire, then drop what only cycles keep.
            await asyncio.sleep(seconds)
            gc.collect()

        try:
            await asyncio.wait_for(pbx.registered.wait(), 10.0)
            await service.wait_settled()
            for _ in range(args.warmup):  # caches, interned strings, first records written
                await hang_up(await place())
            await asyncio.wait_for(service.bridge.wait_idle(), 10.0)
            await settle(64 * args.t1 + 1.0)
            if args.rss:
                base = _rss()
            else:
                tracemalloc.start(args.frames)
                before = tracemalloc.take_snapshot()
                base = tracemalloc.get_traced_memory()[0]
            for _ in range(args.calls):
                held.append(await place())
            await settle(0.2)
            if service.bridge.active != args.calls:
                raise RuntimeError(f"{service.bridge.active} calls up, {args.calls} placed")
            # Both readings are taken before anything is printed: formatting a traceback reads
            # the sources (linecache), which would count as held.
            readings = []
            for label in ("timers running", "timers run"):
                if label == "timers run":
                    await settle(64 * args.t1 + 1.0)
                if args.rss:
                    readings.append((label, _rss() - base, None))
                else:
                    readings.append(
                        (
                            label,
                            tracemalloc.get_traced_memory()[0] - base,
                            tracemalloc.take_snapshot(),
                        )
                    )
            if not args.rss:
                tracemalloc.stop()
            for label, grown, snapshot in readings:
                if snapshot is None:
                    print(f"RSS, {label}: {grown / args.calls:.0f} bytes per held call")
                    continue
                ours = sum(
                    s.size_diff
                    for s in snapshot.compare_to(before, "filename")
                    if s.traceback[0].filename == __file__
                )
                group = "traceback" if args.frames > 1 else "lineno"
                stats = snapshot.compare_to(before, group)
                _report(label, grown, args.calls, ours, stats, args.top)
                print("  by file:")
                for stat in snapshot.compare_to(before, "filename")[: args.top]:
                    name = _short(stat.traceback[0].filename)
                    print(f"  {stat.size_diff / args.calls:8.0f} B/call  {name}")
            for call in held:
                await hang_up(call)
            await asyncio.wait_for(service.bridge.wait_idle(), 10.0)
        finally:
            await service.stop()
            server.close()
            assert pbx.transport is not None
            pbx.transport.close()
    placed = args.warmup + args.calls
    expected = {"INVITE": placed, "ACK": placed, "BYE": placed}
    if Retell.seen != expected:
        raise RuntimeError(f"Retell saw {Retell.seen}, expected {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=1, help="more: callers of the sites")
    parser.add_argument("--t1", type=float, default=0.5, help="sip.t1: Timers L, M = 64*T1")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting in a section of the config (e.g. records.ladder_messages=0)",
    )
    parser.add_argument("--rss", action="store_true", help="RSS grown instead of tracemalloc")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    args = parser.parse_args()
    with open(os.devnull, "w") as log:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(run(args, log))
        else:
            asyncio.run(run(args, log))


if __name__ == "__main__":
    main()
