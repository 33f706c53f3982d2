"""Master data over the operator port: ``/vehicles``, ``/fences``, ``/filings`` with the
in-memory admin, the JSON row checks of ``storage.masterdata``, and the database adapter: a
POSTed back-filing resolves a pending alert without a restart."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import h11
import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from alerts.calendar import GMT8, SealingPeriod, WorkingCalendar
from ingest import (
    AlertFilter,
    InMemoryMasterDataAdmin,
    InMemoryPositionSink,
    InMemoryTerminalRegistry,
    MasterDataAdmin,
    Metrics,
    OperatorHttp,
    Server,
    ServerConfig,
)
from ingest.interfaces import AlertVocabulary
from storage import migrate
from storage.alerts import AlertRepository
from storage.masterdata import (
    MasterDataError,
    filing_rows_from_json,
    upsert_vehicles,
    vehicle_rows_from_csv,
    vehicle_rows_from_json,
)
from storage.reports_violations import backfilling_by_unit
from tests.operator_auth import AUTH_HEADER, memory_access
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import Stream
from tests.test_rules_service import CALENDAR, at, drive, holiday_drive
from tools.rules_db import DatabaseAlertFeed, DatabaseMasterData, DatabaseMasterDataAdmin
from tools.rules_service import RepositoryAlertStore, RuleService, TeeSink

VEHICLE = {
    "plate": "云A00001",
    "phone": "13800000001",
    "unit": "gov",
    "category": "retained",
    "exempt": False,
}
FILING = {
    "plate": "云A00001",
    "start": "2026-10-03T09:00:00+08:00",
    "end": "2026-10-03T12:00:00+08:00",
    "destination": None,
    "purpose": "flood inspection",
    "passengers": 2,
    "approver": "Li",
}
FENCES = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [102.71, 25.04]},
            "properties": {"name": "depot", "kind": "parking", "radius_m": 300},
        }
    ],
}


async def call(
    port: int, method: str, target: str, body: Any = None, *, raw: bytes | None = None
) -> tuple[int, Any]:
    """One request; the status and the decoded JSON answer."""
    data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    headers = [("host", "test"), ("content-length", str(len(data))), AUTH_HEADER]
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    out += conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage())
    await stream.send_all(out)
    status, answer = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            answer += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
    await stream.aclose()
    return status, json.loads(answer)


@asynccontextmanager
async def operator_port(admin: MasterDataAdmin | None) -> AsyncIterator[int]:
    http = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        healthy=lambda: True,
        access=memory_access(),
        masterdata=admin,
    )
    async with trio.open_nursery() as nursery:
        (port,) = await nursery.start(http.run)
        yield port
        nursery.cancel_scope.cancel()


def memory_admin() -> InMemoryMasterDataAdmin:
    return InMemoryMasterDataAdmin(wall_clock=lambda: at(5, 10))


async def test_post_and_get_vehicles_fences_and_filings() -> None:
    admin = memory_admin()
    with trio.fail_after(10):
        async with operator_port(admin) as port:
            assert await call(port, "POST", "/vehicles", [VEHICLE]) == (201, {"ids": [1]})
            assert await call(port, "POST", "/fences", FENCES) == (201, {"ids": [2]})
            # One filing object or a list; the same window again updates (same id).
            assert await call(port, "POST", "/filings", FILING) == (201, {"ids": [3]})
            again = {**FILING, "purpose": "repairs"}
            assert await call(port, "POST", "/filings", [again]) == (201, {"ids": [3]})
            assert admin.changed == 4

            status, vehicles = await call(port, "GET", "/vehicles")
            assert status == 200
            assert [(v["id"], v["plate"]) for v in vehicles] == [(1, "云A00001")]
            status, fences = await call(port, "GET", "/fences")
            assert (status, fences["type"], fences["features"][0]["id"]) == (
                200,
                "FeatureCollection",
                2,
            )
            status, filings = await call(port, "GET", "/filings")
            assert status == 200
            assert [(f["id"], f["purpose"], f["filed_at"]) for f in filings] == [
                (3, "repairs", "2026-10-05T10:00:00+08:00")
            ]
            # since: China time when it has no offset; filings ending before it are left out.
            assert await call(port, "GET", "/filings?since=2026-10-03T12:00:00") == (200, filings)
            assert await call(port, "GET", "/filings?since=2026-10-03T12:00:01") == (200, [])


async def test_bad_requests_are_400_with_every_problem() -> None:
    admin = memory_admin()
    with trio.fail_after(10):
        async with operator_port(admin) as port:
            status, answer = await call(port, "POST", "/vehicles", raw=b"{not json")
            assert (status, answer["error"]) == (400, "bad_request")
            assert "not JSON" in answer["detail"]
            status, answer = await call(port, "POST", "/vehicles", raw=b"\xff\xfe")
            assert (status, answer["error"]) == (400, "bad_request")
            status, answer = await call(port, "POST", "/vehicles", VEHICLE)  # not a list
            assert (status, answer["detail"]) == (400, "expected a list of objects")
            status, answer = await call(port, "POST", "/fences", [])
            assert (status, answer["error"]) == (400, "bad_request")
            status, answer = await call(port, "POST", "/filings", 3)
            assert (status, answer["error"]) == (400, "bad_request")

            # Every problem of the request is listed; nothing is stored.
            bad = [FILING, {"plate": "云A00001"}, {**FILING, "destination": "nowhere"}]
            status, answer = await call(port, "POST", "/filings", bad)
            assert status == 400
            assert answer["error"] == "invalid"
            assert answer["problems"] == [
                "filing 0: unknown vehicle plate '云A00001'",
                "filing 1: missing keys ['approver', 'end', 'passengers', 'purpose', 'start']",
                "filing 2: unknown vehicle plate '云A00001'",
                "filing 2: unknown fence 'nowhere' as destination",
            ]
            assert await call(port, "GET", "/filings") == (200, [])
            assert admin.changed == 0

            status, answer = await call(port, "GET", "/filings?sinse=2026-10-01")
            assert (status, answer["error"]) == (400, "bad_request")
            status, answer = await call(port, "GET", "/filings?since=yesterday")
            assert (status, answer["error"]) == (400, "bad_request")
            status, answer = await call(port, "PUT", "/vehicles", [VEHICLE])
            assert status == 405
        async with operator_port(None) as port:  # a node without master data
            assert (await call(port, "GET", "/vehicles"))[0] == 404
            assert (await call(port, "POST", "/filings", FILING))[0] == 404


def test_json_rows_get_the_csv_checks_with_every_problem_listed() -> None:
    now = at(5, 10)
    assert vehicle_rows_from_json([{**VEHICLE, "max_speed_kmh": 80}]) == [
        {**VEHICLE, "max_speed_kmh": 80.0, "phone": "013800000001"}  # the one phone identity
    ]
    (row,) = filing_rows_from_json(FILING, now=now)  # one object is one filing
    assert (row["passengers"], row["filed_at"], row["state"], row["destination"]) == (
        "2",
        now,
        "approved",
        None,
    )
    del FILING["destination"]  # optional in JSON
    try:
        assert filing_rows_from_json([FILING], now=now)[0]["destination"] is None
    finally:
        FILING["destination"] = None
    with pytest.raises(MasterDataError) as caught:
        vehicle_rows_from_json(
            [
                {**VEHICLE, "category": "tank", "exempt": "maybe"},
                VEHICLE,
                VEHICLE,
                {**VEHICLE, "plate": "x", "phone": "12ab", "colour": "red"},
                "vehicle",
                {**VEHICLE, "plate": "y", "phone": None, "unit": ["gov"]},
            ]
        )
    assert caught.value.problems == (
        "vehicle 0: category must be one of retained, platform, rental, got 'tank'",
        "vehicle 2: plate already in vehicle 1",
        (
            "vehicle 3: unknown keys ['colour'] (known: plate, phone, unit, category, exempt, "
            "max_speed_kmh)"
        ),
        "vehicle 4: expected a JSON object, got str",
        "vehicle 5: unit must be text, a number or null, got list",
    )
    with pytest.raises(MasterDataError) as caught:
        filing_rows_from_json(
            [{**FILING, "end": FILING["start"]}, {**FILING, "start": "soon", "state": "maybe"}],
            now=now,
        )
    assert caught.value.problems == (
        "filing 0: end 2026-10-03T09:00:00+08:00 is not after start 2026-10-03T09:00:00+08:00",
        # every problem of a filing, not only its first
        (
            "filing 1: start must be an ISO 8601 time, got 'soon'; "
            "state must be one of pending, approved, rejected, cancelled, got 'maybe'"
        ),
    )
    with pytest.raises(MasterDataError) as caught:
        filing_rows_from_json(
            [{**FILING, "colour": "red", "end": "later", "passengers": ["a"]}], now=now
        )
    (problem,) = caught.value.problems
    assert problem.startswith("filing 0: unknown keys ['colour']")
    assert "passengers must be text, a number or null, got list" in problem
    assert problem.endswith("end must be an ISO 8601 time, got 'later'")
    with pytest.raises(MasterDataError, match="no vehicle given"):
        vehicle_rows_from_json([])


# ---------------------------------------------------------------------------------------------
# The database adapter


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
        upsert_vehicles(conn, vehicle_rows_from_csv(VEHICLE_CSV))
    return pg_schema_dsn


VEHICLE_CSV = "plate,phone,unit,category,exempt\n云A00001,13800000001,gov,retained,false\n"


@asynccontextmanager
async def db_node(
    dsn: str,
    *,
    clock: Callable[[], datetime] = lambda: at(5, 10),
    calendar: WorkingCalendar = CALENDAR,
) -> AsyncIterator[tuple[RuleService, int, int]]:
    def now() -> datetime:
        return clock()

    repository = AlertRepository(dsn)
    rules = RuleService(
        master=DatabaseMasterData(dsn, wall_clock=now),
        store=RepositoryAlertStore(repository),
        publish=None,
        calendar=calendar,
        wall_clock=now,
        reload_s=3600,  # only the POST's reload may pick the filing up
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
    http = server.operator_http(memory_access())
    http.masterdata = DatabaseMasterDataAdmin(dsn, after_write=rules.reload, wall_clock=now)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            await nursery.start(rules.run)
            (http_port,) = await nursery.start(http.run)
            (port,) = await nursery.start(server.run)
            yield rules, port, http_port
            nursery.cancel_scope.cancel()
    finally:
        feed.close()
        repository.close()


@pytest.mark.db
async def test_a_backfiling_posted_late_with_an_earlier_claimed_time_stays_a_violation(
    db: str,
) -> None:
    # Article 21: the platform's receipt time decides.  The trip was on 3 October; the
    # back-filing reaches the platform only now, long after its deadline (10 October), and
    # claims to have been filed on 5 October.
    with trio.fail_after(30):
        async with db_node(db) as (_rules, port, http_port):
            stream = await Stream.open(http_port, "/alerts/stream?rule=holiday_sealing&after=0")
            await drive(port, "13800000001", holiday_drive())
            ((seq, alert),) = await stream.events(1)
            assert alert["state"] == "pending_backfill"

            # Refused as a whole: an unknown plate and fence, found by the database.
            bad = [FILING, {**FILING, "plate": "云A99999", "destination": "nowhere"}]
            status, answer = await call(http_port, "POST", "/filings", bad)
            assert status == 400
            assert "filing 1: unknown vehicle plate '云A99999'" in answer["problems"]
            assert "filing 1: unknown fence 'nowhere' as destination" in answer["problems"]
            assert await call(http_port, "GET", "/filings") == (200, [])

            claimed = {**FILING, "filed_at": "2026-10-05T10:00:00+08:00"}
            before = datetime.now(UTC)
            status, answer = await call(http_port, "POST", "/filings", claimed)
            assert status == 201
            (filing_id,) = answer["ids"]
            # The 201 came after the reload: the judgement is already on the stream.
            ((seq2, judged),) = await stream.events(1)
            assert seq2 > seq
            assert (judged["id"], judged["state"]) == (alert["id"], "violation")
            assert judged["detail"]["late_filings"] == [filing_id]
            assert judged["detail"]["claimed_earlier"] == [filing_id]
            assert judged["detail"]["claimed_filed_at"] == "2026-10-05T10:00:00+08:00"

            status, filings = await call(http_port, "GET", "/filings?since=2026-10-01")
            assert status == 200
            (filing,) = filings
            assert (filing["id"], filing["plate"], filing["passengers"]) == (
                filing_id,
                "云A00001",
                "2",
            )
            assert filing["claimed_filed_at"] == "2026-10-05T10:00:00+08:00"
            received = datetime.fromisoformat(filing["received_at"])
            assert received >= before - timedelta(seconds=5)  # the database's clock, not ours
            assert filing["filed_at"] == filing["received_at"]

            # A correction of the end time, after the trip: a second version, both visible.
            corrected = {**claimed, "end": "2026-10-03T18:00:00+08:00", "id": filing_id}
            status, answer = await call(http_port, "POST", "/filings", corrected)
            assert (status, answer["ids"]) == (201, [filing_id])
            status, one = await call(http_port, "GET", f"/filings/{filing_id}")
            assert status == 200
            assert one["version"] == 2
            assert [(v["version"], v["end"]) for v in one["versions"]] == [
                (1, "2026-10-03T12:00:00+08:00"),
                (2, "2026-10-03T18:00:00+08:00"),
            ]
            assert one["versions"][0]["received_at"] <= one["versions"][1]["received_at"]
            assert (await call(http_port, "GET", "/filings/999999"))[0] == 404
            await stream.aclose()
    with psycopg.connect(db) as conn:
        (counts,) = backfilling_by_unit(conn, at(1, 0), at(1, 0, month=11))
    assert (counts.unit, counts.in_time, counts.late, counts.claimed_earlier) == ("gov", 0, 1, 1)


@pytest.mark.db
async def test_a_filings_body_gets_every_problem_in_one_answer(db: str) -> None:
    with trio.fail_after(30):
        async with db_node(db) as (_rules, _port, http_port):
            bad = [
                {**FILING, "end": "2026-10-03T08:00:00+08:00"},  # a format problem
                {**FILING, "plate": "云A99999"},  # unknown to the database
                {**FILING, "destination": "nowhere"},
            ]
            status, answer = await call(http_port, "POST", "/filings", bad)
    assert status == 400
    problems = answer["problems"]
    assert len(problems) == 3
    assert problems[0].startswith("filing 0: end 2026-10-03T08:00:00+08:00 is not after start")
    assert problems[1:] == [
        "filing 1: unknown vehicle plate '云A99999'",
        "filing 2: unknown fence 'nowhere' as destination",
    ]


@pytest.mark.db
async def test_a_backfiling_posted_in_time_resolves_the_pending_alert_without_a_restart(
    db: str,
) -> None:
    # The same with the real clock: a drive during a sealing period that began yesterday,
    # back-filed at once (well within 3 working days).
    now = datetime.now(GMT8).replace(microsecond=0)
    sealed = SealingPeriod(start=now - timedelta(days=1), end=now + timedelta(days=1))
    calendar = WorkingCalendar(sealing_periods=[sealed], years=range(now.year - 1, now.year + 2))
    trip_start = now - timedelta(hours=3)
    with trio.fail_after(30):
        async with db_node(db, clock=lambda: datetime.now(GMT8), calendar=calendar) as (
            _rules,
            port,
            http_port,
        ):
            stream = await Stream.open(http_port, "/alerts/stream?rule=holiday_sealing&after=0")
            await drive(port, "13800000001", holiday_drive(trip_start))
            ((seq, alert),) = await stream.events(1)
            assert alert["state"] == "pending_backfill"
            filing = {
                **FILING,
                "start": (trip_start - timedelta(minutes=5)).isoformat(),
                "end": (trip_start + timedelta(hours=2)).isoformat(),
            }
            status, answer = await call(http_port, "POST", "/filings", filing)
            assert status == 201
            (filing_id,) = answer["ids"]
            ((seq2, resolved),) = await stream.events(1)
            assert seq2 > seq
            assert (resolved["id"], resolved["state"]) == (alert["id"], "resolved")
            assert resolved["detail"]["filing"] == filing_id
            assert resolved["detail"]["backfilled"] is True
            assert "claimed_earlier" not in resolved["detail"]
            await stream.aclose()
    with psycopg.connect(db) as conn:
        (counts,) = backfilling_by_unit(conn, now - timedelta(days=1), now + timedelta(days=1))
    assert (counts.in_time, counts.late, counts.claimed_earlier) == (1, 0, 0)


@pytest.mark.db
async def test_vehicles_and_fences_through_the_database(db: str) -> None:
    admin = DatabaseMasterDataAdmin(db, wall_clock=lambda: at(5, 10))
    with trio.fail_after(30):
        async with operator_port(admin) as port:
            second = {**VEHICLE, "plate": "云A00002", "phone": "13800000002", "exempt": True}
            second["reason"] = "escort duty"  # a vehicle added exempt says why
            status, answer = await call(port, "POST", "/vehicles", [VEHICLE, second])
            assert status == 201
            status, vehicles = await call(port, "GET", "/vehicles")
            assert [v["id"] for v in vehicles] == answer["ids"]
            assert [(v["plate"], v["exempt"]) for v in vehicles] == [
                ("云A00001", False),
                ("云A00002", True),
            ]
            status, answer = await call(port, "POST", "/vehicles", [{**second, "phone": "x"}])
            assert (status, answer["error"]) == (400, "invalid")

            status, answer = await call(port, "POST", "/fences", FENCES)
            assert status == 201
            status, fences = await call(port, "GET", "/fences")
            (feature,) = fences["features"]
            assert feature["id"] == answer["ids"][0]
            assert (feature["properties"]["name"], feature["properties"]["radius_m"]) == (
                "depot",
                300,
            )
            broken = {"type": "FeatureCollection", "features": [{"type": "Feature"}]}
            status, answer = await call(port, "POST", "/fences", broken)
            assert (status, answer["error"], len(answer["problems"])) == (400, "invalid", 1)


# ---------------------------------------------------------------------------------------------
# The alert stream next to these endpoints: the race the database test above once hit


class StaleHeadFeed:
    """An alert feed whose ``last_seq`` lags one call behind, as when an event is committed
    between the stream's read of the head and its read of the events."""

    def __init__(self) -> None:
        self.events: list[tuple[int, dict[str, Any]]] = []
        self.head = 0
        self.new = trio.Event()
        self.vocabulary = AlertVocabulary()

    def publish(self, alert: dict[str, Any]) -> None:
        self.events.append((len(self.events) + 1, alert))
        self.new.set()

    async def last_seq(self) -> int:
        await trio.lowlevel.checkpoint()
        seen, self.head = self.head, len(self.events)
        return seen

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        await trio.lowlevel.checkpoint()
        return [e for e in self.events if e[0] > seq and filters.matches(e[1])][:limit]

    async def wait_for_new(self, after_seq: int) -> None:
        if len(self.events) > after_seq:
            await trio.lowlevel.checkpoint()
            return
        self.new = trio.Event()
        await self.new.wait()


async def test_the_stream_never_repeats_an_event_committed_during_a_round() -> None:
    feed = StaleHeadFeed()
    feed.publish({"id": "a", "rule": "overspeed"})
    http = OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        healthy=lambda: True,
        access=memory_access(),
        alerts=feed,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (port,) = await nursery.start(http.run)
            stream = await Stream.open(port, "/alerts/stream?after=0")
            assert [seq for seq, _ in await stream.events(1)] == [1]
            feed.publish({"id": "b", "rule": "overspeed"})
            assert [seq for seq, _ in await stream.events(1)] == [2]
            await stream.aclose()
            nursery.cancel_scope.cancel()
