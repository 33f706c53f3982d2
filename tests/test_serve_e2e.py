"""The wired application against a real PostgreSQL: acks mean durable, auth codes persist,
unauthenticated terminals write nothing, SIGKILL right after an ack loses nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import pytest
import trio

from ingest import Server, ServerConfig
from protocol import encode, encode_split
from protocol.header import Edition
from protocol.messages.control import LocationQuery
from protocol.messages.location import Location, LocationBatch, LocationQueryResponse
from protocol.messages.multimedia import MultimediaData, MultimediaUploadResponse
from protocol.phone import canonical_phone
from storage import PositionWriter, Spool, TerminalStore, migrate
from storage.terminal_cache import TerminalCodeCache
from tests.operator_auth import TEST_TOKEN, store_token
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal, location
from tools import cli
from tools.serve_cmd import WriterSink
from tools.terminal_registry import DatabaseRegistry

pytestmark = pytest.mark.db

# The location basic information (table 23) without additional items, as 0x0801 carries it.
BASIC_FIELDS = (
    "alarm",
    "status",
    "latitude",
    "longitude",
    "altitude_m",
    "speed",
    "direction",
    "time",
)


def _count(dsn: str, phone: str) -> int:
    """Positions stored for ``phone`` (in whichever form: they are stored in one)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM positions WHERE phone = %s", (canonical_phone(phone),)
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


