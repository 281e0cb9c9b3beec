"""The records a call manager keeps in memory (``CallManager.records``): the last
``keep_records`` (100 by default, for the demo and tests), none in ``sbc run``, where they go to
the store only and what a burst of calls leaves alive keeps the memory of the burst
(docs/performance.md, "Round 4: idle"). Either way every record is published."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from sbc.b2bua.calls import CallManager
from sbc.b2bua.events import CallEnded, CallEvent
from sbc.media.base import PassthroughBackend
from sbc.net.engine import IncomingRequest
from tests.unit.call_harness import LIMIT, PBX_SOURCE, FakeEngine, a_invite, config


async def refused_calls(keep_records: int | None, calls: int) -> tuple[CallManager, int]:
    """``calls`` calls one after the other, each refused 486 by Retell; the manager and how
    many CallEnded events its bus published."""
    engine = FakeEngine()
    uuids = iter(f"uuid-{i}" for i in range(calls))
    kwargs = {} if keep_records is None else {"keep_records": keep_records}
    manager = CallManager(
        engine,  # type: ignore[arg-type]
        config(trusted=(ipaddress.ip_network("10.0.0.0/24"),)),
        PassthroughBackend(),
        new_uuid=lambda: next(uuids),
        **kwargs,  # type: ignore[arg-type]
    )
    ended: list[CallEvent] = []
    manager.events.subscribe(ended.append, inline=True, kinds=(CallEnded,))
    for i in range(calls):
        invite = a_invite()
        manager.handle_request(IncomingRequest(engine, f"pbx-invite-{i}", invite, PBX_SOURCE, None))
        await engine.wait(lambda n=i + 1: len(engine.requests("INVITE")) == n)
        engine.requests("INVITE")[i].deliver(486, to_tag=f"rt{i}")
        await asyncio.wait_for(manager.wait_idle(), LIMIT)
    return manager, len(ended)


@pytest.mark.parametrize(
    ("keep", "kept"), [(None, ["uuid-0", "uuid-1", "uuid-2"]), (2, ["uuid-1", "uuid-2"]), (0, [])]
)
async def test_the_last_records_are_kept_and_every_one_is_published(
    keep: int | None, kept: list[str]
) -> None:
    manager, published = await refused_calls(keep, 3)
    assert [r.call_uuid for r in manager.records] == kept
    assert published == 3
    assert manager.active == 0
