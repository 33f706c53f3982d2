"""The capture file format (protocol/capture.py) against the server's writer and reader
(ingest/capture.py), byte for byte, both ways; truncation, caps and bad files."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import capture as ingest_capture
from protocol import capture
from protocol.capture import (
    CaptureEncoder,
    CaptureError,
    CaptureHeader,
    CaptureReader,
    CaptureWriter,
    Record,
)

FIXTURES = Path(__file__).parent / "data" / "replay"
WALL = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

records_strategy = st.lists(
    st.builds(
        Record,
        st.integers(min_value=0, max_value=2**64 - 1),
        st.binary(max_size=300),
    ),
    max_size=20,
)
peers = st.text(max_size=40)
starts = st.datetimes(
    min_value=datetime(1970, 1, 1),
    max_value=datetime(2400, 1, 1),
    timezones=st.just(UTC),
)


def _file_bytes(start: datetime, peer: str, records: list[Record], max_bytes: int = 2**40) -> bytes:
    out = io.BytesIO()
    writer = CaptureWriter(out, start=start, peer=peer, max_bytes=max_bytes)
    for record in records:
        writer.record(record.data, offset=record.offset_ns)
    return out.getvalue()


@settings(max_examples=200)
@given(start=starts, peer=peers, records=records_strategy)
def test_written_files_read_back(start: datetime, peer: str, records: list[Record]) -> None:
    data = _file_bytes(start, peer, records)
    header, parsed = capture.parse_capture(data)
    assert header.start == start
    assert header.peer == peer
    assert header.version == capture.VERSION
    assert parsed == records
    reader = CaptureReader(io.BytesIO(data), read_bytes=7)  # records cut across reads
    assert reader.header == header
    assert list(reader) == records
    assert not reader.truncated


@settings(max_examples=200)
@given(records=records_strategy.filter(bool), data=st.data())
def test_a_truncated_tail_ends_the_file_before_it(
    records: list[Record], data: st.DataObject
) -> None:
    whole = _file_bytes(WALL, "127.0.0.1:1", records)
    header_size = len(capture.pack_header(CaptureHeader(start_wall_ns=0, peer="127.0.0.1:1")))
    cut = data.draw(st.integers(min_value=header_size, max_value=len(whole) - 1))
    sizes = [capture.RECORD.size + len(r.data) for r in records]
    whole_records = 0
    end = header_size
    while whole_records < len(sizes) and end + sizes[whole_records] <= cut:
        end += sizes[whole_records]
        whole_records += 1
    reader = CaptureReader(io.BytesIO(whole[:cut]))
    assert list(reader) == records[:whole_records]
    assert reader.truncated == (cut != end)
    assert list(reader) == []  # exhausted, and still says so
    assert reader.truncated == (cut != end)
    assert capture.parse_capture(whole[:cut])[1] == records[:whole_records]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "ends inside the capture header"),
        (b"JT808C", "ends inside the capture header"),
        (b"NOTACAPTURE-FILE-AT-ALL", "bad magic"),
        (b"JT808CAP\x00\x02" + bytes(10), "version 2"),
        (b"JT808CAP\x00\x01" + bytes(8) + b"\x00\x05abc", "ends inside the capture header"),
    ],
)
def test_bad_files_are_capture_errors(data: bytes, message: str) -> None:
    with pytest.raises(CaptureError, match=message):
        CaptureReader(io.BytesIO(data))
    if len(data) >= len(capture.MAGIC) and not data.startswith(capture.MAGIC):
        with pytest.raises(CaptureError):
            capture.parse_capture(data)


def test_an_implausible_record_length_is_an_error_not_an_allocation() -> None:
    head = capture.pack_header(CaptureHeader(start_wall_ns=0, peer="p:1"))
    data = head + capture.RECORD.pack(5, 0xFFFF_FFFF) + b"tiny"
    with pytest.raises(CaptureError, match="4294967295 bytes"):
        list(CaptureReader(io.BytesIO(data)))
    with pytest.raises(CaptureError):
        capture.parse_capture(data)
    assert list(CaptureReader(io.BytesIO(data), max_record_bytes=2**32)) == []  # truncated


def test_the_cap_keeps_whole_records() -> None:
    encoder = CaptureEncoder(start=WALL, peer="127.0.0.1:9", max_bytes=100)
    out = bytearray(encoder.header())
    written = []
    for n in range(10):
        packed = encoder.record(bytes([n]) * 10, offset=n)
        if packed is None:
            break
        out += packed
        written.append(Record(n, bytes([n]) * 10))
    assert encoder.stopped
    assert encoder.record(b"", offset=99) is None  # stays stopped
    assert len(out) == encoder.written <= 100
    assert capture.parse_capture(bytes(out))[1] == written
    assert len(written) == (100 - len(encoder.header())) // (capture.RECORD.size + 10)


def test_values_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ValueError, match="u64"):
        capture.pack_record(2**64, b"")
    with pytest.raises(ValueError, match="u64"):
        capture.pack_header(CaptureHeader(start_wall_ns=-1, peer=""))
    with pytest.raises(ValueError, match="aware"):
        capture.wall_ns(datetime(2024, 1, 1))
    long_peer = "x" * 70_000
    header, _ = capture.parse_capture(
        capture.pack_header(CaptureHeader(start_wall_ns=0, peer=long_peer))
    )
    assert header.peer == "x" * 0xFFFF


def test_offsets_and_names() -> None:
    assert capture.offset_ns(100.5, 100.0) == 500_000_000
    assert capture.offset_ns(99.0, 100.0) == 0  # a clock never runs back; clamp anyway
    assert capture.wall_ns(WALL) == (
        (WALL - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000
    )
    name = capture.capture_name(WALL, pid=42, connection=7)
    assert name == "20240501T120000.123456Z-42-7.jt808cap"
    assert re.fullmatch(r"\d{8}T\d{6}\.\d{6}Z-\d+-\d+\.jt808cap", name)


# ---------------------------------------------------------------------------------------------
# Against the server's implementation


async def test_the_server_s_writer_reads_back_with_ours(tmp_path: Path) -> None:
    chunks = [(100.25, b"\x7eabc\x7e"), (101.0, b""), (102.5, bytes(range(256)) * 3)]
    writer = await ingest_capture.CaptureWriter.open(
        tmp_path,
        connection=3,
        peer="127.0.0.5:40000",
        wall=WALL,
        start=100.0,
        max_bytes=10_000,
    )
    for now, data in chunks:
        await writer.record(data, now=now)
    await writer.aclose()
    assert writer.path.name == capture.capture_name(
        WALL, pid=int(writer.path.name.split("-")[1]), connection=3
    )
    with writer.path.open("rb") as file:
        reader = CaptureReader(file)
        records = list(reader)
    assert reader.header.start == WALL
    assert reader.header.peer == "127.0.0.5:40000"
    assert records == [Record(capture.offset_ns(now, 100.0), data) for now, data in chunks]
    assert reader.bytes_read == writer.written


@settings(max_examples=100)
@given(start=starts, peer=peers, records=records_strategy)
def test_written_files_read_back_with_the_server_s_reader(
    start: datetime, peer: str, records: list[Record], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("cap") / "x.jt808cap"
    path.write_bytes(_file_bytes(start, peer, records))
    header, parsed = ingest_capture.read_capture(path)
    assert header.start == start
    assert header.peer == peer
    assert header.version == 1
    assert parsed == [(r.offset_ns, r.data) for r in records]


async def test_both_writers_write_the_same_bytes(tmp_path: Path) -> None:
    chunks = [(0.001, b"\x7e\x01\x02\x7e"), (0.75, bytes(100))]
    theirs = await ingest_capture.CaptureWriter.open(
        tmp_path, connection=1, peer="127.0.0.1:5", wall=WALL, start=0.0, max_bytes=10**6
    )
    for now, data in chunks:
        await theirs.record(data, now=now)
    await theirs.aclose()
    ours = _file_bytes(
        WALL, "127.0.0.1:5", [Record(capture.offset_ns(now, 0.0), data) for now, data in chunks]
    )
    assert await trio.Path(theirs.path).read_bytes() == ours


def test_the_committed_fixtures_read_the_same_both_ways() -> None:
    files = sorted(FIXTURES.glob("*.jt808cap"))
    assert files
    for path in files:
        data = path.read_bytes()
        header, records = capture.parse_capture(data)
        theirs_header, theirs = ingest_capture.read_capture(path)
        assert (header.start, header.peer) == (theirs_header.start, theirs_header.peer)
        assert [(r.offset_ns, r.data) for r in records] == theirs
        with path.open("rb") as file:
            reader = CaptureReader(file, read_bytes=100)
            assert list(reader) == records
            assert not reader.truncated
