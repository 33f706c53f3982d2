"""The synchronous database side of the writer: one psycopg connection per store.

A :class:`PgPositionStore` is used by one worker thread at a time (the trio writer hands it
out); nothing here knows about trio.

Two ways to store a batch, both exactly-once thanks to the unique index on the natural key:

* **direct**: binary COPY straight into ``positions``.  Fastest (PostgreSQL's COPY inserts
  rows in multi-row groups), and correct as long as no row is a repeat: a repeat hits the unique
  index, PostgreSQL aborts the COPY and nothing of the batch is kept.
* **staging**: binary COPY into a per-connection temporary table, then ``INSERT ... SELECT ...
  ON CONFLICT DO NOTHING`` into ``positions`` in the same transaction; repeats are skipped and
  counted.  ``vehicle_id`` is resolved here by a join on ``terminal_bindings``.

:meth:`PgPositionStore.write_rows` tries direct and redoes the batch through staging when the
COPY hits the unique index (or goes straight to staging when asked); the writer asks for
staging while repeats are frequent.  Spool replays always use staging.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format

from storage.bindings import BindingCache, BindingMap
from storage.masterdata import LINK_LOCK
from storage.rows import COLUMN_NAMES, COLUMN_TYPES, NATURAL_KEY, PositionRow

logger = logging.getLogger(__name__)

_COLS = ", ".join(COLUMN_NAMES)
_STAGE = "jt808_positions_stage"
COPY_DIRECT = f"COPY positions ({_COLS}) FROM STDIN (FORMAT BINARY)"
COPY_STAGE = f"COPY {_STAGE} ({_COLS}) FROM STDIN (FORMAT BINARY)"
_SELECT_STAGED = ", ".join("b.vehicle_id" if c == "vehicle_id" else f"s.{c}" for c in COLUMN_NAMES)
# Taken while positions are given vehicles (storage.bindings; migration 11 takes it exclusively
# when bindings change).
LINK_SHARED = f"SELECT pg_advisory_xact_lock_shared({LINK_LOCK})"
LINK_SHARED_THEN_VERSION = f"{LINK_SHARED}; SELECT version FROM masterdata_state"  # noqa: S608
# The vehicle bound to the phone at the row's device time (bindings of a phone do not overlap).
INSERT_STAGED = (
    f"INSERT INTO positions ({_COLS}) SELECT {_SELECT_STAGED} FROM {_STAGE} s "  # noqa: S608
    "LEFT JOIN terminal_bindings b ON b.phone = s.phone AND b.valid_from <= s.device_time "
    "AND (b.valid_to IS NULL OR s.device_time < b.valid_to) "
    f"ON CONFLICT ({', '.join(NATURAL_KEY)}) DO NOTHING"
)
CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} (LIKE positions INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)

# Errors that mean "these rows are bad", not "the database is unavailable": retrying them or
# spooling them would fail again.
DATA_ERRORS: tuple[type[Exception], ...] = (
    psycopg.DataError,
    psycopg.errors.NotNullViolation,
    psycopg.errors.CheckViolation,
    ValueError,
    TypeError,
    OverflowError,
    struct.error,
)


class JsonTextDumper(Dumper):
    """Binary jsonb from JSON text already serialised by the row builder (version byte 1)."""

    oid = psycopg.adapters.types["jsonb"].oid
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        text: str = obj
        return b"\x01" + text.encode()


@dataclasses.dataclass(frozen=True, slots=True)
class WriteResult:
    rows: int
    inserted: int
    fell_back: bool = False  # direct COPY hit the unique key and the batch went via staging

    @property
    def duplicates(self) -> int:
        return self.rows - self.inserted


class PgPositionStore:
    """One connection that writes position batches.

    ``statement_timeout_s`` bounds each statement server-side and the TCP user timeout bounds
    a dead network, so a worker thread always comes back even if the trio side gave up on it.
    """

    def __init__(
        self,
        dsn: str,
        *,
        statement_timeout_s: float = 5.0,
        connect_timeout_s: float = 3.0,
        application_name: str = "jt808-writer",
        bindings: BindingCache | None = None,
    ) -> None:
        self.dsn = dsn
        self.statement_timeout_s = statement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.application_name = application_name
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._busy = False
        self._abandoned = False
        # The terminal bindings, read again when the master-data version moves; shared by the
        # stores of one writer.
        self._bindings = bindings or BindingCache()

    # -- connection ---------------------------------------------------------------------------

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        timeout_ms = max(1, int(self.statement_timeout_s * 1000))
        conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=max(1, round(self.connect_timeout_s)),
            application_name=self.application_name,
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=timeout_ms,
        )
        try:
            conn.adapters.register_dumper(None, JsonTextDumper)
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            conn.execute(CREATE_STAGE)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call ``getattr(self, method)(...)`` as the one user of this store (worker thread).

        If :meth:`abandon` was called meanwhile (the trio side timed out), the connection is
        closed when the call returns.
        """
        with self._lock:
            self._busy = True
        try:
            return getattr(self, method)(*args, **kwargs)
        finally:
            with self._lock:
                self._busy = False
                if self._abandoned:
                    self.close()

    def abandon(self) -> None:
        """Give up on this store: close it now if idle, else when its running call returns."""
        with self._lock:
            self._abandoned = True
            if not self._busy:
                self.close()

    # -- writing ------------------------------------------------------------------------------

    def run_upkeep(self, fn: Callable[[psycopg.Connection[Any]], None]) -> None:
        fn(self.connection())

    def ping(self) -> None:
        self.connection().execute("SELECT 1")

    def write_rows(self, rows: Sequence[PositionRow], *, staging: bool = False) -> WriteResult:
        """Store ``rows`` exactly once (see the module docstring); commit before returning.

        Each row is given the vehicle its phone was bound to at its device time
        (:mod:`storage.bindings`), whatever ``vehicle_id`` it came with."""
        conn = self.connection()
        if not staging:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    self._copy_rows(cur, COPY_DIRECT, rows, self._bindings_for(cur))
            except psycopg.errors.UniqueViolation:
                pass  # a repeat: the transaction rolled back, redo via staging
            else:
                return WriteResult(len(rows), len(rows))
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(LINK_SHARED)  # the staged insert resolves the vehicles itself
            self._copy_rows(cur, COPY_STAGE, rows, None)
            cur.execute(INSERT_STAGED)
            inserted = cur.rowcount
        return WriteResult(len(rows), inserted, fell_back=not staging)

    def _bindings_for(self, cur: psycopg.Cursor[Any]) -> BindingMap:
        """The bindings as this transaction sees them under the link lock taken shared: a
        binding change either committed before (and the master-data version read here moved)
        or re-resolves these rows when it commits (storage.schema, migration 11).  Two
        statements in one round trip, so the version is read after the lock is held."""
        cur.execute(LINK_SHARED_THEN_VERSION)
        cur.nextset()
        row = cur.fetchone()
        version = None if row is None else int(row[0])
        return self._bindings.current(cur, version)

    def write_payload(self, payload: bytes) -> WriteResult:
        """Store a binary COPY stream of positions rows (a spool record) via staging."""
        conn = self.connection()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(LINK_SHARED)
            with cur.copy(COPY_STAGE) as copy:
                copy.write(payload)
            staged = cur.rowcount
            cur.execute(INSERT_STAGED)
            inserted = cur.rowcount
        return WriteResult(staged, inserted)

    @staticmethod
    def _copy_rows(
        cur: psycopg.Cursor[Any],
        statement: str,
        rows: Sequence[PositionRow],
        bindings: BindingMap | None,
    ) -> None:
        with cur.copy(statement) as copy:
            copy.set_types(COLUMN_TYPES)
            write_row = copy.write_row
            if bindings is None:
                for row in rows:
                    write_row(row)
                return
            vehicle_at = bindings.vehicle_at
            for row in rows:
                vehicle_id = vehicle_at(row[1], row[0])
                if vehicle_id == row[-1]:
                    write_row(row)
                else:
                    write_row(row[:-1] + (vehicle_id,))  # noqa: RUF005 - 15% faster than unpacking
