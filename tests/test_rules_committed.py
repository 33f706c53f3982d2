"""The rule engine judging committed positions (tools.rules_consumer, storage.rule_log): on by
default, one judge per vehicle whatever the deployment, late data judged, history re-judged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from alerts import WorkingCalendar
from protocol.header import Header
from protocol.messages.location import LocationBatch, LocationReport
from storage import position_row, rule_log
from storage.masterdata import (
    filing_rows_from_csv,
    upsert_filings,
    upsert_vehicles,
    vehicle_rows_from_csv,
)
from storage.pgstore import COPY_DIRECT, PgPositionStore
from storage.rows import COLUMN_TYPES
from tests.serving import http, serving
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal
from tests.test_rules_service import HOME_E6, STATUS_ACC_FIXED, STATUS_FIXED, at, report
from tools.rules_consumer import CommittedRuleService, build_service, rerun

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parent.parent
CALENDAR = WorkingCalendar(years=range(2025, 2028))


def vehicles_csv(count: int, first: int = 1) -> str:
    lines = ["plate,phone,unit,category,exempt"]
    lines += [f"云A{n:05d},138{n:08d},gov,retained,false" for n in range(first, first + count)]
    return "\n".join(lines) + "\n"


def phone_of(n: int) -> str:
    return f"138{n:08d}"


def wire(phone: str) -> str:
    return phone.rjust(12, "0")


def trip(day: datetime, *, minutes: int = 10) -> list[LocationReport]:
    """Parked 30 min, ``minutes`` of driving east at 40 km/h (a report every 30 s), parked an
    hour: one trip starting at ``day`` + 30 min."""
    reports = []
    t = day
    lon = HOME_E6[0]
    for _ in range(3):
        reports.append(report(t, lon, speed_kmh=0, status=STATUS_FIXED))
        t += timedelta(minutes=10)
    for _ in range(minutes * 2):
        lon += 3_300
        reports.append(report(t, lon, speed_kmh=40, status=STATUS_ACC_FIXED))
        t += timedelta(seconds=30)
    for _ in range(6):
        reports.append(report(t, lon, speed_kmh=0, status=STATUS_FIXED))
        t += timedelta(minutes=10)
    return reports


def parked(day: datetime, count: int = 4) -> list[LocationReport]:
    return [
        report(day + timedelta(minutes=10 * k), HOME_E6[0], speed_kmh=0, status=STATUS_FIXED)
        for k in range(count)
    ]


def setup(dsn: str, count: int = 1, filings: str | None = None, *, filed: datetime) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        upsert_vehicles(conn, vehicle_rows_from_csv(vehicles_csv(count)))
        if filings:
            # past periods' filings, as a former platform recorded them (their own times)
            upsert_filings(conn, filing_rows_from_csv(filings, now=filed), historical=True)


def alerts(dsn: str) -> list[tuple[str, str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, rule, state FROM alerts ORDER BY id").fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def trips(dsn: str) -> list[tuple[int, datetime]]:
    with psycopg.connect(dsn) as conn:
        return [
            (int(v), s)
            for v, s in conn.execute(
                "SELECT vehicle_id, started_at FROM trips ORDER BY vehicle_id, started_at"
            ).fetchall()
        ]


async def wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    """Poll the database (or an engine) until ``predicate()`` holds."""
    with trio.fail_after(timeout_s):
        while not await trio.to_thread.run_sync(predicate):  # noqa: ASYNC110 - polls the database
            await trio.sleep(0.2)


def store_positions(dsn: str, phone: str, reports: list[LocationReport], **kw: Any) -> None:
    """Store reports as the writer does (one transaction)."""
    header = Header(msg_id=0x0200, body_length=0, phone=wire(phone), serial=1)
    received = kw.get("received", datetime.now(UTC))
    rows = [position_row(header, r, received) for r in reports]
    store = PgPositionStore(dsn)
    try:
        store.write_rows(rows)
    finally:
        store.close()


async def send(port: int, phone: str, reports: list[LocationReport]) -> None:
    terminal = await Terminal.connect(port, phone)
    await terminal.login()
    for message in reports:
        await terminal.send(message)
        await terminal.receive()
    await terminal.close()


# ---------------------------------------------------------------------------------------------
# On by default


async def test_serve_without_flags_raises_holiday_sealing(db: str, tmp_path: Path) -> None:
    setup(db, filed=at(1, 8))
    async with serving(db, tmp_path) as app:
        await send(app.server.ports[0], phone_of(1), trip(at(3, 9)))
        await wait_for(lambda: any(rule == "holiday_sealing" for _, rule, _ in alerts(db)))
    ((alert_id, _, state),) = [a for a in alerts(db) if a[1] == "holiday_sealing"]
    assert alert_id.startswith(f"holiday_sealing:{wire(phone_of(1))}:20261003T09")
    assert state in ("pending_backfill", "violation")


async def test_a_terminal_moving_between_nodes_mid_trip_gives_one_trip_and_one_alert(
    db: str, tmp_path: Path
) -> None:
    """Two nodes (each with its engine) on one database; the terminal reconnects to the other
    node halfway through a holiday drive."""
    setup(db, filed=at(1, 8))
    reports = trip(at(3, 9), minutes=20)
    half = len(reports) // 2
    async with serving(db, tmp_path / "a") as first, serving(db, tmp_path / "b") as second:
        await send(first.server.ports[0], phone_of(1), reports[:half])
        await send(second.server.ports[0], phone_of(1), reports[half:])
        await wait_for(lambda: len(trips(db)) == 1 and len(alerts(db)) == 1)
        await trio.sleep(2 * 0.5 + 1)  # nothing more comes
        assert len(alerts(db)) == 1
        assert len(trips(db)) == 1


# ---------------------------------------------------------------------------------------------
# One judge per vehicle


@asynccontextmanager
async def engines(dsn: str, count: int, **kw: Any) -> AsyncIterator[list[CommittedRuleService]]:
    services: list[CommittedRuleService] = []
    closers: list[Any] = []
    async with trio.open_nursery() as nursery:
        for n in range(count):
            service, closing = build_service(
                dsn, engine_id=f"test-{n}", metrics_registry=CollectorRegistry()
            )
            service.calendar = CALENDAR
            service.balance_s = kw.get("balance_s", 0.3)
            service.poll_s = 0.1
            closers.extend(closing)
            await nursery.start(service.run)
            services.append(service)
        try:
            yield services
        finally:
            nursery.cancel_scope.cancel()
    for close in closers:
        close()


def fleet_traffic(dsn: str, count: int) -> None:
    """Vehicle n drives on 2026-10-03 (holiday) if n is odd, else on 2026-10-09 (a working
    day: an unfiled trip); stored one vehicle per transaction, in two halves."""
    for part in range(2):
        for n in range(1, count + 1):
            day = at(3, 9) if n % 2 else at(9, 9)
            reports = trip(day)
            half = len(reports) // 2
            store_positions(dsn, phone_of(n), reports[:half] if part == 0 else reports[half:])


async def judged_all(services: list[CommittedRuleService]) -> None:
    for service in services:
        service.caught_up = trio.Event()
    for service in services:
        with trio.fail_after(30):
            await service.caught_up.wait()


async def test_several_engines_share_the_vehicles_and_judge_as_one(
    pg_schema_dsn: str,  # noqa: F811
) -> None:
    from storage import migrate  # noqa: PLC0415

    single_dsn = pg_schema_dsn
    with psycopg.connect(single_dsn, autocommit=True) as conn:
        migrate(conn)
    setup(single_dsn, count=40, filed=at(1, 8))
    fleet_traffic(single_dsn, 40)
    async with engines(single_dsn, 1) as (alone,):
        await wait_for(lambda: len(alone.parts) == rule_log.PARTS)
        await judged_all([alone])
    expected = alerts(single_dsn)
    assert {rule for _, rule, _ in expected} == {"holiday_sealing", "unfiled_trip"}
    assert len(expected) == 40

    # The same traffic on a fresh schema, judged by four engines while it arrives.
    with psycopg.connect(single_dsn, autocommit=True) as conn:
        for table in ("alert_events", "alerts", "trips", "rule_state", "rule_engines"):
            conn.execute(f"DELETE FROM {table}")
        conn.execute("DELETE FROM positions")
    async with engines(single_dsn, 4) as four:
        await wait_for(lambda: sum(len(s.parts) for s in four) == rule_log.PARTS)
        await wait_for(lambda: all(len(s.parts) == rule_log.PARTS // 4 for s in four))
        owned = [set(s.parts) for s in four]
        assert set().union(*owned) == set(range(rule_log.PARTS))
        await trio.to_thread.run_sync(fleet_traffic, single_dsn, 40)
        await judged_all(four)
    assert alerts(single_dsn) == expected


def judged(service: CommittedRuleService) -> float:
    registry = service.metrics.registry
    assert registry is not None
    return registry.get_sample_value("jt808_rules_positions_judged_total") or 0.0


async def test_transactions_committing_out_of_order_are_all_judged(db: str) -> None:
    setup(db, count=2, filed=at(1, 8))
    rows = {}
    for n in (1, 2):
        header = Header(msg_id=0x0200, body_length=0, phone=wire(phone_of(n)), serial=1)
        rows[n] = [position_row(header, r, datetime.now(UTC)) for r in trip(at(9, 9))]
    # The day's partition (or TimescaleDB chunk) exists before the race: creating a chunk
    # holds a lock until its transaction commits, which would make the second writer wait
    # for the first for that reason instead.  Stored and removed in one transaction: no
    # engine ever sees the row.
    with psycopg.connect(db) as conn:
        with conn.cursor() as cur, cur.copy(COPY_DIRECT) as copy:
            copy.set_types(COLUMN_TYPES)
            copy.write_row(rows[1][0])
        conn.execute("DELETE FROM positions")
    async with engines(db, 1) as (engine,):
        await wait_for(lambda: len(engine.parts) == rule_log.PARTS)
        second = PgPositionStore(db)
        try:
            with psycopg.connect(db) as first, first.transaction():
                # The first writer stores first and commits last.
                with first.cursor() as cur, cur.copy(COPY_DIRECT) as copy:
                    copy.set_types(COLUMN_TYPES)
                    for row in rows[1]:
                        copy.write_row(row)
                await trio.to_thread.run_sync(second.write_rows, rows[2])
                await judged_all([engine])
                assert judged(engine) == 0  # the second waits behind the first, still open
            await wait_for(lambda: judged(engine) == len(rows[1]) + len(rows[2]))
        finally:
            second.close()
    assert sorted(rule for _, rule, _ in alerts(db)) == ["unfiled_trip", "unfiled_trip"]


# ---------------------------------------------------------------------------------------------
# Late data, device time, history


async def test_a_blind_area_upload_of_an_old_holiday_drive_raises_its_alert(
    db: str, tmp_path: Path
) -> None:
    setup(db, filed=at(1, 8))
    async with serving(db, tmp_path) as app:
        port = app.server.ports[0]
        await send(port, phone_of(1), parked(at(5, 9)))  # live, two days later: parked
        with trio.fail_after(30):
            while await judged_by(app.http_ports[0]) < 4:  # noqa: ASYNC110 - polls /metrics
                await trio.sleep(0.2)
        assert alerts(db) == []
        terminal = await Terminal.connect(port, phone_of(1))
        await terminal.login()
        await terminal.send(LocationBatch(batch_type=1, positions=tuple(trip(at(3, 9)))))
        await terminal.receive()
        await terminal.close()
        await wait_for(lambda: any(rule == "holiday_sealing" for _, rule, _ in alerts(db)))
    found = alerts(db)
    assert [rule for _, rule, _ in found].count("holiday_sealing") == 1
    # Old device times do not make a terminal that is being heard look offline now (the two
    # silent days between the drive and the live reports are, by the data, closed).
    assert all(state == "resolved" for _, rule, state in found if rule == "terminal_offline")


async def judged_by(http_port: int) -> float:
    """``jt808_rules_positions_judged_total`` from a node's ``/metrics``."""
    status, text = await http(http_port, "GET", "/metrics")
    assert status == 200
    for line in str(text).splitlines():
        if line.startswith("jt808_rules_positions_judged_total "):
            return float(line.split()[1])
    return 0.0


