"""What a burst of calls leaves alive once it is over: nothing made during the burst that lives
on in the allocator's arenas (docs/performance.md, "Round 8: idle"). CPython's allocator gives
an arena (1 MiB) back only once every block in it is free: one small object made at the end of
a burst and kept for good (a counter's new value, a cached string, a prepared statement) holds
the whole arena, so RSS stays at the burst's high-water mark. Each test here names one such
object that the code used to make anew and keep, and checks it is now made once, up front."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from pathlib import Path

from sbc.b2bua import call as call_module
from sbc.b2bua.call import FactQueue
from sbc.b2bua.callstate import ShutdownRequested
from sbc.ops import records
from tests.unit.test_records import make_record, started_writer


async def test_the_loops_deadlines_keep_one_no_deadline_value() -> None:
    """_Deadlines lives as long as the loop; the "no deadline" it keeps when its last entry
    goes (fired, or disarmed as a call ends) is the same object each time, not a new float."""
    loop = asyncio.get_running_loop()
    facts = FactQueue()
    assert await facts.get(loop.time() + 0.01) is None  # fired
    shared = call_module._deadlines
    assert shared is not None
    after_firing = shared._timer_at
    getter = asyncio.ensure_future(facts.get(loop.time() + 60))
    await asyncio.sleep(0)
    facts.put_nowait(ShutdownRequested("x"))
    await getter
    facts.close()  # disarmed: the call ended
    assert shared._timer_at == float("inf")
    assert shared._timer_at is after_firing


def _statements() -> int:
    """sqlite3's prepared statements alive in the process."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if type(o).__name__ == "Statement" and type(o).__module__ == "sqlite3"
    )


async def test_the_records_writer_prepares_its_inserts_when_it_opens(tmp_path: Path) -> None:
    """Every INSERT size the writer may run is prepared at open (before a burst), none on its
    first use in a burst; the priming writes nothing."""
    path = tmp_path / "calls.sqlite3"
    writer = await started_writer(path)
    made = _statements()
    # 63 records: one statement of each size (32 + 16 + 8 + 4 + 2 + 1 rows), then one alone.
    assert await writer.write_many([make_record(f"u-{i}") for i in range(63)])
    assert await writer.write(make_record("u-63"))
    assert _statements() <= made
    await writer.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM calls").fetchone()[0] == 64
        assert db.execute("SELECT count(*) FROM calls WHERE call_uuid = ''").fetchone()[0] == 0
    finally:
        db.close()


async def test_the_records_writers_page_cache_is_bounded(tmp_path: Path) -> None:
    writer = await started_writer(tmp_path / "calls.sqlite3")
    try:
        size = await writer._in_thread(
            lambda: writer._db.execute("PRAGMA cache_size").fetchone()[0]  # type: ignore[union-attr]
        )
    finally:
        await writer.close()
    assert size == -records.WRITER_CACHE_KIB


async def test_the_records_writers_cursor_keeps_no_row_id(tmp_path: Path) -> None:
    """The writer's one cursor lives as long as the service: it keeps no value a write makes
    (``lastrowid``, an int per INSERT, above 256 after as many rows)."""
    writer = await started_writer(tmp_path / "calls.sqlite3")
    try:
        assert await writer.write_many([make_record(f"u-{i}") for i in range(300)])
        assert writer._cursor is not None
        assert writer._cursor.lastrowid is None
    finally:
        await writer.close()
