"""Migration 5, and master data (vehicles, fences, filings) through storage and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from geofence import Circle, DailyWindow, FenceKind, PeriodWindow, Polygon, Rectangle
from storage import (
    MasterDataError,
    changed_since,
    filing_rows_from_csv,
    load_fence_rows,
    load_filing_rows,
    load_registry_rows,
    masterdata_version,
    migrate,
    vehicle_rows_from_csv,
)
from storage.schema import MIGRATIONS
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main
from tools.masterdata_cmd import fences_from_rows, filings_from_rows, registry_from_rows

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 9, 1, tzinfo=UTC)


def _columns(conn: psycopg.Connection[Any], table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    ).fetchall()
    return {name for (name,) in rows}


def _import(kind: str, path: Path, dsn: str, *extra: str) -> int:
    return main([kind, "import", str(path), "--dsn", dsn, *extra])


def test_migration_5_from_empty(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert 5 in migrate(conn, now=NOW, days_ahead=0)
        assert {"max_speed_kmh", "exempt", "category"} <= _columns(conn, "vehicles")
        assert {"id", "rule", "record", "deadline", "vehicle_id"} <= _columns(conn, "alerts")
        assert _columns(conn, "alert_events") == {"seq", "alert_id", "at", "alert"}
        assert {"distance_source", "seq", "filing_id"} <= _columns(conn, "trips")
        assert {"shape", "geometry", "daily_start", "period_end"} <= _columns(conn, "fences")
        assert masterdata_version(conn) == 1


def test_migration_5_upgrades_version_4_keeping_vehicles(pg_schema_dsn: str) -> None:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE jt808_schema_migrations (version integer PRIMARY KEY, name text "
            "NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("CREATE TABLE jt808_settings (key text PRIMARY KEY, value text NOT NULL)")
        conn.execute("INSERT INTO jt808_settings VALUES ('backend', 'partitioned')")
        ctx_backend = "partitioned"
        from storage.schema import SchemaContext  # noqa: PLC0415

        ctx = SchemaContext(backend=ctx_backend)
        for migration in MIGRATIONS[:4]:
            conn.execute(migration.render(ctx))
            conn.execute(
                "INSERT INTO jt808_schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        conn.execute(
            "INSERT INTO vehicles (plate, phone, unit, category) VALUES ('A1', '1', 'u', 'rental')"
        )
        assert migrate(conn, now=NOW, days_ahead=0)[0] == 5
        assert "kind" not in _columns(conn, "alerts")  # migration 4's table is gone
        assert load_registry_rows(conn)[0]["plate"] == "A1"
        assert migrate(conn, now=NOW, days_ahead=0) == []


def test_imports_load_as_engine_objects(pg_schema_dsn: str) -> None:  # noqa: F811
    assert _import("vehicles", DATA / "vehicles.csv", pg_schema_dsn) == 0
    assert _import("fences", DATA / "fences.geojson", pg_schema_dsn) == 0
    assert _import("filings", DATA / "filings.csv", pg_schema_dsn) == 0
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        registry = registry_from_rows(load_registry_rows(conn))
        fences = {f.name: f for f in fences_from_rows(load_fence_rows(conn))}
        filing_rows = load_filing_rows(conn)
        filings = filings_from_rows(filing_rows)
        version = masterdata_version(conn)
    assert len(registry) == 3  # the vehicle without a terminal is not tracked
    first = registry[registry.index_of_phone["013800000001"]]
    assert (first.plate, first.category, first.exempt, first.max_speed_kmh) == (
        "云A·00001",
        "retained",
        False,
        80.0,
    )
    assert fences["Kunming"].id == 10
    assert fences["Kunming"].kind is FenceKind.PERMITTED
    assert isinstance(fences["Kunming"].shape, Polygon)
    assert fences["Kunming"].max_speed_kmh == 100.0
    assert isinstance(fences["Dali office"].shape, Rectangle)
    assert fences["Dali office"].id > 10  # ids given later do not collide with explicit ones
    park = fences["Bureau car park"]
    assert isinstance(park.shape, Circle)
    assert park.shape.radius_m == 150.0
    assert isinstance(park.window, DailyWindow)
    assert isinstance(fences["Resort"].window, PeriodWindow)
    assert filing_rows[0]["destination"] == "Dali office"
    assert filings[0].destination_fence == fences["Dali office"].id
    assert filings[0].vehicle == first.id
    assert filings[0].start == datetime.fromisoformat("2026-09-20T08:00:00+08:00")
    assert filings[1].destination_fence is None

    # Re-importing changes nothing but the version; filed_at stays the first one.
    assert _import("filings", DATA / "filings.csv", pg_schema_dsn) == 0
    assert _import("fences", DATA / "fences.geojson", pg_schema_dsn) == 0
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert changed_since(conn, version)
        again = load_filing_rows(conn)
        assert [r["id"] for r in again] == [r["id"] for r in filing_rows]
        assert [r["filed_at"] for r in again] == [r["filed_at"] for r in filing_rows]
        assert len(load_fence_rows(conn)) == 4
        assert not changed_since(conn, masterdata_version(conn))


def test_fences_replace_deactivates_the_rest(pg_schema_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    assert _import("fences", DATA / "fences.geojson", pg_schema_dsn) == 0
    one = tmp_path / "one.geojson"
    one.write_text(
        '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
        '{"type": "Point", "coordinates": [102.7, 25.0]}, "properties": '
        '{"name": "Kunming", "kind": "permitted", "radius_m": 5000}}]}',
        encoding="utf-8",
    )
    assert _import("fences", one, pg_schema_dsn, "--replace") == 0
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        rows = load_fence_rows(conn)
        assert [(r["id"], r["name"], r["shape"]) for r in rows] == [(10, "Kunming", "circle")]
        assert len(load_fence_rows(conn, include_inactive=True)) == 4


def test_bad_geojson_is_reported_and_nothing_is_imported(
    pg_schema_dsn: str,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = tmp_path / "bad.geojson"
    bad.write_text(
        '{"type": "FeatureCollection", "features": ['
        '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [102.7, 25.0]}, '
        '"properties": {"name": "ok", "kind": "parking", "radius_m": 10}},'
        '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [102.7, 25.0]}, '
        '"properties": {"name": "no radius", "kind": "parking"}},'
        '{"type": "Feature", "geometry": {"type": "LineString", "coordinates": []}, '
        '"properties": {"name": "line", "kind": "zone"}}]}',
        encoding="utf-8",
    )
    assert _import("fences", bad, pg_schema_dsn) == 1
    assert "2 problem(s)" in caplog.text
    assert "'no radius'" in caplog.text
    assert "radius_m" in caplog.text
    assert "feature 2 ('line')" in caplog.text
    not_json = tmp_path / "x.geojson"
    not_json.write_text("{", encoding="utf-8")
    assert _import("fences", not_json, pg_schema_dsn) == 1
    assert "not JSON" in caplog.text
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert load_fence_rows(conn) == []


def test_vehicle_csv_problems_are_listed_by_line() -> None:
    text = (
        "plate,phone,unit,category,exempt\n"
        "A1,123,u,retained,false\n"
        "A2,12x,u,retained,false\n"
        ",1,u,retained,false\n"
        "A3,4,,retained,false\n"
        "A4,5,u,truck,false\n"
        "A5,6,u,rental,maybe\n"
        "A1,7,u,rental,no\n"
        "A6,123,u,rental,no\n"
    )
    with pytest.raises(MasterDataError) as caught:
        vehicle_rows_from_csv(text)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(3, 10)]
    assert "phone must be up to 20 digits" in problems[0]
    assert "category must be one of" in problems[3]
    assert "exempt must be true or false" in problems[4]
    assert "already on line 2" in problems[5]
    with pytest.raises(MasterDataError, match="missing columns"):
        vehicle_rows_from_csv("plate,phone\nA1,1\n")
    with pytest.raises(MasterDataError, match="unknown columns"):
        vehicle_rows_from_csv("plate,phone,unit,category,exempt,colour\n")


def test_filing_csv_problems(pg_schema_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(MasterDataError) as caught:
        filing_rows_from_csv(
            "plate,start,end,destination,purpose,passengers,approver,state\n"
            "A1,2026-10-01T09:00,2026-10-01T08:00,,x,y,z,\n"
            "A1,yesterday,2026-10-01T08:00,,x,y,z,\n"
            "A1,2026-10-01T07:00,2026-10-01T08:00,,x,y,z,done\n",
            now=NOW,
        )
    assert len(caught.value.problems) == 3
    assert "is not after start" in caught.value.problems[0]
    assert "ISO 8601" in caught.value.problems[1]
    assert "state must be one of" in caught.value.problems[2]
    rows = filing_rows_from_csv(
        "plate,start,end,destination,purpose,passengers,approver,filed_at\n"
        "A1,2026-10-01T07:00,2026-10-01T08:00,,x,y,z,2026-10-02T10:00\n",
        now=NOW,
    )
    assert rows[0]["filed_at"] == datetime.fromisoformat("2026-10-02T10:00+08:00")
    # unknown plate and fence: nothing imported, exit 1
    assert _import("vehicles", DATA / "vehicles.csv", pg_schema_dsn) == 0
    bad = tmp_path / "f.csv"
    bad.write_text(
        "plate,start,end,destination,purpose,passengers,approver\n"
        "云A·00001,2026-10-01T07:00,2026-10-01T08:00,,x,y,z\n"
        "NOPE,2026-10-01T07:00,2026-10-01T08:00,,x,y,z\n"
        "云A·00002,2026-10-01T07:00,2026-10-01T08:00,Moon,x,y,z\n",
        encoding="utf-8",
    )
    assert _import("filings", bad, pg_schema_dsn) == 1
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert load_filing_rows(conn) == []


def test_a_phone_on_two_plates_is_refused(pg_schema_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    assert _import("vehicles", DATA / "vehicles.csv", pg_schema_dsn) == 0
    moved = tmp_path / "v.csv"
    moved.write_text(
        "plate,phone,unit,category,exempt\n新B,013800000001,u,rental,false\n", encoding="utf-8"
    )
    assert _import("vehicles", moved, pg_schema_dsn) == 1
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        assert len(load_registry_rows(conn)) == 4


def test_gbk_vehicles_import_says_gb18030(
    pg_schema_dsn: str,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What Excel saves on a Chinese Windows: GBK, no BOM.
    text = (
        "plate,phone,unit,category,exempt\n"
        "云A12345,013800000011,昆明市财政局,retained,false\n"
        "滇B·0001,013800000012,云南省审计厅,platform,true\n"
    )
    path = tmp_path / "车辆.csv"
    path.write_bytes(text.encode("gbk"))
    # --log-level after the sub-command, and the result still on standard output.
    assert (
        main(["vehicles", "import", str(path), "--dsn", pg_schema_dsn, "--log-level", "ERROR"]) == 0
    )
    out = capsys.readouterr().out
    assert out == f"imported 2 vehicles from {path} (read as GB 18030)\n"
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        rows = {r["plate"]: r["unit"] for r in load_registry_rows(conn)}
    assert rows == {"云A12345": "昆明市财政局", "滇B·0001": "云南省审计厅"}
    # UTF-8 with a BOM, and the encoding given by hand.
    path.write_bytes(text.encode("utf-8-sig"))
    assert (
        main(["--log-level", "WARNING", "vehicles", "import", str(path), "--dsn", pg_schema_dsn])
        == 0
    )
    assert "(read as UTF-8 (with BOM))" in capsys.readouterr().out
    path.write_bytes(text.encode("gbk"))
    assert _import("vehicles", path, pg_schema_dsn, "--encoding", "gbk") == 0
    assert "(read as gbk)" in capsys.readouterr().out
    # Neither UTF-8 nor GB 18030: one line naming the line and the byte.
    path.write_bytes(text.encode("gbk") + b"A9,1,u,retained,\xff\xff\n")
    assert _import("vehicles", path, pg_schema_dsn) == 1
    assert "neither UTF-8 nor GB 18030: line 4, byte 17 (0xff)" in caplog.text
    assert "--encoding" in caplog.text


def test_filing_csv_lists_every_problem_at_once(
    pg_schema_dsn: str,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert _import("vehicles", DATA / "vehicles.csv", pg_schema_dsn) == 0
    bad = tmp_path / "f.csv"
    bad.write_text(
        "plate,start,end,destination,purpose,passengers,approver,state\n"
        "云A·00001,yesterday,2026-10-01T08:00,,x,y,z,done\n"  # two problems in one line
        "NOPE,2026-10-01T07:00,2026-10-01T08:00,,x,y,z,\n"  # found by the database lookup
        "云A·00002,2026-10-01T07:00,2026-10-01T08:00,Moon,x,y,z,,extra\n"
        "云A·00002,2026-10-01T07:00,2026-10-01T08:00,Moon,x,y,z,\n",
        encoding="utf-8",
    )
    assert _import("filings", bad, pg_schema_dsn) == 1
    assert "4 problem(s), nothing imported" in caplog.text
    assert "line 2: start must be an ISO 8601 time" in caplog.text
    assert "; state must be one of" in caplog.text
    assert "line 3: unknown vehicle plate 'NOPE'" in caplog.text
    assert "line 4: more fields than the header" in caplog.text
    assert "line 5: unknown fence 'Moon' as destination" in caplog.text
