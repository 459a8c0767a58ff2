"""The join store: what the gateway remembered of each answered prediction and the outcome posted
for it, in one SQL table that all workers of a gateway (SQLite, one file) or all replicas
(PostgreSQL) share, so every query sees one truth.

The request path only appends to a bounded deque (`remember`: no lock, no I/O). One writer thread
decodes what was queued, inserts it in batches (one transaction each), turns predictions past
their expiry into tombstones and deletes old rows, in bounded batches. `join` and the queries run
synchronously in SQL, for the caller's thread executor.

    url   sqlite:///relative/path.db, sqlite:////absolute/path.db   embedded (WAL; several processes write)
          postgresql://user@host:port/db                            shared by replicas (psycopg 3)
"""
from __future__ import annotations

import logging
import math
import re
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Sequence, TypeVar

import numpy as np
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict

from gateway.errors import Unavailable
from gateway.outcomes.records import Feedback, Joined, Prediction

log = logging.getLogger(__name__)

T = TypeVar("T")
Score = Callable[[Sequence[float], float], float]   # (predicted row, label) -> the value arm_stats sums
Fits = Callable[[Feedback, Sequence[float]], str | None]  # (outcome, predicted row) -> why it does not fit, or None

TABLE = "outcome_predictions"
TRACE_CANDIDATES = 64   # predictions of one trace id a join looks at (oldest first)
ATTEMPTS = 3            # tries of a join or query transaction on a transient error (lock, deadlock, lost connection)
RETRY_S = 0.5           # the writer's back-off after a failed batch
_FIRST_WINS = "the prediction already has an outcome (the first one posted is kept)"
_OUTCOME_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_F64 = np.dtype("<f8")


class Status(StrEnum):
    """What a join did with one posted outcome."""

    JOINED = "joined"         # paired with its prediction
    UNKNOWN = "unknown"       # no prediction by that id: never remembered, or deleted since
    EXPIRED = "expired"       # the prediction is past its expires_at (or a tombstone)
    DUPLICATE = "duplicate"   # the prediction already has an outcome: the first one posted wins
    BAD_ROW = "bad_row"       # the row index is outside the prediction's batch
    MISFIT = "misfit"         # the outcome does not fit the prediction's row (the join's `fits` check)


@dataclass(frozen=True, slots=True)
class Result:
    """One item of a join: its status, why (for the caller; empty when joined) and, when joined,
    the joined record."""

    status: Status
    reason: str = ""
    joined: Joined | None = None


@dataclass(frozen=True, slots=True)
class JoinReport:
    """The results of a join, one per posted item, in the order they were posted."""

    results: tuple[Result, ...]

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results)

    def counts(self) -> Counter[str]:
        """Items per status (for metrics and the caller's answer)."""
        return Counter(r.status.value for r in self.results)

    @property
    def joined(self) -> list[Joined]:
        """The records joined, in posting order (for quality metrics)."""
        return [r.joined for r in self.results if r.joined is not None]


class ArmStats(NamedTuple):
    """Count, sum and sum of squares of one outcome over a target's joined predictions."""

    n: int
    sum: float
    sum_sq: float


def label_score(row: Sequence[float], label: float) -> float:
    """The default per-row value for the "label" outcome (`join`'s score): with several values a row (class scores)
    1.0 when the top one's index is the label, else 0.0 (its mean is accuracy); with one value the
    absolute error (its mean is the MAE)."""
    if len(row) > 1:
        return 1.0 if float(max(range(len(row)), key=row.__getitem__)) == label else 0.0
    return abs(float(row[0]) - label)


class Observer:
    """The writer's health, for metrics: called in the writer thread; quick, never raising. (What
    is lost, item by item, goes to the store's on_drop.)"""

    def written(self, rows: int, depth: int) -> None:
        """A batch of rows was committed; depth items are still queued."""

    def failed(self, stage: str) -> None:
        """A stage failed: "write" (a batch: retried, or written row by row) or "sweep" (retried later)."""

    def swept(self, tombstoned: int, deleted: int) -> None:
        """Expired predictions became tombstones; rows past their purge time were deleted."""


