"""Call records: one SQLite row per finished call, written off the call path.

:class:`RecordWriter` observes the call events bus (``sbc.b2bua.events``) through its own
bounded queue (``[records] queue``): a :class:`~sbc.b2bua.events.CallEnded` becomes one row.
The calls that end within ``batch_wait`` (0.1 s) of each other are written in one transaction,
one commit per batch (the commit was most of a record's cost); the rows are made in the worker
thread, which gives the GIL back to the event loop after each (``_give_way``).
Every database operation runs in the writer's one worker thread, never on the event loop, so a
slow or failing disk only fills the writer's queue; once full, the bus drops further events for
it and counts them (``EventBus.dropped``, logged on the first drop of a run). A failed write is
counted (``failed``) and logged, and the next record is tried as usual. At shutdown the service
flushes the bus, then :meth:`RecordWriter.close` waits for the last row: nothing queued is lost
on SIGTERM. Counters for metrics: ``written``, ``failed`` (and the bus's ``dropped``).

The database is in WAL mode (``synchronous=NORMAL``: a killed process loses nothing committed,
a power cut at most the last transactions, never the file's consistency); readers
(``sbc calls``) never block the writer. The schema is versioned with ``PRAGMA user_version``
and migrated on start by the steps of :data:`MIGRATIONS` (a file from a newer sbc is refused).
Rows whose call ended more than ``keep_days`` ago are deleted at start and then once a day.

Columns (``calls`` table): see :data:`COLUMNS`. JSON columns: ``x_headers`` (object: the X-
headers sent to Retell), ``transfers`` (list of the transfers' records), ``media`` (the media
session's ``stats()``), ``ladder`` (list of the SIP message summaries, ``sbc/b2bua/ladder.py``).
Most calls' ladders are stored in ``ladder_packed`` instead (``ladder`` is then ``[]``): the
fields the call kept of each message, as one text (``Ladder.packed``), from which the readers
(:func:`list_calls`, :func:`find_call`) make the same summaries when the record is read; a
record read has only ``ladder``, whichever way it was stored.
Media counters per direction: ``a_*`` what came from side a (the leg that called: 3CX's caller,
or Retell for a call Retell sent) and went to side b, ``b_*`` the reverse; NULL when the media
layer cannot see packets (pass-through).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from array import array
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import structlog

from sbc.b2bua.events import CallEnded, CallEvent, CallRecord, EventBus, Subscription
from sbc.b2bua.ladder import ladder_json, packed_ladder, unpacked_ladder

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "ROWS_PER_INSERT",
    "SCHEMA_VERSION",
    "RecordWriter",
    "RecordsError",
    "connect_readonly",
    "find_call",
    "list_calls",
    "row_of",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

DAY = 86_400.0
PRUNE_EVERY = DAY
# How long the writer lets ended calls gather before it takes them from its queue: under load
# a commit per batch rather than per call (a commit cost ~0.4 ms of CPU each, most of what a
# record cost); a record reaches the disk that much later, and nothing queued is lost on
# SIGTERM (the bus is flushed before close).
BATCH_WAIT = 0.1
BUSY_TIMEOUT_MS = 5_000
# The writer connection's page cache, KiB (SQLite's default is 2,000 KiB per connection). It
# fills as the file grows and is never given back: a fresh service's first few thousand calls
# grew RSS by 0.73 KiB a call, outside Python's allocator, for as long as the file was under
# 2 MB, the most of what a burst of calls left behind once over (docs/performance.md, Round
# 8: idle). The writer appends; the pages it needs again are the tables' and indexes' last
# ones and those of the indexes' random keys, which the OS keeps in its own cache anyway.
WRITER_CACHE_KIB = 512

# Each step takes the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: one row per call
        """CREATE TABLE calls (
            call_uuid TEXT PRIMARY KEY,
            direction TEXT NOT NULL,
            pbx_call_id TEXT NOT NULL,
            retell_call_id TEXT NOT NULL,
            human_call_id TEXT,
            caller TEXT NOT NULL,
            caller_name TEXT,
            called TEXT NOT NULL,
            retell_number TEXT,
            x_headers TEXT NOT NULL DEFAULT '{}',
            started REAL NOT NULL,
            answered REAL,
            ended REAL NOT NULL,
            end_reason TEXT NOT NULL,
            hung_up_by TEXT,
            pbx_status INTEGER,
            retell_status INTEGER,
            transfers TEXT NOT NULL DEFAULT '[]'
        )""",
        "CREATE INDEX calls_started ON calls (started)",
        "CREATE INDEX calls_ended ON calls (ended)",
        "CREATE INDEX calls_caller ON calls (caller)",
    ),
    (  # 2: media counters per direction and the SIP ladder
        "ALTER TABLE calls ADD COLUMN a_packets INTEGER",
        "ALTER TABLE calls ADD COLUMN a_bytes INTEGER",
        "ALTER TABLE calls ADD COLUMN b_packets INTEGER",
        "ALTER TABLE calls ADD COLUMN b_bytes INTEGER",
        "ALTER TABLE calls ADD COLUMN media TEXT",
        "ALTER TABLE calls ADD COLUMN ladder TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE calls ADD COLUMN ladder_omitted INTEGER NOT NULL DEFAULT 0",
    ),
    (  # 3: the route that took the call, and the sbc instance that wrote the row (several
        # instances may share one PostgreSQL database; sbc/ops/records_pg.py)
        "ALTER TABLE calls ADD COLUMN route TEXT",
        "ALTER TABLE calls ADD COLUMN instance TEXT",
    ),
    (  # 4: the ladder as the call kept it (Ladder.packed), summarised when read; ``ladder``
        # then holds '[]'. Rows written before keep their ``ladder`` and a NULL here.
        "ALTER TABLE calls ADD COLUMN ladder_packed TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

COLUMNS = (
    "call_uuid",
    "direction",
    "pbx_call_id",
    "retell_call_id",
    "human_call_id",
    "caller",
    "caller_name",
    "called",
    "retell_number",
    "x_headers",
    "started",
    "answered",
    "ended",
    "end_reason",
    "hung_up_by",
    "pbx_status",
    "retell_status",
    "transfers",
    "a_packets",
    "a_bytes",
    "b_packets",
    "b_bytes",
    "media",
    "ladder",
    "ladder_omitted",
    "route",
    "instance",
    "ladder_packed",
)
JSON_COLUMNS = frozenset({"x_headers", "transfers", "media", "ladder"})
_INSERT = (
    f"INSERT OR REPLACE INTO calls ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)})"
)
# Rows per INSERT statement of a batch: every statement SQLite runs releases and takes back the
# GIL (sqlite3_step, sqlite3_reset), and on a busy bridge each take waits for the event loop
# to let go of it (up to sys.getswitchinterval(), 5 ms, and a forced switch of both threads):
# one statement per row made those hand-offs cost the writer thread more CPU than SQLite
# itself. 32 rows x 27 columns stay under 999 parameters, the limit of SQLite before 3.32.
# Statements for 32, 16, 8, 4, 2 and 1 rows only (a batch of 45: 32 + 8 + 4 + 1): the sqlite3
# module keeps each distinct statement prepared, about 100 KB each for the larger ones (one
# for every size from 1 to 32 kept 3.6 MB more).
ROWS_PER_INSERT = 32
# After each row it makes, the writer's thread lets go of the GIL (os.sched_yield releases it
# around the system call, and lets a thread waiting for the core run): a row is pure Python
# (row_of), and the event loop, once it has a message to read, would otherwise wait for the
# writer to release the GIL on its own, which it did only in SQLite's execute, after up to
# ROWS_PER_INSERT rows, or after the switch interval (5 ms). time.sleep(0) does the same but
# sleeps the timer slack, ~80 us a row. bench/bench_records.py --stall (docs/performance.md,
# Round 5: records): how late the loop read a message during a batch of 1,000 records.
_give_way = os.sched_yield
_VALUES = f"({', '.join('?' for _ in COLUMNS)})"
_INSERT_ROWS = {n: _INSERT + f", {_VALUES}" * (n - 1) for n in (32, 16, 8, 4, 2, 1)}
_PRIMING_ROW = ("",) * len(COLUMNS)  # every column NOT NULL-proof: see _prepare_inserts
# The SQL of the readers is the same for both stores but for the placeholder and SQLite's
# instr() (PostgreSQL: strpos()); see select_calls() and find_calls().
SQLITE = "sqlite"
POSTGRESQL = "postgresql"
_PLACEHOLDER = {SQLITE: "?", POSTGRESQL: "%s"}
_CONTAINS = {SQLITE: "instr(caller, {}) > 0", POSTGRESQL: "strpos(caller, {}) > 0"}


class RecordsError(Exception):
    """The records database cannot be used (the message says which file and why)."""


# -- a record as a row ---------------------------------------------------------------------------


# What json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str) writes, with
# its encoder made once rather than per call (json.dumps makes one for any non-default
# argument). encode() keeps its record of the containers being encoded per call, so the
# encoder may be shared by threads.
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode

# A None parameter is bound as NULL either way; without an adapter of its own, sqlite3 looks
# for one by two failed attribute lookups (each an AttributeError made and dropped) for each
# None of each row (five to eight a call). {}.get(None) is None: the same NULL, found in the
# adapters' table by one C call (about 0.2 us less per None; process-wide, as any adapter).
_NO_ADAPTATION: dict[None, None] = {}
sqlite3.register_adapter(type(None), cast(Callable[[None], None], _NO_ADAPTATION.get))


def _counter(media: dict[str, Any] | None, side: str, name: str) -> int | None:
    sides = (media or {}).get("sides") or {}
    rtp = (sides.get(side) or {}).get("rtp") or {}
    value = rtp.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_NO_COUNTERS = (None, None, None, None)


def _counters(media: dict[str, Any]) -> tuple[int | None, ...]:
    """a_packets, a_bytes, b_packets, b_bytes of the media session's stats."""
    return (
        _counter(media, "a", "packets"),
        _counter(media, "a", "bytes"),
        _counter(media, "b", "packets"),
        _counter(media, "b", "bytes"),
    )


