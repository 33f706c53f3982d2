"""Operator access: accounts and tokens, roles and units checked in one place
(``ingest.access``), the append-only audit trail, and failed logins counted and rate-limited
on the operator port."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from ingest import access
from ingest.access import ADMIN, DISPATCHER, VIEWER, Principal
from ingest.http import OperatorHttp
from ingest.interfaces import (
    InMemoryAlertFeed,
    InMemoryMasterDataAdmin,
    InMemoryOperatorAccess,
    OperatorAccess,
)
from ingest.lockout import LockoutPolicy
from ingest.metrics import Metrics
from storage import access as access_store
from tests.operator_auth import TEST_TOKEN, exchange, memory_access, port_of, store_token
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_rules_service import at
from tools import cli
from tools.access_db import DatabaseOperatorAccess
from tools.rules_db import DatabaseMasterDataAdmin

VIEWER_TOKEN = "viewer-token"
NORTH_TOKEN = "north-dispatcher-token"
SOUTH_ADMIN_TOKEN = "south-admin-token"
TOKENS = {
    VIEWER_TOKEN: Principal(name="vera", role=VIEWER),
    NORTH_TOKEN: Principal(name="nick", role=DISPATCHER, unit="north"),
    SOUTH_ADMIN_TOKEN: Principal(name="sam", role=ADMIN, unit="south"),
}


def vehicle(plate: str, unit: str, phone: str, *, exempt: bool = False) -> dict[str, Any]:
    return {"plate": plate, "phone": phone, "unit": unit, "category": "retained", "exempt": exempt}


NORTH_CAR = vehicle("云A00001", "north", "13800000001")
SOUTH_CAR = vehicle("云A00002", "south", "13800000002")


def filing(plate: str) -> dict[str, Any]:
    return {
        "plate": plate,
        "start": "2026-10-03T09:00:00+08:00",
        "end": "2026-10-03T12:00:00+08:00",
        "destination": None,
        "purpose": "inspection",
        "passengers": "2",
        "approver": "Li",
    }


async def call(
    port: int,
    method: str,
    target: str,
    body: Any = None,
    *,
    token: str | None = TEST_TOKEN,
) -> tuple[int, Any, dict[bytes, bytes]]:
    """One request: status, decoded JSON (or text) and the response headers."""
    status, answer, got = await exchange(port, method, target, body, token=token)
    try:
        return status, json.loads(answer), got
    except ValueError:
        return status, answer.decode(), got


def operator(
    *,
    admin: Any = None,
    gate: OperatorAccess | None = None,
    commands: list[str] | None = None,
    **kwargs: Any,
) -> OperatorHttp:
    async def runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
        if commands is not None:
            commands.append(phone)
        return {"phone": phone, "reply": {"msg_id": "0x0001"}}

    return OperatorHttp(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        terminals=lambda: [{"phone": "13800000001"}, {"phone": "13800000002"}],
        command=runner,
        alerts=InMemoryAlertFeed(),
        masterdata=admin,
        access=gate if gate is not None else memory_access(**TOKENS),
        **kwargs,
    )


def memory_admin() -> InMemoryMasterDataAdmin:
    return InMemoryMasterDataAdmin(wall_clock=lambda: at(5, 10))


# ---------------------------------------------------------------------------------------------
# The rules, pure


def test_the_role_table() -> None:
    viewer, dispatcher, admin = (Principal(name="x", role=r) for r in access.ROLES)
    for method, route in [("GET", "/vehicles"), ("HEAD", "/filings"), ("GET", "/alerts/stream")]:
        assert access.allowed(viewer, method, route)
    for route in ("/filings", access.COMMANDS):
        assert not access.allowed(viewer, "POST", route)
        assert access.allowed(dispatcher, "POST", route)
    for method, route in [("POST", "/vehicles"), ("POST", "/fences"), ("GET", "/audit")]:
        assert not access.allowed(dispatcher, method, route)
        assert access.allowed(admin, method, route)
    assert access.route_of("/terminals/013800000001/commands") == access.COMMANDS
    assert access.is_public("/healthz", metrics_public=False)
    assert access.is_public("/metrics", metrics_public=True)
    assert not access.is_public("/metrics", metrics_public=False)
    assert access.bearer_token(b"Bearer  abc ") == "abc"
    assert access.bearer_token(b"Basic abc") is None
    assert access.bearer_token(b"Bearer ") is None


def test_unit_scoping() -> None:
    north = Principal(name="n", role=ADMIN, unit="north")
    units = {"云A00001": "north", "云A00002": "south"}
    assert access.visible(north, [NORTH_CAR, SOUTH_CAR]) == [NORTH_CAR]
    assert access.filing_write_problems(north, [filing("云A00001")], units) == []
    assert access.filing_write_problems(north, [filing("云A00002")], units)
    assert access.filing_write_problems(north, [filing("云X99999")], units)  # unknown: refused
    assert access.vehicle_write_problems(north, [NORTH_CAR], units) == []
    assert access.vehicle_write_problems(north, [SOUTH_CAR], units)
    # Moving another unit's car into one's own unit is taking it.
    assert access.vehicle_write_problems(north, [{**SOUTH_CAR, "unit": "north"}], units)
    assert access.fence_write_problems(north)
    assert access.may_command(north, "013800000001", [NORTH_CAR, SOUTH_CAR])
    assert not access.may_command(north, "13800000002", [NORTH_CAR, SOUTH_CAR])
    assert not access.may_command(north, "13800000001", None)
    assert access.alert_unit(north, None) == "north"
    with pytest.raises(ValueError, match="south"):
        access.alert_unit(north, "south")


# ---------------------------------------------------------------------------------------------
# The operator port


async def test_without_a_token_only_healthz_and_public_metrics_answer() -> None:
    endpoints = [
        ("GET", "/terminals"),
        ("GET", "/vehicles"),
        ("GET", "/fences"),
        ("GET", "/filings"),
        ("POST", "/vehicles"),
        ("POST", "/fences"),
        ("POST", "/filings"),
        ("POST", "/terminals/13800000001/commands"),
        ("GET", "/alerts/stream"),
        ("GET", "/audit"),
        ("GET", "/nothing-here"),
    ]
    metrics = Metrics()
    async with port_of(operator(admin=memory_admin(), metrics=metrics)) as port:
        for method, target in endpoints:
            for token in (None, "wrong"):
                status, answer, headers = await call(port, method, target, token=token)
                assert status == 401, (method, target, token, answer)
                assert headers[b"www-authenticate"].startswith(b"Bearer")
        assert (await call(port, "GET", "/healthz", token=None))[0] == 200
        assert (await call(port, "GET", "/metrics", token=None))[0] == 200
    failures = metrics.registry.get_sample_value
    assert failures("jt808_http_login_failures_total", {"reason": "missing"}) == len(endpoints)
    assert failures("jt808_http_login_failures_total", {"reason": "invalid"}) == len(endpoints)

    async with port_of(operator(metrics_public=False)) as port:
        assert (await call(port, "GET", "/metrics", token=None))[0] == 401
        assert (await call(port, "GET", "/metrics", token=VIEWER_TOKEN))[0] == 200
        assert (await call(port, "GET", "/healthz", token=None))[0] == 200


async def test_a_port_without_accounts_lets_nobody_in() -> None:
    http = OperatorHttp(host="127.0.0.1", port=0, registry=CollectorRegistry(), terminals=list)
    async with port_of(http) as port:
        assert (await call(port, "GET", "/terminals"))[0] == 401
        assert (await call(port, "GET", "/healthz"))[0] == 200


async def test_a_viewer_reads_and_cannot_write() -> None:
    admin = memory_admin()
    await admin.add_vehicles([NORTH_CAR])
    sent: list[str] = []
    async with port_of(operator(admin=admin, commands=sent)) as port:
        assert (await call(port, "GET", "/vehicles", token=VIEWER_TOKEN))[0] == 200
        assert (await call(port, "GET", "/terminals", token=VIEWER_TOKEN))[0] == 200
        for target, body in [
            ("/vehicles", [{**NORTH_CAR, "exempt": True}]),
            ("/fences", {"type": "FeatureCollection", "features": []}),
            ("/filings", filing("云A00001")),
            ("/terminals/13800000001/commands", {"msg_id": "0x8201"}),
        ]:
            status, answer, _ = await call(port, "POST", target, body, token=VIEWER_TOKEN)
            assert status == 403, (target, answer)
            assert answer["error"] == "forbidden"
    assert admin.changed == 1  # the setup's write only
    assert sent == []


async def test_a_unit_bound_dispatcher_sees_and_files_for_its_unit_only() -> None:
    admin = memory_admin()
    await admin.add_vehicles([NORTH_CAR, SOUTH_CAR])
    await admin.add_filings([filing("云A00002")])
    gate = memory_access(**TOKENS)
    sent: list[str] = []
    async with port_of(operator(admin=admin, gate=gate, commands=sent)) as port:
        status, cars, _ = await call(port, "GET", "/vehicles", token=NORTH_TOKEN)
        assert (status, [c["plate"] for c in cars]) == (200, ["云A00001"])
        assert (await call(port, "GET", "/filings", token=NORTH_TOKEN))[1] == []
        status, terminals, _ = await call(port, "GET", "/terminals", token=NORTH_TOKEN)
        assert terminals == [{"phone": "13800000001"}]

        # Another unit's trip: refused, nothing stored (one forbidden item refuses the lot).
        before = admin.changed
        both = [filing("云A00001"), {**filing("云A00002"), "purpose": "approved by north"}]
        status, answer, _ = await call(port, "POST", "/filings", both, token=NORTH_TOKEN)
        assert status == 403
        assert answer["problems"] == ["filing 1: '云A00002' is not a vehicle of 'north'"]
        assert admin.changed == before
        status, _, _ = await call(port, "POST", "/filings", filing("云A00001"), token=NORTH_TOKEN)
        assert status == 201

        target = "/terminals/13800000002/commands"
        assert (await call(port, "POST", target, {"msg_id": "0x8201"}, token=NORTH_TOKEN))[0] == 403
        target = "/terminals/13800000001/commands"
        assert (await call(port, "POST", target, {"msg_id": "0x8201"}, token=NORTH_TOKEN))[0] == 200
        assert sent == ["13800000001"]
        status, _, _ = await call(port, "GET", "/alerts/stream?unit=south", token=NORTH_TOKEN)
        assert status == 403
        # A dispatcher edits no vehicles, even of its unit.
        status, _, _ = await call(port, "POST", "/vehicles", [NORTH_CAR], token=NORTH_TOKEN)
        assert status == 403

        # An admin bound to no unit may do all of it.
        status, cars, _ = await call(port, "GET", "/vehicles")
        assert len(cars) == 2
        status, _, _ = await call(port, "POST", "/filings", filing("云A00002"))
        assert status == 201
        # A unit-bound admin edits its unit's vehicles only, and no fences.
        south = SOUTH_ADMIN_TOKEN
        assert (await call(port, "POST", "/vehicles", [SOUTH_CAR], token=south))[0] == 201
        assert (await call(port, "POST", "/vehicles", [NORTH_CAR], token=south))[0] == 403
        fences = {"type": "FeatureCollection", "features": []}
        assert (await call(port, "POST", "/fences", fences, token=south))[0] == 403
    # The command sent is in the audit trail, by name and address.
    (entry,) = [e for e in gate.entries if e.action == "command.send"]
    assert (entry.actor.name, entry.actor.source, entry.key) == ("nick", "127.0.0.1", "13800000001")


async def test_failed_logins_are_counted_and_rate_limited_per_address() -> None:
    metrics = Metrics()
    policy = LockoutPolicy(failures=3, window_s=60.0, lockout_s=60.0)
    async with port_of(operator(metrics=metrics, login_lockout=policy)) as port:
        for _ in range(3):
            assert (await call(port, "GET", "/terminals", token="guess"))[0] == 401
        # Locked: answered 429 unchecked, even with a good token; /healthz still answers.
        status, answer, _ = await call(port, "GET", "/terminals", token=TEST_TOKEN)
        assert (status, answer["error"]) == (429, "too_many_failures")
        assert (await call(port, "GET", "/terminals", token="guess"))[0] == 429
        assert (await call(port, "GET", "/healthz", token=None))[0] == 200
    sample = metrics.registry.get_sample_value
    assert sample("jt808_http_login_failures_total", {"reason": "invalid"}) == 3
    assert sample("jt808_http_login_refused_total") == 2


async def test_a_missing_token_does_not_lock_an_address() -> None:
    policy = LockoutPolicy(failures=2, window_s=60.0, lockout_s=60.0)
    async with port_of(operator(login_lockout=policy)) as port:
        for _ in range(5):
            assert (await call(port, "GET", "/terminals", token=None))[0] == 401
        assert (await call(port, "GET", "/terminals"))[0] == 200


# ---------------------------------------------------------------------------------------------
# Against the database


def _principals(dsn: str) -> None:
    store_token(dsn)
    store_token(dsn, NORTH_TOKEN, "nick", DISPATCHER, "north")
    store_token(dsn, VIEWER_TOKEN, "vera", VIEWER)


async def test_setting_a_vehicle_exempt_is_audited_with_who_when_before_after(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _principals(db)
    gate = DatabaseOperatorAccess(db)
    started = datetime.now(UTC) - timedelta(seconds=5)
    try:
        http = operator(admin=DatabaseMasterDataAdmin(db), gate=gate)
        async with port_of(http) as port:
            assert (await call(port, "POST", "/vehicles", [NORTH_CAR]))[0] == 201
            exempt = [{**NORTH_CAR, "exempt": True, "reason": "escort duty"}]
            assert (await call(port, "POST", "/vehicles", exempt))[0] == 201
            assert (await call(port, "POST", "/vehicles", exempt))[0] == 201  # unchanged
            status, rows, _ = await call(port, "GET", "/audit?user=test-admin")
            assert (await call(port, "GET", "/audit", token=NORTH_TOKEN))[0] == 403
    finally:
        gate.close()
    assert status == 200
    changes = [r for r in rows if r["object_kind"] == "vehicle"]
    assert [r["action"] for r in changes] == ["vehicle.insert", "vehicle.exempt"]
    row = changes[1]
    assert (row["actor"], row["source"], row["object_key"], row["unit"]) == (
        "test-admin",
        "127.0.0.1",
        "云A00001",
        "north",
    )
    assert row["before"]["exempt"] is False
    assert row["after"]["exempt"] is True
    assert row["reason"] == "escort duty"
    assert datetime.fromisoformat(row["at"]) >= started

    assert cli.main(["audit", "list", "--since", started.isoformat(), "--dsn", db, "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    exempted = [r for r in listed if r["action"] == "vehicle.exempt"]
    assert [(r["actor"], r["before"]["exempt"], r["after"]["exempt"]) for r in exempted] == [
        ("test-admin", False, True)
    ]
    assert cli.main(["audit", "list", "--since", started.isoformat(), "--dsn", db]) == 0
    table = capsys.readouterr().out
    assert "test-admin@127.0.0.1  vehicle.exempt  vehicle 云A00001" in table


async def test_a_unit_bound_dispatcher_stores_nothing_for_another_unit(db: str) -> None:
    _principals(db)
    gate = DatabaseOperatorAccess(db)
    try:
        async with port_of(operator(admin=DatabaseMasterDataAdmin(db), gate=gate)) as port:
            assert (await call(port, "POST", "/vehicles", [NORTH_CAR, SOUTH_CAR]))[0] == 201
            south = filing("云A00002")
            assert (await call(port, "POST", "/filings", south, token=NORTH_TOKEN))[0] == 403
            assert (await call(port, "POST", "/vehicles", [SOUTH_CAR], token=VIEWER_TOKEN))[
                0
            ] == 403
            north = filing("云A00001")
            assert (await call(port, "POST", "/filings", north, token=NORTH_TOKEN))[0] == 201
            _, seen, _ = await call(port, "GET", "/filings", token=NORTH_TOKEN)
            assert [f["plate"] for f in seen] == ["云A00001"]
            _, seen, _ = await call(port, "GET", "/filings")
            assert sorted(f["plate"] for f in seen) == ["云A00001"]
    finally:
        gate.close()
    with psycopg.connect(db) as conn:
        plates = conn.execute(
            "SELECT v.plate FROM filings f JOIN vehicles v ON v.id = f.vehicle_id"
        ).fetchall()
        assert plates == [("云A00001",)]
        actors = conn.execute(
            "SELECT actor, source FROM audit_log WHERE action LIKE 'filing.%'"
        ).fetchall()
        assert actors == [("nick", "127.0.0.1")]


def test_audit_rows_cannot_be_changed_or_removed(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        access_store.set_actor(conn, "someone", "cli")
        access_store.append_audit(conn, action="test.write", kind="test", key="1")
        for statement in (
            "UPDATE audit_log SET actor = 'nobody'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT actor, source FROM audit_log").fetchall() == [
            ("someone", "cli")
        ]


async def test_tokens_expire_and_are_revoked(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        access_store.add_user(conn, "eve", VIEWER, None)
        _, live = access_store.create_token(conn, "eve", datetime.now(UTC) + timedelta(hours=1))
        _, old = access_store.create_token(conn, "eve", datetime.now(UTC) - timedelta(seconds=1))
        stored = conn.execute("SELECT sha256, prefix FROM operator_tokens").fetchall()
    assert live.startswith("jt808_")
    assert len(live) > 40
    assert all(live.encode() not in bytes(h) and live != p for h, p in stored)
    gate = DatabaseOperatorAccess(db)
    try:
        assert await gate.authenticate(live) == Principal(name="eve", role=VIEWER)
        assert await gate.authenticate(old) is None
        assert await gate.authenticate(live + "x") is None
        with psycopg.connect(db, autocommit=True) as conn:
            access_store.revoke_token(conn, live[: access_store.SHOWN_CHARS])
        assert await gate.authenticate(live) is None
    finally:
        gate.close()


def test_the_account_commands(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = ["--dsn", db]
    assert cli.main(["users", "add", "ann", "--role", "dispatcher", "--unit", "north", *dsn]) == 0
    assert cli.main(["users", "add", "ann", "--role", "viewer", *dsn]) == 1  # taken
    assert cli.main(["users", "add", "bob", "--role", "root", *dsn]) == 2  # no such role
    assert cli.main(["tokens", "create", "nobody", *dsn]) == 1
    capsys.readouterr()
    assert cli.main(["tokens", "create", "ann", "--expires", "30d", *dsn]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("jt808_")
    assert cli.main(["users", "list", "--json", *dsn]) == 0
    (ann,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (ann["name"], ann["role"], ann["unit"], ann["tokens"]) == ("ann", DISPATCHER, "north", 1)
    assert cli.main(["tokens", "list", "--json", *dsn]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["prefix"] == token[: access_store.SHOWN_CHARS]
    assert token not in json.dumps(listed)
    assert cli.main(["tokens", "revoke", "jt808_", *dsn]) == 1  # too short to name one
    assert cli.main(["tokens", "revoke", str(listed["id"]), *dsn]) == 0
    assert capsys.readouterr().out == f"token {listed['id']} revoked\n"
    assert cli.main(["users", "list", "--json", *dsn]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 0
    assert cli.main(["audit", "list", "--since", "2000-01-01", "--json", *dsn]) == 0
    actions = [json.loads(line)["action"] for line in capsys.readouterr().out.splitlines()]
    assert actions == ["user.add", "token.create", "token.revoke"]


def test_a_gate_for_tests_is_an_operator_access() -> None:
    gate: OperatorAccess = InMemoryOperatorAccess({})
    assert gate is not None
