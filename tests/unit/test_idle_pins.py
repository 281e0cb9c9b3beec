"""What a burst of calls leaves alive once it is over: nothing made during the burst that lives
on in the allocator's arenas (docs/performance.md, "Round 8: idle"). CPython's allocator gives
an arena (1 MiB) back only once every block in it is free: one small object made at the end of
a burst and kept for good (a counter's new value, a cached string, a prepared statement) holds
the whole arena, so RSS stays at the burst's high-water mark. Each test here names one such
object that the code used to make anew and keep, and checks it is now made once, up front."""

from __future__ import annotations

import asyncio
import gc
import io
import itertools
import json
import sqlite3
import sys
import time
import tracemalloc
import types
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

from sbc.b2bua import call as call_module
from sbc.b2bua.call import FactQueue
from sbc.b2bua.callstate import ShutdownRequested
from sbc.net.engine import EngineStats
from sbc.net.guard import Guard, GuardConfig
from sbc.net.transport import TransportStats, count_of
from sbc.ops import idle, records
from sbc.ops.idle import warm_free_lists
from sbc.ops.logging import configure_logging
from sbc.ops.metrics import PlainCounter, PlainGauge, PlainHistogram
from tests.unit.engine_sink import engine_without_sockets
from tests.unit.test_engine_fast_paths import OPTIONS
from tests.unit.test_guard import PBX, Clock
from tests.unit.test_guard import make as make_guard
from tests.unit.test_logging import _json_line
from tests.unit.test_records import make_record, started_writer

# Not followed: code and the objects every instance shares (its class, module, functions), and
# a bound method's object (a test's clock, which a test moves on).
_SHARED = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def reachable(root: object, skip: tuple[object, ...] = ()) -> dict[int, object]:
    """Every object ``root`` holds, directly or not (ints and floats too), by id, but what
    ``skip`` holds. The dict keeps them alive, so that no id is reused while compared."""
    seen: dict[int, object] = {}
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen[id(o)] = o
        if not isinstance(o, _SHARED) and not any(o is s for s in skip):
            stack.extend(gc.get_referents(o))
    return seen