@asynccontextmanager
async def running_app(dsn: str, spool_dir: Path) -> AsyncIterator[int]:
    config = ServerConfig(host="127.0.0.1", port=0, http_port=0)
    writer = PositionWriter(dsn, spool=Spool(spool_dir))
    store = TerminalStore(dsn)
    server = Server(
        config, sink=WriterSink(writer), registry=DatabaseRegistry(store, TerminalCodeCache())
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        ports = await nursery.start(server.run)
        try:
            yield ports[0]
        finally:
            nursery.cancel_scope.cancel()
            store.close()


async def test_position_is_in_the_database_when_its_ack_arrives(db: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_app(db, tmp_path / "spool") as port:
            terminal = await Terminal.connect(port, "13900000001", Edition.V2019)
            await terminal.login()
            for n in range(3):
                serial = await terminal.send(location(n))
                ack = await terminal.receive()
                assert getattr(ack.message, "reply_serial", None) == serial
                assert getattr(ack.message, "result", None) == 0
                assert _count(db, terminal.wire_phone) == n + 1
            batch = LocationBatch(batch_type=1, positions=tuple(location(n) for n in range(3, 8)))
            await terminal.send(batch)
            await terminal.receive()
            assert _count(db, terminal.wire_phone) == 8
            await terminal.close()


async def test_retransmission_stored_once_and_unauthenticated_refused(
    db: str, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with running_app(db, tmp_path / "spool") as port:
            stranger = await Terminal.connect(port, "13900000002")
            await stranger.send(location(1))
            refusal = await stranger.receive()
            assert getattr(refusal.message, "result", None) == 1
            assert _count(db, stranger.wire_phone) == 0

            terminal = await Terminal.connect(port, "13900000003")
            await terminal.login()
            serial = await terminal.send(location(5))
            await terminal.receive()
            await terminal.send(location(5), serial=serial)  # the terminal missed our ack
            again = await terminal.receive()
            assert getattr(again.message, "reply_serial", None) == serial
            assert _count(db, terminal.wire_phone) == 1
            await stranger.close()
            await terminal.close()


async def test_bad_input_costs_only_itself(db: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_app(db, tmp_path / "spool") as port:
            noisy = await Terminal.connect(port, "13900000006")
            quiet = await Terminal.connect(port, "13900000007")
            await noisy.login()
            await quiet.login()
            good = bytearray(encode(location(1), phone=noisy.phone, serial=40))
            good[-2] ^= 0xFF  # the check code no longer matches
            await noisy.stream.send_all(b"garbage\x00\xff" + bytes(good))
            await noisy.stream.send_all(b"\x7e" + b"\x11" * 3000 + b"\x7e")  # oversize
            error_reply = await noisy.receive()  # 0x8001 result 2 for the bad check code
            assert getattr(error_reply.message, "result", None) == 2
            serial = await noisy.send(location(2))
            ack = await noisy.receive()
            assert getattr(ack.message, "reply_serial", None) == serial
            await quiet.send(location(3))
            await quiet.receive()
            assert _count(db, noisy.wire_phone) == 1
            assert _count(db, quiet.wire_phone) == 1
            await noisy.close()
            await quiet.close()


async def test_auth_code_survives_a_restart(db: str, tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with running_app(db, tmp_path / "spool") as port:
            terminal = await Terminal.connect(port, "13900000004")
            code = await terminal.login()
            await terminal.close()
        async with running_app(db, tmp_path / "spool") as port:
            from protocol.messages.terminal import TerminalAuth  # noqa: PLC0415

            terminal = await Terminal.connect(port, "13900000004")
            await terminal.send(TerminalAuth(auth_code=code))
            assert getattr((await terminal.receive()).message, "result", None) == 0
            await terminal.send(TerminalAuth(auth_code="wrong"))
            assert getattr((await terminal.receive()).message, "result", None) == 1
            await terminal.close()


def _free_port(count: int = 1) -> int:
    """A port with ``count`` consecutive free ports from it (workers serve http_port + i),
    below the ephemeral range (32768 and up), where no outgoing connection can take it
    between this check and the server's bind."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(20_000, 32_768 - count)
        try:
            for offset in range(count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise AssertionError(f"no {count} consecutive free ports")


def _start_server(dsn: str, data_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JT808_")}
    log = (data_dir / "server.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tools.cli",
            "serve",
            "--dsn",
            dsn,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-port",
            str(_free_port(count=4)),
            "--data-dir",
            str(data_dir),
            *extra,  # later flags win: extra may override the ones above
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        cwd=Path(__file__).resolve().parent.parent,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            time.sleep(0.1)
        else:
            log.close()  # the child keeps its own descriptor
            return process
    process.kill()
    process.wait()
    log.close()
    raise AssertionError("server did not start: " + (data_dir / "server.log").read_text()[-2000:])


@pytest.mark.parametrize("stall_database", [False, True], ids=["database-up", "database-stalled"])
async def test_sigkill_right_after_an_ack_loses_nothing(
    db: str, tmp_path: Path, stall_database: bool
) -> None:
    port = _free_port()
    process = _start_server(db, tmp_path, port)
    blocker: psycopg.Connection[tuple[object, ...]] | None = None
    try:
        with trio.fail_after(60):
            terminal = await Terminal.connect(port, "13900000005")
            await terminal.login()
            if stall_database:
                # Hold a lock that blocks every insert: the writer's timeout sends the batch to
                # the spool, which is fsynced before the ack.
                blocker = psycopg.connect(db)
                blocker.execute("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
            serial = await terminal.send(location(7))
            ack = await terminal.receive()
            assert getattr(ack.message, "reply_serial", None) == serial
            process.send_signal(signal.SIGKILL)
            process.wait()
            await terminal.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if blocker is not None:
            blocker.rollback()
            blocker.close()
    if stall_database:
        assert _count(db, "013900000005") == 0
        restarted = _start_server(db, tmp_path, port)  # replays the spool
        try:
            deadline = time.monotonic() + 20
            while _count(db, "013900000005") == 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the database: no event to wait on
                await trio.sleep(0.2)
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert restarted.wait(timeout=20) == 0
    assert _count(db, "013900000005") == 1


async def test_two_worker_processes_share_the_port_and_stop_cleanly(
    db: str, tmp_path: Path
) -> None:
    port = _free_port()
    process = _start_server(db, tmp_path, port, "--workers", "2")
    try:
        with trio.fail_after(60):
            terminals = [await Terminal.connect(port, f"1390000010{n}") for n in range(6)]
            for terminal in terminals:
                await terminal.login()
                await terminal.send(location(1))
                await terminal.receive()
                await terminal.close()
        for terminal in terminals:
            assert _count(db, terminal.wire_phone) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def _session_nodes(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT phone, node FROM sessions").fetchall()
    return {str(phone): str(node) for phone, node in rows}


async def test_the_served_app_records_sessions_answers_commands_and_stores_media(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port, http_port = _free_port(), _free_port()
    node_id = f"e2e-{uuid.uuid4().hex[:8]}"
    store_token(db)
    process = _start_server(db, tmp_path, port, "--http-port", str(http_port), "--node-id", node_id)
    try:
        with trio.fail_after(30):
            terminal = await Terminal.connect(port, "13900000201")
            await terminal.login()
            phone = terminal.wire_phone
            while _session_nodes(db).get(phone) != node_id:  # noqa: ASYNC110 - polls the database
                await trio.sleep(0.05)

            async def answer_location() -> None:
                command = await terminal.receive()
                assert isinstance(command.message, LocationQuery)
                await terminal.send(
                    LocationQueryResponse(reply_serial=command.serial, location=location(3))
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_location)
                url = f"http://127.0.0.1:{http_port}"
                argv = ["send", "13900000201", "0x8201", "--http", url, "--token", TEST_TOKEN]
                assert await trio.to_thread.run_sync(cli.main, argv) == 0
            answer = json.loads(capsys.readouterr().out)
            assert (answer["node"], answer["reply"]["msg_id"]) == (node_id, "0x0201")

            photo = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"
            fix = location(4)
            upload = MultimediaData(
                media_id=5,
                media_type=0,
                media_format=0,
                event=0,
                channel=1,
                location=Location(**{f: getattr(fix, f) for f in BASIC_FIELDS}),
                data=photo,
            )
            wires = encode_split(upload, phone=terminal.phone, first_serial=50, max_body=300)
            for wire in wires:
                await terminal.stream.send_all(wire)
            replies = [(await terminal.receive()).message for _ in range(len(wires) + 1)]
            assert replies[-1] == MultimediaUploadResponse(media_id=5)
            assert (tmp_path / "media" / phone / "5.jpg").read_bytes() == photo
            await terminal.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT media_id, size_bytes FROM multimedia").fetchone()
    assert row == (5, len(photo))
    assert phone not in _session_nodes(db)  # removed on disconnect, and the node's rows at stop