# ------------------------------------------------------------ the two databases

_COLUMNS = ("model", "request_id", "trace_id", "target", "version", "decision", "segments", "rows_f64", "width",
            "answered_at", "expires_at", "purge_at")


class _Row(NamedTuple):
    """A row as joins and queries select it (_READ)."""

    id: int
    request_id: str | None
    trace_id: str
    target: str
    version: str
    decision: str
    segments: str | None
    rows_f64: bytes | None
    width: int
    answered_at: float
    expires_at: float
    joined_at: float | None
    label: float | None
    business: str | None
    outcome_row: int | None


_READ = ", ".join(_Row._fields)
_SCHEMA = (
    f"""CREATE TABLE IF NOT EXISTS {TABLE} (
        id {{id}},
        model TEXT NOT NULL,
        request_id TEXT,                 -- NULL: the client sent none, only the trace id joins
        trace_id TEXT NOT NULL,
        target TEXT NOT NULL,
        version TEXT NOT NULL,
        decision TEXT NOT NULL,
        segments TEXT,                   -- JSON object; NULL in a tombstone
        rows_f64 {{blob}},                 -- the rows, float64 little-endian, width values each; NULL in a tombstone
        width INTEGER NOT NULL,
        answered_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        purge_at DOUBLE PRECISION NOT NULL,  -- deleted from then on (expiry + grace; joined: + retention)
        label DOUBLE PRECISION,
        business TEXT,                   -- JSON object: outcome name -> number
        outcome_row INTEGER,
        label_score DOUBLE PRECISION,    -- the Score of the row and the label, for arm_stats
        joined_at DOUBLE PRECISION
    )""",
    f"CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_request ON {TABLE} (model, request_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_trace ON {TABLE} (model, trace_id)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_joined ON {TABLE} (model, answered_at) WHERE joined_at IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expiry ON {TABLE} (expires_at) WHERE joined_at IS NULL AND rows_f64 IS NOT NULL",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_purge ON {TABLE} (purge_at)",
)
# A request id seen again replaces its prediction unless that one has an outcome already.
_INSERT = (f"INSERT INTO {TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT (model, request_id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[2:]) + f" WHERE {TABLE}.joined_at IS NULL")
_BY_REQUEST = f"SELECT {_READ} FROM {TABLE} WHERE model = ? AND request_id = ?"
_BY_TRACE = f"SELECT {_READ} FROM {TABLE} WHERE model = ? AND trace_id = ? {{only_anonymous}} " \
            f"ORDER BY answered_at, id LIMIT {TRACE_CANDIDATES}"
_JOIN = f"UPDATE {TABLE} SET label = ?, business = ?, outcome_row = ?, label_score = ?, joined_at = ?, purge_at = ? " \
        f"WHERE id = ? AND joined_at IS NULL"
_TOMBSTONE = f"UPDATE {TABLE} SET segments = NULL, rows_f64 = NULL WHERE id IN (SELECT id FROM {TABLE} " \
             f"WHERE joined_at IS NULL AND rows_f64 IS NOT NULL AND expires_at <= ? LIMIT ?)"
_PURGE = f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE purge_at <= ? LIMIT ?)"


class _Backend(ABC):
    """One database: how to connect, run a transaction, and the few words of SQL that differ."""

    transient: tuple[type[Exception], ...]   # errors worth a retry: locks, deadlocks, lost connections
    id_column: str
    blob: str
    lock_rows: str            # appended to a join's SELECT to lock what it will update
    business_value: str       # SQL for a business outcome's value; its one parameter from business_param
    schema_lock: str | None   # run first in the schema transaction: creators racing take turns

    @abstractmethod
    def connect(self) -> Any:
        """A new connection in autocommit mode (transactions are explicit)."""

    @abstractmethod
    def transaction(self, conn: Any) -> ContextManager[None]:
        """A transaction on conn: committed when the block ends, rolled back when it raises."""

    def sql(self, text: str) -> str:
        """text, written with ? placeholders, for this database."""
        return text

    def business_param(self, name: str) -> str:
        return name

    def prepare(self, conn: Any) -> None:
        """Per-database settings made once before the schema (outside any transaction)."""

    @abstractmethod
    def describe(self) -> str:
        """The database, for log lines (no credentials)."""


