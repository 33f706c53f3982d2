"""``ingest.ConsoleData`` over :mod:`storage.console`, for the ``serve`` wiring.

Reads run in worker threads, each on a connection of its own (:func:`storage.masterdata.connect`
opens one per request), at most :data:`CONSOLE_CONNECTIONS` at once; the positions hub's
once-a-second read keeps one connection open instead, since it asks all the time while anyone
watches.  Values come back as JSON (times ISO 8601 in China time).  A database that cannot
answer is ``ServiceUnavailableError``; a value it refuses is ``MasterDataRejected``.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg
import trio

from ingest import AlertFilter, MasterDataRejected
from ingest.access import Actor
from ingest.interfaces import AlertVocabulary, ServiceUnavailableError
from storage import StorageError, console, masterdata
from storage.errors import DatabaseUnavailableError, database_errors
from storage.reports_violations import (
    backfilling_by_unit,
    month_bounds,
    violations_by_unit_rule,
    write_csv,
)
from tools.rules_db import ALERT_VOCABULARY

# Console reads at once, each on its own connection: a track of a month is the heaviest
# (~100,000 rows read to thin); three leave the database's connections to ingest.
CONSOLE_CONNECTIONS = 3
CONNECT_TIMEOUT_S = 5

_T = TypeVar("_T")


def _json_value(value: Any) -> Any:
    """Instants in China time as ISO 8601 (as alerts show them); other values as they are."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(masterdata.CHINA)
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DatabaseConsoleData:
    """See the module docstring.  ``close()`` when done."""

    def __init__(self, dsn: str, *, wall_clock: Callable[[], datetime] = _utc_now) -> None:
        self._dsn = dsn
        self._wall_clock = wall_clock
        self._limiter = trio.CapacityLimiter(CONSOLE_CONNECTIONS)
        # The hub's connection, used by one round at a time.
        self._poll_conn: psycopg.Connection[Any] | None = None
        self._poll_lock = threading.Lock()
        self._poll_limiter = trio.CapacityLimiter(1)

    @property
    def vocabulary(self) -> AlertVocabulary:
        return ALERT_VOCABULARY

    async def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        def call() -> _T:
            with masterdata.connect(self._dsn) as conn:
                return work(conn)

        try:
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except DatabaseUnavailableError as exc:
            raise ServiceUnavailableError(f"the database is unavailable: {exc}") from exc
        except masterdata.MasterDataError as exc:
            # The database refused a value of the request (a note's or a unit's text with NUL
            # or an unpaired surrogate): the same request fails again, so it is not "the
            # database is unavailable" (503) but the client's fault (400).
            raise MasterDataRejected(exc.problems) from exc

    async def _poll(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        def call() -> _T:
            with self._poll_lock:
                try:
                    with database_errors():
                        if self._poll_conn is None or self._poll_conn.closed:
                            self._poll_conn = psycopg.connect(
                                self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                            )
                        return work(self._poll_conn)
                except DatabaseUnavailableError:
                    self._drop()
                    raise

        try:
            return await trio.to_thread.run_sync(call, limiter=self._poll_limiter)
        except DatabaseUnavailableError as exc:
            raise ServiceUnavailableError(f"positions are unavailable: {exc}") from exc

    def _drop(self) -> None:
        if self._poll_conn is not None:
            self._poll_conn.close()
            self._poll_conn = None

    def close(self) -> None:
        with self._poll_lock:
            self._drop()

    async def latest_positions(self, received_since: datetime | None) -> list[dict[str, Any]]:
        now = self._wall_clock()
        rows = await self._poll(lambda conn: console.latest_positions(conn, now, received_since))
        return [_json_value(row) for row in rows]

    async def alerting_vehicles(self) -> set[int]:
        return await self._poll(console.alerting_vehicles)

    async def vehicle(self, vehicle_id: int) -> dict[str, Any] | None:
        found = await self._run(lambda conn: console.vehicle(conn, vehicle_id))
        return None if found is None else _json_value(found)

    async def bindings(self, vehicle_id: int) -> list[dict[str, Any]] | None:
        def read(conn: psycopg.Connection[Any]) -> list[dict[str, Any]] | None:
            found = console.vehicle(conn, vehicle_id)
            if found is None:
                return None
            rows = masterdata.vehicle_bindings(conn, found["plate"]) or []
            return [
                {"phone": r["phone"], "from": r["valid_from"], "to": r["valid_to"]} for r in rows
            ]

        found = await self._run(read)
        return None if found is None else _json_value(found)

    async def track(
        self, vehicle_id: int, start: datetime, end: datetime, max_points: int
    ) -> dict[str, Any]:
        found = await self._run(
            lambda conn: console.track(conn, vehicle_id, start, end, max_points=max_points)
        )
        result: dict[str, Any] = _json_value(found)
        return result

    async def alerts(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        filters: AlertFilter,
        limit: int,
    ) -> list[dict[str, Any]]:
        return await self._run(
            lambda conn: console.alert_list(
                conn,
                since=since,
                until=until,
                unit=filters.unit,
                rule=filters.rule,
                state=filters.state,
                severity=filters.severity,
                limit=limit,
            )
        )

    async def alert(self, alert_id: str) -> dict[str, Any] | None:
        found = await self._run(lambda conn: console.alert_detail(conn, alert_id))
        return None if found is None else _json_value(found)

    async def add_note(
        self, alert_id: str, *, text: str, acknowledge: bool, actor: Actor
    ) -> dict[str, Any] | None:
        note = await self._run(
            lambda conn: console.add_note(
                conn,
                alert_id,
                text=text,
                acknowledge=acknowledge,
                actor=actor.name,
                source=actor.source,
            )
        )
        return None if note is None else _json_value(note)

    async def violations(self, period: str, unit: str | None) -> dict[str, Any]:
        counts, backfilling = await self._counts(period, unit)
        return {
            "period": period,
            "violations": [
                {"unit": c.unit, "rule": c.rule, "violations": c.violations, "vehicles": c.vehicles}
                for c in counts
            ],
            "backfilling": [
                {
                    "unit": b.unit,
                    "in_time": b.in_time,
                    "late": b.late,
                    "claimed_earlier": b.claimed_earlier,
                }
                for b in backfilling
            ],
        }

    async def violations_csv(self, period: str, unit: str | None) -> str:
        counts, backfilling = await self._counts(period, unit)
        out = io.StringIO()
        write_csv(period, counts, out, backfilling)
        return out.getvalue()

    async def _counts(self, period: str, unit: str | None) -> tuple[list[Any], list[Any]]:
        try:
            start, end = month_bounds(period)
        except StorageError as exc:
            raise ValueError(str(exc)) from exc
        return await self._run(
            lambda conn: (
                violations_by_unit_rule(conn, start, end, unit=unit),
                backfilling_by_unit(conn, start, end, unit=unit),
            )
        )
