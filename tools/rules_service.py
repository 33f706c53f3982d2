"""The rule engine as a service of the server: positions in, alert events out (wiring).

This module joins ``ingest`` (position records, the alert feed) and ``alerts`` (the pure rule
engine); neither package knows the other.

* :class:`TeeSink` -- the ``ingest.PositionSink`` given to the server: every batch goes to the
  storage sink *and* to the :class:`RuleService`.  The acknowledgement depends only on the
  storage sink's completion.  When the rule service's queue is full, ``submit`` waits: the
  connection stops reading, exactly as it does when storage is slow (back-pressure, rather
  than dropping positions the rules must see or buffering without bound).
* :class:`RuleService` -- ``async run(*, task_status)``: takes batches from its bounded queue,
  converts them to :class:`alerts.PositionBatch` (device time, not arrival time, so back-filled
  0x0704 reports raise what they would have raised live), evaluates them in a worker thread
  (one at a time: the engine is not thread-safe), keeps alerts in an :class:`alerts.AlertStore`
  and hands each changed alert to ``publish`` (the node's alert feed).  Every ``tick_s`` it
  advances the engine's clock (deadlines, silent terminals); every ``reload_s`` it asks the
  :class:`MasterData` source for its version and reloads vehicles, fences and filings when it
  changed, so master-data changes take effect without a restart.  Trips the engine detects
  (started and ended) go to a :class:`TripStore` (the database's trips table) from the same
  worker thread.  :meth:`RuleService.drain` stops taking batches, evaluates the ones still
  queued and returns (graceful shutdown).
* :class:`MasterData` -- the source of vehicles, fences and filings; :class:`StaticMasterData`
  is the in-memory one (tests, nodes without a database).
* :class:`TripStore` -- where trips go; :class:`InMemoryTripStore` keeps them in a dict.
* :class:`RepositoryAlertStore` -- :class:`alerts.AlertStore` over a repository that keeps
  alerts as JSON dicts (the database's ``AlertRepository``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import trio

from alerts import (
    Alert,
    AlertStore,
    EngineResult,
    Filing,
    PositionBatch,
    Registry,
    RuleEngine,
    RulesConfig,
    WorkingCalendar,
)
from alerts.engine import TripRecord
from geofence import Fence
from ingest.interfaces import Completion, PositionRecord, PositionSink
from protocol.batch import MILEAGE_ABSENT, TIME_ABSENT
from protocol.messages.location import Mileage
from protocol.phone import PhoneError, canonical_phone

__all__ = [
    "AlertRepository",
    "InMemoryTripStore",
    "MasterData",
    "PhoneIndex",
    "RepositoryAlertStore",
    "RuleService",
    "StaticMasterData",
    "TeeSink",
    "TripStore",
    "records_to_batch",
]

logger = logging.getLogger(__name__)

# Batches waiting for the engine.  A batch is one message's positions (one 0x0200, or a 0x0704
# of up to a few dozen); 1024 batches is a few seconds of a 10 000-terminal fleet, enough to
# ride out one slow evaluation (a master-data reload) before the server feels back-pressure.
QUEUE_BATCHES = 1024
# Batches evaluated in one worker-thread call when several are waiting: amortises the thread
# hop and the engine's per-call sorting while keeping one call under ~100 ms.
COALESCE_BATCHES = 256
# Deadlines are whole days and the offline threshold is minutes: a minute's resolution is
# plenty (the issue: "every 60 s").
TICK_S = 60.0
# How often the master-data version is polled: a new filing or fence takes effect within this.
RELOAD_S = 10.0

Publish = Callable[[Mapping[str, Any]], object]


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------------
# Master data


class MasterData(Protocol):
    """Where vehicles, fences and filings come from.  Both methods are blocking (they run in a
    worker thread) and may raise on a broken source (the service then keeps the old data)."""

    def version(self) -> int:
        """A number that changes whenever anything :meth:`load` returns changes."""
        ...

    def load(
        self, filings_since: datetime | None = None
    ) -> tuple[Registry, Sequence[Fence], Sequence[Filing]]:
        """The current vehicles (in a stable order: new vehicles are appended, so indices
        keep their vehicle), fences, and the filings that count: those ending at or after
        ``filings_since`` (device time of the oldest data to be judged; None: the source's
        default window)."""
        ...


class StaticMasterData:
    """In-memory :class:`MasterData`; :meth:`replace` changes it and bumps the version."""

    def __init__(
        self,
        registry: Registry | None = None,
        fences: Sequence[Fence] = (),
        filings: Sequence[Filing] = (),
    ) -> None:
        self._data = (registry or Registry(()), tuple(fences), tuple(filings))
        self._version = 1

    def version(self) -> int:
        return self._version

    def load(
        self, filings_since: datetime | None = None
    ) -> tuple[Registry, Sequence[Fence], Sequence[Filing]]:
        return self._data

    def replace(
        self,
        *,
        registry: Registry | None = None,
        fences: Sequence[Fence] | None = None,
        filings: Sequence[Filing] | None = None,
    ) -> None:
        old_registry, old_fences, old_filings = self._data
        self._data = (
            old_registry if registry is None else registry,
            old_fences if fences is None else tuple(fences),
            old_filings if filings is None else tuple(filings),
        )
        self._version += 1


# ---------------------------------------------------------------------------------------------
# Trips


class TripStore(Protocol):
    """Where detected trips go.  Blocking (called from the rule service's worker thread); a
    trip comes once when it starts (``ended_at`` None) and again when it ends, keyed by
    (vehicle, started_at).  May raise: the service logs it and goes on."""

    def put_trips(self, trips: Sequence[TripRecord]) -> None: ...


class InMemoryTripStore:
    """:class:`TripStore` in a dict keyed by (vehicle, started_at); an end replaces the
    start's record."""

    def __init__(self) -> None:
        self.trips: dict[tuple[int, datetime], TripRecord] = {}

    def put_trips(self, trips: Sequence[TripRecord]) -> None:
        for trip in trips:
            old = self.trips.get((trip.vehicle, trip.started_at))
            if old is not None and old.ended_at is not None and trip.ended_at is None:
                continue  # an end once seen is not taken back by a resent start
            self.trips[(trip.vehicle, trip.started_at)] = trip


# ---------------------------------------------------------------------------------------------
# Alert store over a repository of JSON dicts


class AlertRepository(Protocol):
    """The part of ``storage.alerts.AlertRepository`` the store needs (alerts as the dicts of
    ``Alert.to_json``).  ``put`` returns the event's sequence number."""

    def get(self, alert_id: str) -> dict[str, Any] | None: ...

    def put(self, alert: dict[str, Any]) -> int: ...

    def open_alerts(self) -> list[dict[str, Any]]: ...

    def due(self, now: datetime) -> list[dict[str, Any]]: ...

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[dict[str, Any]]: ...


class RepositoryAlertStore:
    """:class:`alerts.AlertStore` over an :class:`AlertRepository`.

    Blocking, like the repository: the engine calls it from the rule service's worker thread.
    ``last_seq`` is the sequence number of the latest ``put`` (the repository appends an event
    per put, which is what the database's alert feed streams).
    """

    def __init__(self, repository: AlertRepository) -> None:
        self.repository = repository
        self.last_seq = 0

    def get(self, alert_id: str) -> Alert | None:
        found = self.repository.get(alert_id)
        return None if found is None else Alert.from_json(found)

    def put(self, alert: Alert) -> None:
        self.last_seq = self.repository.put(alert.to_json())

    def open_alerts(self) -> list[Alert]:
        return [Alert.from_json(a) for a in self.repository.open_alerts()]

    def due(self, now: datetime) -> list[Alert]:
        return [Alert.from_json(a) for a in self.repository.due(now)]

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[Alert]:
        found = self.repository.backfill_alerts(vehicle, opened_from, opened_to)
        return [Alert.from_json(a) for a in found]


# ---------------------------------------------------------------------------------------------
# Positions


def records_to_batch(
    records: Iterable[PositionRecord], index_of_phone: Callable[[str], int]
) -> PositionBatch:
    """Position records as engine rows: device time (POSIX seconds, ``TIME_ABSENT`` if the
    report had none), signed degrees, km/h, the status and alarm words, item 0x01 mileage."""
    rows = list(records)
    mileage = []
    for record in rows:
        item = record.location.find(Mileage)
        mileage.append(item.value if isinstance(item, Mileage) else MILEAGE_ABSENT)
    return PositionBatch.from_arrays(
        vehicle=np.array([index_of_phone(r.phone) for r in rows], dtype=np.int64),
        time=np.array(
            [
                TIME_ABSENT if r.location.time is None else int(r.location.time.timestamp())
                for r in rows
            ],
            dtype=np.int64,
        ),
        lon=np.array([r.location.lon for r in rows], dtype=np.float64),
        lat=np.array([r.location.lat for r in rows], dtype=np.float64),
        speed_kmh=np.array([r.location.speed_kmh for r in rows], dtype=np.float64),
        status=np.array([r.location.status for r in rows], dtype=np.uint32),
        alarm=np.array([r.location.alarm for r in rows], dtype=np.uint32),
        mileage=np.array(mileage, dtype=np.int64),
    )


class PhoneIndex:
    """Phone -> registry index, by the one phone identity (:func:`protocol.phone.
    canonical_phone`): a 2013 (12-digit) and a 2019 (20-digit) header phone of the same
    terminal find the same vehicle; a phone that is not one finds none (-1)."""

    def __init__(self, registry: Registry) -> None:
        self._index: dict[str, int] = {}
        for phone, index in registry.index_of_phone.items():
            with contextlib.suppress(PhoneError):
                self._index[canonical_phone(phone)] = index

    def __call__(self, phone: str) -> int:
        try:
            return self._index.get(canonical_phone(phone), -1)
        except PhoneError:
            return -1


class TeeSink:
    """A :class:`ingest.PositionSink` that stores through ``primary`` and also feeds ``rules``.

    The completion returned is the primary's alone: the terminal's acknowledgement waits only
    for storage.  ``rules.submit`` may wait when the rule service's queue is full (see the
    module docstring); a rule service that has stopped is skipped.
    """

    def __init__(self, primary: PositionSink, rules: RuleService) -> None:
        self._primary = primary
        self._rules = rules

    async def submit(self, records: Sequence[PositionRecord]) -> Completion:
        completion = await self._primary.submit(records)
        await self._rules.submit(records)
        return completion

    def submit_nowait(self, records: Sequence[PositionRecord]) -> Completion | None:
        """Both without waiting, or neither (None) when either would have to wait."""
        submit = getattr(self._primary, "submit_nowait", None)
        if submit is None or not self._rules.has_room():
            return None
        completion: Completion | None = submit(records)
        if completion is not None:
            self._rules.submit_nowait(records)
        return completion


# ---------------------------------------------------------------------------------------------
# The service


class RuleService:
    """Runs a :class:`alerts.RuleEngine` on the positions the server receives.

    ``master`` gives vehicles, fences and filings; ``store`` keeps the alerts (the engine's
    :class:`alerts.InMemoryAlertStore` if None); ``trips`` receives detected trips (dropped
    if None); ``publish`` receives every created or changed
    alert as JSON, in the order the engine reports them (an ``InMemoryAlertFeed.publish``; None
    when the store itself publishes, as the database does with NOTIFY).  ``wall_clock`` is the
    time given to :meth:`alerts.RuleEngine.tick`.  Start :meth:`run` with ``nursery.start``.
    """

    def __init__(
        self,
        *,
        master: MasterData,
        store: AlertStore | None = None,
        trips: TripStore | None = None,
        publish: Publish | None = None,
        calendar: WorkingCalendar | None = None,
        config: RulesConfig | None = None,
        hold_s: int = 0,
        wall_clock: Callable[[], datetime] = _utc_now,
        tick_s: float = TICK_S,
        reload_s: float = RELOAD_S,
        queue_batches: int = QUEUE_BATCHES,
    ) -> None:
        self.master = master
        self.store = store
        self.trips = trips
        self.publish = publish
        self.calendar = calendar
        self.config = config
        self.hold_s = hold_s
        self.wall_clock = wall_clock
        self.tick_s = tick_s
        self.reload_s = reload_s
        self.engine: RuleEngine | None = None
        self.version: int | None = None
        self.batches = 0  # batches evaluated
        self.failures = 0  # evaluations that raised (logged, batch skipped)
        self.trip_failures = 0  # trip writes that raised (logged, trips not stored)
        self.running = False
        self.dropped = 0  # positions submitted while the service was not running
        # Filings are loaded from the device time of the oldest data judged so far on (None:
        # the master-data source's default window); see CommittedRuleService.
        self.filings_since: datetime | None = None
        self._drained = trio.Event()
        self._phones = PhoneIndex(Registry(()))
        # what the engine holds, by (filing, version), to apply changes only
        self._filings: dict[tuple[int, int], Filing] = {}
        self._limiter = trio.CapacityLimiter(1)  # the engine is not thread-safe
        self._send, self._receive = trio.open_memory_channel[Sequence[PositionRecord]](
            queue_batches
        )

    def has_room(self) -> bool:
        """True if :meth:`submit_nowait` takes a batch now."""
        return (
            not self.running
            or self._send.statistics().current_buffer_used < self._send.statistics().max_buffer_size
        )

    def submit_nowait(self, records: Sequence[PositionRecord]) -> None:
        """:meth:`submit` when :meth:`has_room` said so (a full queue drops and counts)."""
        if not self.running:
            self._drop(records)
            return
        try:
            self._send.send_nowait(records)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self.dropped += len(records)

    async def submit(self, records: Sequence[PositionRecord]) -> None:
        """Queue a batch; waits while the queue is full.  Dropped (and counted) while the
        service is not running -- before it started, or between a failure and its restart --
        so that a failing rule engine never holds up storage and acknowledgements."""
        if not self.running:
            self._drop(records)
            return
        try:
            await self._send.send(records)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("rule service stopped: %s position(s) not evaluated", len(records))

    def _drop(self, records: Sequence[PositionRecord]) -> None:
        if not self.dropped:
            logger.warning("rule service not running: positions are not evaluated")
        self.dropped += len(records)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load master data, then evaluate until cancelled; reports readiness once loaded.

        May be run again after it failed (the queue outlives a run)."""
        await trio.to_thread.run_sync(self._start, limiter=self._limiter)
        try:
            self.running = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ticker)
                nursery.start_soon(self._reloader)
                task_status.started()
                await self._consume()
                # drain() closed the queue and everything in it was evaluated.
                self._drained.set()
                nursery.cancel_scope.cancel()
        finally:
            self.running = False

    async def run_after(
        self, ready: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """:meth:`run` once ``ready`` is set (the schema is current); reports itself started
        at once, so the server does not wait for its database to come up."""
        task_status.started()
        await ready.wait()
        await self.run()

    async def _consume(self) -> None:
        async for first in self._receive:
            batches = [first]
            while len(batches) < COALESCE_BATCHES:
                try:
                    batches.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):  # EndOfChannel: drained
                    break
            result = await trio.to_thread.run_sync(self._evaluate, batches, limiter=self._limiter)
            self._publish(result)

    async def drain(self) -> None:
        """Stop taking batches (later ``submit`` calls drop theirs), evaluate the ones still
        queued, and return once :meth:`run` has finished them (and returned).  The caller
        bounds the wait; cancelling it leaves the rest unevaluated."""
        await self._send.aclose()
        await self._drained.wait()

    async def tick(self) -> None:
        """Advance the engine's clock to ``wall_clock()`` now (the periodic task does this)."""
        result = await trio.to_thread.run_sync(self._tick, self.wall_clock(), limiter=self._limiter)
        self._publish(result)

    async def reload(self) -> bool:
        """Reload master data if its version changed (the periodic task does this); True if
        it did."""
        result = await trio.to_thread.run_sync(self._reload, limiter=self._limiter)
        if result is None:
            return False
        self._publish(result)
        return True

    # -- trio side

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.tick_s)
            await self.tick()

    async def _reloader(self) -> None:
        while True:
            await trio.sleep(self.reload_s)
            await self.reload()

    def _publish(self, result: EngineResult | None) -> None:
        if result is None or self.publish is None:
            return
        for alert in result.alerts:
            self.publish(alert.to_json())

    # -- worker thread (one at a time, under the limiter)

    def _start(self) -> None:
        if self.calendar is None:
            self.calendar = WorkingCalendar()
        version = self.master.version()
        registry, fences, filings = self.master.load(self.filings_since)
        self._build(registry, fences, filings)
        self.version = version

    def _build(
        self, registry: Registry, fences: Sequence[Fence], filings: Sequence[Filing]
    ) -> None:
        assert self.calendar is not None
        self.engine = RuleEngine(
            registry=registry,
            fences=fences,
            calendar=self.calendar,
            config=self.config,
            store=self.store,
            filings=filings,
            hold_s=self.hold_s,
        )
        self.store = self.engine.store  # keep the same store across rebuilds
        self._phones = PhoneIndex(registry)
        self._filings = {f.key: f for f in filings}
        logger.info(
            "rules: %s vehicle(s), %s fence(s), %s filing(s)",
            len(registry),
            len(fences),
            len(filings),
        )

    def _evaluate(self, batches: list[Sequence[PositionRecord]]) -> EngineResult | None:
        engine = self.engine
        assert engine is not None
        try:
            batch = records_to_batch((r for b in batches for r in b), self._phones)
            result = engine.process(batch)
        except Exception:
            # A bug in a rule must not stop ingestion: the positions are stored regardless.
            self.failures += 1
            logger.exception("rules: evaluating %s batch(es) failed", len(batches))
            return None
        self.batches += len(batches)
        self._store_trips(result)
        return result

    def _tick(self, now: datetime) -> EngineResult | None:
        assert self.engine is not None
        try:
            result = self.engine.tick(now)
        except Exception:
            self.failures += 1
            logger.exception("rules: tick at %s failed", now.isoformat())
            return None
        self._store_trips(result)
        return result

    def _store_trips(self, result: EngineResult) -> None:
        trips = [*result.trips_started, *result.trips_ended]
        if self.trips is None or not trips:
            return
        try:
            self.trips.put_trips(trips)
        except Exception:
            # Alerts were judged and stored regardless; the trips of this call are lost.
            self.trip_failures += 1
            logger.exception("rules: storing %s trip record(s) failed", len(trips))

    def _reload(self) -> EngineResult | None:
        engine = self.engine
        assert engine is not None
        try:
            version = self.master.version()
            if version == self.version:
                return None
            registry, fences, filings = self.master.load(self.filings_since)
        except Exception:
            logger.exception("rules: master data could not be read; keeping the old")
            return None
        try:
            engine.set_registry(registry)
            self._phones = PhoneIndex(registry)
        except ValueError as exc:
            # Vehicles were removed or reordered: the engine cannot map its per-vehicle state
            # onto the new order.  Start a fresh engine on the same store (it resumes the open
            # episodes from there; trips in progress start over).
            logger.warning("rules: %s; rebuilding the engine", exc)
            self._build(registry, fences, filings)
            self.version = version
            return None
        engine.set_fences(fences)
        new = {f.key: f for f in filings}
        old = self._filings
        engine.remove_filings([key for key in old if key not in new])
        result = engine.add_filings([f for key, f in new.items() if old.get(key) != f])
        self._filings = new
        self.version = version
        logger.info(
            "rules: master data version %s: %s vehicle(s), %s fence(s), %s filing(s)",
            version,
            len(registry),
            len(fences),
            len(filings),
        )
        return result
