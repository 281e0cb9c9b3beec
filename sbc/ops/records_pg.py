"""Call records in PostgreSQL (``[records] url``): the rows of several sbc in one database.

The same writer as the SQLite store (:class:`~sbc.ops.records.RecordWriter`: the bus's bounded
queue, batches of the calls ending within 0.1 s, one worker thread, exact ``written``,
``failed`` and ``dropped``), with the worker thread talking to PostgreSQL through psycopg's
synchronous API instead of to a file. The table is the SQLite one, column for column
(:data:`~sbc.ops.records.COLUMNS`; JSON columns of type ``json``, which keeps the text as
written), so ``sbc calls`` reads either the same way; ``instance`` tells the writers apart.

A database that cannot be reached never stops sbc or a call: not at start (the service starts,
and the rows of the calls meanwhile are counted as failed), not mid-run. The writer reconnects
with a backoff (1 s doubling to 30 s; a batch arriving before the next attempt is due fails at
once, so the queue keeps moving) and logs one line when an outage begins
(``call_records_unavailable``) and one when it ends (``call_records_reconnected``). A batch whose
connection breaks fails whole (PostgreSQL rolled it back), unless a new connection made at once
takes it (a server restarted while sbc was idle); a row that PostgreSQL refuses fails alone
(the batch is retried row by row).

The schema's version lives in the table ``sbc_schema``; it is created or migrated under an
advisory lock, so that two instances starting together do not race. A database of a newer
schema stops the start (as a newer SQLite file does). Neither the URL's password nor
``records.password`` ever reaches a log line or an error message (:func:`scrub`).

psycopg is an optional dependency (``pip install 'sbc[pg]'``): imported only when a URL is
configured, so an SQLite-only install does without it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import structlog

from sbc.b2bua.events import CallRecord
from sbc.ops.records import (
    BATCH_WAIT,
    COLUMNS,
    JSON_COLUMNS,
    PRUNE_EVERY,
    SCHEMA_VERSION,
    RecordsError,
    RecordWriter,
    row_of,
)
from sbc.ops.settings import redact_url

__all__ = [
    "COLUMN_TYPES",
    "CREATE",
    "INSERT",
    "PostgresRecordWriter",
    "connect_readonly",
    "connection_params",
    "scrub",
]

log = structlog.get_logger(__name__)

# The SQLite table's columns (sbc/ops/records.py, MIGRATIONS) in PostgreSQL's types: REAL is
# double precision there, and the byte counters of a long call outgrow 32 bits.
COLUMN_TYPES: dict[str, str] = {
    "call_uuid": "TEXT PRIMARY KEY",
    "direction": "TEXT NOT NULL",
    "pbx_call_id": "TEXT NOT NULL",
    "retell_call_id": "TEXT NOT NULL",
    "human_call_id": "TEXT",
    "caller": "TEXT NOT NULL",
    "caller_name": "TEXT",
    "called": "TEXT NOT NULL",
    "retell_number": "TEXT",
    "x_headers": "JSON NOT NULL DEFAULT '{}'",
    "started": "DOUBLE PRECISION NOT NULL",
    "answered": "DOUBLE PRECISION",
    "ended": "DOUBLE PRECISION NOT NULL",
    "end_reason": "TEXT NOT NULL",
    "hung_up_by": "TEXT",
    "pbx_status": "INTEGER",
    "retell_status": "INTEGER",
    "transfers": "JSON NOT NULL DEFAULT '[]'",
    "a_packets": "BIGINT",
    "a_bytes": "BIGINT",
    "b_packets": "BIGINT",
    "b_bytes": "BIGINT",
    "media": "JSON",
    "ladder": "JSON NOT NULL DEFAULT '[]'",
    "ladder_omitted": "INTEGER NOT NULL DEFAULT 0",
    "route": "TEXT",
    "instance": "TEXT",
    "ladder_packed": "TEXT",  # not json: sbc reads it, and PostgreSQL need not parse it
}

# A database without the table gets the current schema at once; a later schema adds a step
# keyed by the version it starts from (as the SQLite MIGRATIONS do).
CREATE: tuple[str, ...] = (
    "CREATE TABLE calls (\n    "
    + ",\n    ".join(f"{name} {COLUMN_TYPES[name]}" for name in COLUMNS)
    + "\n)",
    "CREATE INDEX calls_started ON calls (started)",
    "CREATE INDEX calls_ended ON calls (ended)",
    "CREATE INDEX calls_caller ON calls (caller)",
)
MIGRATIONS: dict[int, tuple[str, ...]] = {
    0: CREATE,
    3: ("ALTER TABLE calls ADD COLUMN ladder_packed TEXT",),  # SQLite's step 4
}

# A replayed call_uuid replaces its row, as SQLite's INSERT OR REPLACE does.
INSERT = (
    f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ("
    + ", ".join("%s::json" if name in JSON_COLUMNS else "%s" for name in COLUMNS)
    + ") ON CONFLICT (call_uuid) DO UPDATE SET "
    + ", ".join(f"{name} = EXCLUDED.{name}" for name in COLUMNS if name != "call_uuid")
)
# Any constant: the lock that keeps two instances from creating the schema at the same time.
SCHEMA_LOCK = 0x5BC_CA11

CONNECT_TIMEOUT = 5  # seconds; the worker thread waits that long at most for a dead host
RETRY_MIN = 1.0
RETRY_MAX = 30.0
# libpq's defaults, unless the URL says otherwise: a host that vanished (no RST) is noticed
# within ~20 s instead of the kernel's two hours of TCP retries.
_DEFAULT_PARAMS = {
    "connect_timeout": str(CONNECT_TIMEOUT),
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "2",
    "tcp_user_timeout": "20000",  # ms: unacknowledged data (a write into the void) gives up
}


def _driver() -> ModuleType:
    try:
        import psycopg
    except ImportError:
        raise RecordsError(
            "call records in PostgreSQL (records.url) need psycopg: pip install 'sbc[pg]'"
        ) from None
    return psycopg


def _connection_lost(psycopg: ModuleType, exc: Exception, conn: Any) -> bool:
    """Whether ``exc`` cost the connection too, not only its statement."""
    return isinstance(exc, psycopg.OperationalError) or bool(conn.closed) or bool(conn.broken)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` without any of ``secrets`` in it and without a URL's password."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return redact_url(text)


def connection_params(
    url: str, *, password: str | None = None, application_name: str = "sbc"
) -> dict[str, str]:
    """libpq's connection parameters for ``url``: ``password`` (when given) overrides the URL's,
    and the timeouts of :data:`_DEFAULT_PARAMS` apply unless the URL sets them. Raises
    :class:`RecordsError` (without the password) for a URL libpq cannot read."""
    psycopg = _driver()
    try:
        params: dict[str, str] = dict(psycopg.conninfo.conninfo_to_dict(url))
    except psycopg.Error as exc:
        raise RecordsError(
            f"call records {redact_url(url)}: not a usable URL: {scrub(str(exc), password)}"
        ) from None
    for key, value in _DEFAULT_PARAMS.items():
        params.setdefault(key, value)
    params.setdefault("application_name", application_name[:63])
    if password:
        params["password"] = password
    return params


def connect_readonly(url: str, password: str | None = None) -> Any:
    """A connection for reading (``sbc calls``): rows as dicts, every transaction read-only.
    Raises :class:`RecordsError` when the database cannot be reached or read."""
    psycopg = _driver()
    from psycopg.rows import dict_row

    params = connection_params(url, password=password, application_name="sbc calls")
    try:
        db = psycopg.connect(autocommit=True, row_factory=dict_row, **params)
        db.execute("SET default_transaction_read_only = on")
    except psycopg.Error as exc:
        message = scrub(str(exc), password, params.get("password"))
        raise RecordsError(f"call records {redact_url(url)}: cannot read: {message}") from None
    return db


class PostgresRecordWriter(RecordWriter):
    """:class:`~sbc.ops.records.RecordWriter` whose rows go to PostgreSQL (module docstring).

    ``retry_min``/``retry_max``: the reconnection backoff; ``monotonic``: its clock.
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        keep_days: int = 90,
        instance: str = "",
        wall_clock: Callable[[], float] = time.time,
        prune_every: float = PRUNE_EVERY,
        batch_wait: float = BATCH_WAIT,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # ``path`` means nothing here: target names the database instead.
        super().__init__(
            "",
            keep_days=keep_days,
            wall_clock=wall_clock,
            prune_every=prune_every,
            batch_wait=batch_wait,
            instance=instance,
        )
        self.url = url
        self._password = password
        self._retry_min = retry_min
        self._retry_max = retry_max
        self._monotonic = monotonic
        # In the worker thread only:
        self._conn: Any = None
        self._params: dict[str, str] = {}
        self._down_since: float | None = None  # monotonic time the outage began
        self._down_failed = 0  # rows that failed during it
        self._delay = 0.0
        self._retry_at = 0.0
        self._error: Exception = RecordsError(f"call records {self.target}: not connected")
        self.outages = 0  # for tests and logs: how many times the database was lost

    @property
    def target(self) -> str:
        return redact_url(self.url)

    @property
    def connected(self) -> bool:
        """Whether the worker holds a connection (read from any thread: a snapshot)."""
        return self._conn is not None

    def _opened_fields(self) -> dict[str, Any]:
        # False: the database was down at start (call_records_unavailable said why)
        return {"instance": self.instance, "connected": self.connected}

    def _scrub(self, exc: BaseException) -> str:
        return scrub(str(exc) or type(exc).__name__, self._password, self._params.get("password"))

    # -- in the worker thread --------------------------------------------------------------------
    def _open(self) -> int:
        psycopg = _driver()
        self._params = connection_params(
            self.url, password=self._password, application_name=f"sbc {self.instance}".strip()
        )
        try:
            conn = psycopg.connect(autocommit=True, **self._params)
        except psycopg.Error as exc:
            self._down(exc)  # sbc starts all the same: the calls need no database
            return SCHEMA_VERSION
        try:
            found = self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return found

    def _migrate(self, conn: Any) -> int:
        """Create or migrate the schema (under an advisory lock); the version found."""
        psycopg = _driver()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS sbc_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT max(version) FROM sbc_schema").fetchone()
                found = int(row[0] or 0)
                if found > SCHEMA_VERSION:
                    raise RecordsError(
                        f"call records {self.target}: schema version {found} is newer than "
                        f"this sbc's ({SCHEMA_VERSION}); use the sbc that wrote it, or another "
                        "database"
                    )
                version = found
                while version < SCHEMA_VERSION:
                    for statement in MIGRATIONS[version]:
                        conn.execute(statement)
                    version = SCHEMA_VERSION if version == 0 else version + 1
                if found != SCHEMA_VERSION:
                    conn.execute("DELETE FROM sbc_schema")
                    conn.execute("INSERT INTO sbc_schema (version) VALUES (%s)", (version,))
        except psycopg.Error as exc:
            raise RecordsError(f"call records {self.target}: {self._scrub(exc)}") from None
        return found

    def _connection(self) -> Any:
        """The connection, reconnecting when the backoff allows; None while the database is
        unreachable (``self._error`` says why)."""
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            self._lost(RecordsError("connection closed"))
        if self._monotonic() < self._retry_at:
            return None
        psycopg = _driver()
        try:
            conn = psycopg.connect(autocommit=True, **self._params)
        except psycopg.Error as exc:
            self._down(exc)
            return None
        try:
            self._migrate(conn)
        except RecordsError as exc:
            conn.close()
            self._down(exc)
            return None
        self._conn = conn
        if self._down_since is not None:
            log.info(
                "call_records_reconnected",
                path=self.target,
                down_for=round(self._monotonic() - self._down_since, 1),
                failed=self._down_failed,
            )
        self._down_since = None
        self._down_failed = 0
        self._retry_at = 0.0
        return conn

    def _down(self, exc: BaseException) -> None:
        """The database could not be reached: fail until the next attempt (backoff), logging
        only the first failure of an outage."""
        now = self._monotonic()
        message = self._scrub(exc)
        if self._down_since is None:
            self._down_since = now
            self._delay = self._retry_min
            self.outages += 1
            log.warning(
                "call_records_unavailable",
                path=self.target,
                error=message,
                retry_in=self._delay,
                detail="calls go on; their records fail until the database is back",
            )
        else:
            self._delay = min(self._delay * 2, self._retry_max)
        self._retry_at = now + self._delay
        self._error = RecordsError(f"call records {self.target}: unavailable: {message}")

    def _lost(self, exc: BaseException) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing more to release
                conn.close()
        self._down(exc)

    def _insert(self, record: CallRecord) -> None:
        conn = self._conn
        if conn is None:
            raise self._error
        conn.execute(INSERT, row_of(record, self.instance))

    def _insert_batch(self, records: list[CallRecord]) -> list[Exception | None]:
        """All the rows in one transaction; if PostgreSQL refuses one, each alone (so only that
        one fails); when the connection is lost, every row not committed fails. A connection
        that had died while idle (PostgreSQL restarted between two calls) is replaced at once
        and the batch tried again: a database that is back loses no record to it."""
        established = self._conn is not None
        errors, lost = self._insert_batch_once(records)
        if lost and established:
            self._retry_at = 0.0  # one immediate attempt; the backoff applies from then on
            errors, lost = self._insert_batch_once(records)
        if self._down_since is not None:
            self._down_failed += sum(error is not None for error in errors)
        return errors

    def _insert_batch_once(self, records: list[CallRecord]) -> tuple[list[Exception | None], bool]:
        """:meth:`_insert_batch`'s errors, and whether the connection was lost meanwhile."""
        psycopg = _driver()
        errors: list[Exception | None] = [None] * len(records)
        conn = self._connection()
        if conn is None:
            return [self._error] * len(records), False
        rows: dict[int, tuple[Any, ...]] = {}
        for i, record in enumerate(records):
            try:
                rows[i] = row_of(record, self.instance)
            except Exception as exc:  # a value that cannot be serialised fails its row alone
                errors[i] = exc
        try:
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(INSERT, list(rows.values()))
            return errors, False
        except psycopg.Error as exc:
            if _connection_lost(psycopg, exc, conn):
                self._lost(exc)
                for i in rows:
                    errors[i] = self._error
                return errors, True
        for i in rows:  # one row was refused: find it
            try:
                with conn.transaction():
                    self._insert(records[i])
            except psycopg.Error as exc:
                if _connection_lost(psycopg, exc, conn):
                    self._lost(exc)
                    for j in rows:
                        if j >= i:
                            errors[j] = self._error
                    return errors, True
                errors[i] = RecordsError(self._scrub(exc))
            except Exception as exc:
                errors[i] = exc
        return errors, False

    def _delete_before(self, before: float) -> int:
        psycopg = _driver()
        conn = self._connection()
        if conn is None:
            return 0  # the outage is logged already; the next daily prune catches up
        try:
            with conn.transaction():
                cursor = conn.execute("DELETE FROM calls WHERE ended < %s", (before,))
                return int(cursor.rowcount)
        except psycopg.Error as exc:
            if _connection_lost(psycopg, exc, conn):
                self._lost(exc)
            raise RecordsError(self._scrub(exc)) from None

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
