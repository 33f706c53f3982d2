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


def test_raw_missing_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent.bin"
    assert main(["decode", "--raw", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"jt808 decode: cannot read {missing}: No such file or directory"
    ]


def _serve_capture(directory: Path, chunks: list[bytes]) -> Path:
    """A capture written the way ``jt808 serve --capture`` writes one (ingest.capture)."""
    import trio  # noqa: PLC0415

    from ingest.capture import CaptureWriter  # noqa: PLC0415

    async def write() -> Path:
        writer = await CaptureWriter.open(
            directory,
            connection=1,
            peer="10.1.2.3:40000",
            wall=datetime(2026, 10, 3, 0, 30, tzinfo=GMT8),
            start=100.0,
            max_bytes=1 << 20,
        )
        for i, chunk in enumerate(chunks):
            await writer.record(chunk, now=100.0 + i * 0.5)
        await writer.aclose()
        return writer.path

    return trio.run(write)


def test_raw_reads_a_serve_capture_record_by_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [encode(REPORT, phone="13800138000", serial=n) for n in range(1, 17)]
    stream = b"".join(frames)
    # Socket reads cut anywhere, one of them in the middle of a frame.
    chunks = [stream[:10], stream[10 : len(frames[0]) * 5 + 3], stream[len(frames[0]) * 5 + 3 :]]
    path = _serve_capture(tmp_path, chunks)
    code, rows = _run(["--raw", str(path)], monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert not [row for row in rows if "error" in row]
    assert [row["serial"] for row in rows] == list(range(1, 17))
    assert rows[0]["capture"] == {"offset_s": 0.5, "peer": "10.1.2.3:40000"}
    assert rows[-1]["capture"] == {"offset_s": 1.0, "peer": "10.1.2.3:40000"}
    # A truncated tail (the writer died mid-record) is no error either.
    path.write_bytes(path.read_bytes()[:-7])
    code, rows = _run(["--raw", str(path)], monkeypatch=monkeypatch, capsys=capsys)
    assert code == 0
    assert [row["serial"] for row in rows] == list(range(1, 6))
