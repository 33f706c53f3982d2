"""The rule engine judging committed positions: the database is the log (wiring).

:class:`CommittedRuleService` is a :class:`~tools.rules_service.RuleService` whose positions
come from the ``positions`` table rather than from the server that received them
(:mod:`storage.rule_log`): every stored position is judged -- whichever worker or node stored
it, and also what a spool replay or a replayed capture stored -- and each vehicle by one
engine, whatever the deployment:

* Vehicles fall into :data:`storage.rule_log.PARTS` partitions; an engine judges the
  partitions whose advisory locks it holds.  Every :attr:`balance_s` it says it is alive and
  takes or gives up partitions until each running engine has its share (a new engine gets
  partitions from the others; a dead engine's are taken over once its lock connection is
  gone).
* Judging reads the rows stored by finished transactions, in transaction order, up to the
  database's horizon (no committed position is skipped whatever order writers commit in),
  and advances a cursor per partition.  Every :attr:`save_s`, and when a partition is given
  up, the cursor and the engine's state for that partition's vehicles are saved together, so
  the next holder (or this engine after a crash) resumes exactly there; what was judged
  after the last save is judged again, and since alert ids are deterministic nothing is
  duplicated.
* A row older than what its vehicle was judged on (a blind-area upload, 0x0704 type 1, a
  spool replayed late) makes the engine judge that vehicle again from before it
  (:meth:`alerts.RuleEngine.rejudge`): from the start of the trip the row falls in, or
  :data:`REJUDGE_MARGIN_S` before the row, over every stored position since.
* Filings are loaded for the device times being judged (traffic of September judged in
  December finds September's filings).

Ingestion never waits for this service: acknowledgements depend on storage only, and the lag
of the rules is a metric (:class:`RuleMetrics`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from alerts import EngineResult, PositionBatch
from protocol.batch import TIME_ABSENT
from protocol.phone import PhoneError, canonical_phone
from storage import rule_log
from tools.rules_db import FILINGS_LOOKBACK
from tools.rules_service import PhoneIndex, RuleService

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often an engine that has caught up looks for new rows
BALANCE_S = 2.0  # heartbeat and partition balance
SAVE_S = 30.0  # cursor + state saved this often (and when a partition is given up)
# Transaction ids read per step: adapted between these so a step holds about TARGET_ROWS.
FIRST_STEP_XIDS = 4096
MAX_STEP_XIDS = 1 << 24
TARGET_ROWS = 20_000
# A late row is judged again with what came before it: from the start of the trip it falls in
# (its vehicle's trips table) or this long before the row, at most MAX_REJUDGE_S before it.
REJUDGE_MARGIN_S = 1800
MAX_REJUDGE_S = 7 * 86400
# Filings are loaded from this long before the oldest device time judged (a filing may end
# before the trip it covers is judged, within the engine's filing_late_s).
FILINGS_MARGIN = timedelta(days=2)
CONNECT_TIMEOUT_S = 5


class RuleMetrics:
    """The rule engine's figures on ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry
        kw: dict[str, Any] = {} if registry is None else {"registry": registry}
        self.judged = Counter("jt808_rules_positions_judged", "Positions judged", **kw)
        self.late = Counter(
            "jt808_rules_late_positions",
            "Positions older than what their vehicle was judged on, judged again",
            **kw,
        )
        self.rejudged = Counter(
            "jt808_rules_vehicles_rejudged", "Vehicles judged again from an earlier time", **kw
        )
        self.lag = Histogram(
            "jt808_rules_lag_seconds",
            "From receipt to judgement, of the oldest position of each judged step",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600),
            **kw,
        )
        self.alerts = Counter(
            "jt808_rules_alert_changes", "Alerts opened or changed", ["rule", "state"], **kw
        )
        self.partitions = Gauge("jt808_rules_partitions_owned", "Partitions judged here", **kw)
        self.failures = Counter(
            "jt808_rules_failures", "Steps that failed (retried)", ["stage"], **kw
        )


