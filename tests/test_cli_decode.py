"""``jt808 decode``: JSON lines, errors that do not stop the run, exit status."""

from __future__ import annotations

import io
import json
from datetime import datetime
from pathlib import Path

import pytest

from protocol import encode
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.location import LocationBatch, LocationReport, Mileage, RawItem
from tools.cli import main

REPORT = LocationReport(
    alarm=1 << 8,
    status=0b1111,
    latitude=25_040_000,
    longitude=102_710_000,
    altitude_m=1890,
    speed=605,
    direction=90,
    time=datetime(2026, 10, 3, 8, 30, tzinfo=GMT8),
    items=(Mileage(value=12345), RawItem(item_id=0xE1, data=b"\x01\x02")),
)


def _run(
    argv: list[str],
    stdin: str = "",
    monkeypatch: pytest.MonkeyPatch | None = None,
    capsys: pytest.CaptureFixture[str] | None = None,
) -> tuple[int, list[dict[str, object]]]:
    assert monkeypatch is not None
    assert capsys is not None
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(["decode", *argv])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()]


def test_location_report_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wire = encode(REPORT, phone="13912345678", serial=7)
    code, rows = _run([wire.hex()], monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert rows == [
        {
            "msg_id": "0x0200",
            "version": "2013",
            "phone": "013912345678",
            "serial": 7,
            "encrypted": False,
            "subpackage": None,
            "body": {
                "alarm": 256,
                "status": 15,
                "lat": -25.04,
                "lon": -102.71,
                "altitude_m": 1890,
                "speed_kmh": 60.5,
                "direction": 90,
                "time": "2026-10-03T08:30:00+08:00",
                "extras": {"0x01": {"mileage_km": 1234.5}, "0xe1": {"raw": "0102"}},
            },
        }
    ]


def test_stdin_lines_errors_and_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = encode(
        LocationBatch(batch_type=1, positions=(REPORT, REPORT)),
        phone="1",
        serial=1,
        edition=Edition.V2019,
    )
    bad = bytearray(good)
    bad[-2] ^= 0x01  # break the check code
    lines = f"{good.hex()}\n\n{bytes(bad).hex()}\nnot-hex\n{good.hex()}\n"
    code, rows = _run([], stdin=lines, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1
    assert [("error" in r) for r in rows] == [False, True, True, False]
    assert rows[0]["version"] == "2019"
    body = rows[0]["body"]
    assert isinstance(body, dict)
    assert body["batch_type"] == 1
    assert len(body["positions"]) == 2
    error = rows[1]["error"]
    assert isinstance(error, dict)
    assert error["kind"] == "checksum"
    assert rows[2]["error"] == {"kind": "hex", "detail": "not a hex string"}


def test_raw_capture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = tmp_path / "capture.bin"
    capture.write_bytes(b"junk" + encode(REPORT, phone="1", serial=1) * 3)
    code, rows = _run(["--raw", str(capture)], monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert [r["serial"] for r in rows] == [1, 1, 1]


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-command"]) == 2
    capsys.readouterr()
