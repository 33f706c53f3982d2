"""The rule engine on the database: master data from the imported tables, alerts and their
events in PostgreSQL, the stream served from the event log."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from ingest import InMemoryPositionSink, InMemoryTerminalRegistry, Metrics, Server, ServerConfig
from storage import migrate
from storage.alerts import AlertRepository
from storage.masterdata import (
    filing_rows_from_csv,
    upsert_filings,
    upsert_vehicles,
    vehicle_rows_from_csv,
)
from tests.operator_auth import memory_access
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import Stream
from tests.test_rules_service import CALENDAR, at, drive, holiday_drive
from tools.rules_db import DatabaseAlertFeed, DatabaseMasterData
from tools.rules_service import RepositoryAlertStore, RuleService, TeeSink

pytestmark = pytest.mark.db

VEHICLES = "plate,phone,unit,category,exempt\n云A00001,13800000001,gov,retained,false\n"
BACKFILING = (
    "plate,start,end,destination,purpose,passengers,approver,filed_at\n"
    "云A00001,2026-10-03T09:00:00+08:00,2026-10-03T12:00:00+08:00,,flood inspection,2,Li,"
    "2026-10-05T10:00:00+08:00\n"
)


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
        upsert_vehicles(conn, vehicle_rows_from_csv(VEHICLES))
    return pg_schema_dsn


@asynccontextmanager
async def node(dsn: str) -> AsyncIterator[tuple[RuleService, int, int]]:
    def now() -> datetime:
        return at(3, 12)

    repository = AlertRepository(dsn)
    rules = RuleService(
        master=DatabaseMasterData(dsn, wall_clock=now),
        store=RepositoryAlertStore(repository),
        publish=None,
        calendar=CALENDAR,
        wall_clock=now,
    )
    feed = DatabaseAlertFeed(dsn)
    sink = InMemoryPositionSink()
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        ServerConfig(host="127.0.0.1", port=0, http_port=0, rules=True),
        sink=TeeSink(sink, rules),
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
        alerts=feed,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await nursery.start(rules.run)
            (http_port,) = await nursery.start(server.operator_http(memory_access()).run)
            (port,) = await nursery.start(server.run)
            yield rules, port, http_port
            nursery.cancel_scope.cancel()
    finally:
        feed.close()
        repository.close()


async def test_holiday_drive_alert_in_the_database_and_backfiling_resolves_it(db: str) -> None:
    with trio.fail_after(30):
        async with node(db) as (rules, port, http_port):
            stream = await Stream.open(http_port, "/alerts/stream?rule=holiday_sealing&after=0")
            await drive(port, "13800000001", holiday_drive())
            ((seq, alert),) = await stream.events(1)
            assert (alert["rule"], alert["state"]) == ("holiday_sealing", "pending_backfill")
            assert alert["deadline"] == "2026-10-10T23:59:59+08:00"

            with psycopg.connect(db, autocommit=True) as conn:
                upsert_filings(
                    conn, filing_rows_from_csv(BACKFILING, now=at(5, 10)), historical=True
                )
            assert await rules.reload()  # the import took effect without a restart
            ((seq2, resolved),) = await stream.events(1)
            assert seq2 > seq
            assert (resolved["id"], resolved["state"]) == (alert["id"], "resolved")
            await stream.aclose()
    with AlertRepository(db) as repository:
        stored = repository.get(alert["id"])
    assert stored is not None
    assert stored["state"] == "resolved"
