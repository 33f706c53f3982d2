"""The rule service end to end in one process: a terminal drives, the server stores and tees the
positions to the rule engine, and the alert comes out of ``GET /alerts/stream``."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from alerts import Alert, Filing, InMemoryAlertStore, Registry, RuleEngine, Vehicle, WorkingCalendar
from alerts.calendar import GMT8
from ingest import (
    AlertFilter,
    InMemoryAlertFeed,
    InMemoryPositionSink,
    InMemoryTerminalRegistry,
    Metrics,
    PositionRecord,
    Server,
    ServerConfig,
)
from protocol.header import Edition, Header
from protocol.messages.location import ALARM_POWER_CUT, LocationReport
from tests.operator_auth import memory_access
from tests.terminal_client import Terminal
from tests.test_alerts_stream import Stream
from tools.rules_service import (
    RepositoryAlertStore,
    RuleService,
    StaticMasterData,
    TeeSink,
    records_to_batch,
)

CALENDAR = WorkingCalendar(years=range(2025, 2028))
CAR = Vehicle(id=101, phone="013800000001", plate="云A00001", unit="gov")
HOME_E6 = (102_710_000, 25_040_000)  # Kunming
STATUS_FIXED = 0b10
STATUS_ACC_FIXED = 0b11


def at(day: int, hour: int, minute: int = 0, *, month: int = 10) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=GMT8)


def holiday_drive(start: datetime | None = None) -> list[LocationReport]:
    """2026-10-03 (National Day; or from ``start``): parked 30 min, 5 km east at 40 km/h,
    parked an hour."""
    reports = []
    t = at(3, 9) if start is None else start
    lon = HOME_E6[0]
    for _ in range(3):
        reports.append(report(t, lon, speed_kmh=0, status=STATUS_FIXED))
        t += timedelta(minutes=10)
    for _ in range(15):  # 333 m per 30 s report
        lon += 3_300  # ~333 m at this latitude
        reports.append(report(t, lon, speed_kmh=40, status=STATUS_ACC_FIXED))
        t += timedelta(seconds=30)
    for _ in range(6):
        reports.append(report(t, lon, speed_kmh=0, status=STATUS_FIXED))
        t += timedelta(minutes=10)
    return reports


def report(
    when: datetime, lon_e6: int, *, speed_kmh: float, status: int, alarm: int = 0
) -> LocationReport:
    return LocationReport(
        alarm=alarm,
        status=status,
        latitude=HOME_E6[1],
        longitude=lon_e6,
        altitude_m=1890,
        speed=round(speed_kmh * 10),
        direction=90,
        time=when,
    )


@dataclass
class Node:
    server: Server
    rules: RuleService
    master: StaticMasterData
    feed: InMemoryAlertFeed
    sink: InMemoryPositionSink
    port: int
    http_port: int


@asynccontextmanager
async def node(master: StaticMasterData) -> AsyncIterator[Node]:
    feed = InMemoryAlertFeed()
    sink = InMemoryPositionSink()
    rules = RuleService(
        master=master,
        store=InMemoryAlertStore(),
        publish=feed.publish,
        calendar=CALENDAR,
        wall_clock=lambda: at(3, 12),
    )
    codes = (f"code{n}" for n in itertools.count(1))
    server = Server(
        ServerConfig(host="127.0.0.1", port=0, http_port=0, rules=True),
        sink=TeeSink(sink, rules),
        registry=InMemoryTerminalRegistry(),
        metrics=Metrics(CollectorRegistry()),
        new_auth_code=lambda: next(codes),
        alerts=feed,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await nursery.start(rules.run)
        (http_port,) = await nursery.start(server.operator_http(memory_access()).run)
        (port,) = await nursery.start(server.run)
        yield Node(server, rules, master, feed, sink, port, http_port)
        nursery.cancel_scope.cancel()


async def drive(port: int, phone: str, reports: list[LocationReport]) -> None:
    terminal = await Terminal.connect(port, phone)
    await terminal.login()
    for message in reports:
        await terminal.send(message)
        await terminal.receive()  # the ack: the position is stored
    await terminal.close()


async def test_holiday_drive_raises_holiday_sealing_on_the_stream_and_a_filing_resolves_it() -> (
    None
):
    master = StaticMasterData(Registry([CAR]))
    with trio.fail_after(20):
        async with node(master) as n:
            stream = await Stream.open(n.http_port, "/alerts/stream?rule=holiday_sealing&after=0")
            await drive(n.port, "13800000001", holiday_drive())
            ((seq, alert),) = await stream.events(1)
            assert alert["rule"] == "holiday_sealing"
            assert alert["state"] == "pending_backfill"
            assert (alert["plate"], alert["unit"], alert["phone"]) == (
                "云A00001",
                "gov",
                "013800000001",
            )
            assert alert["opened_at"] == "2026-10-03T09:30:00+08:00"  # device time
            assert alert["deadline"] == "2026-10-10T23:59:59+08:00"
            assert len(n.sink.records) == 24  # stored as well

            # A back-filing arrives in the master data: it takes effect without a restart.
            filing = Filing(
                id=7,
                vehicle=CAR.id,
                start=at(3, 9),
                end=at(3, 12),
                filed_at=at(5, 10),
                purpose="flood inspection",
            )
            master.replace(filings=[filing])
            assert await n.rules.reload()
            assert not await n.rules.reload()  # unchanged version: nothing to do
            ((seq2, resolved),) = await stream.events(1)
            assert seq2 > seq
            assert resolved["id"] == alert["id"]
            assert resolved["state"] == "resolved"
            assert resolved["detail"]["filing"] == 7
            await stream.aclose()


async def test_power_cut_raises_terminal_tamper_once_the_vehicle_is_known() -> None:
    master = StaticMasterData()  # the vehicle is not registered yet
    with trio.fail_after(20):
        async with node(master) as n:
            stream = await Stream.open(n.http_port, "/alerts/stream?after=0")
            cut = report(at(2, 8, month=11), HOME_E6[0], speed_kmh=0, status=STATUS_FIXED, alarm=0)
            await drive(n.port, "13800000001", [cut])
            # The ack waits for storage only; the rules evaluate on their own time.
            while n.rules.batches < 1:  # noqa: ASYNC110 - a counter of a worker thread
                await trio.sleep(0.01)
            assert await n.feed.last_seq() == 0  # unknown vehicle: no alert

            master.replace(registry=Registry([CAR]))
            assert await n.rules.reload()
            alarm = report(
                at(2, 8, 5, month=11),
                HOME_E6[0],
                speed_kmh=0,
                status=STATUS_FIXED,
                alarm=ALARM_POWER_CUT,
            )
            await drive(n.port, "13800000001", [alarm])
            ((_, alert),) = await stream.events(1)
            assert alert["rule"] == "terminal_tamper"
            assert alert["state"] == "open"
            assert alert["detail"]["alarm"] == "power_cut"
            assert alert["opened_at"] == "2026-11-02T08:05:00+08:00"
            await stream.aclose()


async def test_tick_publishes_deadline_violations() -> None:
    master = StaticMasterData(Registry([CAR]))
    with trio.fail_after(20):
        async with node(master) as n:
            await drive(n.port, "13800000001", holiday_drive())
            await n.feed.wait_for_new(0)
            n.rules.wall_clock = lambda: at(12, 0)  # past the 10-10 deadline
            await n.rules.tick()
            events = await n.feed.events_after(0, 10, AlertFilter())
            states = [(e["rule"], e["state"]) for _, e in events if e["rule"] == "holiday_sealing"]
            assert states == [
                ("holiday_sealing", "pending_backfill"),
                ("holiday_sealing", "violation"),
            ]


# ---------------------------------------------------------------------------------------------
# RepositoryAlertStore


class FakeRepository:
    """The alert repository's dict methods, in memory (what storage.alerts provides)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, dict[str, Any]]] = []

    def get(self, alert_id: str) -> dict[str, Any] | None:
        row = self.rows.get(alert_id)
        return None if row is None else dict(row)

    def put(self, alert: dict[str, Any]) -> int:
        self.rows[alert["id"]] = dict(alert)
        self.events.append((len(self.events) + 1, dict(alert)))
        return len(self.events)

    def open_alerts(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self.rows.values() if a["state"] == "open"]

    def due(self, now: datetime) -> list[dict[str, Any]]:
        return [
            dict(a)
            for a in self.rows.values()
            if a["state"] == "pending_backfill"
            and a["deadline"] is not None
            and datetime.fromisoformat(a["deadline"]) < now
        ]

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[dict[str, Any]]:
        return [
            dict(a)
            for a in self.rows.values()
            if a["vehicle"] == vehicle
            and a["rule"] in {"unfiled_trip", "holiday_sealing"}
            and opened_from <= datetime.fromisoformat(a["opened_at"]) <= opened_to
        ]