async def test_traffic_of_september_judged_in_december_finds_septembers_filings(
    db: str,
) -> None:
    filing = (
        "plate,start,end,destination,purpose,passengers,approver,filed_at\n"
        "云A00001,2026-09-15T08:00:00+08:00,2026-09-15T18:00:00+08:00,,inspection,2,Li,"
        "2026-09-14T10:00:00+08:00\n"
    )
    setup(db, count=2, filings=filing, filed=datetime(2026, 9, 14, 10, tzinfo=UTC))
    day = datetime(2026, 9, 15, 9, tzinfo=at(1, 0).tzinfo)
    store_positions(db, phone_of(1), trip(day))  # filed
    store_positions(db, phone_of(2), trip(day))  # not filed
    async with engines(db, 1) as (engine,):
        await wait_for(lambda: len(engine.parts) == rule_log.PARTS)
        await judged_all([engine])
    ((alert_id, rule, _),) = alerts(db)
    assert rule == "unfiled_trip"
    assert f":{wire(phone_of(2))}:" in alert_id


async def test_a_killed_engine_restarted_judges_everything_once(db: str) -> None:
    setup(db, count=20, filed=at(1, 8))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tools.cli", "rules", "run", "--dsn", db]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)

    engine = await trio.to_thread.run_sync(start)
    try:
        await trio.to_thread.run_sync(fleet_traffic, db, 10)
        await wait_for(lambda: len(alerts(db)) >= 1)
        engine.send_signal(signal.SIGKILL)
        engine.wait(10)
        for n in range(11, 21):  # arrives while no engine runs
            store_positions(db, phone_of(n), trip(at(3, 9) if n % 2 else at(9, 9)))
        engine = await trio.to_thread.run_sync(start)
        await wait_for(lambda: len(alerts(db)) == 20, timeout_s=60)
        await trio.sleep(1.5)
        assert len(alerts(db)) == 20
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(20)
    with psycopg.connect(db) as conn:
        events = conn.execute(
            "SELECT alert_id, count(*) FROM alert_events "
            "WHERE alert->>'state' IN ('open', 'pending_backfill') GROUP BY 1"
        ).fetchall()
    assert len(events) == 20
    assert all(count == 1 for _, count in events)  # each alert opened once, never again


