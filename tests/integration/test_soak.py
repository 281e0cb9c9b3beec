"""No leaks (issue 11): a soak of talk, busy, unavailable, cancelled and transferred calls
through a real ``sbc run``, and what was found by it.

* The soak (``bench/soak.py``, smaller): 3 batches of 100 calls of each of the five kinds
  (1,500 calls), T1 = 0.1 s so that every transaction timer runs out within 6.4 s. After each
  batch calls, dialogs, SIP transactions, stream connections, RTP ports and every per-call or
  per-request table of sbc must read 0 on ``/metrics``, and RSS must stay flat: the growth from
  the end of batch 2 to the end of batch 3 at most 30 % of what the first batch (the warm-up:
  caches, SQLite pages, allocator arenas) added, and at most 8 KiB per call. Before the fixes
  below an ended call stayed at about 20 KiB until a full garbage collection.
* A relay session, once closed, is freed by reference counting (its sockets pointed at each
  other and at their transports).
* The manager lets an ended call go: with the cyclic collector off, nothing holds the call or
  its media session once its transactions are over.
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from pathlib import Path

import pytest
from bridge_helpers import assert_both_ends, pbx_call, retell, running_bridge
from peers import require_binary

from sbc.b2bua.events import CallStarted
from sbc.media.ports import PortPool
from sbc.media.relay import RelayBackend, RelaySession, RelaySocket
from sbc.ops.settings import MediaSettings
from sbc.sdp.parser import parse_sdp
from tests.scripts import bench_script

pytestmark = pytest.mark.integration


def test_calls_of_every_kind_leave_nothing_and_rss_stays_flat(tmp_path: Path) -> None:
    require_binary("sipp")
    soak = bench_script("soak.py")
    load = soak.SoakLoad(batches=3, calls=100, rate=20.0, hold_ms=200, t1=0.1, settle=40.0)
    result = soak.run_soak(load, tmp_path, echo=False)
    batches = result["batches"]
    summary = "\n".join(
        f"batch {b['batch']}: {b['outcome']} RSS {b['rss_settled_mib']:.2f} MiB left "
        f"{soak.nonzero_only(b['leftovers'])}"
        for b in batches
    )
    assert not result["failures"], f"{result['failures']}\n{summary}\n(logs in {tmp_path})"
    assert len(batches) == 3
    for batch in batches:
        # Every caller completed every call of its kind...
        assert all(o["ok"] == load.calls and o["failed"] == 0 for o in batch["outcome"].values())
        # ...and sbc holds nothing once the transaction timers ran out.
        left = batch["leftovers"]
        for name in soak.ZERO_GAUGES:
            assert left[name] == 0, (name, left)
        assert soak.nonzero_only(left) == {}
    assert result["retell"] == {"exit": 0, "ok": 3 * load.per_batch, "failed": 0}
    # What sbc counted: every call started and ended, every transfer handed over.
    counted = result["counters"]
    assert counted["sbc_calls_started_total"] == 3 * load.per_batch
    ended = sum(v for k, v in counted.items() if k.startswith("sbc_calls_ended_total"))
    assert ended == 3 * load.per_batch
    assert counted['sbc_transfers_total{mode="refer",outcome="transferred"}'] == 3 * load.calls
    # The connection to Retell was closed when Retell went away: nothing left at all.
    assert soak.nonzero_only(result["leftovers_end"]) == {}

    warmup = batches[0]["rss_settled_mib"] - result["rss_idle_mib"]
    later = batches[2]["rss_settled_mib"] - batches[1]["rss_settled_mib"]
    kib_per_call = 1024 * later / load.per_batch
    figures = (
        f"RSS idle {result['rss_idle_mib']:.2f} MiB, after batches "
        f"{[round(b['rss_settled_mib'], 2) for b in batches]}: warm-up +{warmup:.2f} MiB, "
        f"batch 2 -> 3 {later:+.2f} MiB ({kib_per_call:.2f} KiB per call)"
    )
    assert later <= 0.3 * warmup, figures
    assert kib_per_call <= 8.0, figures


RELAY = "127.0.0.1"


def sdp(address: str, port: int) -> bytes:
    return (
        f"v=0\r\no=- 1 1 IN IP4 {address}\r\ns=-\r\nc=IN IP4 {address}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    ).encode()


async def test_a_closed_relay_session_is_freed_without_the_cyclic_collector() -> None:
    base = 44000 + (os.getpid() % 200) * 20
    pool = PortPool(base, base + 19)
    backend = RelayBackend(RELAY, RELAY, pool, learning_window=0.2)
    session = await backend.allocate("soak-call")
    await session.offer("a", parse_sdp(sdp(RELAY, 30000)))
    await session.answer("b", parse_sdp(sdp(RELAY, 30002)))
    gone = weakref.ref(session)
    gc.collect()
    gc.disable()
    try:
        await session.close()
        del session
        await asyncio.sleep(0)
        assert gone() is None
        # Nothing of it is left for the cyclic collector either (RelaySocket has no weakref).
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, RelaySocket | RelaySession)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []
    assert pool.in_use == 0
    assert backend.sessions == set()


async def test_the_manager_lets_an_ended_call_go_without_the_cyclic_collector(
    tmp_path: Path,
) -> None:
    """An in-process bridge (relay media), one call from SIPp 3CX to SIPp Retell: once it
    ended and its transactions are over, nothing holds the call or its media session, with
    the cyclic collector off from the answer on (the manager disposes of the call)."""
    require_binary("sipp")
    async with running_bridge(
        tmp_path, media=MediaSettings(mode="relay"), timers=(0.1, 1.0, 0.5)
    ) as bridge:
        started = asyncio.Event()
        bridge.calls.events.subscribe(lambda event: started.set(), kinds=(CallStarted,))
        far = await retell(tmp_path, bridge, "retell_uas.xml")
        near = await pbx_call(tmp_path, bridge, "pbx_caller.xml", extra=("-d", "1500"))
        async with asyncio.timeout(10):
            await started.wait()
            (call,) = bridge.calls.calls.values()
            await call.up.wait()
        gone = weakref.ref(call)
        media = weakref.ref(call.bridge.media)
        del call
        gc.collect()
        gc.disable()
        try:
            assert_both_ends("3CX", await near.finish(30), near, 1)
            assert_both_ends("Retell", await far.finish(30), far, 1)
            await bridge.drained(64 * 0.1 + 5)
            assert gone() is None
            assert media() is None
        finally:
            gc.enable()
