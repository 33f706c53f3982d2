"""Alerts in PostgreSQL: the rule engine's alert store, an event log, and NOTIFY for live tails.

:class:`AlertRepository` keeps alert records as plain dicts in the shape of the engine's
``Alert.to_json()`` (``storage`` does not import ``alerts``; the wiring converts)::

    {"id", "rule", "state", "phone", "vehicle", "plate", "unit", "severity",
     "opened_at", "updated_at", "deadline", "closed_at", "detail"}

with times as ISO 8601 strings with an offset.  The record is stored verbatim (``alerts.record``)
next to typed columns for queries, so :meth:`AlertRepository.get` returns what was put.

Every :meth:`~AlertRepository.put` appends the new record to ``alert_events`` and sends
``NOTIFY jt808_alerts, '<seq>'`` in the same transaction.  Writers take a transaction-level
advisory lock first, so event numbers are committed in order: a reader that has seen event
``seq`` will never later find a smaller one appear (the property ``events_after`` and
Last-Event-ID resumption rely on).  Alerts are rare next to positions, so serialising their
writers costs nothing measurable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Self

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from storage.errors import StorageError, database_errors, is_unavailable

__all__ = [
    "ALERT_CHANNEL",
    "ALERT_KEYS",
    "BACKFILL_RULES",
    "AlertRepository",
]

logger = logging.getLogger(__name__)

ALERT_CHANNEL = "jt808_alerts"

# The keys of an alert record (alerts.lifecycle.Alert.to_json).
ALERT_KEYS = frozenset(
    {
        "id",
        "rule",
        "state",
        "phone",
        "vehicle",
        "plate",
        "unit",
        "severity",
        "opened_at",
        "updated_at",
        "deadline",
        "closed_at",
        "detail",
    }
)

# The rules whose alerts can be resolved by a back-filing (alerts.rules.BACKFILL_RULES; a test
# keeps the two equal, storage may not import alerts).
BACKFILL_RULES = ("unfiled_trip", "holiday_sealing")

# Advisory lock (class, key) serialising event appends; any constants of our own.
_LOCK = (808_2019, 5)

# events_after returns at most this many events a call: an SSE client that is far behind
# catches up in pages instead of one huge result held in memory.
MAX_EVENTS_PER_CALL = 10_000

_UPSERT = """
INSERT INTO alerts (id, rule, state, phone, vehicle_id, plate, unit, severity, opened_at,
                    updated_at, deadline, closed_at, detail, record)
VALUES (%(id)s, %(rule)s, %(state)s, %(phone)s, %(vehicle)s, %(plate)s, %(unit)s, %(severity)s,
        %(opened_at)s, %(updated_at)s, %(deadline)s, %(closed_at)s, %(detail)s, %(record)s)
ON CONFLICT (id) DO UPDATE SET
    rule = EXCLUDED.rule, state = EXCLUDED.state, phone = EXCLUDED.phone,
    vehicle_id = EXCLUDED.vehicle_id, plate = EXCLUDED.plate, unit = EXCLUDED.unit,
    severity = EXCLUDED.severity, opened_at = EXCLUDED.opened_at,
    updated_at = EXCLUDED.updated_at, deadline = EXCLUDED.deadline,
    closed_at = EXCLUDED.closed_at, detail = EXCLUDED.detail, record = EXCLUDED.record
