"""Filings the platform stamps (article 21; storage.schema migration 13): the receipt time is the
database's, a claimed time is only kept beside it, a historical import is explicit and refused
for recent windows, every correction is a version, and the rules judge each moment by the version
in force then."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest

from alerts.calendar import GMT8, posix
from alerts.engine import _Filings
from alerts.lifecycle import CLAIM_TOLERANCE_S, claims_earlier
from alerts.model import Filing, Registry, Vehicle
from geofence import FenceIndex
from storage.masterdata import (
    MasterDataError,
    filing_history,
    filing_rows_from_csv,
    load_filing_rows,
    load_filing_versions,
    upsert_filings,
    upsert_vehicles,
    vehicle_rows_from_csv,
)
from tests.storage_fixtures import migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tools.cli import main

HEADER = "plate,start,end,destination,purpose,passengers,approver,filed_at\n"
LAST_YEAR = datetime.now(GMT8).year - 1


def _vehicle(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        upsert_vehicles(
            conn,
            vehicle_rows_from_csv(
                "plate,phone,unit,category,exempt\n云A00001,13800000001,gov,retained,false\n"
            ),
        )


def _file(db: str, csv: str, *, historical: bool = False) -> list[int]:
    with psycopg.connect(db, autocommit=True) as conn:
        return upsert_filings(
            conn, filing_rows_from_csv(csv, now=datetime.now(UTC)), historical=historical
        )


def test_the_receipt_is_the_databases_and_a_claimed_time_is_only_kept(db: str) -> None:
    _vehicle(db)
    before = datetime.now(UTC) - timedelta(seconds=5)
    (filing_id,) = _file(
        db,
        HEADER + f"云A00001,{LAST_YEAR}-10-03T09:00:00,{LAST_YEAR}-10-03T12:00:00,,"
        f"inspection,2,Li,{LAST_YEAR}-10-03T08:00:00\n",
    )
    with psycopg.connect(db) as conn:
        (row,) = load_filing_rows(conn)
        (version,) = load_filing_versions(conn)
    assert row["id"] == filing_id
    assert row["received_at"] >= before
    assert row["filed_at"] == row["received_at"]  # what the rules count from
    assert row["claimed_filed_at"] == datetime(LAST_YEAR, 10, 3, 8, tzinfo=GMT8)
    assert (row["version"], row["historical"]) == (1, False)
    assert (version["id"], version["version"], version["superseded_at"]) == (filing_id, 1, None)
    assert version["filed_at"] == row["received_at"]


def test_a_historical_import_counts_the_files_times_for_old_windows_only(db: str) -> None:
    _vehicle(db)
    old = (
        HEADER + f"云A00001,{LAST_YEAR}-10-03T09:00:00,{LAST_YEAR}-10-03T12:00:00,,"
        f"inspection,2,Li,{LAST_YEAR}-10-05T10:00:00\n"
    )
    (filing_id,) = _file(db, old, historical=True)
    with psycopg.connect(db) as conn:
        (row,) = load_filing_rows(conn)
        (version,) = load_filing_versions(conn)
    assert row["historical"] is True
    assert row["filed_at"] == version["filed_at"] == datetime(LAST_YEAR, 10, 5, 10, tzinfo=GMT8)
    # last week's filings are not history: refused, with a one-line reason, nothing stored
    week_ago = (datetime.now(GMT8) - timedelta(days=7)).replace(microsecond=0, tzinfo=None)
    recent = (
        HEADER + f"云A00001,{week_ago.isoformat()},{(week_ago + timedelta(hours=2)).isoformat()},"
        f",inspection,2,Li,{week_ago.isoformat()}\n"
    )
    with pytest.raises(MasterDataError) as refused:
        _file(db, recent, historical=True)
    (problem,) = refused.value.problems
    assert "line 2: a historical import takes filings whose window ended 30 days ago" in problem
    with psycopg.connect(db) as conn:
        assert [r["id"] for r in load_filing_rows(conn)] == [filing_id]


def test_the_cli_refuses_a_recent_historical_import(
    db: str, tmp_path: object, caplog: pytest.LogCaptureFixture
) -> None:
    _vehicle(db)
    week_ago = (datetime.now(GMT8) - timedelta(days=7)).replace(microsecond=0, tzinfo=None)
    path = tmp_path / "filings.csv"  # type: ignore[operator]
    path.write_text(
        HEADER + f"云A00001,{week_ago.isoformat()},{(week_ago + timedelta(hours=2)).isoformat()},"
        f",inspection,2,Li,{week_ago.isoformat()}\n",
        encoding="utf-8",
    )
    assert main(["filings", "import", str(path), "--historical", "--dsn", db]) == 1
    assert "30 days ago" in caplog.text


def test_corrections_are_versions_and_history_shows_them(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _vehicle(db)
    row = f"云A00001,{LAST_YEAR}-10-03T09:00:00,{LAST_YEAR}-10-03T12:00:00,,inspection,2,Li,\n"
    (filing_id,) = _file(db, HEADER + row)
    assert _file(db, HEADER + row) == [filing_id]  # the same again: no new version
    # the end time corrected after the trip, by the filing's id
    corrected = (
        "plate,start,end,destination,purpose,passengers,approver,id\n"
        f"云A00001,{LAST_YEAR}-10-03T09:00:00,{LAST_YEAR}-10-03T18:00:00,,inspection,2,Li,"
        f"{filing_id}\n"
    )
    assert _file(db, corrected) == [filing_id]
    with psycopg.connect(db) as conn:
        versions = filing_history(conn, plate="云A00001")
        engine_versions = load_filing_versions(conn)
        assert filing_history(conn, plate="云X") is None
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE filing_versions SET purpose = 'covered up'")
        conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM filing_versions")
    assert versions is not None
    assert [(v["filing"], v["version"], v["end"].astimezone(GMT8).hour) for v in versions] == [
        (filing_id, 1, 12),
        (filing_id, 2, 18),
    ]
    first, second = engine_versions
    assert first["superseded_at"] == second["filed_at"]  # v1 was in force until v2 came
    assert second["superseded_at"] is None
    assert main(["filings", "history", "云A00001", "--dsn", db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"filing {filing_id} v1",
        f"filing {filing_id} v2",
    ]
    assert main(["filings", "history", "云A00001", "--json", "--dsn", db]) == 0
    parsed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["version"] for p in parsed] == [1, 2]


# ---------------------------------------------------------------------------------------------
# The engine: each moment judged by the version in force then


def _at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 10, 9, hour, minute, tzinfo=GMT8)


def test_a_version_covers_only_while_it_is_in_force() -> None:
    registry = Registry([Vehicle(id=7, phone="013800000001", plate="云A1", unit="gov")])
    # v1 (filed 07:00) covers 08:00-18:00; v2 (filed 10:00) shortens it to 08:00-09:30.
    v1 = Filing(id=1, vehicle=7, start=_at(8), end=_at(18), filed_at=_at(7), superseded_at=_at(10))
    v2 = Filing(id=1, vehicle=7, start=_at(8), end=_at(9, 30), filed_at=_at(10), version=2)
    filings = _Filings([v1, v2], registry, FenceIndex([]), early_s=0, late_s=0)
    times = [_at(8, 30), _at(9, 45), _at(11)]
    found = filings.lookup(
        np.zeros(len(times), dtype=np.int64), np.array([posix(t) for t in times], np.int64)
    )
    # 08:30 and 09:45 are covered by v1, in force then; at 11:00 v2 is in force and does not
    # cover it: the trip then is unfiled.
    assert [int(f) >= 0 for f in found] == [True, True, False]
    # the deadline of a trip outlasting its filing is the version in force now
    assert int(filings.filed_end(np.array([1], np.int64))[0]) == posix(_at(9, 30))


def test_a_claim_well_before_the_receipt_is_flagged() -> None:
    base = Filing(id=1, vehicle=7, start=_at(8), end=_at(18), filed_at=_at(12))
    assert not claims_earlier(base)
    near = Filing(
        id=1,
        vehicle=7,
        start=_at(8),
        end=_at(18),
        filed_at=_at(12),
        claimed_at=_at(12) - timedelta(seconds=CLAIM_TOLERANCE_S),
    )
    assert not claims_earlier(near)  # within the tolerance: a queue, a clock
    far = Filing(id=1, vehicle=7, start=_at(8), end=_at(18), filed_at=_at(12), claimed_at=_at(7))
    assert claims_earlier(far)


def test_a_historical_import_is_in_the_audit_trail_with_the_files_checksum(
    db: str, tmp_path: object
) -> None:
    _vehicle(db)
    path = tmp_path / "history.csv"  # type: ignore[operator]
    path.write_text(
        HEADER + f"云A00001,{LAST_YEAR}-10-03T09:00:00,{LAST_YEAR}-10-03T12:00:00,,"
        f"inspection,2,Li,{LAST_YEAR}-10-05T10:00:00\n",
        encoding="utf-8",
    )
    assert main(["filings", "import", str(path), "--historical", "--dsn", db]) == 0
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            "SELECT source, object_key, after FROM audit_log "
            "WHERE action = 'filings.import_historical'"
        ).fetchall()
    ((source, key, after),) = rows
    assert (source, key) == ("cli", "history.csv")
    assert after["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(after["filings"]) == 1
