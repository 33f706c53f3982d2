"""The position writer against a real PostgreSQL: round trip, dedup, spool, back-pressure."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from prometheus_client import REGISTRY

from protocol.fields import GMT8
from protocol.header import Header
from protocol.messages.location import (
    AnalogInputs,
    ExtendedSignal,
    Fuel,
    GnssSatellites,
    IoStatus,
    Location,
    Mileage,
    RawItem,
    RecorderSpeed,
    SignalStrength,
)
from storage.errors import WriterClosedError
from storage.pgstore import COPY_DIRECT, PgPositionStore, WriteResult
from storage.rows import COLUMN_NAMES, COLUMN_TYPES, PositionRow, position_row
from storage.schema import existing_partitions, migrate
from storage.spool import Spool
from storage.writer import Durability, PositionWriter, WriterConfig
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401


def scalar(item_type: Any, value: int) -> Any:
    """An item of the factory-made scalar types (mypy cannot see their fields)."""
    return item_type(value=value)


CLOSED_PORT_DSN = "postgresql://postgres@127.0.0.1:1/nothing"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=GMT8)
RECEIVED = datetime(2024, 5, 1, 4, 0, 5, tzinfo=UTC)
FAST = WriterConfig(
    batch_rows=50,
    batch_gather_s=0.02,
    write_timeout_s=2.0,
    connect_timeout_s=1.0,
    retry_min_s=0.05,
    retry_max_s=0.2,
)


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        migrate(conn, now=RECEIVED, days_ahead=1)
    return pg_schema_dsn


def make_rows(count: int, *, phones: int = 5, start: int = 0) -> list[PositionRow]:
    rows = []
    for i in range(start, start + count):
        header = Header(msg_id=0x0200, body_length=0, phone=f"0138000{i % phones:05d}", serial=i)
        items: tuple[Any, ...] = ()
        if i % 2:
            items = (
                Mileage(value=100_000 + i),
                Fuel(value=300 + i),
                RecorderSpeed(value=601),
                scalar(SignalStrength, 20),
                scalar(GnssSatellites, 9),
                scalar(IoStatus, 3),
                scalar(AnalogInputs, 0x00010002),
                scalar(ExtendedSignal, 0xFFFFFFFF),
            )
        if i % 3 == 0:
            items = (*items, RawItem(item_id=0xE3, data=bytes([i % 256, 0x7E])))
        location = Location(
            alarm=i % 4,
            status=0b11,
            latitude=22_500_000 + i,
            longitude=113_900_000 + i,
            altitude_m=i % 500,
            speed=i % 1200,
            direction=i % 360,
            time=T0 + timedelta(seconds=i // phones),
            items=items,
        )
        rows.append(position_row(header, location, RECEIVED))
    return rows


def stored(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT {', '.join(COLUMN_NAMES)} FROM positions ORDER BY phone, device_time, fix_key"
        ).fetchall()


def expected(rows: Sequence[PositionRow], vehicles: dict[str, int] | None = None) -> list[Any]:
    out = []
    for row in sorted(rows, key=lambda r: (r.phone, r.device_time, r.fix_key)):
        values: list[Any] = list(row)
        values[COLUMN_NAMES.index("extras")] = json.loads(row.extras) if row.extras else None
        values[-1] = (vehicles or {}).get(row.phone)  # the binding's, whatever the row said
        out.append(tuple(values))
    return out


def count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM positions").fetchone()
        assert row is not None
        return int(row[0])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def running(writer: PositionWriter) -> AsyncIterator[PositionWriter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        try:
            yield writer
        finally:
            nursery.cancel_scope.cancel()


async def submit_all(
    writer: PositionWriter, rows: Sequence[PositionRow], per: int = 7
) -> list[Durability]:
    completions = [await writer.submit(rows[i : i + per]) for i in range(0, len(rows), per)]
    return [await c.wait() for c in completions]


async def eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - polls the database and the spool directory
            await trio.sleep(0.02)


# ---------------------------------------------------------------------------------------------


async def test_batch_round_trips_exactly(db: str) -> None:
    with psycopg.connect(db) as conn:
        vid = conn.execute(
            "INSERT INTO vehicles (plate, phone, unit, category) "
            "VALUES ('粤B12345', '013800000001', 'u1', 'platform') RETURNING id"
        ).fetchone()
    assert vid is not None
    rows = make_rows(300)
    # a caller-given vehicle id gives way to the terminal's binding (storage.bindings)
    rows[5] = rows[5]._replace(vehicle_id=999)
    async with running(PositionWriter(db, config=FAST)) as writer:
        outcomes = await submit_all(writer, rows)
        assert writer.outstanding_rows == 0
    assert set(outcomes) == {Durability.DATABASE}
    assert stored(db) == expected(rows, {"013800000001": vid[0]})


async def test_staging_path_round_trips_and_fills_vehicles(db: str) -> None:
    with psycopg.connect(db) as conn:
        vid = conn.execute(
            "INSERT INTO vehicles (plate, phone, unit, category) "
            "VALUES ('A1', '013800000002', 'u1', 'rental') RETURNING id"
        ).fetchone()
    assert vid is not None
    rows = make_rows(120)
    config = dataclasses.replace(FAST, dedup="staging")
    writer = PositionWriter(db, config=config)  # the SQL join fills the vehicle ids
    async with running(writer):
        assert set(await submit_all(writer, rows)) == {Durability.DATABASE}
    assert stored(db) == expected(rows, {"013800000002": vid[0]})


async def test_retransmitted_rows_are_stored_once(db: str) -> None:
    rows = make_rows(200)
    fallbacks = metric("jt808_storage_dedup_fallbacks_total")
    duplicates = metric("jt808_storage_duplicate_rows_total")
    async with running(PositionWriter(db, config=FAST)) as writer:
        await submit_all(writer, rows)
        # the same rows again, then a mix of old and new in one batch
        assert set(await submit_all(writer, rows)) == {Durability.DATABASE}
        assert set(await submit_all(writer, rows[:50] + make_rows(50, start=200))) == {
            Durability.DATABASE
        }
    # and again after a "restart": a new writer, nothing remembered in memory
    async with running(PositionWriter(db, config=FAST)) as writer:
        assert set(await submit_all(writer, rows)) == {Durability.DATABASE}
    assert count(db) == 250
    assert stored(db) == expected(rows + make_rows(50, start=200))
    assert metric("jt808_storage_dedup_fallbacks_total") > fallbacks
    assert metric("jt808_storage_duplicate_rows_total") - duplicates == 200 + 50 + 200


async def test_repeat_inside_one_batch(db: str) -> None:
    rows = make_rows(10)
    async with running(PositionWriter(db, config=FAST)) as writer:
        assert await (await writer.submit(rows + rows)).wait() is Durability.DATABASE
    assert count(db) == 10


class _KillMidCopy(PgPositionStore):
    """Terminates its own backend from another connection halfway through the first COPY."""

    killed = False

    def write_rows(self, rows: Sequence[PositionRow], **kwargs: Any) -> WriteResult:
        if not _KillMidCopy.killed:
            _KillMidCopy.killed = True
            conn = self.connection()
            pid = conn.info.backend_pid
            with conn.transaction(), conn.cursor() as cur, cur.copy(COPY_DIRECT) as copy:
                copy.set_types(COLUMN_TYPES)
                for i, row in enumerate(rows):
                    if i == len(rows) // 2:
                        with psycopg.connect(self.dsn, autocommit=True) as other:
                            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    copy.write_row(row)
        return super().write_rows(rows, **kwargs)


async def test_connection_killed_mid_batch_loses_nothing(db: str, tmp_path: Path) -> None:
    _KillMidCopy.killed = False
    rows = make_rows(40)
    spool = Spool(tmp_path / "spool")
    writer = PositionWriter(
        db,
        config=FAST,
        spool=spool,
        store_factory=lambda: _KillMidCopy(db, statement_timeout_s=2, connect_timeout_s=1),
    )
    async with running(writer):
        completion = await writer.submit(rows)
        assert await completion.wait() is Durability.SPOOL
        assert _KillMidCopy.killed
        await eventually(lambda: writer.db_up and spool.is_empty())
    assert stored(db) == expected(rows)


class _LoseAnswerAfterCommit(PgPositionStore):
    """Commits, then behaves as if the connection died before the answer arrived."""

    lost = False

    def write_rows(self, rows: Sequence[PositionRow], **kwargs: Any) -> WriteResult:
        result = super().write_rows(rows, **kwargs)
        if not _LoseAnswerAfterCommit.lost:
            _LoseAnswerAfterCommit.lost = True
            self.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return result


async def test_commit_without_answer_is_stored_once(db: str, tmp_path: Path) -> None:
    _LoseAnswerAfterCommit.lost = False
    rows = make_rows(30)
    spool = Spool(tmp_path / "spool")
    writer = PositionWriter(
        db,
        config=FAST,
        spool=spool,
        store_factory=lambda: _LoseAnswerAfterCommit(db, connect_timeout_s=1),
    )
    async with running(writer):
        assert await (await writer.submit(rows)).wait() is Durability.SPOOL
        await eventually(lambda: writer.db_up and spool.is_empty())
    assert count(db) == 30  # the replay found every row already there


async def test_unreachable_database_spools_and_replays_across_restart(
    db: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    rows = make_rows(120)
    down = PositionWriter(CLOSED_PORT_DSN, config=FAST, spool=Spool(spool_dir))
    async with running(down):
        first = await submit_all(down, rows[:60])
        assert not down.db_up
        second = await submit_all(down, rows[60:])  # straight to the spool, no waiting
    assert set(first + second) == {Durability.SPOOL}
    assert count(db) == 0
    # A crash left a torn record after the good ones: it must be ignored.
    segment = sorted(spool_dir.iterdir())[-1]
    with segment.open("ab") as f:
        f.write(b"JTSP\x00\x00\x10\x00torn")
    # The next process, with the database reachable, replays the spool by itself.
    spool = Spool(spool_dir)
    async with running(PositionWriter(db, config=FAST, spool=spool)) as writer:
        await eventually(spool.is_empty)
        assert writer.db_up
    assert stored(db) == expected(rows)
    assert list(spool_dir.iterdir()) == []


async def test_database_back_while_running(db: str, tmp_path: Path) -> None:
    target = [CLOSED_PORT_DSN]
    spool = Spool(tmp_path / "spool")
    writer = PositionWriter(
        db,
        config=FAST,
        spool=spool,
        store_factory=lambda: PgPositionStore(target[0], connect_timeout_s=1),
    )
    rows = make_rows(100)
    async with running(writer):
        assert set(await submit_all(writer, rows[:50])) == {Durability.SPOOL}
        target[0] = db  # the database comes back
        await eventually(lambda: writer.db_up and spool.is_empty())
        assert set(await submit_all(writer, rows[50:])) == {Durability.DATABASE}
    assert stored(db) == expected(rows)


async def test_full_spool_is_not_durable(tmp_path: Path) -> None:
    full_before = metric("jt808_storage_spool_full_total")
    failed_before = metric("jt808_storage_rows_total", outcome="failed")
    spool = Spool(tmp_path / "spool", max_bytes=2_000)
    async with running(PositionWriter(CLOSED_PORT_DSN, config=FAST, spool=spool)) as writer:
        first = await (await writer.submit(make_rows(3))).wait()
        second = await (await writer.submit(make_rows(30, start=3))).wait()
    assert first is Durability.SPOOL
    assert second is Durability.FAILED
    assert not second.durable
    assert metric("jt808_storage_spool_full_total") == full_before + 1
    assert metric("jt808_storage_rows_total", outcome="failed") == failed_before + 30


async def test_without_spool_failures_are_not_durable() -> None:
    async with running(PositionWriter(CLOSED_PORT_DSN, config=FAST)) as writer:
        assert await (await writer.submit(make_rows(2))).wait() is Durability.FAILED


async def test_invalid_rows_fail_alone(db: str) -> None:
    good = make_rows(20)
    bad = [make_rows(1, start=20)[0]._replace(extras="{not json")]  # the server refuses it
    config = dataclasses.replace(FAST, batch_gather_s=0.5)
    async with running(PositionWriter(db, config=config)) as writer:
        c_good = await writer.submit(good)
        c_bad = await writer.submit(bad)
        assert await c_bad.wait() is Durability.FAILED
        assert await c_good.wait() is Durability.DATABASE
    assert count(db) == 20


class _Slow(PgPositionStore):
    def write_rows(self, rows: Sequence[PositionRow], **kwargs: Any) -> WriteResult:
        time.sleep(0.3)
        return super().write_rows(rows, **kwargs)


async def test_submit_waits_at_the_cap(db: str) -> None:
    config = dataclasses.replace(FAST, batch_rows=10, max_pending_rows=20, connections=1)
    writer = PositionWriter(db, config=config, store_factory=lambda: _Slow(db))
    async with running(writer):
        await writer.submit(make_rows(10))
        await writer.submit(make_rows(10, start=10))
        assert writer.outstanding_rows == 20
        returned = trio.Event()

        async def third() -> None:
            await writer.submit(make_rows(10, start=20))
            returned.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(0.1)
            assert not returned.is_set()  # blocked: 20 rows outstanding, cap 20
            await returned.wait()
        await writer.drain()
    assert count(db) == 30


async def test_cancel_flushes_the_open_batch(db: str) -> None:
    config = dataclasses.replace(FAST, batch_gather_s=60.0, batch_rows=10_000)
    writer = PositionWriter(db, config=config)
    async with running(writer):
        completion = await writer.submit(make_rows(25))
        await trio.sleep(0.05)
        before: Durability | None = completion.result
    assert before is None  # it was waiting for its batch to fill
    assert completion.result is Durability.DATABASE
    assert count(db) == 25
    with pytest.raises(WriterClosedError):
        await writer.submit(make_rows(1))


async def test_slow_database_times_out_into_spool(db: str, tmp_path: Path) -> None:
    config = dataclasses.replace(FAST, write_timeout_s=0.1)
    spool = Spool(tmp_path / "spool")
    slow = [True]

    class _SlowOnce(PgPositionStore):
        def write_rows(self, rows: Sequence[PositionRow], **kwargs: Any) -> WriteResult:
            if slow[0]:
                slow[0] = False
                time.sleep(0.5)
            return super().write_rows(rows, **kwargs)

    writer = PositionWriter(db, config=config, spool=spool, store_factory=lambda: _SlowOnce(db))
    rows = make_rows(20)
    async with running(writer):
        assert await (await writer.submit(rows)).wait() is Durability.SPOOL
        await eventually(lambda: writer.db_up and spool.is_empty())
    assert stored(db) == expected(rows)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="max_pending_rows"):
        WriterConfig(batch_rows=100, max_pending_rows=10)
    assert WriterConfig(batch_rows=100, connections=2).pending_cap == 400


async def test_writer_keeps_partitions_ahead_of_its_clock(pg_schema_dsn: str) -> None:  # noqa: F811
    db = pg_schema_dsn
    with psycopg.connect(db, autocommit=True) as conn:
        migrate(conn, backend="partitioned")  # by name: on a server with TimescaleDB too
    future = datetime(2031, 3, 1, 12, tzinfo=UTC)
    config = dataclasses.replace(FAST, partition_days_ahead=2)
    writer = PositionWriter(db, config=config, wall_clock=lambda: future)

    def has_partitions() -> bool:
        with psycopg.connect(db) as conn:
            return existing_partitions(conn) >= {"positions_p20310302", "positions_p20310303"}

    async with running(writer):
        await eventually(has_partitions)