class _SQLite(_Backend):
    transient = (sqlite3.OperationalError,)
    id_column = "INTEGER PRIMARY KEY"
    blob = "BLOB"
    lock_rows = ""                 # BEGIN IMMEDIATE holds the database's write lock already
    business_value = "json_extract(business, ?)"
    schema_lock = None             # BEGIN IMMEDIATE serializes schema creators too

    def __init__(self, path: Path, busy_timeout_s: float) -> None:
        self.path = path
        self.busy_timeout_s = busy_timeout_s

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous = NORMAL")   # with WAL: durable across a process crash, fsync per checkpoint
        return conn

    @contextmanager
    def transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # IMMEDIATE: take the write lock first (waiting up to the busy timeout), so a transaction
        # that reads and then writes never fails on a lock upgrade
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def business_param(self, name: str) -> str:
        return f'$."{name}"'

    def prepare(self, conn: sqlite3.Connection) -> None:
        # switching to WAL needs the file to itself for a moment: a process opening it at the same
        # time can make it answer "locked" at once, past the busy timeout
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def describe(self) -> str:
        return f"sqlite {self.path}"


class _Postgres(_Backend):
    transient = (psycopg.OperationalError,)    # includes deadlocks and serialization failures
    id_column = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    blob = "BYTEA"
    lock_rows = " FOR UPDATE"
    business_value = "(business::jsonb ->> ?)::float8"
    schema_lock = "SELECT pg_advisory_xact_lock(7295351104)"   # CREATE ... IF NOT EXISTS races on the catalog

    def __init__(self, url: str, connect_timeout_s: float) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout_s)))

    def transaction(self, conn: psycopg.Connection) -> ContextManager[Any]:
        return conn.transaction()

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def describe(self) -> str:
        info = conninfo_to_dict(self.url)
        return f"postgresql {info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"


def _backend(url: str, timeout_s: float) -> _Backend:
    """sqlite:///PATH (PATH relative to the working directory unless it starts with /, as in
    SQLAlchemy) or postgresql://... (any libpq URL)."""
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return _SQLite(Path(url[len("sqlite:///"):]), timeout_s)
    if url.startswith(("postgresql://", "postgres://")):
        return _Postgres(url, timeout_s)
    raise ValueError(f"outcome store url {url!r}: expected sqlite:///relative.db, sqlite:////absolute.db "
                     "or postgresql://user@host:port/db")


# ------------------------------------------------------------ the store


