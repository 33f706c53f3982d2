"""One phone identity (protocol.phone, migration 9) and positions linked to their vehicle
whenever the vehicle was imported: a 2019 terminal's positions are found in every view, and a
terminal moved to another vehicle leaves its past on the old one."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest

from protocol.fields import GMT8
from protocol.header import Edition, Header
from protocol.messages.location import Location, Mileage
from protocol.phone import PhoneError, canonical_phone
from storage import migrate, position_row
from storage.masterdata import upsert_vehicles, vehicle_bindings, vehicle_rows_from_csv
from storage.pgstore import PgPositionStore
from storage.reports import export_positions_csv, positions_per_unit, refresh_daily_stats
from storage.rows import COLUMN_NAMES
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main

DAY = datetime(2026, 11, 2, 9, 0, tzinfo=GMT8)
PHONE_2019 = "00000000013800000002"  # as a 2019 header carries 13800000002
PHONE_2013 = "013800000002"  # the same terminal in a 2013 header


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("13800000002", "013800000002"),
        ("013800000002", "013800000002"),
        ("00000000013800000002", "013800000002"),
        ("12345678901234567", "00012345678901234567"),
        ("0", "000000000000"),
        ("01380000000A", "01380000000a"),  # hex digits some devices send, kept
    ],
)
def test_one_form_for_every_edition(given: str, stored: str) -> None:
    assert canonical_phone(given) == stored


@pytest.mark.parametrize("bad", ["", "1380000000x", "123456789012345678901", "138 0000"])
def test_what_is_not_a_phone_is_refused(bad: str) -> None:
    with pytest.raises(PhoneError):
        canonical_phone(bad)


def _rows(phone: str, start: datetime, count: int, *, layout: Edition = Edition.V2013) -> list:
    header = Header(msg_id=0x0200, body_length=0, phone=phone, serial=1, layout=layout)
    rows = []
    for k in range(count):
        location = Location(
            alarm=0,
            status=0b11,
            latitude=25_040_000,
            longitude=102_710_000 + 100 * k,
            altitude_m=1890,
            speed=400,
            direction=90,
            time=start + timedelta(minutes=k),
            items=(Mileage(value=10_000 + 5 * k),),
        )
        rows.append(position_row(header, location, datetime.now(UTC)))
    return rows


def _store(dsn: str, rows: list, store: PgPositionStore | None = None) -> None:
    own = store is None
    store = store or PgPositionStore(dsn)
    try:
        store.write_rows(rows)
    finally:
        if own:
            store.close()


def _import(dsn: str, csv: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        upsert_vehicles(conn, vehicle_rows_from_csv(csv))


def _vehicle_of_positions(dsn: str) -> list[tuple[str | None, int]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT v.plate, count(*) FROM positions p LEFT JOIN vehicles v ON v.id = p.vehicle_id "
            "GROUP BY 1 ORDER BY 1 NULLS FIRST"
        ).fetchall()


HEADER = "plate,phone,unit,category,exempt\n"


def test_a_2019_terminal_is_found_in_every_view(db: str) -> None:
    _import(db, HEADER + "云A00002,13800000002,昆明市财政局,retained,false\n")
    _store(db, _rows(PHONE_2019, DAY, 10, layout=Edition.V2019))
    with psycopg.connect(db, autocommit=True) as conn:
        latest = conn.execute(
            "SELECT plate, unit, category, phone FROM vehicle_latest_position"
        ).fetchall()
        assert latest == [("云A00002", "昆明市财政局", "retained", PHONE_2013)]
        refresh_daily_stats(conn)
        daily = conn.execute(
            "SELECT plate, unit, category, day, positions FROM vehicle_daily_stats"
        ).fetchall()
        assert daily == [("云A00002", "昆明市财政局", "retained", date(2026, 11, 2), 10)]
        units = positions_per_unit(conn, DAY - timedelta(hours=1), DAY + timedelta(hours=1))
        assert [(u.unit, u.category, u.vehicles, u.positions) for u in units] == [
            ("昆明市财政局", "retained", 1, 10)
        ]
        out = io.BytesIO()
        export_positions_csv(
            conn, out, DAY - timedelta(hours=1), DAY + timedelta(hours=1), unit="昆明市财政局"
        )
    lines = out.getvalue().decode("utf-8").splitlines()
    assert len(lines) == 11  # the header and the ten positions
    assert all("云A00002" in line for line in lines[1:])


def test_positions_stored_before_or_just_after_an_import_carry_the_vehicle(db: str) -> None:
    store = PgPositionStore(db)  # one writer connection, before and after the import
    try:
        _store(db, _rows(PHONE_2013, DAY, 3), store)  # reports before its vehicle exists
        assert _vehicle_of_positions(db) == [(None, 3)]
        _import(db, HEADER + "云A00002,13800000002,gov,retained,false\n")
        assert _vehicle_of_positions(db) == [("云A00002", 3)]  # linked when the import committed
        # The store read the bindings before the import: the next batch sees the import.
        _store(db, _rows(PHONE_2019, DAY + timedelta(hours=1), 2), store)
        assert _vehicle_of_positions(db) == [("云A00002", 5)]
    finally:
        store.close()


def _now_s() -> datetime:
    return datetime.now(GMT8).replace(microsecond=0)


def test_a_terminal_moved_to_another_vehicle_leaves_its_past_on_the_old_one(db: str) -> None:
    store = PgPositionStore(db)
    try:
        _import(db, HEADER + "云A00001,13800000002,gov,retained,false\n")
        _store(db, _rows(PHONE_2013, DAY, 4), store)
        # Article 18: the terminal is moved to another vehicle through the platform centre.
        _import(
            db,
            HEADER + "云A00001,,gov,retained,false\n" + "云A00009,13800000002,gov,retained,false\n",
        )
        moved = _now_s()
        # what it records from now on is the new vehicle's ...
        _store(db, _rows(PHONE_2019, moved + timedelta(seconds=2), 3, layout=Edition.V2019), store)
        # ... and what it recorded before the move, uploaded only now (blind-area data,
        # 0x0704), stays the old vehicle's: the vehicle is the one of the device time
        _store(db, _rows(PHONE_2013, moved - timedelta(hours=1), 2), store)
    finally:
        store.close()
    assert _vehicle_of_positions(db) == [("云A00001", 6), ("云A00009", 3)]
    with psycopg.connect(db) as conn:
        resolved = conn.execute(
            "SELECT count(*) FROM positions WHERE vehicle_id IS DISTINCT FROM "
            "jt808_vehicle_at(phone, device_time)"
        ).fetchone()
    assert resolved == (0,)  # the SQL function agrees with the writer


def test_a_move_committed_while_a_batch_is_being_stored(db: str) -> None:
    # The writer's transaction read the bindings before the move and commits after the move
    # began: the move's commit waits for it, then gives its rows the new vehicle.
    _import(db, HEADER + "云A00001,13800000002,gov,retained,false\n")
    with psycopg.connect(db) as setup:
        old = setup.execute("SELECT id FROM vehicles WHERE plate = '云A00001'").fetchone()
    assert old is not None
    after = _now_s() + timedelta(seconds=30)  # device time after the move
    row = _rows(PHONE_2013, after, 1)[0]._replace(vehicle_id=old[0])
    writer = psycopg.connect(db)
    writer.execute(
        "SELECT pg_advisory_xact_lock_shared(80808, hashtext('jt808 link ' || current_schema()))"
    )
    with (
        writer.cursor() as cur,
        cur.copy(f"COPY positions ({', '.join(COLUMN_NAMES)}) FROM STDIN") as copy,
    ):
        copy.write_row(row)
    done = threading.Event()

    def move() -> None:
        _import(
            db,
            HEADER + "云A00001,,gov,retained,false\n" + "云A00009,13800000002,gov,retained,false\n",
        )
        done.set()

    mover = threading.Thread(target=move)
    mover.start()
    assert not done.wait(0.5)  # the move's commit waits for the batch
    writer.commit()
    writer.close()
    mover.join(10)
    assert done.is_set()
    assert _vehicle_of_positions(db) == [("云A00009", 1)]


def test_migration_9_gives_old_rows_the_one_identity_and_their_vehicle(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        # As stored before migration 9: a vehicle as typed, positions as the header had them.
        conn.execute(
            "INSERT INTO vehicles (plate, phone, unit, category) "
            "VALUES ('云A00002', '13800000002', 'gov', 'retained')"
        )
        for row in _rows(PHONE_2019, DAY, 2, layout=Edition.V2019):
            values = list(row)
            values[1] = PHONE_2019
            placeholders = ", ".join(["%s"] * len(values))
            conn.execute(
                f"INSERT INTO positions ({', '.join(COLUMN_NAMES)}) VALUES ({placeholders})",
                values,
            )
        conn.execute("DELETE FROM jt808_schema_migrations WHERE version = 9")
        conn.execute("DROP FUNCTION jt808_canonical_phone(text)")
        assert migrate(conn) == [9]
        assert conn.execute("SELECT phone FROM vehicles").fetchall() == [(PHONE_2013,)]
        rows = conn.execute("SELECT DISTINCT phone FROM positions").fetchall()
        assert rows == [(PHONE_2013,)]
    assert _vehicle_of_positions(db) == [("云A00002", 2)]


def test_terminal_bindings_over_time_and_vehicle_history(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _import(db, HEADER + "云A00001,13800000002,gov,retained,false\n")
    _import(  # the terminal moved to another vehicle
        db,
        HEADER + "云A00001,,gov,retained,false\n" + "云A00009,13800000002,gov,retained,false\n",
    )
    with psycopg.connect(db) as conn:
        old = vehicle_bindings(conn, "云A00001")
        new = vehicle_bindings(conn, "云A00009")
        assert vehicle_bindings(conn, "云X") is None
    assert old is not None
    assert new is not None
    (first,) = old
    (second,) = new
    assert (first["phone"], first["valid_from"]) == (PHONE_2013, None)  # since the beginning
    assert first["valid_to"] == second["valid_from"]  # handed over at one instant
    assert (second["phone"], second["valid_to"]) == (PHONE_2013, None)  # still fitted
    assert main(["vehicles", "history", "云A00009", "--dsn", db]) == 0
    assert capsys.readouterr().out.strip().endswith(".. now")
    assert main(["vehicles", "history", "云A00001", "--json", "--dsn", db]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["phone"] == PHONE_2013
    assert line["from"] is None
    assert line["to"] is not None
    assert main(["vehicles", "history", "云X", "--dsn", db]) == 1
