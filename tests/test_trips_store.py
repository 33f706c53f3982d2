"""Trips the rule service detects go to its trip store (the trips table in production), and
positions still queued at shutdown are evaluated before the service stops."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from alerts import InMemoryAlertStore, Registry
from ingest import InMemoryPositionSink, InMemoryTerminalRegistry, Metrics, Server, ServerConfig
from storage import TripRepository, migrate
from storage.masterdata import upsert_vehicles, vehicle_rows_from_csv
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_rules_service import CALENDAR, CAR, _record, at, drive, holiday_drive
from tools.rules_db import DatabaseMasterData, DatabaseTripStore
from tools.rules_service import InMemoryTripStore, RuleService, StaticMasterData, TeeSink, TripStore


@asynccontextmanager
async def node(rules: RuleService) -> AsyncIterator[int]:
    sink = InMemoryPositionSink()
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        ServerConfig(host="127.0.0.1", port=0, http_port=0, rules=True),
        sink=TeeSink(sink, rules),
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await nursery.start(rules.run)
        (port,) = await nursery.start(server.run)
        yield port
        await rules.drain()
        nursery.cancel_scope.cancel()


def service(master: DatabaseMasterData | StaticMasterData, trips: TripStore) -> RuleService:
    def now() -> datetime:
        return at(3, 12)

    return RuleService(
        master=master,
        store=InMemoryAlertStore(),
        trips=trips,
        calendar=CALENDAR,
        wall_clock=now,
    )


async def test_a_drive_stores_its_trip_started_and_ended() -> None:
    trips = InMemoryTripStore()
    rules = service(StaticMasterData(Registry([CAR])), trips)
    with trio.fail_after(20):
        async with node(rules) as port:
            await drive(port, "13800000001", holiday_drive())
    (trip,) = trips.trips.values()
    assert (trip.vehicle, trip.phone) == (CAR.id, CAR.phone)
    assert trip.started_at == at(3, 9, 30)  # device time
    assert trip.ended_at is not None
    assert trip.distance_km is not None
    assert 4 < trip.distance_km < 6


async def test_drain_evaluates_what_is_still_queued() -> None:
    trips = InMemoryTripStore()
    rules = service(StaticMasterData(Registry([CAR])), trips)
    records = [_record(message) for message in holiday_drive()]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rules.run)
            for record in records:  # queued faster than evaluated: one batch each
                await rules.submit([record])
            await rules.drain()
            assert rules.batches == len(records)
            await rules.submit(records[:1])  # after drain: dropped, not an error
            assert rules.batches == len(records)
    assert len(trips.trips) == 1


async def test_a_failing_trip_store_does_not_stop_the_rules() -> None:
    class Broken:
        def put_trips(self, trips: object) -> None:
            raise RuntimeError("disk full")

    rules = service(StaticMasterData(Registry([CAR])), Broken())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rules.run)
            await rules.submit([_record(m) for m in holiday_drive()])
            await rules.drain()
    assert (rules.batches, rules.failures) == (1, 0)
    assert rules.trip_failures >= 1


@pytest.mark.db
async def test_trips_are_upserted_into_the_trips_table(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
        upsert_vehicles(
            conn,
            vehicle_rows_from_csv(
                "plate,phone,unit,category,exempt\n云A00001,13800000001,gov,retained,false\n"
            ),
        )
        row = conn.execute("SELECT id FROM vehicles").fetchone()
    assert row is not None
    vehicle_id = int(row[0])
    store = DatabaseTripStore(pg_schema_dsn)
    rules = service(DatabaseMasterData(pg_schema_dsn, wall_clock=lambda: at(3, 12)), store)
    try:
        with trio.fail_after(30):
            async with node(rules) as port:
                await drive(port, "13800000001", holiday_drive())
        # A replay of the same drive finds the same row (keyed by device start time).
        rules = service(DatabaseMasterData(pg_schema_dsn, wall_clock=lambda: at(3, 12)), store)
        with trio.fail_after(30):
            async with node(rules) as port:
                await drive(port, "13800000001", holiday_drive())
    finally:
        store.close()
    with TripRepository(pg_schema_dsn) as repository:
        (trip,) = repository.trips(vehicle_id)
        assert repository.trips(since=at(3, 10)) == []
    assert trip["started_at"] == at(3, 9, 30)
    assert trip["ended_at"] is not None
    assert trip["phone"] == "013800000001"  # the vehicle's, in the one phone identity
    assert trip["distance_source"] in ("mileage", "track")
    assert 4 < trip["distance_km"] < 6
