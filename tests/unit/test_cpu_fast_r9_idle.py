"""Round 9, idle: what a quiet service gives back after a burst of calls (docs/performance.md,
"Round 9: idle"). The records writer's SQLite page cache (up to WRITER_CACHE_KIB, in the writer
thread's malloc arena) is freed when the service goes idle, the ladder's remembered texts are
let go, the records' delivery task stops waiting (EventBus.rest), and the idle collection runs
a few times, a moment apart, so that what each look makes does not keep the burst's arenas."""

from __future__ import annotations

import _sqlite3
import asyncio
import ctypes
import gc
import sqlite3
from array import array
from pathlib import Path

import pytest

from sbc.b2bua import ladder as ladder_module
from sbc.b2bua.events import CallEvent, CallStarted, EventBus
from sbc.b2bua.ladder import _pack_columns, forget_texts
from sbc.net.addresses import Destination
from sbc.ops import idle
from sbc.ops.records import RecordWriter
from sbc.sip.uri import parse_uri
from tests.unit.test_cpu_fast_r8_call import _columns
from tests.unit.test_idle_pins import _statements
from tests.unit.test_records import make_record, started_writer

# SQLite's own count of the bytes it has allocated, process-wide (the library the sqlite3
# module is linked with; memory statistics are on by default).
_LIB = ctypes.CDLL(_sqlite3.__file__)
_LIB.sqlite3_memory_used.restype = ctypes.c_int64


def sqlite_bytes() -> int:
    return int(_LIB.sqlite3_memory_used())


async def test_the_records_writer_gives_its_page_cache_back(tmp_path: Path) -> None:
    """After 2,000 rows (a file larger than the cache) the writer's connection holds a full
    page cache; release_memory() frees most of it, makes no statement, keeps no row id, and
    the writes after it go on as before."""
    path = tmp_path / "calls.sqlite3"
    writer = await started_writer(path)
    try:
        for batch in range(125):
            rows = [make_record(f"u-{batch}-{i}") for i in range(16)]
            assert all(await writer.write_many(rows))
        statements = _statements()
        full = sqlite_bytes()
        await writer.release_memory()
        released = full - sqlite_bytes()
        # the cache is 512 KiB (WRITER_CACHE_KIB) once the file is larger; at 5a67994 there
        # was no way to give it back
        assert released >= 256 * 1024, released
        assert writer._cursor is not None and writer._cursor.lastrowid is None
        assert _statements() <= statements
        assert await writer.write(make_record("after"))
    finally:
        await writer.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*) FROM calls").fetchone()[0] == 2001
    finally:
        db.close()


async def test_release_memory_of_a_writer_not_open_does_nothing(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "calls.sqlite3")
    await writer.release_memory()  # not started
    started = await started_writer(tmp_path / "other.sqlite3")
    await started.close()
    await started.release_memory()  # closed


async def _run_idle(
    monkeypatch: pytest.MonkeyPatch, seen: list[float], done: list[str], until: int, quiet: float
) -> asyncio.Task[None]:
    """collect_when_idle with every step recorded in ``done``; returns once ``until`` steps
    were recorded (the task still running)."""
    enough = asyncio.Event()

    def note(step: str) -> None:
        done.append(step)
        if len(done) >= until:
            enough.set()

    def collect() -> int:
        note("collect")
        return 0

    def trim(pad: int) -> int:
        note(f"trim {pad}")
        return 0

    async def shrink() -> None:
        await asyncio.sleep(0)
        note("shrink")

    monkeypatch.setattr(gc, "collect", collect)
    monkeypatch.setattr(idle, "_MALLOC_TRIM", trim)
    task = asyncio.ensure_future(
        idle.collect_when_idle(
            lambda: 0,
            lambda: seen[0],
            quiet=quiet,
            every=0.01,
            release=lambda: note("release"),
            shrink=shrink,
        )
    )
    await asyncio.sleep(0.03)
    seen[0] = 2.0  # a call seen: then quiet
    await asyncio.wait_for(enough.wait(), 10)
    return task


