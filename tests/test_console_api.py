"""The operator console's server side (``ingest.console_api``): the session cookie and its
forgery defence, the page's files, and the data endpoints against a real database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from ingest import console_api
from ingest.access import DISPATCHER, VIEWER, Principal
from ingest.console_api import ConsoleApi
from ingest.http import OperatorHttp
from ingest.interfaces import InMemoryMasterDataAdmin
from ingest.lockout import LockoutPolicy
from storage import masterdata
from storage.alerts import AlertRepository
from tests.operator_auth import TEST_TOKEN, exchange, memory_access, port_of
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tools.console_db import DatabaseConsoleData
from tools.rules_db import DatabaseMasterDataAdmin

CHINA = masterdata.CHINA
VIEWER_TOKEN = "jt808_viewer"
NORTH_TOKEN = "jt808_north-dispatcher"
NORTH_VIEWER_TOKEN = "jt808_north-viewer"
TOKENS = {
    VIEWER_TOKEN: Principal(name="vera", role=VIEWER),
    NORTH_TOKEN: Principal(name="nick", role=DISPATCHER, unit="north"),
    NORTH_VIEWER_TOKEN: Principal(name="nora", role=VIEWER, unit="north"),
}


async def request(
    port: int,
    method: str,
    target: str,
    body: Any = None,
    *,
    token: str | None = TEST_TOKEN,
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, Any, dict[bytes, bytes]]:
    """One request: status, the body (JSON decoded when it is JSON) and the headers."""
    status, answer, got = await exchange(port, method, target, body, token=token, headers=headers)
    if got.get(b"content-type", b"").startswith(b"application/json") and answer:
        return status, json.loads(answer), got
    return status, answer, got


def operator(console: ConsoleApi, admin: Any = None) -> OperatorHttp:
    return OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=list,
        masterdata=admin,
        access=memory_access(**TOKENS),
        console=console,
        heartbeat_s=0.5,
        login_lockout=LockoutPolicy(failures=3, window_s=60.0, lockout_s=60.0),
    )


# ---------------------------------------------------------------------------------------------
# Session and page (no database)


async def test_a_session_cookie_logs_in_authenticates_and_logs_out() -> None:
    admin = InMemoryMasterDataAdmin(wall_clock=lambda: datetime(2026, 10, 5, tzinfo=CHINA))
    async with port_of(operator(ConsoleApi(data=None), admin)) as port:
        status, body, headers = await request(
            port, "POST", "/session", {"token": TEST_TOKEN}, token=None
        )
        assert status == 200
        assert body == {"name": "test-admin", "role": "admin", "unit": None}
        cookie = headers[b"set-cookie"].decode()
        assert cookie.startswith(f"jt808_session={TEST_TOKEN};")
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(cookie.split("; "))
        assert "Secure" not in cookie  # no TLS on this port
        jar = (("cookie", f"other=1; jt808_session={TEST_TOKEN}"),)

        status, body, _ = await request(port, "GET", "/session", token=None, headers=jar)
        assert (status, body["name"]) == (200, "test-admin")
        status, _, _ = await request(port, "GET", "/vehicles", token=None, headers=jar)
        assert status == 200

        # A write by the cookie alone may be a cross-site forgery: refused, nothing stored.
        car = {"plate": "云A1", "phone": None, "unit": "n", "category": "retained", "exempt": False}
        status, body, _ = await request(port, "POST", "/vehicles", [car], token=None, headers=jar)
        assert status == 403
        assert "X-JT808-Console" in body["detail"]
        assert await admin.vehicles() == []
        console = (*jar, ("x-jt808-console", "1"))
        status, _, _ = await request(port, "POST", "/vehicles", [car], token=None, headers=console)
        assert status == 201

        status, _, headers = await request(port, "DELETE", "/session", token=None, headers=jar)
        assert status == 204
        assert headers[b"set-cookie"].decode().startswith("jt808_session=;")
        assert "Max-Age=0" in headers[b"set-cookie"].decode()

        status, _, _ = await request(port, "GET", "/session", token=None)
        assert status == 401
        status, _, _ = await request(
            port, "GET", "/session", token=None, headers=(("cookie", "jt808_session=jt808_x"),)
        )
        assert status == 401


async def test_a_bad_session_token_is_a_failed_login() -> None:
    async with port_of(operator(ConsoleApi(data=None))) as port:
        for token in ("jt808_wrong", "not a token\r\nx: y", "jt808_wrong"):
            status, _, headers = await request(
                port, "POST", "/session", {"token": token}, token=None
            )
            assert status == 401
            assert b"set-cookie" not in headers
        # The lock-out of the address counts them with the bearer tokens'.
        status, _, _ = await request(port, "POST", "/session", {"token": TEST_TOKEN}, token=None)
        assert status == 429
        status, _, _ = await request(port, "POST", "/session", {"tok": 1}, token=None)
        assert status == 400


async def test_the_page_is_served_without_a_token_and_nothing_else(tmp_path: Path) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html><title>控制台</title>", "utf-8")
    (tmp_path / "app.js").write_text("export const x = 1;\n", "utf-8")
    (tmp_path / "vendor" / "lib.js").write_text("lib\n", "utf-8")
    (tmp_path / "secret.py").write_text("x = 1\n", "utf-8")
    (tmp_path / ".hidden.js").write_text("x\n", "utf-8")
    (tmp_path.parent / "outside.js").write_text("outside\n", "utf-8")
    console = ConsoleApi(
        data=None, static_root=tmp_path, tile_url="https://t/{z}/{x}/{y}.png", offline_after_s=90
    )
    async with port_of(operator(console)) as port:
        status, _, headers = await request(port, "GET", "/", token=None)
        assert (status, headers[b"location"]) == (302, b"/console/")
        status, body, headers = await request(port, "GET", "/console/", token=None)
        assert status == 200
        assert "控制台" in body.decode()
        assert headers[b"content-type"] == b"text/html; charset=utf-8"
        assert headers[b"cache-control"] == console_api.CACHE_HTML.encode()
        status, body, headers = await request(port, "GET", "/console/app.js", token=None)
        assert (status, headers[b"content-type"]) == (200, b"text/javascript; charset=utf-8")
        status, _, headers = await request(port, "GET", "/console/vendor/lib.js", token=None)
        assert (status, headers[b"cache-control"]) == (200, console_api.CACHE_VENDOR.encode())
        status, body, _ = await request(port, "GET", "/console/config.json", token=None)
        assert body == {
            "tile_url": "https://t/{z}/{x}/{y}.png",
            "tile_attribution": None,
            "offline_after_s": 90,
        }
        for path in (
            "/console/secret.py",
            "/console/.hidden.js",
            "/console/../outside.js",
            "/console/%2e%2e/outside.js",
            "/console/vendor/..%2f..%2foutside.js",
            "/console/missing.js",
            "/console//etc/passwd.txt",
        ):
            status, _, _ = await request(port, "GET", path, token=None)
            assert status == 404, path
        status, _, _ = await request(port, "POST", "/console/app.js", token=None)
        assert status == 405
        status, _, _ = await request(port, "GET", "/positions/latest", token=None)
        assert status == 401  # the data is not public


# ---------------------------------------------------------------------------------------------
# Data (database)

NOW = datetime.now(UTC).replace(microsecond=0)


def seed(dsn: str) -> dict[str, int]:
    """Three vehicles (two of north, one of south), positions, one open alert: plate -> id."""
    cars = [
        {"plate": "云A1", "phone": "013800000001", "unit": "north", "category": "retained"},
        {"plate": "云A2", "phone": "013800000002", "unit": "north", "category": "platform"},
        {"plate": "云A3", "phone": "013800000003", "unit": "south", "category": "retained"},
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        masterdata.upsert_vehicles(conn, [{**c, "exempt": False} for c in cars])
        ids = dict(conn.execute("SELECT plate, id FROM vehicles").fetchall())
    # 1: moving now; 2: parked now (and in alert); 3: heard an hour ago (offline).
    store_positions(dsn, "000013800000001", [(NOW - timedelta(seconds=30), 60.0)])
    store_positions(dsn, "000013800000002", [(NOW - timedelta(seconds=20), 0.0)])
    store_positions(dsn, "000013800000003", [(NOW - timedelta(hours=1), 40.0)])
    put_alert(dsn, "overspeed:1", ids["云A2"], "north", state="open")
    return ids


def store_positions(
    dsn: str, phone: str, fixes: list[tuple[datetime, float]], *, received: datetime | None = None
) -> None:
    phone = phone[-12:]
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO positions (device_time, phone, fix_key, received_at, msg_id, serial, "
            "alarm, status, lat, lon, altitude_m, speed_kmh, direction, vehicle_id) VALUES "
            "(%s, %s, %s, %s, 512, 1, 0, 3, %s, 102.7, 1900, %s, 90, "
            "jt808_vehicle_at(%s, %s))",
            [
                (t, phone, i, received or t, 25.0 + i * 1e-4, speed, phone, t)
                for i, (t, speed) in enumerate(fixes)
            ],
        )


def put_alert(dsn: str, alert_id: str, vehicle: int, unit: str, *, state: str, **more: Any) -> None:
    opened = more.pop("opened_at", NOW - timedelta(minutes=5))
    record = {
        "id": alert_id,
        "rule": alert_id.split(":", maxsplit=1)[0],
        "state": state,
        "phone": "013800000002",
        "vehicle": vehicle,
        "plate": "云A2",
        "unit": unit,
        "severity": "high",
        "opened_at": opened.isoformat(),
        "updated_at": opened.isoformat(),
        "deadline": None,
        "closed_at": None,
        "detail": more.pop("detail", {}),
    }
    with AlertRepository(dsn) as repository:
        repository.put(record)


@asynccontextmanager
async def console_port(dsn: str) -> AsyncIterator[tuple[int, ConsoleApi]]:
    data = DatabaseConsoleData(dsn)
    console = ConsoleApi(data=data, poll_s=0.2)
    try:
        async with port_of(operator(console, DatabaseMasterDataAdmin(dsn))) as port:
            yield port, console
    finally:
        data.close()


async def test_latest_positions_with_states_and_unit_scoping(db: str) -> None:
    ids = seed(db)
    async with console_port(db) as (port, _):
        status, body, _ = await request(port, "GET", "/positions/latest")
        assert status == 200
        states = {e["plate"]: e["state"] for e in body}
        assert states == {"云A1": "moving", "云A2": "alert", "云A3": "offline"}
        first = next(e for e in body if e["plate"] == "云A1")
        assert set(first) == {
            "vehicle_id", "plate", "unit", "category", "phone", "device_time", "received_at",
            "lat", "lon", "speed_kmh", "direction", "state",
        }  # fmt: skip
        assert first["vehicle_id"] == ids["云A1"]
        assert first["device_time"].endswith("+08:00")
        status, body, _ = await request(port, "GET", "/positions/latest", token=NORTH_TOKEN)
        assert sorted(e["plate"] for e in body) == ["云A1", "云A2"]


async def test_the_position_stream_sends_a_snapshot_then_changes(db: str) -> None:
    seed(db)
    async with console_port(db) as (port, console):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"GET /positions/stream HTTP/1.1\r\nhost: t\r\n"
            + f"authorization: Bearer {NORTH_VIEWER_TOKEN}\r\n\r\n".encode()
        )
        events = SseReader(stream)
        with trio.fail_after(10):
            kind, data = await events.next_event()
        assert kind == "snapshot"
        assert sorted(e["plate"] for e in data) == ["云A1", "云A2"]
        # A new position of a north car shows within a round or two; the south car's never.
        stored_at = trio.current_time()
        store_positions(db, "013800000003", [(NOW, 50.0)], received=datetime.now(UTC))
        store_positions(db, "013800000001", [(NOW, 0.0)], received=datetime.now(UTC))
        with trio.fail_after(5):
            kind, data = await events.next_event()
        assert trio.current_time() - stored_at < 2.0
        assert kind == "positions"
        assert [(e["plate"], e["state"], e["speed_kmh"]) for e in data] == [("云A1", "parked", 0.0)]
        assert console.hub is not None
        assert len(console.hub._subscribers) == 1
        await stream.aclose()
        with trio.fail_after(5):
            while console.hub._subscribers:  # noqa: ASYNC110 - the hub's own count
                await trio.sleep(0.05)


class SseReader:
    """Server-sent events from a raw chunked response (chunk sizes are lines it skips)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next_event(self) -> tuple[str, Any]:
        while True:
            while b"\n\n" not in self.buffer:
                data = await self.stream.receive_some(1 << 20)
                assert data, "stream closed"
                self.buffer += data
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            lines = block.replace(b"\r\n", b"\n").split(b"\n")
            kind = next((ln[7:].decode() for ln in lines if ln.startswith(b"event: ")), None)
            payload = b"".join(ln[6:] for ln in lines if ln.startswith(b"data: "))
            if kind is not None:  # one event is one chunk of the response
                return kind, json.loads(payload)


