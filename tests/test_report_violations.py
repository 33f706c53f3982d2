"""``jt808 report violations`` and ``jt808 alerts list`` on stored alerts."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from alerts.calendar import GMT8
from alerts.lifecycle import Alert
from alerts.rules import AlertState, Severity
from storage import AlertRepository, StorageError, migrate, month_bounds
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tools import report_chart
from tools.cli import main


def _alert(n: int, rule: str, unit: str, opened: datetime, state: AlertState) -> dict[str, object]:
    return Alert(
        id=f"{rule}:{n}",
        rule=rule,
        state=state,
        phone=f"1380000000{n}",
        vehicle=n,
        plate=f"云A{n}",
        unit=unit,
        severity=Severity.MEDIUM,
        opened_at=opened,
        updated_at=opened,
    ).to_json()


@pytest.fixture
def stored(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        migrate(conn, days_ahead=0)
    oct3 = datetime(2026, 10, 3, 10, 0, tzinfo=GMT8)
    v = AlertState.VIOLATION
    with AlertRepository(pg_schema_dsn) as repo:
        for record in (
            _alert(1, "holiday_sealing", "Finance", oct3, v),
            _alert(2, "holiday_sealing", "Finance", oct3 + timedelta(hours=1), v),
            _alert(3, "overspeed", "Finance", oct3, v),
            _alert(4, "out_of_area", "Audit", oct3, v),
            _alert(5, "out_of_area", "Audit", oct3, AlertState.RESOLVED),  # not counted
            _alert(6, "overspeed", "Audit", datetime(2026, 11, 1, 0, 0, tzinfo=GMT8), v),
            # 23:30 on 30 Sep China time is still September
            _alert(7, "overspeed", "Audit", datetime(2026, 9, 30, 23, 30, tzinfo=GMT8), v),
        ):
            repo.put(record)
    return pg_schema_dsn


def test_month_bounds() -> None:
    start, end = month_bounds("2026-12")
    assert start == datetime(2026, 12, 1, tzinfo=GMT8)
    assert end == datetime(2027, 1, 1, tzinfo=GMT8)
    for bad in ("2026-13", "2026-1", "October", "2026-10\n", "２０２６-１０", "0000-01", "9999-12"):
        with pytest.raises(StorageError):
            month_bounds(bad)


def test_report_table_csv_and_png(
    stored: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_csv, out_png = tmp_path / "v.csv", tmp_path / "v.png"
    args = ["report", "violations", "--period", "2026-10", "--dsn", stored]
    assert main([*args, "--csv", str(out_csv), "--png", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "Violations 2026-10" in table
    assert "holiday_sealing" in table
    assert table.splitlines()[-1].split() == ["total", "4"]
    with out_csv.open(encoding="utf-8") as f:
        assert list(csv.reader(f)) == [
            ["period", "unit", "rule", "violations", "vehicles"],
            ["2026-10", "Audit", "out_of_area", "1", "1"],
            ["2026-10", "Finance", "holiday_sealing", "2", "2"],
            ["2026-10", "Finance", "overspeed", "1", "1"],
        ]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out_png.stat().st_size > 1000
    assert main([*args, "--unit", "Audit", "--png", str(out_png)]) == 0
    assert "holiday_sealing" not in capsys.readouterr().out
    assert main(["report", "violations", "--period", "2026-13", "--dsn", stored]) == 1


def test_report_png_needs_a_cjk_font_for_chinese_units(
    stored: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with AlertRepository(stored) as repo:
        repo.put(
            _alert(
                8,
                "overspeed",
                "昆明市财政局",
                datetime(2026, 10, 5, tzinfo=GMT8),
                AlertState.VIOLATION,
            )
        )
    out_png = tmp_path / "v.png"
    args = ["report", "violations", "--period", "2026-10", "--dsn", stored, "--png", str(out_png)]
    monkeypatch.setattr(report_chart, "find_cjk_font", lambda: None)
    assert main(args) == 1
    assert "no CJK font" in caplog.text
    assert "apt-get install fonts-noto-cjk" in caplog.text
    assert not out_png.exists()
    # ASCII units only: drawn with English labels
    assert main([*args, "--unit", "Audit"]) == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alerts_list(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["alerts", "list", "--dsn", stored]
    assert main([*base, "--since", "2026-10-01", "--until", "2026-11-01", "--json"]) == 0
    records = [json.loads(line) for line in io.StringIO(capsys.readouterr().out)]
    assert [r["id"] for r in records] == [
        "holiday_sealing:1",
        "out_of_area:4",
        "out_of_area:5",
        "overspeed:3",
        "holiday_sealing:2",
    ]
    assert main([*base, "--since", "2026-10-01", "--unit", "Audit", "--state", "violation"]) == 0
    table = capsys.readouterr().out
    assert "out_of_area:4" in table
    assert "overspeed:6" in table
    assert "2026-10-03 10:00:00" in table
    assert table.splitlines()[-1] == "2 alert(s)"
    assert main([*base, "--since", "2026-10-01", "--rule", "no_such_rule"]) == 2