async def test_the_idle_collection_lets_the_records_go_before_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once quiet: the tables, the records' task and cache, then the collection and the trim,
    once; then nothing until calls are seen again."""
    done: list[str] = []
    seen = [1.0]
    task = await _run_idle(monkeypatch, seen, done, until=4, quiet=0.05)
    try:
        await asyncio.sleep(0.2)  # many looks
        assert done == ["release", "shrink", "collect", "trim 0"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_no_more_collections_when_a_call_came_in_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    done: list[str] = []
    seen = [1.0]
    task = await _run_idle(monkeypatch, seen, done, until=4, quiet=2.0)
    try:
        seen[0] = 3.0  # before the next one: a call started and ended
        await asyncio.sleep(0.2)  # many looks, all within the new quiet spell (2 s)
        assert done == ["release", "shrink", "collect", "trim 0"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_the_ladders_remembered_texts_are_let_go_when_idle() -> None:
    """A peer first seen during a burst (a new source port) left its address and URI texts
    in the ladder's memo for good; forget_texts() (the idle collection's release) empties it,
    and the next ladder packs the same text, remembering it again."""
    uri = parse_uri("sip:4155550123@127.0.0.82")
    address = Destination("udp", "127.0.0.81", 38197)
    fields = _columns([uri], [address])
    times, idents = array("d", [1.0]), array("q", [1])
    first = _pack_columns(fields, times, idents)
    assert first is not None and "udp:127.0.0.81:38197" in first
    assert (address.transport, address.host, address.port) in ladder_module._ADDRESS_TEXTS
    forget_texts()
    assert ladder_module._ADDRESS_TEXTS == {} and ladder_module._URI_TEXTS == {}
    assert _pack_columns(fields, times, idents) == first
    assert (address.transport, address.host, address.port) in ladder_module._ADDRESS_TEXTS


async def test_a_delivery_task_with_nothing_to_deliver_rests_when_idle() -> None:
    """EventBus.rest() stops a delivery task waiting for its next event (what that wait made
    goes with it) and loses nothing: the next event starts a new task, delivered in order."""
    bus = EventBus()
    seen: list[str] = []

    async def observer(event: CallEvent) -> None:
        assert isinstance(event, CallStarted)
        seen.append(event.call_uuid)

    sub = bus.subscribe(observer, maxsize=10)
    bus.publish(CallStarted("a"))
    await bus.flush()
    waiting = sub.task
    assert waiting is not None and not waiting.done()
    await bus.rest()
    assert sub.task is None and waiting.cancelled()
    bus.publish(CallStarted("b"))
    bus.publish(CallStarted("c"))
    await bus.flush()
    assert seen == ["a", "b", "c"]
    assert sub.task is not None and sub.task is not waiting
    await bus.close()


async def test_rest_waits_for_what_is_being_delivered() -> None:
    """Events queued or being handed over when rest() is called are all delivered, in order;
    the task is stopped only once it has nothing left."""
    bus = EventBus()
    seen: list[str] = []
    go = asyncio.Event()

    async def slow(event: CallEvent) -> None:
        assert isinstance(event, CallStarted)
        await go.wait()
        seen.append(event.call_uuid)

    sub = bus.subscribe(slow, maxsize=10)
    for name in "abc":
        bus.publish(CallStarted(name))
    resting = asyncio.ensure_future(bus.rest())
    await asyncio.sleep(0.01)
    assert not resting.done() and sub.handling
    bus.publish(CallStarted("d"))
    go.set()
    await asyncio.wait_for(resting, 10)
    assert seen == ["a", "b", "c", "d"]
    assert sub.task is None
    bus.publish(CallStarted("e"))
    await bus.flush()
    assert seen == ["a", "b", "c", "d", "e"]
    await bus.close()