"""


def _time(record: Mapping[str, Any], key: str, *, required: bool) -> datetime | None:
    value = record.get(key)
    if value is None:
        if required:
            raise StorageError(f"alert {record.get('id')!r}: {key} is required")
        return None
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise StorageError(
            f"alert {record.get('id')!r}: {key} must be ISO 8601 with an offset, got {value!r}"
        )
    return parsed


def _params(record: Mapping[str, Any]) -> dict[str, Any]:
    missing = ALERT_KEYS - set(record)
    if missing:
        raise StorageError(f"alert record lacks {sorted(missing)}")
    if not isinstance(record["detail"], Mapping):
        raise StorageError(f"alert {record['id']!r}: detail must be an object")
    return {
        "id": str(record["id"]),
        "rule": str(record["rule"]),
        "state": str(record["state"]),
        "phone": str(record["phone"]),
        "vehicle": int(record["vehicle"]),
        "plate": str(record["plate"]),
        "unit": str(record["unit"]),
        "severity": str(record["severity"]),
        "opened_at": _time(record, "opened_at", required=True),
        "updated_at": _time(record, "updated_at", required=True),
        "deadline": _time(record, "deadline", required=False),
        "closed_at": _time(record, "closed_at", required=False),
        "detail": Jsonb(dict(record["detail"])),
        "record": Jsonb(dict(record)),
    }


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise StorageError(f"{name} must be timezone-aware")
    return value


class AlertRepository:
    """The alert store on PostgreSQL (sync psycopg; see the module docstring).

    One connection serves the queries and writes and is meant for one worker thread at a time
    (the engine's).  :meth:`wait_for_events` listens on a second connection of its own, so one
    thread may wait while another writes.  Connections are opened on first use and reopened
    after a failure; :meth:`close` closes both.

    When the database cannot answer (unreachable, restarting, the connection cut mid-query)
    every method raises :class:`~storage.errors.DatabaseUnavailableError`; the next call
    tries a new connection.
    """

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[TupleRow] | None = None
        self._listen: psycopg.Connection[TupleRow] | None = None
        self._listen_lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in (self._conn, self._listen):
            if conn is not None:
                conn.close()
        self._conn = self._listen = None

    def _connection(self) -> psycopg.Connection[TupleRow]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
            )
        return self._conn

    def _rows(self, query: str, params: Sequence[Any] | Mapping[str, Any]) -> list[TupleRow]:
        """A read.  A kept connection that died while idle (the server restarted, the network
        dropped it) is only found out by using it: the read is tried once more on a new one,
        so the first query after an outage does not fail for nothing (reads repeat safely)."""
        with database_errors():
            kept = self._conn is not None and not (self._conn.closed or self._conn.broken)
            try:
                return self._connection().execute(query, params).fetchall()
            except psycopg.OperationalError as exc:
                if not kept or not is_unavailable(exc):
                    raise
                logger.info("alert store connection lost (%s); reconnecting", type(exc).__name__)
                self._drop()
                return self._connection().execute(query, params).fetchall()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -----------------------------------------------------------------------------------------
    # The engine's AlertStore, with dicts

    def get(self, alert_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT record FROM alerts WHERE id = %s", (alert_id,))
        return dict(rows[0][0]) if rows else None

    def put(self, alert: Mapping[str, Any]) -> int:
        """Insert or replace the alert, append its event and NOTIFY; returns the event's seq."""
        params = _params(alert)
        with database_errors():
            return self._put(params)

    def _put(self, params: Mapping[str, Any]) -> int:
        conn = self._connection()
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _LOCK)
            conn.execute(_UPSERT, params)
            row = conn.execute(
                "INSERT INTO alert_events (alert_id, alert) VALUES (%s, %s) RETURNING seq",
                (params["id"], params["record"]),
            ).fetchone()
            if row is None:  # pragma: no cover - RETURNING always yields the row
                raise StorageError("alert event was not stored")
            seq = int(row[0])
            conn.execute("SELECT pg_notify(%s, %s)", (ALERT_CHANNEL, str(seq)))
        return seq

    def open_alerts(self) -> list[dict[str, Any]]:
        """Alerts in state ``open``, by id."""
        rows = self._rows("SELECT record FROM alerts WHERE state = 'open' ORDER BY id", ())
        return [dict(r[0]) for r in rows]

    def due(self, now: datetime) -> list[dict[str, Any]]:
        """``pending_backfill`` alerts whose deadline is before ``now``, by id."""
        rows = self._rows(
            "SELECT record FROM alerts WHERE state = 'pending_backfill' AND deadline < %s "
            "ORDER BY id",
            (_aware(now, "now"),),
        )
        return [dict(r[0]) for r in rows]

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[dict[str, Any]]:
        """Alerts of the back-filing rules for ``vehicle`` opened within [from, to], any state."""
        rows = self._rows(
            "SELECT record FROM alerts WHERE vehicle_id = %s AND rule = ANY(%s) "
            "AND opened_at >= %s AND opened_at <= %s ORDER BY id",
            (
                vehicle,
                list(BACKFILL_RULES),
                _aware(opened_from, "opened_from"),
                _aware(opened_to, "opened_to"),
            ),
        )
        return [dict(r[0]) for r in rows]

    # -----------------------------------------------------------------------------------------
    # History and the event log

    def list_alerts(
        self,
        since: datetime,
        until: datetime | None = None,
        unit: str | None = None,
        rule: str | None = None,
        state: str | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts opened in [since, until) (until None: no end), filtered, by opening time."""
        rows = self._rows(
            "SELECT record FROM alerts WHERE opened_at >= %(since)s "
            "AND (%(until)s::timestamptz IS NULL OR opened_at < %(until)s::timestamptz) "
            "AND (%(unit)s::text IS NULL OR unit = %(unit)s::text) "
            "AND (%(rule)s::text IS NULL OR rule = %(rule)s::text) "
            "AND (%(state)s::text IS NULL OR state = %(state)s::text) "
            "ORDER BY opened_at, id",
            {
                "since": _aware(since, "since"),
                "until": None if until is None else _aware(until, "until"),
                "unit": unit,
                "rule": rule,
                "state": state,
            },
        )
        return [dict(r[0]) for r in rows]

    def events_after(
        self,
        seq: int,
        limit: int = 1000,
        *,
        unit: str | None = None,
        rule: str | None = None,
        state: str | None = None,
        severity: str | None = None,
    ) -> list[tuple[int, dict[str, Any]]]:
        """Events with a number above ``seq`` matching the filters, oldest first, at most
        ``limit`` (capped at :data:`MAX_EVENTS_PER_CALL`).  A filter holding a NUL matches
        nothing (PostgreSQL text cannot hold one, so no stored alert has it)."""
        limit = max(0, min(limit, MAX_EVENTS_PER_CALL))
        if any(value is not None and "\x00" in value for value in (unit, rule, state, severity)):
            return []
        rows = self._rows(
            "SELECT seq, alert FROM alert_events WHERE seq > %(seq)s "
            "AND (%(unit)s::text IS NULL OR alert->>'unit' = %(unit)s::text) "
            "AND (%(rule)s::text IS NULL OR alert->>'rule' = %(rule)s::text) "
            "AND (%(state)s::text IS NULL OR alert->>'state' = %(state)s::text) "
            "AND (%(severity)s::text IS NULL OR alert->>'severity' = %(severity)s::text) "
            "ORDER BY seq LIMIT %(limit)s",
            {
                "seq": seq,
                "unit": unit,
                "rule": rule,
                "state": state,
                "severity": severity,
                "limit": limit,
            },
        )
        return [(int(s), dict(a)) for s, a in rows]

    def last_seq(self) -> int:
        """The newest event's number (0 when there is none)."""
        rows = self._rows("SELECT coalesce(max(seq), 0) FROM alert_events", ())
        return int(rows[0][0])

    def wait_for_events(self, after_seq: int, timeout_s: float) -> bool:
        """Block until an event numbered above ``after_seq`` exists, or ``timeout_s`` passes.

        True when there is one (possibly already before the call).  LISTENs on a connection of
        its own, started before looking at the log so no event can slip between the two.
        """
        with self._listen_lock, database_errors():
            listen = self._listen
            if listen is None or listen.closed or listen.broken:
                listen = psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=self.connect_timeout_s
                )
                listen.execute(f"LISTEN {ALERT_CHANNEL}")
                self._listen = listen
            row = listen.execute("SELECT coalesce(max(seq), 0) FROM alert_events").fetchone()
            if row is not None and int(row[0]) > after_seq:
                return True
            for notify in listen.notifies(timeout=max(0.0, timeout_s)):
                try:
                    if int(notify.payload) > after_seq:
                        return True
                except ValueError:
                    logger.warning("ignoring %s payload %r", ALERT_CHANNEL, notify.payload)
            return False