async def test_a_track_is_thinned_and_bounded(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = seed(db)
    start = NOW - timedelta(hours=3)
    store_positions(
        db, "013800000001", [(start + timedelta(minutes=i), float(i)) for i in range(100)]
    )
    put_alert(db, "overspeed:t", ids["云A1"], "north", state="violation", opened_at=start)
    monkeypatch.setattr(console_api, "MAX_TRACK_POINTS", 10)
    window = f"from={_q(start)}&to={_q(start + timedelta(hours=2))}"
    async with console_port(db) as (port, _):
        path = f"/vehicles/{ids['云A1']}/track?{window}"
        status, body, _ = await request(port, "GET", path)
        assert status == 200
        assert body["vehicle"]["plate"] == "云A1"
        assert body["thinned"] is True
        speeds = [p["speed_kmh"] for p in body["positions"]]
        assert speeds == [float(i) for i in range(0, 100, 10)]  # evenly: one in ten
        assert set(body["positions"][0]) == {"device_time", "lat", "lon", "speed_kmh", "direction"}
        assert [a["id"] for a in body["alerts"]] == ["overspeed:t"]
        assert body["trips"] == []
        for bad in (
            f"/vehicles/{ids['云A1']}/track",
            f"/vehicles/{ids['云A1']}/track?from={_q(start)}",
            f"/vehicles/{ids['云A1']}/track?from={_q(start)}&to={_q(start + timedelta(days=32))}",
            f"/vehicles/{ids['云A1']}/track?from={_q(start)}&to={_q(start)}",
            f"/vehicles/{ids['云A1']}/track?from=yesterday&to={_q(start)}",
        ):
            status, _, _ = await request(port, "GET", bad)
            assert status == 400, bad
        status, _, _ = await request(port, "GET", f"/vehicles/{ids['云A3']}/track?{window}",
                                     token=NORTH_TOKEN)  # fmt: skip
        assert status == 404  # another unit's vehicle
        status, body, _ = await request(port, "GET", f"/vehicles/{ids['云A1']}/bindings")
        assert status == 200
        assert body == [{"phone": "013800000001", "from": None, "to": None}]


def _q(value: datetime) -> str:
    return value.isoformat().replace("+", "%2B")


async def test_alerts_list_detail_and_notes_with_audit(db: str) -> None:
    ids = seed(db)
    put_alert(db, "overspeed:s", ids["云A3"], "south", state="open")
    async with console_port(db) as (port, _):
        status, body, _ = await request(port, "GET", "/alerts?state=open")
        assert status == 200
        assert [(a["id"], a["acknowledged"], a["notes"]) for a in body] == [
            ("overspeed:1", False, 0),
            ("overspeed:s", False, 0),
        ] or [a["id"] for a in body] == ["overspeed:s", "overspeed:1"]
        status, body, _ = await request(port, "GET", "/alerts", token=NORTH_TOKEN)
        assert [a["id"] for a in body] == ["overspeed:1"]
        status, _, _ = await request(port, "GET", "/alerts?unit=south", token=NORTH_TOKEN)
        assert status == 403
        status, body, _ = await request(port, "GET", "/alerts?rule=nonsense")
        assert (status, body["parameter"]) == (400, "rule")
        status, _, _ = await request(port, "GET", "/alerts?limit=5001")
        assert status == 400

        note = {"text": "司机已联系 called the driver", "acknowledge": True}
        status, body, _ = await request(
            port, "POST", "/alerts/overspeed%3A1/notes", note, token=NORTH_TOKEN
        )
        assert status == 201
        assert body["note"]["user"] == "nick"
        assert body["note"]["acknowledged"] is True
        status, _, _ = await request(port, "POST", "/alerts/overspeed%3As/notes", note,
                                     token=NORTH_TOKEN)  # fmt: skip
        assert status == 403  # another unit's alert
        status, _, _ = await request(
            port, "POST", "/alerts/overspeed%3A1/notes", note, token=VIEWER_TOKEN
        )
        assert status == 403  # a viewer writes nothing
        status, _, _ = await request(port, "POST", "/alerts/none/notes", note)
        assert status == 404
        status, _, _ = await request(port, "POST", "/alerts/overspeed%3A1/notes", {"text": ""})
        assert status == 400

        status, body, _ = await request(port, "GET", "/alerts/overspeed%3A1")
        assert status == 200
        assert [n["text"] for n in body["notes"]] == [note["text"]]
        assert len(body["events"]) == 1
        assert body["filing"] is None
        status, _, _ = await request(port, "GET", "/alerts/overspeed%3As", token=NORTH_TOKEN)
        assert status == 404
        status, body, _ = await request(port, "GET", "/alerts?state=open", token=NORTH_TOKEN)
        assert [(a["acknowledged"], a["notes"]) for a in body] == [(True, 1)]
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT actor, action, object_key, unit FROM audit_log WHERE object_kind = 'alert'"
        ).fetchall()
    assert rows == [("nick", "alert.acknowledge", "overspeed:1", "north")]