def made_by(
    root: object, update: Callable[[], Any], times: int = 300, skip: tuple[object, ...] = ()
) -> list[object]:
    """The objects ``root`` holds after ``update`` ran ``times`` times that it did not hold
    before: what a burst of such updates would leave alive (``skip``: a test's own clock)."""
    before = reachable(root, skip)
    for _ in range(times):
        update()
    return [o for i, o in reachable(root, skip).items() if i not in before]


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
    (``lastrowid``, an int per statement, above 256 after as many rows); nor the writer."""
    writer = await started_writer(tmp_path / "calls.sqlite3")
    try:
        assert await writer.write_many([make_record(f"u-{i}") for i in range(300)])
        assert writer._cursor is not None
        assert writer._cursor.lastrowid is None
        # nor does the writer keep the count as an int made by the last `+= 1`
        assert writer.written == 300
        assert not [v for v in vars(writer).values() if type(v) is int and v > 256]
    finally:
        await writer.close()


def test_the_guard_keeps_no_number_per_new_call() -> None:
    """A trusted source's token bucket and the new-call cap are updated by every new call
    from 3CX: their numbers are kept in arrays, not as float objects made per update."""
    clock = Clock()
    guard = make_guard(clock)
    assert isinstance(guard, Guard) and isinstance(guard.config, GuardConfig)
    guard.request_verdict(PBX, counted=True, new=True)

    def new_call() -> None:
        clock.now += 0.013
        assert guard.admit_datagram(PBX)
        assert guard.request_verdict(PBX, counted=True, new=True) == 0
        assert guard.new_call_allowed()

    assert made_by(guard, new_call, skip=(clock,)) == []


async def test_the_loops_deadlines_keep_nothing_per_deadline_armed() -> None:
    """Every call arms and disarms deadlines in the loop's one _Deadlines: once disarmed,
    nothing made for them stays (no sequence number kept as a new int)."""
    loop = asyncio.get_running_loop()
    shared = call_module._deadlines_of(loop)
    queue = FactQueue()

    def call() -> None:
        shared.disarm(shared.arm(loop.time() + 60, queue))

    call()
    assert made_by(shared, call, skip=(loop,)) == []


async def test_the_engines_and_transports_counts_keep_no_number_per_message() -> None:
    """The counters of every message (received, sent, by kind) are cells of arrays: counting
    keeps no int object made by a `+= 1` (above 256: a new object each time)."""
    engine, sink = engine_without_sockets()
    received = iter(range(10**6))

    def options() -> None:
        i = next(received)
        engine.transports._datagram_received(OPTIONS % (i, i, i), ("127.0.0.1", 5070))

    options()
    stats = (engine.stats, engine.transports.stats)
    assert made_by(stats, options, times=400) == []
    assert len(sink.sent) == 401
    assert engine.stats.requests_received == engine.transports.stats.datagrams_received == 401
    assert engine.transports.stats.messages_sent == 401
    assert engine.stats.messages == {("in", "OPTIONS", "udp"): 401, ("out", 200, "udp"): 401}


def test_counts_read_what_was_counted() -> None:
    """The counters kept as itertools.count objects read back their counts, also once set
    (a test sets one, say) or past what one machine digit of an int holds."""
    stats = EngineStats()
    for _ in range(300):
        next(stats.requests)
    assert stats.requests_received == 300
    stats.requests_received = 2**40
    next(stats.requests)
    assert stats.requests_received == 2**40 + 1
    assert count_of(itertools.count(7)) == 7
    transport = TransportStats(oversized=2)
    transport.messages_sent = 5
    transport.stream_messages_received = 3
    assert (transport.messages_sent, transport.stream_messages_received) == (5, 3)
    assert transport.datagrams_received == 0 and transport.oversized == 2


def test_the_call_metrics_keep_no_number_per_call() -> None:
    """The families every call updates (counters by outcome, gauges, the histograms) keep
    their numbers in arrays: an update keeps no number object of its own."""
    registry = CollectorRegistry()
    ended = PlainCounter("ended", "Calls ended.", ("outcome",), registry=registry)
    active = PlainGauge("active", "Calls up.", registry=registry)
    duration = PlainHistogram("duration", "Seconds.", (0.5, 5.0), registry=registry)
    seconds = iter(range(10**6))

    def call() -> None:
        ended.inc(("answered",))
        active.inc()
        duration.observe(next(seconds) / 100)

    call()
    assert made_by((ended, active, duration), call) == []
    text = generate_latest(registry).decode()
    assert 'ended_total{outcome="answered"} 301.0' in text
    assert "\nactive 301.0\n" in text
    assert 'duration_bucket{le="0.5"} 51.0' in text and "duration_count 301.0" in text
    assert "duration_sum 451.5" in text


async def test_the_transaction_layer_keeps_its_own_queues() -> None:
    """What the layer hands over (messages to send, events) is a copy; the lists it keeps are
    those it was made with, not a new one left by each hand-over."""
    engine, sink = engine_without_sockets()
    outbox, events = engine.layer._outbox, engine.layer._events
    for i in range(3):
        engine.transports._datagram_received(OPTIONS % (i, i, i), ("127.0.0.1", 5070))
    assert len(sink.sent) == 3
    assert engine.layer._outbox is outbox and engine.layer._events is events
    assert outbox == [] and events == []


def test_the_log_lines_timestamps_keep_no_text_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line's timestamp reuses its hour's date and hour, made once an hour, and the minutes
    and seconds of a table made at start: lines second after second (a burst of calls) keep
    no text of theirs. Each is what TimeStamper(fmt="iso", utc=True) writes, across an hour
    and a day."""
    configure_logging("info", "json", stream=io.StringIO())
    fast = _json_line()
    bound = structlog.get_logger("sbc.test").bind()
    writer = bound._logger
    start = 1_765_065_600 - 1_800  # 2025-12-07 00:00:00 UTC, half an hour before
    now = [start * 10**9 + 1_000]
    monkeypatch.setattr(time, "time_ns", lambda: now[0])

    def line_a_second_later() -> None:
        now[0] += 10**9 + 7_000
        micros = now[0] // 1000
        expected = datetime.fromtimestamp(micros // 10**6, UTC).replace(microsecond=micros % 10**6)
        stamp = json.loads(fast(writer, "info", {"event": "x"}))["timestamp"]
        assert stamp == expected.isoformat().replace("+00:00", "Z")
        line = json.loads(fast.after('"a": 1', writer, "info", {"event": "y"}))
        assert line["timestamp"] == stamp

    line_a_second_later()
    assert made_by(fast, line_a_second_later, times=1_700) == []  # within the hour
    for _ in range(3_600):  # across midnight: the new hour's text, and correct stamps
        line_a_second_later()


def test_the_loops_free_lists_are_filled_at_start() -> None:
    """After warm_free_lists, a burst of timers (up to uvloop's 250 kept for reuse) takes the
    TimerHandles made at start-up: none is a new block, that would end in the free list."""
    loop = uvloop.new_event_loop()

    async def burst() -> int:
        warm_free_lists(asyncio.get_running_loop())
        await asyncio.sleep(0)
        tracemalloc.start()
        try:
            timers = [loop.call_later(3600.0, lambda: None) for _ in range(250)]
            traces = tracemalloc.take_snapshot().traces
        finally:
            tracemalloc.stop()
        size = sys.getsizeof(timers[0])
        for timer in timers:
            timer.cancel()
        return sum(1 for trace in traces if trace.size == size)

    try:
        assert loop.run_until_complete(burst()) == 0
    finally:
        loop.close()


async def test_one_full_collection_once_the_calls_are_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """None while calls are up or starting, none before the quiet spell is over, one after
    it, and none again until calls were seen again."""
    collections: list[float] = []
    loop = asyncio.get_running_loop()

    collected = asyncio.Event()

    def collect() -> int:
        collections.append(loop.time())
        collected.set()
        return 0

    async def until_collected() -> None:
        await asyncio.wait_for(collected.wait(), 10)
        collected.clear()

    monkeypatch.setattr(gc, "collect", collect)
    up, seen = [0], [0.0]
    task = asyncio.ensure_future(
        idle.collect_when_idle(lambda: up[0], lambda: seen[0], quiet=1.0, every=0.01)
    )
    try:
        await asyncio.sleep(0.2)
        assert collections == []  # no call yet: nothing to give back
        up[0], seen[0] = 1, 1.0
        await asyncio.sleep(0.2)
        assert collections == []  # a call up
        up[0] = 0
        ended = loop.time()
        await until_collected()
        # after the quiet spell (from the last look that saw the call), not before
        assert collections[0] >= ended + 1.0 - 0.05
        await asyncio.sleep(0.2)
        assert len(collections) == 1  # once per quiet spell
        seen[0] = 2.0  # a short call, started and ended between two looks
        started = loop.time()
        await until_collected()
        assert collections[1] >= started + 1.0 - 0.05
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- Round 8b: idle -------------------------------------------------------------------------------


def test_the_stream_parser_keeps_no_offset_of_a_message_it_is_done_with() -> None:
    """A connection's parser lives as long as the connection: the offsets of the message it
    last framed (ints above 256, a new object each) are not kept until the next one."""
    from sbc.sip.parser import StreamParser

    parser = StreamParser()
    sent = iter(range(10**6))
    framed: list[str] = []

    def feed() -> None:
        i = next(sent)
        data = OPTIONS % (i, i, i)
        half = len(data) // 2  # across two reads: the offsets are kept in between
        assert parser.feed(data[:half]) == []
        framed.extend(message.call_id for message in parser.feed(data[half:]))

    feed()
    assert made_by(parser, feed) == []
    assert len(framed) == 301 and len(set(framed)) == 301
    assert parser.buffered == 0 and not parser.in_message


class _Written:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def is_closing(self) -> bool:
        return False


async def test_a_connections_activity_times_keep_no_float_per_message() -> None:
    """What a TCP connection received and sent last is kept as C doubles: no float made by
    the last message of a burst is kept by the connection."""
    from sbc.net.transport import StreamConnection

    engine, _ = engine_without_sockets()
    connection = StreamConnection(engine.transports, "tcp", outbound=True)
    written = _Written()
    connection._transport = written  # type: ignore[assignment]
    loop = asyncio.get_running_loop()

    def traffic() -> None:
        connection.data_received(b"")  # nothing to frame: only the times change
        connection.write(b"\r\n\r\n")

    before = loop.time()
    traffic()
    assert made_by(connection, traffic, skip=(written,)) == []
    assert before <= connection.last_received <= connection.last_activity <= loop.time()
    assert len(written.data) == 301 and not connection.closed


async def test_the_engines_tables_let_go_once_empty() -> None:
    """A dict keeps the table it grew to when emptied; the engine's and the transaction
    layer's per-transaction tables give theirs back once empty (``release_tables``, called by
    the idle task), and keep what they hold otherwise."""
    engine, _ = engine_without_sockets()
    empty = sys.getsizeof({})
    grown: list[dict[str, Any]] = [
        engine._clients,
        engine._finished,
        engine._incoming,
        engine._key_branches,
        engine._transaction_sources,
        engine.layer._clients,
        engine.layer._servers,
    ]
    for table in grown:
        for i in range(2_000):
            table[f"z9hG4bK{i}"] = None
        for i in range(2_000):
            del table[f"z9hG4bK{i}"]
        assert sys.getsizeof(table) > 10 * empty  # emptied, its table kept
    engine._source_transactions["127.0.0.1"] = 1  # one still counted: left as it is
    engine.release_tables()
    assert [sys.getsizeof(table) for table in grown] == [empty] * len(grown)
    assert all(table is now for table, now in zip(grown, grown, strict=True))
    assert engine._source_transactions == {"127.0.0.1": 1}
    engine.layer._servers["z9hG4bK-live"] = None  # type: ignore[assignment]
    engine.release_tables()
    assert engine.layer._servers == {"z9hG4bK-live": None}  # a live one: left as it is


def test_the_c_librarys_free_pages_can_be_given_back() -> None:
    """glibc (this host's C library) has malloc_trim: the idle collection finds it, and
    calling it (what it does after the collection) gives back free pages without harm."""
    trim = idle._find_malloc_trim()
    assert trim is not None and idle._MALLOC_TRIM is not None
    assert trim(0) in (0, 1)  # 1: some memory was given back


async def test_the_idle_collection_lets_the_tables_go_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """collect_when_idle calls ``release`` right before its full collection, once per quiet
    spell: the tables freed, their blocks' arenas can be given back by that collection; then
    the C library's free pages (malloc_trim)."""
    done: list[str] = []
    collected = asyncio.Event()

    def collect() -> int:
        done.append("collect")
        collected.set()
        return 0

    monkeypatch.setattr(gc, "collect", collect)

    def trim(pad: int) -> int:
        done.append(f"trim {pad}")
        return 0

    monkeypatch.setattr(idle, "_MALLOC_TRIM", trim)
    seen = [1.0]
    task = asyncio.ensure_future(
        idle.collect_when_idle(
            lambda: 0,
            lambda: seen[0],
            quiet=0.05,
            every=0.01,
            release=lambda: done.append("release"),
        )
    )
    try:
        await asyncio.sleep(0.05)
        seen[0] = 2.0  # a call seen: then quiet
        await asyncio.wait_for(collected.wait(), 10)
        await asyncio.sleep(0.1)
        assert done == ["release", "collect", "trim 0"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