def row_of(record: CallRecord, instance: str = "") -> tuple[Any, ...]:
    """The values of :data:`COLUMNS` for ``record``, written by the sbc named ``instance``."""
    x_headers: dict[str, str] = {}
    for name, value in record.x_headers:
        x_headers[name] = f"{x_headers[name]}, {value}" if name in x_headers else value
    media = record.media
    # The ladder as the call kept it, when it can be (most calls): its summaries and their
    # JSON are made when the record is read (_decoded), not for every call here.
    packed = packed_ladder(record.ladder)
    # The relay's packet counters (NULL without a media session; pass-through has no sides).
    # (pass-through's stats have no sides: none of the four counters, without their calls)
    counters = _NO_COUNTERS if media is None or not media.get("sides") else _counters(media)
    # In COLUMNS' order (a tuple straight away: no dict per row).
    values = (
        record.call_uuid,
        record.direction,
        record.pbx_call_id,
        record.retell_call_id,
        record.human_call_id or None,
        record.caller,
        record.caller_name or None,
        record.called,
        record.retell_number or None,
        _json(x_headers),
        record.started,
        record.answered,
        record.ended,
        record.end_reason,
        record.hung_up_by or None,
        record.pbx_status,
        record.retell_status,
        _json([dataclasses.asdict(t) for t in record.transfers]) if record.transfers else "[]",
        *counters,
        None if media is None else _json(media),
        ladder_json(record.ladder) if packed is None else "[]",
        record.ladder_omitted,
        # getattr: the route's name is a later field of CallRecord (several routes per process)
        getattr(record, "route", "") or None,
        instance or None,
        packed,
    )
    # Only a text that is not ASCII can hold a lone surrogate (_storable).
    return tuple([v if type(v) is not str or v.isascii() else _storable(v) for v in values])