def test_rerun_of_a_past_period_is_idempotent_and_sees_corrected_filings(db: str) -> None:
    setup(db, count=2, filed=at(1, 8))
    store_positions(db, phone_of(1), trip(at(9, 9)))
    store_positions(db, phone_of(2), trip(at(9, 9)))
    start, end = at(9, 0), at(10, 0)
    first = rerun(db, start, end)
    assert first.vehicles == 2
    assert sorted(rule for _, rule, _ in alerts(db)) == ["unfiled_trip", "unfiled_trip"]
    again = rerun(db, start, end)
    assert sum(again.changes.values()) == 0  # idempotent
    # A filing for vehicle 1 was corrected (filed in time, before the deadline), as the
    # records of a former platform show it.
    filing = (
        "plate,start,end,destination,purpose,passengers,approver,filed_at\n"
        "云A00001,2026-10-09T08:00:00+08:00,2026-10-09T18:00:00+08:00,,inspection,2,Li,"
        "2026-10-10T10:00:00+08:00\n"
    )
    with psycopg.connect(db, autocommit=True) as conn:
        upsert_filings(conn, filing_rows_from_csv(filing, now=at(10, 10)), historical=True)
    after = rerun(db, start, end, plate="云A00001")
    assert after.vehicles == 1
    states = {alert_id.split(":")[1]: state for alert_id, _, state in alerts(db)}
    assert states[wire(phone_of(1))] == "resolved"
    assert states[wire(phone_of(2))] == "pending_backfill"