async def test_the_violation_report_as_json_and_csv(db: str) -> None:
    ids = seed(db)
    opened = datetime(2026, 10, 3, 9, tzinfo=CHINA)
    put_alert(db, "unfiled_trip:a", ids["云A2"], "north", state="violation", opened_at=opened)
    async with console_port(db) as (port, _):
        status, body, _ = await request(port, "GET", "/reports/violations?period=2026-10")
        assert status == 200
        assert body == {
            "period": "2026-10",
            "violations": [
                {"unit": "north", "rule": "unfiled_trip", "violations": 1, "vehicles": 1}
            ],
            "backfilling": [],
        }
        status, body, headers = await request(
            port, "GET", "/reports/violations?period=2026-10&format=csv"
        )
        assert status == 200
        assert headers[b"content-type"] == b"text/csv; charset=utf-8"
        assert body.decode() == (
            "period,unit,rule,violations,vehicles\n2026-10,north,unfiled_trip,1,1\n"
        )
        status, _, _ = await request(port, "GET", "/reports/violations?period=2026-13")
        assert status == 400
        status, _, _ = await request(
            port, "GET", "/reports/violations?period=2026-10&unit=south", token=NORTH_TOKEN
        )
        assert status == 403


async def test_hostile_values_are_refused_400_never_500_or_503(db: str) -> None:
    """Values the hostile-input campaign (tests/test_http_campaign.py) found answered 500 or
    503 while the database was up: each is the request's fault, answered 400."""
    seed(db)
    async with console_port(db) as (port, _):
        # A period with a final newline matched "$", and its CSV's file name put the newline
        # in a response header, which h11 refused: 500.  Full-width digits matched "\d".
        for period in (
            "2026-10%0A",
            "2026-10%0D%0AX-Injected:%201",
            "%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%96-10",
            "9999-12",
        ):
            for form in ("csv", "json"):
                status, body, _ = await request(
                    port, "GET", f"/reports/violations?period={period}&format={form}"
                )
                assert (status, body["error"]) == (400, "bad_request"), (period, form)
        # Text PostgreSQL cannot hold (NUL, an unpaired surrogate) was refused by the database
        # and answered 503 "unavailable"; nothing is stored either way.
        status, body, _ = await request(port, "GET", "/reports/violations?period=2026-10&unit=%00")
        assert (status, body["error"]) == (400, "bad_request")
        for text in ("a\x00b", "a\ud800"):
            status, body, _ = await request(
                port, "POST", "/alerts/overspeed%3A1/notes", {"text": text}
            )
            assert (status, body["error"]) == (400, "bad_request"), text
        # A limit of eleven million behind leading zeros passed the check of its first nine
        # characters (1); a superscript two is a digit to str.isdigit.
        for limit in ("0000000011000000", "%C2%B2", "%D9%A1"):
            status, _, _ = await request(port, "GET", f"/alerts?limit={limit}")
            assert status == 400, limit
            status, _, _ = await request(port, "GET", f"/audit?limit={limit}")
            assert status == 400, limit
        status, _, _ = await request(port, "GET", "/alerts?limit=00005")
        assert status == 200
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM alert_notes").fetchone() == (0,)


async def test_changing_exempt_needs_a_reason_which_the_audit_keeps(db: str) -> None:
    seed(db)
    car = {"plate": "云A1", "phone": "013800000001", "unit": "north", "category": "retained"}
    async with console_port(db) as (port, _):
        status, body, _ = await request(port, "POST", "/vehicles", [{**car, "exempt": True}])
        assert status == 400
        assert "needs a reason" in body["problems"][0]
        status, _, _ = await request(
            port, "POST", "/vehicles", [{**car, "exempt": False, "category": "platform"}]
        )
        assert status == 201  # no change of the flag: no reason needed
        status, _, _ = await request(
            port, "POST", "/vehicles", [{**car, "exempt": True, "reason": "警卫任务 order 12"}]
        )
        assert status == 201
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT action, reason FROM audit_log WHERE action = 'vehicle.exempt'"
        ).fetchall()
    assert rows == [("vehicle.exempt", "警卫任务 order 12")]