def test_repository_store_gives_the_same_alerts_as_the_in_memory_store() -> None:
    def run(store: Any) -> list[Alert]:
        engine = RuleEngine(registry=Registry([CAR]), fences=[], calendar=CALENDAR, store=store)
        records = [_record(r) for r in holiday_drive()]
        out = list(engine.process(records_to_batch(records, lambda phone: 0)).alerts)
        filing = Filing(id=7, vehicle=CAR.id, start=at(3, 9), end=at(3, 12), filed_at=at(5, 10))
        out += engine.add_filings([filing]).alerts
        return out

    repository = FakeRepository()
    store = RepositoryAlertStore(repository)
    via_repository = run(store)
    in_memory = run(InMemoryAlertStore())
    assert via_repository == in_memory
    assert [a.state.value for a in via_repository] == ["pending_backfill", "resolved"]
    assert store.last_seq == len(repository.events) == 2
    assert [e["state"] for _, e in repository.events] == ["pending_backfill", "resolved"]
    (only,) = repository.rows.values()
    assert Alert.from_json(only) == in_memory[-1]
    # A restarted engine on the same repository resumes instead of duplicating.
    assert store.get(only["id"]) == in_memory[-1]
    assert store.open_alerts() == []
    assert store.due(at(20, 0)) == []


def _record(message: LocationReport) -> PositionRecord:
    header = Header(msg_id=0x0200, body_length=28, phone="013800000001", serial=1)
    return PositionRecord(
        header=header,
        edition=Edition.V2013,
        location=message,
        batch_type=None,
        index=0,
        received_at=at(3, 12),
    )