class JoinStore:
    """Remembered predictions and their outcomes in SQLite or PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, *, writer: bool = True, queue_size: int = 65536, batch: int = 512,
                 batch_s: float = 0.05, grace_s: float = 86400.0, retention_s: float = 30 * 86400.0,
                 settle_s: float = 0.25, sweep_interval_s: float = 5.0, sweep_batch: int = 2000,
                 timeout_s: float = 5.0,
                 on_drop: Callable[[Any, str], None] | None = None, observer: Observer | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Connect, create the schema if missing (idempotent; processes racing take turns) and start
        the writer thread; raises what connecting or the DDL raised. writer=False: a handle for
        tools, for joins and queries only (no schema, no thread; remember refuses).

        queue_size: predictions queued at most; batch: rows one write commits at most, and the
        queue depth that wakes the writer before batch_s (its gathering pause); grace_s: how long a
        tombstone answers "expired" before it is deleted; retention_s: how long a joined record is
        kept for reports and A/B statistics; settle_s: how long a join waits before it looks again
        for predictions it did not find (another process may not have written them yet);
        sweep_interval_s / sweep_batch: how often, and in what bounded steps, expiry runs;
        timeout_s: busy timeout (SQLite), connect timeout (PostgreSQL), a join's wait for this
        process's writer; on_drop(parts, reason):
        a prediction is lost, reason "full" or "closed" (called in remember, on the caller's
        thread), "decode" or "write" (in the writer): quick, never raising; clock: unix time, for
        expiry."""
        self.queue_size = queue_size
        self.batch = batch
        self.batch_s = batch_s
        self.grace_s = grace_s
        self.retention_s = retention_s
        self.settle_s = settle_s
        self.sweep_interval_s = sweep_interval_s
        self.sweep_batch = sweep_batch
        self.timeout_s = timeout_s
        self._backend = _backend(url, timeout_s)
        self._on_drop = on_drop or _ignore
        self._observer = observer or Observer()
        self._clock = clock
        self._queue: deque[tuple[Any, Callable[[Any], Prediction] | None] | threading.Event] = deque()
        self._wake = threading.Event()
        self._closed = not writer
        self._abandon = False
        self._thread: threading.Thread | None = None
        self._reader: Any = None   # the connection of join and the queries, under _reader_lock
        self._reader_lock = threading.Lock()
        b = self._backend
        self._sql = {name: b.sql(text) for name, text in (
            ("insert", _INSERT), ("by_request", _BY_REQUEST + b.lock_rows),
            ("by_trace", _BY_TRACE.format(only_anonymous="") + b.lock_rows),
            ("by_trace_anonymous", _BY_TRACE.format(only_anonymous="AND request_id IS NULL") + b.lock_rows),
            ("join", _JOIN), ("tombstone", _TOMBSTONE), ("purge", _PURGE))}
        if writer:
            self._create_schema()
            self._thread = threading.Thread(target=self._run, name="outcomes-writer", daemon=True)
            self._thread.start()

    @property
    def depth(self) -> int:
        """Items queued and not yet taken by the writer."""
        return len(self._queue)

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new predictions, write all queued ones, stop the writer and disconnect. A writer
        still failing after timeout_s is abandoned: what it held is lost (and logged)."""
        if self._thread is not None:
            self._closed = True
            self._wake.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                self._abandon = True
                self._thread.join(RETRY_S + self.timeout_s)
                log.error("outcome store %s: not drained within %g s; %d queued predictions are lost",
                          self._backend.describe(), timeout_s, len(self._queue))
            self._thread = None
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def remember(self, parts: T, decode: Callable[[T], Prediction] | None = None) -> bool:
        """Queue one answered prediction; never blocks, no I/O. parts is the Prediction, or whatever
        decode(parts) makes one of in the writer thread (so decoding the output tensor happens off
        the request path; one that raises is logged and dropped, "decode"). False, queuing nothing,
        when the queue is full or the store closed (on_drop is told)."""
        queue = self._queue
        if self._closed or len(queue) >= self.queue_size:
            self._on_drop(parts, "closed" if self._closed else "full")
            return False
        queue.append((parts, decode))
        if len(queue) == self.batch:
            self._wake.set()
        return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything remembered before this call is written (or found undecodable);
        False when that took longer than timeout_s (default: the store's timeout_s) or no writer runs."""
        if self._thread is None:
            return not self._queue
        barrier = threading.Event()
        self._queue.append(barrier)
        self._wake.set()
        return barrier.wait(self.timeout_s if timeout_s is None else timeout_s)

    def join(self, items: Sequence[Feedback], now: float, fits: Fits | None = None,
             score: Score = label_score) -> JoinReport:
        """Pair each posted outcome with its prediction, found by request id when the item has one,
        else (or when that finds nothing) by trace id among the predictions made without a request
        id (of any, if the item has none), the oldest without an outcome first. Results come in
        input order; one transaction sets them all. The first outcome posted for a prediction wins:
        later ones are `duplicate` (within one call too). fits(item, row): why an outcome cannot
        belong to the row it names (a class the row does not have), `misfit`, joining nothing;
        score(row, label): the value kept for arm_stats' "label" outcome.
        Predictions this process remembered are written first; for ones another process may still
        hold in its queue, items not found are looked for once more after settle_s. ValueError: a
        label or business value that is not a finite number; Unavailable: the database cannot be
        reached."""
        for item in items:
            values = [*item.business.values(), *([] if item.label is None else [item.label])]
            try:
                finite = all(math.isfinite(v) for v in values)
            except TypeError:
                finite = False
            if not finite:
                raise ValueError(f"outcome for {item.request_id or item.trace_id!r}: labels and business "
                                 "outcomes must be finite numbers")
        self.flush()
        results = self._in_transaction(lambda conn: [self._join_one(conn, item, now, fits, score) for item in items])
        missing = [i for i, r in enumerate(results) if r.status is Status.UNKNOWN]
        if missing and self.settle_s > 0:
            time.sleep(self.settle_s)
            again = self._in_transaction(lambda conn: [self._join_one(conn, items[i], now, fits, score) for i in missing])
            for i, result in zip(missing, again):
                results[i] = result
        return JoinReport(tuple(results))

    def joined(self, model: str, version: str | None = None, since: float | None = None,
               until: float | None = None) -> list[Joined]:
        """The joined records of model (optionally of one version), answered in [since, until),
        oldest first: for segment reports and model cards. Feedback ids are the prediction's."""
        where, params = ["model = ?", "joined_at IS NOT NULL"], [model]
        for clause, value in (("version = ?", version), ("answered_at >= ?", since), ("answered_at < ?", until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        sql = self._backend.sql(f"SELECT {_READ} FROM {TABLE} WHERE {' AND '.join(where)} "
                                "ORDER BY answered_at, id")
        rows = self._with_reader(lambda conn: conn.execute(sql, params).fetchall())
        return [_joined(model, _Row._make(row)) for row in rows]

    def arm_stats(self, model: str, target: str, outcome: str, since: float) -> ArmStats:
        """Count, sum and sum of squares of one outcome over target's predictions answered since
        `since` that have it: "label" sums the Score the join kept for each row and label (by default
        correct 0/1 for class scores, absolute error for one value); any other name sums that
        business outcome. For a sequential A/B gate: mean and variance per arm."""
        if outcome == "label":
            value, params = "label_score", []
        elif _OUTCOME_NAME.fullmatch(outcome):
            value, params = self._backend.business_value, [self._backend.business_param(outcome)]
        else:
            raise ValueError(f"outcome name {outcome!r}: letters, digits and _ . : - only")
        sql = self._backend.sql(f"SELECT COUNT(v), SUM(v), SUM(v * v) FROM (SELECT {value} AS v FROM {TABLE} "
                                "WHERE model = ? AND target = ? AND joined_at IS NOT NULL AND answered_at >= ?) s")
        n, total, total_sq = self._with_reader(lambda conn: conn.execute(sql, [*params, model, target, since]).fetchone())
        return ArmStats(int(n), float(total or 0.0), float(total_sq or 0.0))

    def _create_schema(self) -> None:
        backend = self._backend
        conn = backend.connect()
        try:
            backend.prepare(conn)
            with backend.transaction(conn):
                if backend.schema_lock:
                    conn.execute(backend.schema_lock)
                for statement in _SCHEMA:
                    conn.execute(statement.format(id=backend.id_column, blob=backend.blob))
        finally:
            conn.close()

    # ------------------------------------------------------------ join, on the reader connection

    def _join_one(self, conn: Any, item: Feedback, now: float, fits: Fits | None, score: Score) -> Result:
        candidates = conn.execute(self._sql["by_request"], (item.model, item.request_id)).fetchall() \
            if item.request_id else []
        if not candidates and item.trace_id:
            by_trace = "by_trace_anonymous" if item.request_id else "by_trace"
            candidates = conn.execute(self._sql[by_trace], (item.model, item.trace_id)).fetchall()
        if not candidates:
            return Result(Status.UNKNOWN, "no such prediction: never remembered, or deleted since it expired")
        rows = [_Row._make(row) for row in candidates]
        waiting = [row for row in rows if row.joined_at is None]
        fresh = [row for row in waiting if row.expires_at > now and row.rows_f64 is not None]
        if waiting and not fresh:
            expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(waiting[0].expires_at))
            return Result(Status.EXPIRED, f"the prediction expired at {expired}")
        if not fresh:
            return Result(Status.DUPLICATE, _FIRST_WINS)
        prediction = _prediction(item.model, fresh[0])
        if not 0 <= item.row < len(prediction.rows):
            return Result(Status.BAD_ROW, f"row {item.row} is outside the prediction's {len(prediction.rows)} rows")
        misfit = fits(item, prediction.rows[item.row]) if fits is not None else None
        if misfit:
            return Result(Status.MISFIT, misfit)
        business = {name: float(value) for name, value in item.business.items()}
        label = None if item.label is None else float(item.label)
        value = None if label is None else score(prediction.rows[item.row], label)
        cursor = conn.execute(self._sql["join"], (label, orjson.dumps(business).decode(), item.row, value, now,
                                                  now + self.retention_s, fresh[0].id))
        if cursor.rowcount != 1:   # joined by another process between the SELECT and the UPDATE
            return Result(Status.DUPLICATE, _FIRST_WINS)
        return Result(Status.JOINED, joined=Joined(prediction, item, now))

    def _in_transaction(self, work: Callable[[Any], T]) -> T:
        return self._with_reader(work, transaction=True)

    def _with_reader(self, work: Callable[[Any], T], transaction: bool = False) -> T:
        """work(connection), in a transaction if asked, retried on transient errors with a fresh
        connection; Unavailable when the last try fails."""
        backend = self._backend
        with self._reader_lock:
            for attempt in range(ATTEMPTS):
                try:
                    if self._reader is None:
                        self._reader = backend.connect()
                    if not transaction:
                        return work(self._reader)
                    with backend.transaction(self._reader):
                        return work(self._reader)
                except backend.transient as e:
                    self._reader = _closed(self._reader)
                    if attempt == ATTEMPTS - 1:
                        raise Unavailable(f"outcome store {backend.describe()}: {e}") from e
                    time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        pending: list[tuple[Any, tuple[Any, ...]]] = []   # (parts, row) taken, not yet committed
        barriers: list[threading.Event] = []              # flushes waiting for pending to be committed
        conn: Any = None
        retry_at = next_sweep = 0.0
        while not self._abandon:
            self._take(pending, barriers)
            now = time.monotonic()
            if pending and now >= retry_at:
                try:
                    conn = conn or self._backend.connect()
                    self._insert(conn, pending)
                except self._backend.transient as e:
                    conn = _closed(conn)
                    retry_at = now + RETRY_S
                    self._observer.failed("write")
                    log.warning("outcome store %s: write failed (%s); retrying, %d queued",
                                self._backend.describe(), e, len(self._queue))
                else:
                    self._observer.written(len(pending), len(self._queue))
                    pending.clear()
            if not pending:
                for barrier in barriers:
                    barrier.set()
                barriers.clear()
            if now >= next_sweep and not pending:
                conn, behind = self._sweep(conn)
                next_sweep = now if behind else now + self.sweep_interval_s
            if self._closed and not pending and not self._queue:
                break
            if pending or len(self._queue) < self.batch:
                self._wake.wait(self.batch_s)
                self._wake.clear()
        for barrier in barriers:
            barrier.set()
        if conn is not None:
            conn.close()

    def _insert(self, conn: Any, pending: list[tuple[Any, tuple[Any, ...]]]) -> None:
        """Insert the pending rows in one transaction; if that fails for something other than a
        transient error (a value the database refuses), each alone, dropping only those that fail."""
        try:
            with self._backend.transaction(conn):
                conn.cursor().executemany(self._sql["insert"], [row for _, row in pending])
            return
        except self._backend.transient:
            raise
        except Exception as e:
            log.error("outcome store %s: a batch of %d predictions failed (%r); writing them one by one",
                      self._backend.describe(), len(pending), e)
            self._observer.failed("write")
        lost = 0
        for parts, row in pending:
            try:
                with self._backend.transaction(conn):
                    conn.execute(self._sql["insert"], row)
            except self._backend.transient:
                raise
            except Exception:
                lost += 1
                self._on_drop(parts, "write")
        if lost:
            log.error("outcome store %s: %d predictions could not be written; dropped", self._backend.describe(), lost)

    def _take(self, pending: list[tuple[Any, tuple[Any, ...]]], barriers: list[threading.Event]) -> None:
        """Move queued items into pending (with their rows) and barriers, up to a batch."""
        failed = 0
        error: Exception | None = None
        while len(pending) < self.batch and self._queue:
            item = self._queue.popleft()
            if isinstance(item, threading.Event):
                barriers.append(item)
                continue
            parts, decode = item
            try:
                pending.append((parts, self._encode(parts if decode is None else decode(parts))))
            except Exception as e:
                failed += 1
                error = error or e
                self._on_drop(parts, "decode")
        if error is not None:
            log.error("outcome store %s: %d predictions did not decode (first: %r)", self._backend.describe(),
                      failed, error)

    def _encode(self, p: Prediction) -> tuple[Any, ...]:
        rows = np.asarray(p.rows, dtype=_F64)
        if rows.size == 0:
            rows = rows.reshape(0, 0)
        if rows.ndim != 2:
            raise ValueError(f"rows of {p.model!r} {p.request_id or p.trace_id}: shape {rows.shape}, not [batch, values]")
        return (p.model, p.request_id or None, p.trace_id, p.target, p.version, p.decision, orjson.dumps(p.segments).decode(),
                rows.tobytes(), rows.shape[1], p.at, p.expires_at, p.expires_at + self.grace_s)

    def _sweep(self, conn: Any) -> tuple[Any, bool]:
        """One bounded step of expiry: tombstones, then deletions. The connection (None if it
        failed) and whether more is left to do."""
        now = self._clock()
        try:
            conn = conn or self._backend.connect()
            tombstoned = conn.execute(self._sql["tombstone"], (now, self.sweep_batch)).rowcount
            deleted = conn.execute(self._sql["purge"], (now, self.sweep_batch)).rowcount
        except Exception as e:
            log.warning("outcome store %s: expiry failed: %r", self._backend.describe(), e)
            self._observer.failed("sweep")
            return _closed(conn), False
        if tombstoned or deleted:
            self._observer.swept(tombstoned, deleted)
        return conn, max(tombstoned, deleted) >= self.sweep_batch


def _ignore(parts: Any, reason: str) -> None:
    """The default on_drop: the writer logs decode and write losses; nothing else is kept."""


def _closed(conn: Any) -> None:
    """Close conn (if any), whatever state it is in; None, the connection it leaves."""
    if conn is not None:
        with suppress(Exception):
            conn.close()


def _prediction(model: str, row: _Row) -> Prediction:
    """The Prediction a row holds (a tombstone's rows and segments come back empty)."""
    rows = np.frombuffer(row.rows_f64, dtype=_F64).reshape(-1, row.width).tolist() if row.rows_f64 and row.width else []
    return Prediction(model, row.request_id or "", row.trace_id, row.target, row.version, row.decision,
                      orjson.loads(row.segments) if row.segments else {}, rows, row.answered_at, row.expires_at)


def _joined(model: str, row: _Row) -> Joined:
    """The Joined record a joined row holds; its Feedback is named by the prediction's ids."""
    assert row.joined_at is not None and row.outcome_row is not None
    feedback = Feedback(model, row.request_id or "", row.trace_id, row.outcome_row, row.label,
                        orjson.loads(row.business) if row.business else {})
    return Joined(_prediction(model, row), feedback, row.joined_at)
