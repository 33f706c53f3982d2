"""Two nodes on one PostgreSQL: online sessions in the ``sessions`` table, and a command given
to node A reaching the terminal connected to node B over LISTEN/NOTIFY (and back)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import trio

from protocol import encode_split
from protocol.messages.control import LocationQuery
from protocol.messages.location import LocationQueryResponse
from protocol.messages.params import QueryParamsResponse, TerminalParameter
from storage import NotifyBus, SessionTable, migrate
from storage.sessions import CHUNK_CHARS, ChunkJoiner, encode_chunks
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_commands import node, online, post
from tests.test_ingest_server import PHONE, report

pytestmark = pytest.mark.db


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


def test_long_messages_are_cut_into_notify_sized_chunks_and_joined() -> None:
    message = {"type": "reply", "id": "x", "text": "长" * 5000, "blob": "ab" * 9000}
    chunks = encode_chunks(message)
    assert len(chunks) > 3
    assert all(len(chunk.encode()) < 8000 for chunk in chunks)
    joiner = ChunkJoiner()
    results = [joiner.feed(chunk) for chunk in reversed(chunks)]  # any order
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == message
    assert joiner.feed("garbage") is None
    assert joiner.feed(encode_chunks({"a": 1})[0]) == {"a": 1}
    assert len(chunks[0]) <= CHUNK_CHARS + 60


async def test_a_command_through_node_a_reaches_the_terminal_on_node_b(db: str) -> None:
    run = uuid.uuid4().hex[:8]  # node ids unique to this run: NOTIFY is database-wide
    node_a, node_b = f"a-{run}", f"b-{run}"
    tables = [SessionTable(db), SessionTable(db)]
    buses = [NotifyBus(db), NotifyBus(db)]
    # A stale row of node B from an earlier life, cleared when B starts.
    await tables[1].online("013800000999", node_b, datetime(2024, 1, 1, tzinfo=UTC), "1.2.3.4:5")
    try:
        with trio.fail_after(30):
            async with (
                trio.open_nursery() as nursery,
                node(
                    nursery, config={"node_id": node_a}, sessions=tables[0], transport=buses[0]
                ) as a,
                node(
                    nursery, config={"node_id": node_b}, sessions=tables[1], transport=buses[1]
                ) as b,
            ):
                assert await trio.to_thread.run_sync(tables[0].rows) == []
                terminal = await online(b.port)
                await wait_until_row(tables[0], PHONE)
                (row,) = await trio.to_thread.run_sync(tables[0].rows)
                assert row[:2] == (PHONE, node_b)
                assert row[3] is not None
                assert row[3].startswith("127.0.0.1:")

                async def device() -> None:
                    command = await terminal.recv()
                    assert isinstance(command.message, LocationQuery)
                    await terminal.send(
                        LocationQueryResponse(reply_serial=command.serial, location=report(5))
                    )
                    # then a parameter answer far larger than one NOTIFY payload
                    command = await terminal.recv()
                    values = tuple(
                        TerminalParameter(param_id=0x0013, value=f"host-{n:04d}.example.org:6808")
                        for n in range(250)
                    )
                    reply = QueryParamsResponse(reply_serial=command.serial, params=values)
                    wires = encode_split(reply, phone=terminal.phone, first_serial=900)
                    assert len(wires) > 5
                    for wire in wires:
                        await terminal.send_raw(wire)
                    for _ in wires:
                        await terminal.recv()  # each package is acknowledged
                    device_done.set()

                device_done = trio.Event()
                nursery.start_soon(device)
                status, answer = await post(
                    a.http_port, f"/terminals/{PHONE}/commands", {"msg_id": "0x8201"}
                )
                assert status == 200, answer
                assert answer["node"] == node_b
                assert answer["reply"]["msg_id"] == "0x0201"
                assert answer["reply"]["body"]["location"]["lat"] == report(5).lat
                assert b.metric("jt808_commands_relayed_total") == 1

                answer = await a.server.command(PHONE, "0x8104", {})
                params = answer["reply"]["body"]["params"]
                assert len(params) == 250
                assert params[-1]["value"] == "host-0249.example.org:6808"

                await device_done.wait()
                await terminal.aclose()
                await wait_until_row(tables[0], None)
                status, answer = await post(
                    a.http_port, f"/terminals/{PHONE}/commands", {"msg_id": "0x8201"}
                )
                assert (status, answer["error"]) == (404, "offline")
    finally:
        for table in tables:
            table.close()
        for bus in buses:
            bus.close()


async def wait_until_row(table: SessionTable, phone: str | None) -> None:
    async def phones() -> list[str]:
        return [row[0] for row in await trio.to_thread.run_sync(table.rows)]

    expected = [] if phone is None else [phone]
    while await phones() != expected:  # noqa: ASYNC110 - polls the database: no event to wait on
        await trio.sleep(0.02)


async def test_session_changes_are_written_together_in_order(db: str) -> None:
    table = SessionTable(db)
    first = datetime(2024, 1, 1, tzinfo=UTC)
    later = datetime(2024, 1, 2, tzinfo=UTC)
    changes = [
        *[("online", f"0138000{n:05d}", first, f"10.0.0.{n % 250}:1") for n in range(300)],
        ("offline", "013800000001", first, ""),  # its terminal left
        ("online", "013800000002", later, "10.0.0.9:2"),  # reconnected: a newer row
        ("offline", "013800000002", first, ""),  # the old connection's offline: no effect
    ]
    try:
        assert await table.record("node-a", changes)
    finally:
        table.close()
    with psycopg.connect(db) as conn:
        rows = {
            phone: (node, since)
            for phone, node, since in conn.execute(
                "SELECT phone, node, connected_since FROM sessions"
            ).fetchall()
        }
    assert len(rows) == 299
    assert "013800000001" not in rows
    assert rows["013800000002"] == ("node-a", later)
