"""Master data over the operator port: ``/vehicles``, ``/fences``, ``/filings`` with the
in-memory admin, the JSON row checks of ``storage.masterdata``, and the database adapter: a
POSTed back-filing resolves a pending alert without a restart."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import h11
import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

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
    headers = [("host", "test"), ("content-length", str(len(data)))]
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
        "filing 1: start must be an ISO 8601 time, got 'soon'",
    )
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
async def db_node(dsn: str) -> AsyncIterator[tuple[RuleService, int, int]]:
    def now() -> datetime:
        return at(5, 10)

    repository = AlertRepository(dsn)
    rules = RuleService(
        master=DatabaseMasterData(dsn, wall_clock=now),
        store=RepositoryAlertStore(repository),
        publish=None,
        calendar=CALENDAR,
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
    http = server.operator_http()
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
async def test_posted_backfiling_resolves_the_pending_alert_without_a_restart(db: str) -> None:
    with trio.fail_after(30):
        async with db_node(db) as (_rules, port, http_port):
            stream = await Stream.open(http_port, "/alerts/stream?rule=holiday_sealing&after=0")
            await drive(port, "13800000001", holiday_drive())
            ((seq, alert),) = await stream.events(1)
            assert alert["state"] == "pending_backfill"

            # Refused as a whole: an unknown plate and fence, found by the database.
            bad = [FILING, {**FILING, "plate": "云A99999", "destination": "nowhere"}]
            status, answer = await call(http_port, "POST", "/filings", bad)
            assert (status, answer["problems"]) == (
                400,
                [
                    "filing 1: unknown vehicle plate '云A99999'",
                    "filing 1: unknown fence 'nowhere' as destination",
                ],
            )
            assert await call(http_port, "GET", "/filings") == (200, [])

            status, answer = await call(http_port, "POST", "/filings", FILING)
            assert status == 201
            (filing_id,) = answer["ids"]
            # The 201 came after the reload: the resolution is already on the stream.
            ((seq2, resolved),) = await stream.events(1)
            assert seq2 > seq
            assert (resolved["id"], resolved["state"]) == (alert["id"], "resolved")
            assert resolved["detail"]["filing"] == filing_id

            status, filings = await call(http_port, "GET", "/filings?since=2026-10-01")
            assert status == 200
            assert [(f["id"], f["plate"], f["filed_at"], f["passengers"]) for f in filings] == [
                (filing_id, "云A00001", "2026-10-05T10:00:00+08:00", "2")
            ]
            await stream.aclose()


@pytest.mark.db
async def test_vehicles_and_fences_through_the_database(db: str) -> None:
    admin = DatabaseMasterDataAdmin(db, wall_clock=lambda: at(5, 10))
    with trio.fail_after(30):
        async with operator_port(admin) as port:
            second = {**VEHICLE, "plate": "云A00002", "phone": "13800000002", "exempt": True}
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
