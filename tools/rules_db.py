"""The rule engine's database sources, for the ``serve`` wiring.

* :class:`DatabaseMasterData` -- vehicles, fences and filings from the master-data tables
  (``jt808 vehicles|fences|filings import``), reloaded by the rule service when the tables'
  change counter moves, so imports take effect without a restart.
* :class:`DatabaseAlertFeed` -- the ``alert_events`` log as the operator port's
  ``/alerts/stream`` source: every node streams every node's alerts, and a client resumes with
  Last-Event-ID from the log.
* :class:`DatabaseMasterDataAdmin` -- ``ingest.MasterDataAdmin`` over :mod:`storage.masterdata`
  (the operator port's ``/vehicles``, ``/fences``, ``/filings``): the JSON is checked by the
  same row checks as the CSV imports and GeoJSON by ``geofence.geojson``, written in a worker
  thread, and ``after_write`` (the rule service's ``reload``) runs before the answer, so a
  POSTed filing is in effect when the dispatch system gets its 201.
* :class:`DatabaseTripStore` -- ``tools.rules_service.TripStore`` over
  ``storage.trips.TripRepository``.

The two operator-port adapters raise only the ``ingest`` errors: ``MasterDataRejected`` for
data the checks or the database refuse, ``ServiceUnavailableError`` when the database cannot
answer now (``storage.errors.DatabaseUnavailableError``); the operator port answers 400 and
503 for them.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import trio

from alerts import (
    RULE_NAMES,
    AlertState,
    Filing,
    Registry,
    RuleConfigError,
    RulesConfig,
    SealingPeriod,
    WorkingCalendar,
)
from alerts.engine import TripRecord
from geofence import Fence
from geofence.errors import GeoJSONError
from geofence.geojson import fences_from_geojson, fences_to_geojson
from ingest import AlertFilter, MasterDataRejected
from ingest.access import Actor
from ingest.interfaces import AlertVocabulary, ServiceUnavailableError
from storage import masterdata
from storage.access import set_actor
from storage.alerts import AlertRepository
from storage.errors import DatabaseUnavailableError
from storage.trips import TripRepository
from tools.fences_cmd import explicit_id
from tools.masterdata_cmd import (
    fence_row,
    fences_from_rows,
    filings_from_rows,
    registry_from_rows,
)

# Filings ending more than this long ago cannot matter to live rules: back-filing deadlines are
# 3 working days (article 21), at most about 10 calendar days across the Spring Festival; 35
# days also covers replaying a month of recorded traffic.
FILINGS_LOOKBACK = timedelta(days=35)

# How often a waiting stream looks for new events in the log.  A log query is an index lookup
# of max(seq); twice a second keeps the stream's delay well under a person's notice.
FEED_POLL_S = 0.5

# The rules and states the engine's alerts carry, so the operator port refuses a stream filter
# that could never match (the engine's own lists, never a copy).
ALERT_VOCABULARY = AlertVocabulary(rules=RULE_NAMES, states=tuple(s.value for s in AlertState))

# Master-data requests at once, each on a connection of its own: writes serialise on the
# version row anyway (migration 5), and reads are small; two leave the pool for the rest.
ADMIN_CONNECTIONS = 2

_T = TypeVar("_T")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DatabaseMasterData:
    """``tools.rules_service.MasterData`` over the master-data tables (blocking calls)."""

    def __init__(self, dsn: str, *, wall_clock: Callable[[], datetime] = _utc_now) -> None:
        self._dsn = dsn
        self._wall_clock = wall_clock

    def version(self) -> int:
        with psycopg.connect(self._dsn) as conn:
            return masterdata.masterdata_version(conn)

    def load(
        self, filings_since: datetime | None = None
    ) -> tuple[Registry, Sequence[Fence], Sequence[Filing]]:
        since = filings_since or self._wall_clock() - FILINGS_LOOKBACK
        with psycopg.connect(self._dsn) as conn:
            registry = registry_from_rows(masterdata.load_registry_rows(conn))
            fences = fences_from_rows(masterdata.load_fence_rows(conn))
            filings = filings_from_rows(masterdata.load_filing_versions(conn, since))
        return registry, fences, filings


class DatabaseAlertFeed:
    """``ingest.AlertFeed`` over ``storage.alerts.AlertRepository`` (the ``alert_events`` log).

    Queries run in worker threads, one at a time on the repository's connection.  While the
    database cannot answer, every method raises ``ServiceUnavailableError``; the first call
    after it is back reconnects.
    """

    def __init__(self, dsn: str) -> None:
        self._repository = AlertRepository(dsn)
        self._limiter = trio.CapacityLimiter(1)
        self.vocabulary = ALERT_VOCABULARY

    async def _query(self, query: Callable[[], _T]) -> _T:
        try:
            return await trio.to_thread.run_sync(query, limiter=self._limiter)
        except DatabaseUnavailableError as exc:
            raise ServiceUnavailableError(f"the alert log is unavailable: {exc}") from exc

    async def last_seq(self) -> int:
        return await self._query(self._repository.last_seq)

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        def query() -> list[tuple[int, dict[str, Any]]]:
            return self._repository.events_after(
                seq,
                limit,
                unit=filters.unit,
                rule=filters.rule,
                state=filters.state,
                severity=filters.severity,
            )

        return await self._query(query)

    async def wait_for_new(self, after_seq: int) -> None:
        # Polls until the log has moved rather than returning after each quiet poll: every
        # return costs the stream two more queries (its head and the events after its cursor).
        # A poll, not an Event: the news is in the database, which only a query can ask.
        while await self.last_seq() <= after_seq:  # noqa: ASYNC110
            await trio.sleep(FEED_POLL_S)

    def close(self) -> None:
        self._repository.close()


# ---------------------------------------------------------------------------------------------
# Master data over HTTP


def _json_value(value: Any) -> Any:
    """Times as ISO 8601; instants in China time (GMT+8), as alerts show them."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(masterdata.CHINA)
    return value.isoformat() if hasattr(value, "isoformat") else value