class CommittedRuleService(RuleService):
    """A :class:`RuleService` fed from the database; see the module docstring.  ``dsn`` is
    the database; ``engine_id`` names this engine among its peers (unique per process)."""

    def __init__(
        self,
        *,
        dsn: str,
        engine_id: str,
        metrics: RuleMetrics | None = None,
        poll_s: float = POLL_S,
        balance_s: float = BALANCE_S,
        save_s: float = SAVE_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dsn = dsn
        self.engine_id = engine_id
        self.metrics = metrics if metrics is not None else RuleMetrics(CollectorRegistry())
        self.poll_s = poll_s
        self.balance_s = balance_s
        self.save_s = save_s
        self.parts: dict[int, int] = {}  # partition -> next transaction id to judge
        self._step_xids = FIRST_STEP_XIDS
        self._saved_at = 0.0
        self._data: psycopg.Connection[Any] | None = None
        self._locks: psycopg.Connection[Any] | None = None  # holds the advisory locks
        self._part_vehicles: dict[int, np.ndarray[Any, Any]] = {}
        self._registry_seen: object = None
        self.caught_up = trio.Event()  # set whenever a step found nothing new (tests)
        self._healthy = True  # False after a step failed for a reason other than the database

    # -- trio side

    async def _consume(self) -> None:
        """Balance and judge until cancelled; give the partitions up when stopped."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._balancer)
                while True:
                    result = await self._in_thread(self._judge_step)
                    if result is None:
                        self.caught_up.set()
                        await trio.sleep(self.poll_s)
                        continue
                    if self.caught_up.is_set():
                        self.caught_up = trio.Event()
                    self._publish(result)
        finally:
            # Stopped: save and hand the partitions over.  Failed: hand them over unsaved (the
            # state may be half-updated); the next holder judges again from the last save.
            leave = self._leave if self._healthy else self._lost_locks
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(leave, limiter=self._limiter)

    async def _balancer(self) -> None:
        while True:
            result = await self._in_thread(self._balance)
            if result is not None:
                self._publish(result)
            await trio.sleep(self.balance_s)

    async def _in_thread(self, work: Any) -> EngineResult | None:
        """``work()`` in the engine's thread; a database failure is logged and retried."""
        try:
            result: EngineResult | None = await trio.to_thread.run_sync(work, limiter=self._limiter)
        except psycopg.Error as exc:
            stage = getattr(work, "__name__", "rules").lstrip("_")
            self.metrics.failures.labels(stage).inc()
            logger.warning("rules: %s failed: %s; retrying", stage, exc)
            self._close_data()
            await trio.sleep(self.poll_s)
            return None
        except Exception:
            self._healthy = False
            raise
        return result

    def _build(self, *args: Any, **kwargs: Any) -> None:
        """A new engine (at start, or rebuilt after a master-data change it could not
        apply) judges no vehicle until it takes partitions (with their saved state)."""
        owned = bool(self.parts)
        super()._build(*args, **kwargs)
        self._healthy = True
        assert self.engine is not None
        self.engine.judged_ids = set()
        if owned:
            self._lost_locks()

    async def drain(self) -> None:
        """Nothing is queued here: the database holds it (saved on the way out)."""

    # -- worker thread: judging

    def _judge_step(self) -> EngineResult | None:
        """Judge the next transactions' rows; None when there was nothing new."""
        if not self.parts or self.engine is None:
            return None
        conn = self._data_connection()
        horizon = rule_log.horizon(conn)
        lo = min(self.parts.values())
        if lo >= horizon:
            self._save_if_due()
            return None
        hi = min(horizon, lo + self._step_xids)
        rows = rule_log.read(conn, lo, hi, sorted(self.parts))
        if len(rows) > TARGET_ROWS and self._step_xids > 1:
            self._step_xids //= 2
        elif len(rows) < TARGET_ROWS // 4:
            self._step_xids = min(self._step_xids * 2, MAX_STEP_XIDS)
        parts = self.parts
        rows = [r for r in rows if r[0] >= parts[rule_log.part_of(r[1])]]
        result = self._judge(rows, hi) if rows else None
        for part, cursor in parts.items():
            parts[part] = max(cursor, hi)
        self._save_if_due()
        return result or EngineResult(alerts=[], trips_started=[], trips_ended=[])

    def _judge(self, rows: Sequence[tuple[Any, ...]], before_xid: int) -> EngineResult:
        engine = self.engine
        assert engine is not None
        batch = self._batch(rows)
        filed = self._cover_filings(batch)
        valid = (batch.vehicle >= 0) & (batch.time != TIME_ABSENT)
        late = np.zeros(len(batch), dtype=bool)
        late[valid] = batch.time[valid] < engine.last_t[batch.vehicle[valid]]
        late_vehicles = np.unique(batch.vehicle[late])
        result = _merge(filed, engine.process(batch.take(~np.isin(batch.vehicle, late_vehicles))))
        if late_vehicles.size:
            self.metrics.late.inc(int(np.count_nonzero(late)))
            again = self._rejudge(late_vehicles, int(batch.time[late].min()), before_xid)
            result = _merge(result, again)
        self.metrics.judged.inc(len(rows))
        oldest = min(r[3] for r in rows)
        self.metrics.lag.observe(max(0.0, time.time() - oldest))
        self._store_trips(result)
        for alert in result.alerts:
            self.metrics.alerts.labels(alert.rule, alert.state.value).inc()
        return result

    def _rejudge(
        self, vehicles: np.ndarray[Any, Any], earliest: int, before_xid: int
    ) -> EngineResult:
        """Judge ``vehicles`` again from before ``earliest`` (POSIX seconds), over every
        position of theirs stored below ``before_xid``."""
        engine = self.engine
        assert engine is not None
        ids = [engine.registry[int(i)].id for i in vehicles.tolist()]
        since = self._rejudge_since(ids, earliest)
        phones = sorted(
            {
                form
                for i in vehicles.tolist()
                for form in _phone_forms(engine.registry[int(i)].phone)
            }
        )
        rows = rule_log.history(self._data_connection(), phones, since, before_xid)
        batch = self._batch(rows)
        filed = self._cover_filings(batch)
        self.metrics.rejudged.inc(len(ids))
        return _merge(filed, engine.rejudge(vehicles.tolist(), since, batch))

    def _rejudge_since(self, vehicle_ids: Sequence[int], earliest: int) -> datetime:
        """From the start of the trip the earliest late row falls in, or a margin before it."""
        at = datetime.fromtimestamp(earliest, UTC)
        floor = at - timedelta(seconds=MAX_REJUDGE_S)
        row = (
            self._data_connection()
            .execute(
                "SELECT min(started_at) FROM trips WHERE vehicle_id = ANY(%s) "
                "AND started_at <= %s AND started_at >= %s "
                "AND (ended_at IS NULL OR ended_at >= %s)",
                (list(vehicle_ids), at, floor, at),
            )
            .fetchone()
        )
        start = row[0] if row and row[0] is not None else at
        return max(floor, min(start, at) - timedelta(seconds=REJUDGE_MARGIN_S))

    def _cover_filings(self, batch: PositionBatch) -> EngineResult:
        """Load the filings for the device times in ``batch`` if they are older than those
        loaded so far (judging is by device time, not by the wall clock)."""
        nothing = EngineResult(alerts=[], trips_started=[], trips_ended=[])
        times = batch.time[batch.time != TIME_ABSENT]
        if not times.size or self.engine is None:
            return nothing
        need = datetime.fromtimestamp(int(times.min()), UTC) - FILINGS_MARGIN
        # Until data older than it comes, what the master data loaded at start covers.
        loaded = self.filings_since or self.wall_clock() - FILINGS_LOOKBACK
        if need >= loaded:
            return nothing
        _, _, filings = self.master.load(need)
        self.filings_since = need
        known = self._filings
        new = [f for f in filings if known.get(f.key) != f]
        known.update({f.key: f for f in new})
        return self.engine.add_filings(new)

    def _batch(self, rows: Sequence[tuple[Any, ...]]) -> PositionBatch:
        return _rows_batch(rows, self._phones)

    # -- worker thread: partitions

    def _balance(self) -> EngineResult | None:
        """Heartbeat; take or give up partitions toward this engine's share."""
        if self.engine is None:
            return None
        conn = self._lock_connection()
        if conn is None:
            return None
        try:
            engines = rule_log.heartbeat(
                conn, self.engine_id, sorted(self.parts), host=platform.node()
            )
            share = math.ceil(rule_log.PARTS / engines)
            changed: list[Any] = []
            before = sorted(self.parts)
            for part in sorted(self.parts, reverse=True)[: max(0, len(self.parts) - share)]:
                self._give_up(conn, part)
            for part in range(rule_log.PARTS):
                if len(self.parts) >= share:
                    break
                if part not in self.parts and rule_log.try_lock(conn, part):
                    changed.extend(self._take(conn, part).alerts)
            if sorted(self.parts) != before:
                logger.info(
                    "rules: engine %s judges %s of %s partitions (%s engine(s) running): %s",
                    self.engine_id,
                    len(self.parts),
                    rule_log.PARTS,
                    engines,
                    sorted(self.parts),
                )
        except psycopg.Error as exc:
            logger.warning("rules: partition balance failed: %s; judging nothing until back", exc)
            self._lost_locks()
            return None
        self.metrics.partitions.set(len(self.parts))
        return EngineResult(alerts=changed, trips_started=[], trips_ended=[]) if changed else None

    def _take(self, conn: psycopg.Connection[Any], part: int) -> EngineResult:
        engine = self.engine
        assert engine is not None
        saved = rule_log.load_states(conn, [part]).get(part)
        vehicles = self._vehicles_of(part)
        if saved is not None and saved[1] is not None:
            engine.import_state(_unpack(saved[1]))
        else:
            engine.resume(vehicles)
        self.parts[part] = saved[0] if saved is not None else 0
        self._refresh_judged()
        logger.debug("rules: judging partition %s from transaction %s", part, self.parts[part])
        return engine.reapply_filings(sorted(engine.registry[int(i)].id for i in vehicles))

    def _give_up(self, conn: psycopg.Connection[Any], part: int) -> None:
        engine = self.engine
        assert engine is not None
        vehicles = self._vehicles_of(part)
        state = _pack(engine.export_state(vehicles))
        rule_log.save_states(conn, self.engine_id, {part: (self.parts[part], state)})
        engine.forget(vehicles)
        del self.parts[part]
        self._refresh_judged()
        rule_log.unlock(conn, part)
        logger.debug("rules: partition %s handed over", part)

    def _save_if_due(self) -> None:
        moment = time.monotonic()
        if not self.parts or moment - self._saved_at < self.save_s:
            return
        self._save()
        self._saved_at = moment

    def _save(self) -> None:
        engine = self.engine
        conn = self._lock_connection()
        if engine is None or conn is None or not self.parts:
            return
        states = {
            part: (cursor, _pack(engine.export_state(self._vehicles_of(part))))
            for part, cursor in self.parts.items()
        }
        try:
            rule_log.save_states(conn, self.engine_id, states)
        except psycopg.Error as exc:
            logger.warning("rules: saving the judged state failed: %s", exc)
            self._lost_locks()

    def _leave(self) -> None:
        """Stopping: save every partition and let the others take them at once."""
        try:
            self._save()
            conn = self._locks
            if conn is not None and not conn.broken:
                rule_log.leave(conn, self.engine_id)
        except psycopg.Error as exc:
            logger.warning("rules: leaving: %s", exc)
        finally:
            self._lost_locks()
            self._close_data()

    def _lost_locks(self) -> None:
        """The lock connection is gone (or going): so are the partitions (others take them)."""
        if self.engine is not None:
            for part in list(self.parts):
                self.engine.forget(self._vehicles_of(part))
            self.engine.judged_ids = set()
        self.parts.clear()
        self.metrics.partitions.set(0)
        conn, self._locks = self._locks, None
        if conn is not None:
            conn.close()

    def _vehicles_of(self, part: int) -> np.ndarray[Any, Any]:
        engine = self.engine
        assert engine is not None
        if self._registry_seen is not engine.registry:
            by_part: dict[int, list[int]] = {}
            for phone, index in engine.registry.index_of_phone.items():
                by_part.setdefault(rule_log.part_of(phone), []).append(index)
            self._part_vehicles = {
                p: np.array(sorted(v), dtype=np.int64) for p, v in by_part.items()
            }
            self._registry_seen = engine.registry
            self._refresh_judged()
        return self._part_vehicles.get(part, np.zeros(0, dtype=np.int64))

    def _refresh_judged(self) -> None:
        """The engine's judged vehicles: those of the partitions held (after a change of
        partitions or of the registry)."""
        engine = self.engine
        assert engine is not None
        registry = engine.registry
        engine.judged_ids = {
            registry[int(i)].id for part in self.parts for i in self._vehicles_of(part).tolist()
        }

    # -- connections

    def _data_connection(self) -> psycopg.Connection[Any]:
        if self._data is None or self._data.closed or self._data.broken:
            self._data = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        return self._data

    def _close_data(self) -> None:
        conn, self._data = self._data, None
        if conn is not None:
            conn.close()

    def _lock_connection(self) -> psycopg.Connection[Any] | None:
        conn = self._locks
        if conn is not None and (conn.closed or conn.broken):
            self._lost_locks()
            conn = None
        if conn is None:
            try:
                conn = self._locks = psycopg.connect(
                    self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
                )
            except psycopg.Error as exc:
                logger.warning("rules: no lock connection: %s", exc)
                return None
            if self.engine is not None:
                self.engine.judged_ids = set()
        return conn


def _phone_forms(phone: str) -> list[str]:
    """The forms a terminal phone may be stored under: the one identity, and as the registry
    or a header before migration 9 had it."""
    try:
        return sorted({phone, canonical_phone(phone)})
    except PhoneError:
        return [phone]


def _pack(state: dict[str, np.ndarray[Any, Any]]) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **state)  # type: ignore[arg-type]  # the stub misreads **kwds
    return out.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _merge(first: EngineResult, second: EngineResult) -> EngineResult:
    return EngineResult(
        alerts=[*first.alerts, *second.alerts],
        trips_started=[*first.trips_started, *second.trips_started],
        trips_ended=[*first.trips_ended, *second.trips_ended],
        evaluated=first.evaluated + second.evaluated,
        late=first.late + second.late,
        ignored=first.ignored + second.ignored,
        rejudged=first.rejudged + second.rejudged,
    )


