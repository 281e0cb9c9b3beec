"""Fuzzing a running sbc in CI (a short run; bench/fuzz.py runs for minutes): the whole
Service on loopback (engine, call manager, relay media) fed mutated RFC 4475 and well-formed
messages from the trusted PBX address, as datagrams through the UDP transport's entry and as
stream bytes over real TCP connections (tests/fuzz_harness.py). Nothing may fail inside sbc
(no error-level log line, no exception reaching the loop), an OPTIONS over UDP and over TCP is
answered after every batch, and at the end calls, transactions and RTP ports are back to 0."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from sbc.media.relay import RelayBackend
from tests.fuzz_harness import WELL_FORMED, EngineTarget, mutate, running_engine_target, seeds

pytestmark = pytest.mark.integration

BATCHES = 10
BATCH = 1000  # inputs per batch: one in 20 over TCP
SEED = int(os.environ.get("SBC_FUZZ_SEED", "4475"))


async def drained(target: EngineTarget, limit: float) -> dict[str, int]:
    """Wait until calls, transactions and RTP ports are 0 (transactions end on their timers:
    64*T1 = 6.4 s here); returns what is left after ``limit`` seconds."""
    service = target.service
    loop = asyncio.get_running_loop()
    give_up = loop.time() + limit
    while True:
        media = service.media
        left = {
            "calls": service.bridge.active,
            "transactions": len(service.engine.layer),
            "rtp_ports": media.pool.in_use if isinstance(media, RelayBackend) else 0,
        }
        if not any(left.values()) or loop.time() > give_up:
            return left
        await asyncio.sleep(0.1)  # timers, not events: poll


async def test_fuzzed_input_fails_nothing_and_the_listener_keeps_answering(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    base = seeds()
    pool = list(base)
    async with running_engine_target(tmp_path) as target:
        assert await target.options_answered()
        for batch in range(BATCHES):
            for n in range(BATCH):
                # Half from the well-formed messages: those get past the parser to the calls.
                source = rng.choice(base[-WELL_FORMED:] if rng.random() < 0.5 else pool)
                data = mutate(source, rng, base)
                if n % 20 == 0:
                    await target.feed_tcp(data, rng)
                else:
                    target.feed_udp(data, source_port=rng.choice([5060, 40000]))
                    await asyncio.sleep(0)  # let the calls it started run
                if len(pool) < 500 and rng.random() < 0.2:
                    pool.append(data)
            assert await target.options_answered(), f"OPTIONS unanswered after batch {batch}"
            assert target.findings == [], target.findings[0].detail
        assert target.udp_inputs + target.tcp_inputs == BATCHES * BATCH
        assert target.service.engine.stats.requests_received > BATCHES * BATCH // 4
        assert await drained(target, 30) == {"calls": 0, "transactions": 0, "rtp_ports": 0}
        assert target.service.engine.transports.connection_count == 0
        assert target.findings == []