class DatabaseMasterDataAdmin:
    """``ingest.MasterDataAdmin`` over the master-data tables.

    Each request opens a connection in a worker thread (at most :data:`ADMIN_CONNECTIONS` at
    once); writes are one transaction each (all or nothing).  ``after_write`` is awaited after
    every successful write (the rule service's ``reload``), so the answer means "in effect".
    Values the database refuses are ``MasterDataRejected``; a database that cannot answer is
    ``ServiceUnavailableError``.
    """

    def __init__(
        self,
        dsn: str,
        *,
        after_write: Callable[[], Awaitable[object]] | None = None,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._dsn = dsn
        self._after_write = after_write
        self._wall_clock = wall_clock
        self._limiter = trio.CapacityLimiter(ADMIN_CONNECTIONS)

    async def _run(
        self, work: Callable[[psycopg.Connection[Any]], Any], actor: Actor | None = None
    ) -> Any:
        def call() -> Any:
            try:
                with masterdata.connect(self._dsn) as conn:
                    if actor is not None:  # the audit trail's triggers name the writer
                        set_actor(conn, actor.name, actor.source)
                    return work(conn)
            except masterdata.MasterDataError as exc:
                raise MasterDataRejected(exc.problems) from exc
            except GeoJSONError as exc:
                raise MasterDataRejected(exc.problems) from exc
            except DatabaseUnavailableError as exc:
                raise ServiceUnavailableError(f"the database is unavailable: {exc}") from exc

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def _write(
        self, work: Callable[[psycopg.Connection[Any]], list[int]], actor: Actor | None
    ) -> list[int]:
        ids: list[int] = await self._run(work, actor)
        if self._after_write is not None:
            await self._after_write()
        return ids

    async def add_vehicles(self, items: list[Any], *, actor: Actor | None = None) -> list[int]:
        try:
            rows = masterdata.vehicle_rows_from_json(items)
        except masterdata.MasterDataError as exc:
            raise MasterDataRejected(exc.problems) from exc

        def write(conn: psycopg.Connection[Any]) -> list[int]:
            with conn.transaction():
                # The operator port's writes: an exempt change names its reason.
                masterdata.upsert_vehicles(conn, rows, exempt_needs_reason=True)
                ids = masterdata.vehicle_ids(conn, [r["plate"] for r in rows])
            return [int(i) for i in ids if i is not None]

        return await self._write(write, actor)

    async def add_fences(
        self, collection: Mapping[str, Any], *, actor: Actor | None = None
    ) -> list[int]:
        try:
            fences = fences_from_geojson(collection)
        except GeoJSONError as exc:
            raise MasterDataRejected(exc.problems) from exc
        rows = []
        for fence, feature in zip(fences, collection["features"], strict=True):
            row = fence_row(fence)
            if not explicit_id(feature):
                row["id"] = None  # matched by name, or a new id
            rows.append(row)

        def write(conn: psycopg.Connection[Any]) -> list[int]:
            return masterdata.upsert_fences(conn, rows)

        return await self._write(write, actor)

    async def add_filings(self, items: list[Any], *, actor: Actor | None = None) -> list[int]:
        def known(conn: psycopg.Connection[Any]) -> tuple[set[str], set[str]]:
            plates = {row["plate"] for row in masterdata.load_registry_rows(conn)}
            return plates, {row["name"] for row in masterdata.load_fence_rows(conn)}

        # Plates and destinations checked with the rest: one answer lists every problem.
        plates, fences = await self._run(known)
        try:
            rows = masterdata.filing_rows_from_json(
                items, now=self._wall_clock(), plates=plates, fences=fences
            )
        except masterdata.MasterDataError as exc:
            raise MasterDataRejected(exc.problems) from exc

        def write(conn: psycopg.Connection[Any]) -> list[int]:
            return masterdata.upsert_filings(conn, rows)

        return await self._write(write, actor)

    async def vehicles(self) -> list[dict[str, Any]]:
        rows = await self._run(masterdata.load_registry_rows)
        return [{k: _json_value(v) for k, v in row.items()} for row in rows]

    async def fences(self) -> dict[str, Any]:
        rows = await self._run(masterdata.load_fence_rows)
        # Through the engine's fences, so GET gives back what POST takes.
        document: dict[str, Any] = json.loads(
            json.dumps(fences_to_geojson(fences_from_rows(rows)), default=_json_value)
        )
        return document

    async def filing(self, filing_id: int) -> dict[str, Any] | None:
        def read(conn: psycopg.Connection[Any]) -> list[dict[str, Any]] | None:
            return masterdata.filing_history(conn, filing=filing_id)

        versions = await self._run(read)
        if not versions:
            return None
        current = versions[-1]
        return {
            "id": filing_id,
            **{k: _json_value(v) for k, v in current.items() if k not in ("filing", "version")},
            "version": current["version"],
            "versions": [{k: _json_value(v) for k, v in v.items()} for v in versions],
        }

    async def filings(self, since: datetime | None) -> list[dict[str, Any]]:
        def read(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            return masterdata.load_filing_rows(conn, since, states=masterdata.FILING_STATES)

        rows = await self._run(read)
        return [
            {
                k: _json_value(v)
                for k, v in row.items()
                if k not in ("vehicle_id", "destination_fence")
            }
            for row in rows
        ]


# ---------------------------------------------------------------------------------------------
# Trips


def trip_row(trip: TripRecord) -> dict[str, Any]:
    """A trip as a row of ``storage.trips.TripRepository``."""
    return {
        "vehicle_id": trip.vehicle,
        "started_at": trip.started_at,
        "seq": trip.seq,
        "phone": trip.phone,
        "start_lon": trip.start_lon,
        "start_lat": trip.start_lat,
        "ended_at": trip.ended_at,
        "end_lon": trip.end_lon,
        "end_lat": trip.end_lat,
        "distance_km": trip.distance_km,
        "distance_source": trip.distance_source,
        "filing_id": trip.filing,
    }


class DatabaseTripStore:
    """``tools.rules_service.TripStore`` over the trips table (blocking, worker thread)."""

    def __init__(self, dsn: str) -> None:
        self.repository = TripRepository(dsn)

    def put_trips(self, trips: Sequence[TripRecord]) -> None:
        self.repository.upsert([trip_row(t) for t in trips])

    def close(self) -> None:
        self.repository.close()


class RulesFileError(Exception):
    """The rules file is unreadable or holds an unknown key or a bad value."""


def load_rules_file(path: Path) -> tuple[RulesConfig, WorkingCalendar]:
    """The rule settings and the calendar with local sealing periods, from a TOML file::

        [rules.overspeed]
        enabled = true

        [[sealing]]
        name = "provincial sealing order"
        start = 2026-12-31T18:00:00+08:00
        end = 2027-01-02T08:00:00+08:00

    ``[rules]`` holds a table per rule name (``alerts.RULE_NAMES``) as
    ``alerts.RulesConfig.from_mapping`` reads them; times without an offset are China time.
    """
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise RulesFileError(f"cannot read rules file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RulesFileError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(document) - {"rules", "sealing"})
    if unknown:
        raise RulesFileError(f"{path}: unknown key(s) {', '.join(unknown)}; known: rules, sealing")
    try:
        config = RulesConfig.from_mapping(document.get("rules", {}))
        periods = [_sealing_period(entry) for entry in document.get("sealing", [])]
    except (RuleConfigError, ValueError, TypeError, KeyError) as exc:
        raise RulesFileError(f"{path}: {exc}") from exc
    return config, WorkingCalendar(sealing_periods=periods)


def _sealing_period(entry: Any) -> SealingPeriod:
    if not isinstance(entry, dict) or set(entry) - {"start", "end", "name"}:
        raise ValueError(f"a [[sealing]] entry has start, end and name only: {entry!r}")
    start, end = (_china_time(entry[key]) for key in ("start", "end"))
    return SealingPeriod(start=start, end=end, name=str(entry.get("name", "local sealing period")))


def _china_time(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"{value!r} is not a date and time")
    return value if value.tzinfo else value.replace(tzinfo=masterdata.CHINA)