__all__ = ["CommittedRuleService", "RerunSummary", "RuleMetrics", "build_service", "rerun"]


def build_service(
    dsn: str,
    *,
    engine_id: str,
    rules_file: Path | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> tuple[CommittedRuleService, list[Callable[[], None]]]:
    """The rule engine of ``jt808 serve`` and ``jt808 rules run`` over the database at
    ``dsn``: alerts kept in the database (each change appended to the alert event log and
    NOTIFYd, so every node's stream shows it), trips in the trips table, master data from the
    master-data tables.  Also returns what to close when it stops."""
    from storage.alerts import AlertRepository  # noqa: PLC0415
    from tools.rules_db import DatabaseMasterData, DatabaseTripStore, load_rules_file  # noqa: PLC0415
    from tools.rules_service import RepositoryAlertStore  # noqa: PLC0415

    alert_repository = AlertRepository(dsn)
    trips = DatabaseTripStore(dsn)
    rules_config, calendar = load_rules_file(rules_file) if rules_file else (None, None)
    service = CommittedRuleService(
        dsn=dsn,
        engine_id=engine_id,
        metrics=RuleMetrics(metrics_registry),
        master=DatabaseMasterData(dsn),
        store=RepositoryAlertStore(alert_repository),
        trips=trips,
        publish=None,
        calendar=calendar,
        config=rules_config,
    )
    return service, [alert_repository.close, trips.close]


@dataclasses.dataclass(frozen=True, slots=True)
class RerunSummary:
    """What ``jt808 rules rerun`` did."""

    vehicles: int
    positions: int
    changes: dict[str, int]  # alert changes by resulting state
    trips: int


def rerun(
    dsn: str,
    start: datetime,
    end: datetime,
    *,
    unit: str | None = None,
    plate: str | None = None,
    rules_file: Path | None = None,
    progress: Callable[[str], None] | None = None,
    chunk_vehicles: int = 200,
) -> RerunSummary:
    """Judge the period ``[start, end)`` again from stored positions, filings and fences, for
    every vehicle (or those of ``unit`` / with ``plate``): what was found before is found
    again (deterministic ids: running it twice changes nothing), what the data and the
    filings now say is raised, and an open episode no longer found is closed as superseded.
    Blocking; meant for ``jt808 rules rerun``."""
    from alerts import RuleEngine, WorkingCalendar  # noqa: PLC0415
    from storage.alerts import AlertRepository  # noqa: PLC0415
    from tools.rules_db import DatabaseMasterData, DatabaseTripStore, load_rules_file  # noqa: PLC0415
    from tools.rules_service import RepositoryAlertStore  # noqa: PLC0415

    rules_config, calendar = load_rules_file(rules_file) if rules_file else (None, None)
    registry, fences, filings = DatabaseMasterData(dsn).load(start - FILINGS_MARGIN)
    chosen = [
        i
        for i, vehicle in enumerate(registry.vehicles)
        if vehicle.phone
        and (unit is None or vehicle.unit == unit)
        and (plate is None or vehicle.plate == plate)
    ]
    repository = AlertRepository(dsn)
    trips = DatabaseTripStore(dsn)
    changes: dict[str, int] = {}
    positions = trip_count = 0
    try:
        engine = RuleEngine(
            registry=registry,
            fences=fences,
            calendar=calendar or WorkingCalendar(),
            config=rules_config,
            store=RepositoryAlertStore(repository),
            filings=filings,
        )
        engine.judged_ids = {registry[i].id for i in chosen}
        index = PhoneIndex(registry)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            horizon = rule_log.horizon(conn)
            for first in range(0, len(chosen), chunk_vehicles):
                group = chosen[first : first + chunk_vehicles]
                phones = sorted({f for i in group for f in _phone_forms(registry[i].phone)})
                rows = rule_log.history(conn, phones, start, horizon, until=end)
                positions += len(rows)
                result = engine.rejudge(group, start, _rows_batch(rows, index), until=end)
                # Filings corrected since the alerts were raised apply to them now.
                filed = engine.reapply_filings(registry[i].id for i in group)
                for alert in [*result.alerts, *filed.alerts]:
                    changes[alert.state.value] = changes.get(alert.state.value, 0) + 1
                done = [*result.trips_started, *result.trips_ended]
                if done:
                    trips.put_trips(done)
                    trip_count += len(done)
                if progress is not None:
                    progress(
                        f"re-judged {min(first + chunk_vehicles, len(chosen))} of {len(chosen)} "
                        f"vehicle(s), {positions} position(s)"
                    )
    finally:
        repository.close()
        trips.close()
    return RerunSummary(len(chosen), positions, changes, trip_count)


def _rows_batch(rows: Sequence[tuple[Any, ...]], index: Callable[[str], int]) -> PositionBatch:
    """Log rows (:data:`storage.rule_log.LOG_COLUMNS`) as engine rows."""
    if not rows:
        return PositionBatch.from_arrays(
            vehicle=[], time=[], lon=[], lat=[], speed_kmh=[], status=[]
        )
    _, phones, time_s, received, lon, lat, speed, status, alarm, mileage = zip(*rows, strict=True)
    return PositionBatch.from_arrays(
        vehicle=np.array([index(phone) for phone in phones], dtype=np.int64),
        time=np.array(time_s, dtype=np.int64),
        received=np.array(received, dtype=np.int64),
        lon=np.array(lon, dtype=np.float64),
        lat=np.array(lat, dtype=np.float64),
        speed_kmh=np.array(speed, dtype=np.float64),
        status=np.array(status, dtype=np.uint32),
        alarm=np.array(alarm, dtype=np.uint32),
        mileage=np.array(mileage, dtype=np.int64),
    )
