"""Every way the server was once stopped, replayed against the whole serve wiring: it goes on
serving, and a well-behaved terminal keeps getting its acknowledgements throughout.

The triggers, as they were found (each test names its number):

 1. one unauthenticated frame with a NUL in an auth code or a plate;
 2. terminals logging in while the database is down;
 3. deeply nested JSON on the operator port;
 4. ``GET /vehicles`` while the database is down;
 5. an alert stream open when the database goes down, or opened while it is down;
 6. starting while the database is down;
 7. a takeover of a registered phone (tests/test_terminal_identity.py);
 8. brute-forcing auth codes over many connections;
 9. a junk flood filling the log;
10. slow HTTP clients holding the operator port's slots;
11. a sub-package flood;
12. session rows left behind after an outage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio

from protocol import Edition, encode
from protocol.codec import encode_split
from protocol.messages.multimedia import MultimediaData
from protocol.messages.terminal import TerminalAuth
from tests.db_proxy import DatabaseProxy
from tests.operator_auth import AUTH_LINE
from tests.serving import http, metric, serving
from tests.storage_fixtures import db_proxy, migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal, location, registration
from tools.serve_cmd import Running

pytestmark = pytest.mark.db

STEADY = "13900000777"
ACK_TIMEOUT_S = 10.0


class Steady:
    """A well-behaved terminal reporting every 50 ms; every report must be acknowledged."""

    def __init__(self) -> None:
        self.acked = 0
        self.terminal: Terminal | None = None

    async def run(
        self,
        port: int,
        code: str | None,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        terminal = self.terminal = await Terminal.connect(port, STEADY)
        try:
            if code is None:
                code = await terminal.login()
            else:
                await terminal.send(TerminalAuth(auth_code=code))
                reply = await terminal.receive()
                assert getattr(reply.message, "result", None) == 0
            task_status.started(code)
            n = 0
            while True:
                n += 1
                serial = await terminal.send(location(n))
                with trio.fail_after(ACK_TIMEOUT_S):
                    while True:
                        ack = await terminal.receive()
                        if getattr(ack.message, "reply_serial", None) == serial:
                            break
                assert getattr(ack.message, "result", None) == 0
                self.acked += 1
                await trio.sleep(0.05)
        finally:
            await trio.aclose_forcefully(terminal.stream)


@asynccontextmanager
async def steady_terminal(app: Running, code: str | None = None) -> AsyncIterator[Steady]:
    """The steady terminal runs for the block; it must have been acknowledged throughout."""
    steady = Steady()
    async with trio.open_nursery() as nursery:
        await nursery.start(steady.run, app.server.ports[0], code)
        yield steady
        before = steady.acked
        with trio.fail_after(ACK_TIMEOUT_S):
            while steady.acked < before + 2:  # noqa: ASYNC110 - still acknowledged at the end
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(
    port: int, phone: str, edition: Edition = Edition.V2013
) -> AsyncIterator[Terminal]:
    terminal = await Terminal.connect(port, phone, edition)
    try:
        yield terminal
    finally:
        await trio.aclose_forcefully(terminal.stream)


async def test_1_nul_bytes_in_an_auth_code_or_a_plate(db: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.server.ports[0]
            for _ in range(3):  # as often as they like
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(bytes.fromhex("7e0102000501360000002002da6162006364cd7e"))
                    answer = await stream.receive_some(1024)
                    assert answer  # a 0x8001 (message error), and the connection goes on
            async with client(port, "13900000100") as attacker:
                await attacker.send(registration(plate="云A\x00666"))
                reply = await attacker.receive()
                assert getattr(reply.message, "result", None) == 2  # 0x8001 message error
            assert metric(app, "jt808_decode_errors_total", {"kind": "text_control"}) >= 4
            assert metric(app, "jt808_contained_errors_total", {"where": "connection"}) == 0


async def test_2_logins_while_the_database_is_down(
    db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with serving(proxy.dsn, tmp_path) as app, steady_terminal(app):
            port = app.server.ports[0]
            async with client(port, "13900000101") as known:
                code = await known.login()
            proxy.cut()
            async with client(port, "13900000101") as known:
                await known.send(TerminalAuth(auth_code=code))
                assert getattr((await known.receive()).message, "result", None) == 0
            async with client(port, "13900000102") as newcomer:
                await newcomer.send(registration())
                with trio.move_on_after(1):
                    await newcomer.receive()
                    raise AssertionError("a registration that cannot be stored was answered")
            await trio.sleep(0.5)  # the steady terminal goes on through the spool
            proxy.restore()


async def test_3_deeply_nested_json(db: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.http_ports[0]
            status, _ = await http(port, "POST", "/vehicles", b"[" * 100_000)
            assert status == 400
            deep = b'{"msg_id": "0x8201", "body": ' + b'{"a": ' * 1500 + b"1" + b"}" * 1501
            status, _ = await http(port, "POST", "/terminals/13900000777/commands", deep)
            assert status == 400
            assert (await http(port, "GET", "/healthz"))[0] == 200


async def test_4_reading_vehicles_while_the_database_is_down(
    db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with serving(proxy.dsn, tmp_path) as app, steady_terminal(app):
            port = app.http_ports[0]
            assert (await http(port, "GET", "/vehicles"))[0] == 200
            proxy.cut()
            status, body = await http(port, "GET", "/vehicles")
            assert (status, body["error"]) == (503, "unavailable")
            vehicle = {
                "plate": "云A00001",
                "phone": "13900000001",
                "unit": "u",
                "category": "platform",
                "exempt": False,
            }
            vehicles = json.dumps([vehicle]).encode()
            status, body = await http(port, "POST", "/vehicles", vehicles)
            assert (status, body["error"]) == (503, "unavailable"), body
            proxy.restore()
            assert (await http(port, "GET", "/vehicles"))[0] == 200


async def test_5_alert_streams_through_an_outage(
    db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        async with serving(proxy.dsn, tmp_path, rules=True) as app, steady_terminal(app):
            port = app.http_ports[0]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                head = f"GET /alerts/stream HTTP/1.1\r\nHost: t\r\n{AUTH_LINE}\r\n"
                await stream.send_all(head.encode())
                head = await stream.receive_some(4096)
                assert head.startswith(b"HTTP/1.1 200")
                proxy.cut()
                with trio.fail_after(30):  # the open stream ends cleanly (or keeps beating)
                    while await stream.receive_some(4096):
                        pass
            status, body = await http(port, "GET", "/alerts/stream")
            assert (status, body["error"]) == (503, "unavailable")
            proxy.restore()
            assert (await http(port, "GET", "/healthz"))[0] == 200


async def test_6_starting_while_the_database_is_down(
    db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    with trio.fail_after(90):
        async with (
            serving(proxy.dsn, tmp_path) as app,  # once, so the node knows the code
            client(app.server.ports[0], STEADY) as terminal,
        ):
            code = await terminal.login()
        proxy.cut()
        async with serving(proxy.dsn, tmp_path) as app:
            http_port = app.http_ports[0]
            status, health = await http(http_port, "GET", "/healthz")
            assert (status, health["status"]) == (200, "degraded")
            async with steady_terminal(app, code) as steady:
                while steady.acked < 5:  # noqa: ASYNC110 - polls from outside
                    await trio.sleep(0.05)
                proxy.restore()
                while (await http(http_port, "GET", "/healthz"))[1]["status"] != "ok":  # noqa: ASYNC110 - polls from outside
                    await trio.sleep(0.1)
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT count(*) FROM positions").fetchone()
            assert row is not None
            assert row[0] >= steady.acked


async def test_8_brute_force_is_locked_out(db: str, tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.server.ports[0]
            async with client(port, "13900000200") as owner:
                await owner.login()

            async def guess(source: str, phones: list[str], connections: int) -> None:
                """``connections`` connections, each guessing codes until it is closed."""
                for n in range(connections):
                    phone = phones[n % len(phones)]
                    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
                    async with stream:
                        try:
                            for serial in range(5):
                                code = TerminalAuth(auth_code=f"guess-{serial}")
                                await stream.send_all(encode(code, phone=phone, serial=serial))
                                if not await stream.receive_some(1024):
                                    break
                        except trio.BrokenResourceError:
                            pass  # closed after too many failures

            async with trio.open_nursery() as nursery:
                # one phone from many connections and two addresses: the phone is locked
                nursery.start_soon(guess, "127.0.0.2", ["13900000200"], 20)
                nursery.start_soon(guess, "127.0.0.3", ["13900000200"], 20)
                # many phones from one address: the address is locked
                sprayed = [f"1390000{n:04d}" for n in range(300, 340)]
                nursery.start_soon(guess, "127.0.0.4", sprayed, 60)
            assert metric(app, "jt808_auth_lockouts_total", {"scope": "phone"}) >= 1
            assert metric(app, "jt808_auth_lockouts_total", {"scope": "address"}) >= 1
            locked = metric(app, "jt808_auth_locked_total", {"scope": "address"}) + metric(
                app, "jt808_auth_locked_total", {"scope": "phone"}
            )
            # most attempts never reached the database
            assert locked > metric(app, "jt808_auth_failures_total")
            async with client(port, "13900000201") as bystander:
                await bystander.login()  # another phone from an address not locked


async def test_9_a_junk_flood_writes_little_log(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = (bytes(range(256)) * 4 + b"\x7e") * 1000  # ~1 MB, 1,000 bad "frames" and more
    with trio.fail_after(90), caplog.at_level(logging.INFO):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.server.ports[0]
            errors = 0.0
            while errors < 20_000:
                # A connection whose junk happens to decode as frames of another phone is
                # closed after its failures: the flooder connects again.
                stream = await trio.open_tcp_stream("127.0.0.1", port, local_address="127.0.0.2")
                async with stream:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(junk)
                        with trio.move_on_after(0.5):
                            while await stream.receive_some(65536):
                                pass
                errors = sum(
                    sample.value
                    for family in app.server.metrics.registry.collect()
                    for sample in family.samples
                    if sample.name == "jt808_decode_errors_total"
                )
    assert len(caplog.records) < 200


async def test_10_slow_http_clients_do_not_starve_the_health_check(db: str, tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.http_ports[0]

            async def trickle() -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    for byte in b"GET /metrics HTTP/1.1\r\nHost: t\r\n":
                        await stream.send_all(bytes([byte]))
                        await trio.sleep(1)

            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(trickle)
                await trio.sleep(2)
                for _ in range(3):
                    status, _ = await http(port, "GET", "/healthz", timeout_s=2)
                    assert status == 200
                nursery.cancel_scope.cancel()


async def test_11_a_sub_package_flood_stays_within_its_caps(db: str, tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with serving(db, tmp_path) as app, steady_terminal(app):
            port = app.server.ports[0]
            limits = app.server.uploads.limits

            async def flood(n: int) -> None:
                async with client(port, f"139000004{n:02d}") as terminal:
                    await terminal.login()
                    upload = MultimediaData(
                        media_id=n,
                        media_type=0,
                        media_format=0,
                        event=0,
                        channel=1,
                        location=dataclasses.replace(location(1), items=()),
                        data=b"\xff" * 1000 * 3000,
                    )
                    wires = encode_split(
                        upload, phone=terminal.wire_phone, first_serial=100, max_body=1000
                    )
                    await terminal.stream.send_all(b"".join(wires[:-1]))  # never completed
                    await trio.sleep(1)

            async with trio.open_nursery() as nursery:
                for n in range(10):
                    nursery.start_soon(flood, n)
                while metric(app, "jt808_frames_total", {"msg_id": "0x0801"}) < 10 * 2999 * 0.9:
                    assert metric(app, "jt808_reassembly_bytes") <= limits.max_bytes_total
                    await trio.sleep(0.05)
            assert metric(app, "jt808_reassembly_bytes") <= limits.max_bytes_total
            assert app.server.uploads.bytes_in_flight <= limits.max_bytes_total


async def test_12_session_rows_follow_the_connections_after_an_outage(
    db: str, proxy: DatabaseProxy, tmp_path: Path
) -> None:
    def rows() -> set[str]:
        with psycopg.connect(db) as conn:
            return {str(phone) for (phone,) in conn.execute("SELECT phone FROM sessions")}

    with trio.fail_after(90):
        async with serving(proxy.dsn, tmp_path) as app, steady_terminal(app) as steady:
            port = app.server.ports[0]
            async with client(port, "13900000501") as arriving:
                code = await arriving.login()  # known to the node before the outage
            async with client(port, "13900000500") as leaving:
                await leaving.login()
                while len(rows()) < 2:  # noqa: ASYNC110 - polls from outside
                    await trio.sleep(0.05)
                proxy.cut()
            # during the outage: one terminal left, another came (from the cache)
            async with client(port, "13900000501") as arriving:
                await arriving.send(TerminalAuth(auth_code=code))
                assert getattr((await arriving.receive()).message, "result", None) == 0
                await trio.sleep(0.5)
                proxy.restore()
                assert steady.terminal is not None
                expected = {steady.terminal.wire_phone, arriving.wire_phone}
                while rows() != expected:  # noqa: ASYNC110 - polls from outside
                    await trio.sleep(0.1)


async def test_a_failing_background_service_is_restarted_and_terminals_go_on(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception injected into the position writer (a background service) after it
    started: it is restarted, and a terminal that retransmits what was not acknowledged
    loses nothing."""
    from storage.writer import PositionWriter  # noqa: PLC0415

    armed = trio.Event()
    fired: list[bool] = []
    original = PositionWriter._maintenance_loop

    async def failing_once(self: PositionWriter) -> None:
        if not fired:
            await armed.wait()
            fired.append(True)
            raise RuntimeError("injected writer failure")
        await original(self)

    monkeypatch.setattr(PositionWriter, "_maintenance_loop", failing_once)
    with trio.fail_after(60):
        async with serving(db, tmp_path) as app, client(app.server.ports[0], STEADY) as terminal:
            await terminal.login()
            for n in range(40):
                if n == 10:
                    armed.set()
                serial = await terminal.send(location(n))
                while True:  # a terminal's retransmission: the same frame until acknowledged
                    with trio.move_on_after(1.5):
                        ack = await terminal.receive()
                        if getattr(ack.message, "reply_serial", None) == serial:
                            break
                        continue
                    await terminal.send(location(n), serial=serial)
            assert metric(app, "jt808_service_restarts_total", {"service": "writer"}) == 1
            assert metric(app, "jt808_contained_errors_total", {"where": "service"}) == 1
            with psycopg.connect(db) as conn:
                row = conn.execute("SELECT count(*) FROM positions").fetchone()
            assert row is not None
            assert row[0] == 40
