"""Terminal identity and logins during outages, through the whole serve wiring and PostgreSQL.

* a registered phone cannot be taken over by another device (0x8100 result 3, nothing stored,
  the real terminal stays connected); the same device may register again; the platform
  centre releases a phone with ``jt808 terminals reset``, and every step is in the phone's
  event log;
* while the database is down, known terminals authenticate from the cache and their positions
  are acknowledged through the spool; what cannot be decided is left unanswered.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import trio

from protocol import Edition
from protocol.messages.terminal import (
    REGISTER_TERMINAL_TAKEN,
    REGISTER_TERMINAL_UNKNOWN,
    TerminalAuth,
    TerminalRegister,
    TerminalRegisterResponse,
)
from tests.db_proxy import DatabaseProxy
from tests.serving import http, metric, serving
from tests.storage_fixtures import db_proxy, migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal, location, registration
from tools.cli import main

pytestmark = pytest.mark.db

PHONE = "13900000101"
WIRE_PHONE = PHONE.rjust(12, "0")


@pytest.fixture
async def clients(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[Terminal]]:
    """Every terminal a test connects is closed after it (request it: pytest-trio runs no
    autouse async fixtures)."""
    opened: list[Terminal] = []
    connect = Terminal.connect

    async def tracked(port: int, phone: str, edition: Edition = Edition.V2013) -> Terminal:
        terminal = await connect(port, phone, edition)
        opened.append(terminal)
        return terminal

    monkeypatch.setattr(Terminal, "connect", tracked)
    yield opened
    for terminal in opened:
        await trio.aclose_forcefully(terminal.stream)


def other_device(terminal_id: str = "EVIL-1") -> TerminalRegister:
    return registration(terminal_id=terminal_id, plate="云A66666")


def stored(dsn: str, phone: str = WIRE_PHONE) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM positions WHERE phone = %s", (phone,)).fetchone()
    assert row is not None
    return int(row[0])


def code_of(dsn: str, phone: str = WIRE_PHONE) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT auth_code FROM terminals WHERE phone = %s", (phone,)).fetchone()
    return None if row is None else row[0]


def events(dsn: str, phone: str = WIRE_PHONE) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT event FROM terminal_events WHERE phone = %s ORDER BY id", (phone,)
        ).fetchall()
    return [row[0] for row in rows]


async def report(terminal: Terminal, n: int, *, result: int = 0) -> None:
    serial = await terminal.send(location(n))
    reply = await terminal.receive()
    assert getattr(reply.message, "reply_serial", None) == serial
    assert getattr(reply.message, "result", None) == result


async def test_a_takeover_attempt_gets_result_3_and_stores_nothing(
    clients: list[Terminal], db: str, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with serving(db, tmp_path) as app:
            port = app.server.ports[0]
            owner = await Terminal.connect(port, PHONE)
            code = await owner.login()
            await report(owner, 1)

            attacker = await Terminal.connect(port, PHONE)
            await attacker.send(other_device())
            answer = await attacker.receive()
            assert isinstance(answer.message, TerminalRegisterResponse)
            assert answer.message.result == REGISTER_TERMINAL_TAKEN
            assert answer.message.auth_code is None
            await attacker.send(TerminalAuth(auth_code="guess"))
            assert getattr((await attacker.receive()).message, "result", None) == 1
            await attacker.send(location(99))
            assert getattr((await attacker.receive()).message, "result", None) == 1

            await report(owner, 2)  # still connected, still acknowledged
            assert code_of(db) == code
            assert stored(db) == 2
            assert events(db) == ["registered", "registration_refused"]
            assert metric(app, "jt808_identity_refused_total") == 1
            assert metric(app, "jt808_takeovers_total") == 0


async def test_the_same_terminal_may_register_again_and_its_old_code_is_void(
    clients: list[Terminal], db: str, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with serving(db, tmp_path) as app:
            port = app.server.ports[0]
            first = await Terminal.connect(port, PHONE)
            old = await first.login()
            await first.close()
            again = await Terminal.connect(port, PHONE)
            new = await again.login()  # same manufacturer and terminal id: a terminal that
            assert new != old  # lost its code gets a new one
            stale = await Terminal.connect(port, PHONE)
            await stale.send(TerminalAuth(auth_code=old))
            assert getattr((await stale.receive()).message, "result", None) == 1
            assert events(db) == ["registered", "reregistered"]


async def test_the_platform_centre_releases_a_phone(
    clients: list[Terminal], db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(60):
        async with serving(db, tmp_path) as app:
            port = app.server.ports[0]
            owner = await Terminal.connect(port, PHONE)
            await owner.login()
            await owner.close()
            reset = ["terminals", "reset", PHONE, "--dsn", db]
            args = [*reset, "--reason", "terminal replaced", "--actor", "centre"]
            assert await trio.to_thread.run_sync(main, args) == 0
            replacement = await Terminal.connect(port, PHONE)
            await replacement.send(other_device("NEW-2"))
            answer = await replacement.receive()
            assert getattr(answer.message, "result", None) == 0
            shown = ["terminals", "show", PHONE, "--dsn", db]
            capsys.readouterr()
            assert await trio.to_thread.run_sync(main, shown) == 0
            document = json.loads(capsys.readouterr().out)
            assert document["terminal_id"] == "NEW-2"
            assert [e["event"] for e in document["events"]] == ["registered", "reset", "registered"]
            assert document["events"][1]["actor"] == "centre"
            assert document["events"][1]["detail"]["reason"] == "terminal replaced"
            assert (
                await trio.to_thread.run_sync(main, ["terminals", "reset", "1", "--dsn", db]) == 1
            )


async def test_the_registry_policy_refuses_unknown_and_taken_phones(
    clients: list[Terminal], db: str, tmp_path: Path
) -> None:
    assert main(["terminals", "provision", PHONE, "--dsn", db]) == 0
    with trio.fail_after(30):
        async with serving(db, tmp_path, registration="registry") as app:
            port = app.server.ports[0]
            owner = await Terminal.connect(port, PHONE)
            await owner.login()
            intruder = await Terminal.connect(port, PHONE)
            await intruder.send(other_device())
            taken = await intruder.receive()
            assert getattr(taken.message, "result", None) == REGISTER_TERMINAL_TAKEN
            stranger = await Terminal.connect(port, "13900000999")
            await stranger.send(other_device())
            unknown = await stranger.receive()
            assert getattr(unknown.message, "result", None) == REGISTER_TERMINAL_UNKNOWN
            await report(owner, 1)


async def test_logins_during_an_outage_are_decided_from_the_cache(
    clients: list[Terminal], db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with serving(proxy.dsn, tmp_path) as app:
            port, http_port = app.server.ports[0], app.http_ports[0]
            known = await Terminal.connect(port, PHONE)
            code = await known.login()
            await known.close()

            proxy.cut()
            back = await Terminal.connect(port, PHONE)  # reconnects during the outage
            await back.send(TerminalAuth(auth_code=code))
            assert getattr((await back.receive()).message, "result", None) == 0
            for n in range(3):
                await report(back, n)  # acknowledged: spooled and fsynced
            assert metric(app, "jt808_logins_from_cache_total") == 1
            status, health = await http(http_port, "GET", "/healthz")
            assert (status, health["status"]) == (200, "degraded")

            wrong = await Terminal.connect(port, PHONE)
            await wrong.send(TerminalAuth(auth_code="not-the-code"))
            assert getattr((await wrong.receive()).message, "result", None) == 1

            newcomer = await Terminal.connect(port, "13900000555")
            await newcomer.send(other_device())
            with trio.move_on_after(1) as unanswered:
                await newcomer.receive()
            assert unanswered.cancelled_caught  # not durable, so not answered: it retries

            proxy.restore()
            await newcomer.send(other_device())  # its retransmission
            registered = await newcomer.receive()
            assert getattr(registered.message, "result", None) == 0

            async def replayed() -> None:
                while stored(db) < 3:  # noqa: ASYNC110 - the writer's recovery runs on its own
                    await trio.sleep(0.1)

            await replayed()
            while (await http(http_port, "GET", "/healthz"))[1]["status"] != "ok":  # noqa: ASYNC110
                await trio.sleep(0.1)


async def test_the_cache_survives_a_restart_during_an_outage(
    clients: list[Terminal], db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with serving(proxy.dsn, tmp_path) as app:
            terminal = await Terminal.connect(app.server.ports[0], PHONE, Edition.V2019)
            code = await terminal.login()
            await terminal.close()
        # the node stopped (its cache saved); it starts again with the database down
        proxy.cut()
        async with serving(proxy.dsn, tmp_path) as app:
            terminal = await Terminal.connect(app.server.ports[0], PHONE, Edition.V2019)
            await terminal.send(
                TerminalAuth(auth_code=code, imei="860000000000001", software_version="1.0")
            )
            assert getattr((await terminal.receive()).message, "result", None) == 0
            await report(terminal, 1)
        proxy.restore()