def _storable(value: Any) -> Any:
    """``value``, with any lone surrogate in a text written as its escape: the parser keeps
    octets that are not UTF-8 as surrogates (a caller's name from a PBX sending Latin-1), and
    SQLite refuses those, which would lose the whole row (found by fuzzing)."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _decoded(row: Any, *, ladder: bool = True) -> dict[str, Any]:
    """A row as a record: JSON columns decoded, the ladder (unless not ``ladder``) as the list of
    its entries whichever way it was stored (``ladder``, or ``ladder_packed`` summarised now),
    under ``ladder``; ``ladder_packed`` itself is no field of a record."""
    # an sqlite3.Row, or a dict (psycopg's dict_row; its JSON columns arrive decoded)
    out: dict[str, Any] = {}
    for name in row.keys():  # noqa: SIM118 (sqlite3.Row is no mapping)
        value = row[name]
        if name == "ladder_packed":
            if value is not None and ladder:
                try:
                    out["ladder"] = unpacked_ladder(value)
                except (ValueError, TypeError):  # not what sbc writes: shown as stored
                    out["ladder"] = value
            continue
        if name == "ladder" and not ladder:
            continue
        if name in JSON_COLUMNS and isinstance(value, str):
            with contextlib.suppress(ValueError):  # else shown as stored
                value = json.loads(value)
        out[name] = value
    return out


# -- the database --------------------------------------------------------------------------------


def _user_version(db: sqlite3.Connection) -> int:
    row = db.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def migrate(db: sqlite3.Connection, path: Path | str = "") -> int:
    """Bring the schema to :data:`SCHEMA_VERSION` (each step in one transaction); returns the
    version found. Raises :class:`RecordsError` for a file of a newer schema."""
    found = _user_version(db)
    if found > SCHEMA_VERSION:
        raise RecordsError(
            f"call records {path}: schema version {found} is newer than this sbc's "
            f"({SCHEMA_VERSION}); use the sbc that wrote it, or another records.path"
        )
    for version in range(found, SCHEMA_VERSION):
        with db:  # one transaction per step; a failed step leaves the previous version
            db.execute("BEGIN IMMEDIATE")
            # Read again under the write lock: another sbc sharing the file may have taken
            # this step since the version was read (two instances starting at once).
            if _user_version(db) > version:
                continue
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
    return found


def _set_up(db: sqlite3.Connection, path: Path) -> int:
    """WAL journal, synchronous NORMAL, schema migrated; returns the version found."""
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RecordsError(f"call records {path}: WAL mode refused (journal {mode})")
    db.execute("PRAGMA synchronous = NORMAL")
    return migrate(db, path)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _retry_while_busy(
    step: Callable[[], T],
    timeout: float = BUSY_TIMEOUT_MS / 1000,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> T:
    """``step()``, tried again while SQLite answers "database is locked", for up to
    ``timeout`` seconds. SQLite returns that at once, without its busy handler, when waiting
    could deadlock: two connections that both read a brand-new file and both want to switch it
    to WAL (several instances starting together on one shared file). Every step here is
    idempotent, so trying it again once the other has finished is safe."""
    deadline = clock() + timeout
    delay = 0.001
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or clock() + delay > deadline:
                raise
        pause(delay)
        delay = min(delay * 2, 0.05)


def connect_readonly(path: Path | str) -> sqlite3.Connection:
    """The database for reading (``sbc calls``); rows as :class:`sqlite3.Row`. Raises
    :class:`RecordsError` when it cannot be opened."""
    if not Path(path).is_file():
        raise RecordsError(f"call records {path}: no such file")
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise RecordsError(f"call records {path}: cannot read: {exc}") from None
    db.row_factory = sqlite3.Row
    return db


def dialect_of(db: Any) -> str:
    """:data:`SQLITE` for an ``sqlite3`` connection, else :data:`POSTGRESQL` (psycopg)."""
    return SQLITE if isinstance(db, sqlite3.Connection) else POSTGRESQL


def _read_errors(db: Any) -> tuple[type[Exception], ...]:
    if isinstance(db, sqlite3.Connection):
        return (sqlite3.Error,)
    try:
        import psycopg  # the PostgreSQL store's driver, an optional dependency (sbc[pg])
    except ImportError:  # pragma: no cover - a psycopg connection implies psycopg
        return (sqlite3.Error,)
    return (psycopg.Error,)


def select_calls(
    dialect: str,
    *,
    since: float | None = None,
    caller: str | None = None,
    limit: int = 100,
) -> tuple[str, list[Any]]:
    """The query of :func:`list_calls` in ``dialect`` and its parameters."""
    mark = _PLACEHOLDER[dialect]
    where: list[str] = []
    params: list[Any] = []
    if since is not None:
        where.append(f"started >= {mark}")
        params.append(since)
    if caller:
        where.append(_CONTAINS[dialect].format(mark))
        params.append(caller)
    sql = "SELECT * FROM calls"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY started DESC, call_uuid LIMIT {mark}"
    params.append(max(0, limit))
    return sql, params


def find_calls(dialect: str, call_uuid: str, *, prefix: bool) -> tuple[str, list[Any]]:
    """The query of :func:`find_call` (``prefix``: the calls whose uuid starts with it, at most
    two; LIKE's wildcards in it are literal) in ``dialect`` and its parameters."""
    mark = _PLACEHOLDER[dialect]
    if not prefix:
        return f"SELECT * FROM calls WHERE call_uuid = {mark}", [call_uuid]
    escaped = call_uuid.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"SELECT * FROM calls WHERE call_uuid LIKE {mark} ESCAPE '\\' LIMIT 2", [escaped + "%"]


def list_calls(
    db: Any,
    *,
    since: float | None = None,
    caller: str | None = None,
    limit: int = 100,
    ladder: bool = False,
) -> list[dict[str, Any]]:
    """Records newest first (by start): started at or after ``since`` (UNIX time), caller
    number containing ``caller``, at most ``limit``; without the ladder unless asked. ``db``:
    :func:`connect_readonly`'s SQLite or ``records_pg.connect_readonly``'s PostgreSQL."""
    sql, params = select_calls(dialect_of(db), since=since, caller=caller, limit=limit)
    try:
        rows = db.execute(sql, params).fetchall()
    except _read_errors(db) as exc:
        raise RecordsError(f"call records: cannot read: {exc}") from None
    return [_decoded(row, ladder=ladder) for row in rows]


def find_call(db: Any, call_uuid: str) -> dict[str, Any] | None:
    """The record of ``call_uuid`` (or of the one call whose uuid starts with it)."""
    dialect = dialect_of(db)
    try:
        row = db.execute(*find_calls(dialect, call_uuid, prefix=False)).fetchone()
        if row is None and call_uuid:
            rows = db.execute(*find_calls(dialect, call_uuid, prefix=True)).fetchall()
            row = rows[0] if len(rows) == 1 else None
    except _read_errors(db) as exc:
        raise RecordsError(f"call records: cannot read: {exc}") from None
    return None if row is None else _decoded(row)


# -- the writer ----------------------------------------------------------------------------------


class RecordWriter:
    """Writes one row per :class:`~sbc.b2bua.events.CallEnded` (module docstring).

    :meth:`subscribe` it to the bus (a queue of ``[records] queue`` calls), call :meth:`start`
    before the first call and :meth:`close` after the bus was flushed. For metrics: ``written``,
    ``failed``, ``dropped`` (records that found the queue full).
    """

    def __init__(
        self,
        path: Path | str,
        *,
        keep_days: int = 90,
        wall_clock: Callable[[], float] = time.time,
        prune_every: float = PRUNE_EVERY,
        batch_wait: float = BATCH_WAIT,
        instance: str = "",
    ) -> None:
        self.path = Path(path)
        self.instance = instance  # the ``instance`` column of every row
        self.keep_days = keep_days
        # Rows committed (``written``), a cell of an array: an int attribute made a new int at
        # each `+= 1` (above 256), kept until the next, the last one made at the end of a burst
        # of calls and alive after it in the arenas the burst took (see _open).
        self._written = array("q", (0,))
        self.failed = 0  # records whose write failed (disk full, I/O error...)
        self.pruned = 0  # rows deleted for being older than keep_days
        self._wall = wall_clock
        self._prune_every = prune_every
        self.batch_wait = batch_wait
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # used in the worker thread only
        # The one cursor every write goes through. ``Connection.execute`` makes a cursor per
        # statement and the connection keeps a weak reference to each, dropping the dead ones
        # only every 200 cursors: a few per batch of records, they were small objects made
        # during a burst of calls and alive long after it, one here and there in the
        # allocator's arenas, which it can then not give back (docs/performance.md, Round 4:
        # idle).
        self._cursor: sqlite3.Cursor | None = None
        self._pruning: asyncio.Task[None] | None = None
        self._failing = False
        self.subscription: Subscription | None = None

    def subscribe(self, bus: EventBus, maxsize: int) -> None:
        """Take the ended calls of ``bus`` through a queue of ``maxsize`` (only CallEnded:
        nothing else takes room in it)."""
        self.subscription = bus.subscribe(self.on_call_event, maxsize=maxsize, kinds=(CallEnded,))

    @property
    def written(self) -> int:
        """Rows committed."""
        return self._written[0]

    @property
    def target(self) -> str:
        """Where the rows go, for logs and errors (never a password)."""
        return str(self.path)

    @property
    def dropped(self) -> int:
        """Records the bus dropped for want of room in the queue (the disk was too slow)."""
        return 0 if self.subscription is None else self.subscription.dropped

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open (create) the database, migrate its schema, prune old rows, and prune daily from
        then on. Raises :class:`RecordsError` when the file cannot be used."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sbc-records")
        try:
            found = await self._in_thread(self._open)
        except BaseException:
            await self._shutdown_executor()
            raise
        log.info(
            "call_records_opened",
            path=self.target,
            schema=SCHEMA_VERSION,
            migrated_from=found if found != SCHEMA_VERSION else None,
            keep_days=self.keep_days,
            **self._opened_fields(),
        )
        await self.prune()
        self._pruning = asyncio.ensure_future(self._prune_daily())

    async def close(self) -> None:
        """Stop pruning, let the worker finish what it was given, close the database."""
        if self._pruning is not None:
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
            self._pruning = None
        if self._executor is None:
            return
        try:
            await self._in_thread(self._close)
        except Exception:
            log.exception("call_records_close_failed", path=self.target)
        await self._shutdown_executor()
        log.info("call_records_closed", path=self.target, written=self.written, failed=self.failed)

    def _opened_fields(self) -> dict[str, Any]:
        """More for the ``call_records_opened`` line (a store's own)."""
        return {}

    # -- the bus's observer ----------------------------------------------------------------------
    async def on_call_event(self, event: CallEvent) -> None:
        """Write the ended call's record together with every other one queued within
        ``batch_wait`` (one transaction for them all: one commit per batch, not per call).
        The queue keeps its bound: what it held is taken from it here, so the bus goes on
        dropping (and counting) only what finds it full."""
        if not isinstance(event, CallEnded):
            return
        records = [event.record]
        taken = 0
        queue = self.subscription.queue if self.subscription is not None else None
        try:
            if queue is not None and self.batch_wait > 0:
                await asyncio.sleep(self.batch_wait)  # let the calls ending meanwhile queue up
            while queue is not None and not queue.empty():
                queued = queue.get_nowait()
                taken += 1
                if isinstance(queued, CallEnded):
                    records.append(queued.record)
            await self.write_many(records)
        finally:
            for _ in range(taken):  # the delivery loop marks done the event it handed over
                queue.task_done()  # type: ignore[union-attr]

    async def release_memory(self) -> None:
        """Give back the writer connection's page cache (called when the service is idle,
        before its collection and ``malloc_trim``: sbc/ops/idle.py). SQLite keeps up to
        :data:`WRITER_CACHE_KIB` of pages once read or written, in the writer thread's own malloc
        arena, for good: after a burst of calls about 0.6 MiB of RSS that a quiet service does
        not need (docs/performance.md, Round 9: idle). Nothing when not open; never raises."""
        if self._executor is None:
            return
        with contextlib.suppress(Exception):
            await self._in_thread(self._release_memory)

    async def write(self, record: CallRecord) -> bool:
        """Write ``record``'s row; False (counted in ``failed``, logged) when that failed."""
        return (await self.write_many([record]))[0]

    async def write_many(self, records: list[CallRecord]) -> list[bool]:
        """Write the rows of ``records`` in one transaction; for each, whether it was written
        (a failed one is counted in ``failed`` and logged, once per run of failures)."""
        try:
            errors = await self._in_thread(self._insert_batch, records)
        except Exception as exc:
            errors = [exc] * len(records)
        done: list[bool] = []
        for record, error in zip(records, errors, strict=True):
            done.append(error is None)
            if error is not None:
                self.failed += 1
                if not self._failing:
                    self._failing = True  # one line per run of failures, not one per call
                    log.error(
                        "call_record_write_failed",
                        path=self.target,
                        call_uuid=record.call_uuid,
                        error=str(error) or type(error).__name__,
                    )
                continue
            self._written[0] += 1
            if self._failing:
                self._failing = False
                log.info("call_record_writes_resumed", path=self.target, failed=self.failed)
        return done

    async def prune(self) -> int:
        """Delete the rows of calls that ended more than ``keep_days`` ago; how many."""
        if self.keep_days <= 0:
            return 0
        before = self._wall() - self.keep_days * DAY
        try:
            deleted = await self._in_thread(self._delete_before, before)
        except Exception as exc:
            log.error("call_records_prune_failed", path=self.target, error=str(exc))
            return 0
        self.pruned += deleted
        if deleted:
            log.info("call_records_pruned", deleted=deleted, keep_days=self.keep_days)
        return deleted

    async def _prune_daily(self) -> None:
        while True:
            await asyncio.sleep(self._prune_every)
            await self.prune()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RecordsError("call records: writer not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _shutdown_executor(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    # -- in the worker thread --------------------------------------------------------------------
    def _open(self) -> int:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            # Phone numbers and names: readable by the service's user (and group) only. SQLite
            # gives its -wal and -shm files the database file's permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o640))
            db = sqlite3.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise RecordsError(f"call records {path}: cannot open: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
            found = _retry_while_busy(lambda: _set_up(db, path))
        except sqlite3.Error as exc:
            db.close()
            raise RecordsError(f"call records {path}: {exc}") from None
        except BaseException:
            db.close()
            raise
        # From here on a transaction begins with the first INSERT or DELETE (the sqlite3
        # module's own BEGIN) and ends with commit() or rollback(): no statement of the
        # cursor's but those, all through executemany(). Every execute() has the cursor keep
        # the connection's last row id, a new int per statement (above 256 once the table has
        # as many rows), made during a burst and alive after it in the arenas the burst took,
        # which Python's allocator then cannot give back (docs/performance.md, Round 8: idle).
        db.isolation_level = "DEFERRED"
        self._db = db
        self._cursor = db.cursor()
        self._prepare_inserts()
        return found

    def _prepare_inserts(self) -> None:
        """Each INSERT the writer may run, once, in a transaction rolled back: the sqlite3
        module prepares a statement when it first runs it and keeps it for good (its cache);
        one first run during a burst of calls was a small object made then and alive ever
        after, in the arenas the burst took, which Python's allocator then could not give back
        (docs/performance.md, Round 8: idle). Made here, they sit with the service's other
        long-lived objects. Nothing is written; a failure only leaves them to their first use."""
        db, cursor = self._db, self._cursor
        assert db is not None and cursor is not None
        with contextlib.suppress(sqlite3.Error):
            try:
                for rows, statement in _INSERT_ROWS.items():
                    cursor.executemany(statement, (_PRIMING_ROW * rows,))
            finally:
                db.rollback()

    def _insert(self, record: CallRecord) -> None:
        self._insert_many([record])

    def _insert_many(self, records: list[CallRecord]) -> None:
        """The rows of ``records`` (at most :data:`ROWS_PER_INSERT`) in one statement: all of
        them, or none when it fails."""
        cursor = self._cursor
        if cursor is None:
            raise RecordsError("call records: database closed")
        instance = self.instance
        values: list[Any] = []
        for record in records:
            values += row_of(record, instance)
            _give_way()  # the GIL to the event loop, if it waits for it (see _give_way)
        # executemany() of the one set of values: no row id kept (see _open).
        cursor.executemany(_INSERT_ROWS[len(records)], (values,))

    def _insert_batch(self, records: list[CallRecord]) -> list[Exception | None]:
        """Insert every record's row in one transaction; per record, the error that kept its
        row out (None: committed). A failed row leaves the others in, unless the error rolled
        the transaction back (disk full, I/O error): then the rows before it failed too.

        The rows go in up to :data:`ROWS_PER_INSERT` at a time; a statement that fails is
        tried again row by row, so only the row that caused it is left out."""
        db, cursor = self._db, self._cursor
        if db is None or cursor is None:
            raise RecordsError("call records: database closed")
        errors: list[Exception | None] = [None] * len(records)
        pending: list[int] = []  # inserted in the open transaction

        def failed(exc: Exception) -> None:
            if not db.in_transaction:  # SQLite rolled it back: the rows before failed too
                for j in pending:
                    errors[j] = exc
                pending.clear()  # the next INSERT begins another transaction

        # The transaction begins with the first INSERT (the sqlite3 module's BEGIN; see _open).
        start = 0
        while start < len(records):
            size = min(len(records) - start, ROWS_PER_INSERT)
            size = 1 << (size.bit_length() - 1)  # a size of _INSERT_ROWS
            chunk = range(start, start + size)
            start += size
            try:
                self._insert_many(records[chunk.start : chunk.stop])
                pending.extend(chunk)
                continue
            except Exception as exc:
                failed(exc)
            for i in chunk:  # one by one: only the row that fails is left out
                try:
                    self._insert(records[i])
                    pending.append(i)
                except Exception as exc:
                    errors[i] = exc
                    failed(exc)
        try:
            db.commit()
        except sqlite3.Error as exc:
            for j in pending:
                errors[j] = exc
            with contextlib.suppress(sqlite3.Error):
                db.rollback()
        return errors

    def _delete_before(self, before: float) -> int:
        db, cursor = self._db, self._cursor
        if db is None or cursor is None:
            return 0
        try:
            cursor.executemany("DELETE FROM calls WHERE ended < ?", ((before,),))  # see _open
            deleted = cursor.rowcount
            db.commit()
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.rollback()
            raise
        return deleted

    def _release_memory(self) -> None:
        cursor = self._cursor
        if cursor is None:
            return
        # PRAGMA shrink_memory frees every page of the connection's cache not in use
        # (sqlite3_db_release_memory). Through executescript(): no statement kept in the
        # connection's cache, and the cursor keeps no row id (see _open); the next write reads
        # back the few pages it needs.
        with contextlib.suppress(sqlite3.Error):
            cursor.executescript("PRAGMA shrink_memory")

    def _close(self) -> None:
        db, self._db, self._cursor = self._db, None, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA optimize")
            db.close()
