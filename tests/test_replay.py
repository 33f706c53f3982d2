"""``jt808 replay``: the segmenter and the auth-code rewrite (pure), the replayer against a
fake platform over memory streams (timing under trio's MockClock), and the recorded fixtures
replayed through the real server into PostgreSQL, where the stored rows must be exactly the
positions the captures hold."""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import Server, ServerConfig
from protocol import Edition, Packet, StreamDecoder, decode, encode, encode_raw
from protocol.capture import CaptureWriter, Record, parse_capture
from protocol.codec import parse_frame
from protocol.fields import GMT8
from protocol.framing import unescape
from protocol.messages.base import Message
from protocol.messages.location import Location, LocationBatch, LocationReport
from protocol.messages.terminal import (
    Heartbeat,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalRegister,
    TerminalRegisterResponse,
)
from protocol.phone import canonical_phone
from storage import PositionWriter, Spool, TerminalStore, migrate
from storage.terminal_cache import TerminalCodeCache
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tools import replay_cmd
from tools.replay import (
    CaptureInfo,
    ReplayConfig,
    Replayer,
    ReplayStats,
    Segment,
    capture_files,
    inspect,
    replay,
    rewrite_auth,
    segments,
)
from tools.serve_cmd import WriterSink
from tools.terminal_registry import DatabaseRegistry

FIXTURES = Path(__file__).parent / "data" / "replay"
WALL = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PHONE = "13912345678"


# ---------------------------------------------------------------------------------------------
# Frames and captures


@pytest.fixture
def replay_clock() -> trio.testing.MockClock:
    """A mock clock that jumps only after 50 ms of real idleness: replay runs over real
    loopback sockets, and a clock that jumps while the kernel still carries a frame would
    time it wrong on a busy machine."""
    return trio.testing.MockClock(autojump_threshold=0.05)


def register(serial: int, edition: Edition = Edition.V2013, phone: str = PHONE) -> bytes:
    message = TerminalRegister(
        province=53,
        city=100,
        manufacturer="SIMULATOR01" if edition is Edition.V2019 else "SIMUL",
        model="JT808-SIM",
        terminal_id="T000001",
        plate_color=1,
        plate="云A12345",
    )
    return encode(message, phone=phone, serial=serial, edition=edition)


def auth(
    serial: int, code: str = "recorded", edition: Edition = Edition.V2013, phone: str = PHONE
) -> bytes:
    if edition is Edition.V2019:
        message = TerminalAuth(auth_code=code, imei="862000000000001", software_version="SIM-1.0")
    else:
        message = TerminalAuth(auth_code=code)
    return encode(message, phone=phone, serial=serial, edition=edition)


def fix(n: int) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=0b11,
        latitude=25_040_000 + n,
        longitude=102_710_000,
        altitude_m=1890,
        speed=600,
        direction=90,
        time=datetime(2026, 11, 2, 9, 0, n % 60, tzinfo=GMT8),
    )


def report(serial: int, edition: Edition = Edition.V2013, phone: str = PHONE) -> bytes:
    return encode(fix(serial), phone=phone, serial=serial, edition=edition)


def write_capture(path: Path, start: datetime, records: Sequence[tuple[float, bytes]]) -> Path:
    with path.open("wb") as file:
        writer = CaptureWriter(file, start=start, peer="127.0.0.1:40000", max_bytes=10**6)
        for at_s, data in records:
            writer.record(data, offset=round(at_s * 1e9))
    return path


def joined(found: Sequence[Segment]) -> bytes:
    return b"".join(segment.data for segment in found)


# ---------------------------------------------------------------------------------------------
# The segmenter


@st.composite
def recorded_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes], list[Record]]:
    """A stream of frames (some 0x0102), junk and shared flags, cut into records."""
    makers: list[Callable[[int], bytes]] = [
        register,
        auth,
        report,
        lambda s: auth(s, "x" * 40, Edition.V2019),
        lambda s: encode(Heartbeat(), phone=PHONE, serial=s),
        lambda s: report(s, Edition.V2019),
    ]
    stream = bytearray()
    frames: list[bytes] = []
    for serial in range(draw(st.integers(min_value=0, max_value=8))):
        wire = makers[draw(st.integers(min_value=0, max_value=len(makers) - 1))](serial)
        frames.append(wire)
        if stream.endswith(b"\x7e") and draw(st.booleans()):
            wire = wire[1:]  # share the flag with the frame before
        stream += wire
        junk = draw(st.binary(max_size=6)).replace(b"\x7e", b"")
        stream += junk
    cuts = sorted(draw(st.sets(st.integers(min_value=0, max_value=len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    records = [
        Record(i * 1000, bytes(stream[a:b])) for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    return bytes(stream), frames, records


@settings(max_examples=300)
@given(recorded_streams())
def test_segments_pass_every_byte_on_in_order(
    case: tuple[bytes, list[bytes], list[Record]],
) -> None:
    stream, frames, records = case
    found = segments(records)
    assert joined(found) == stream
    sent = [(f.msg_id, f.serial) for s in found for f in s.frames]
    assert sent == [(decode(w).msg_id, decode(w).serial) for w in frames]
    auth_wires = [w for w in frames if decode(w).msg_id == 0x0102]
    auth_segments = [s for s in found if s.auth is not None]
    assert [s.data for s in auth_segments] == [w[1:] for w in auth_wires]
    # a segment goes out no earlier than the record that completes it
    ends = list(itertools.accumulate(len(r.data) for r in records))
    at = 0
    for segment in found:
        at += len(segment.data)
        if segment.data:
            first_complete = next(i for i, end in enumerate(ends) if end >= at)
            assert segment.offset_ns == records[first_complete].offset_ns


def test_a_split_0x0102_goes_out_whole_with_its_last_piece() -> None:
    wire = auth(7)
    records = [Record(0, report(1) + wire[:5]), Record(10, wire[5:9]), Record(20, wire[9:])]
    found = segments(records)
    assert [(s.offset_ns, s.data) for s in found] == [(0, report(1) + wire[:1]), (20, wire[1:])]
    assert found[1].auth is not None
    assert [f.msg_id for f in found[0].frames] == [0x0200]


def test_counts_positions_of_batches() -> None:
    batch = LocationBatch(batch_type=1, positions=(fix(1), fix(2), fix(3)))
    wire = encode(batch, phone=PHONE, serial=9)
    (segment,) = segments([Record(0, wire)])
    assert [(f.msg_id, f.positions) for f in segment.frames] == [(0x0704, 3)]


def test_oversized_junk_is_passed_on_and_not_examined() -> None:
    junk = b"\x7e\x01\x02" + bytes(5000) + b"\x7e"
    found = segments([Record(0, junk[:3000]), Record(1, junk[3000:] + auth(1)[1:])])
    assert joined(found) == junk + auth(1)[1:]
    assert [s.auth is not None for s in found if s.data] == [False, False, True]


# ---------------------------------------------------------------------------------------------
# The rewrite


@pytest.mark.parametrize("edition", [Edition.V2013, Edition.V2019])
def test_rewrite_auth_changes_only_the_code(edition: Edition) -> None:
    wire = auth(42, "old-code", edition)
    frame = parse_frame(unescape(wire[1:-1])[0])
    rewritten = rewrite_auth(frame, "0123456789abcdef")
    assert rewritten is not None
    before, after = decode(wire), decode(b"\x7e" + rewritten)
    assert isinstance(before.message, TerminalAuth)
    assert isinstance(after.message, TerminalAuth)
    assert after.message == dataclasses.replace(before.message, auth_code="0123456789abcdef")
    assert after.header.serial == 42
    assert after.header.phone == before.header.phone
    assert after.edition == before.edition


def test_an_undecodable_0x0102_is_not_rewritten() -> None:
    wire = encode_raw(0x0102, b"\x05ab", phone=PHONE, serial=1, edition=Edition.V2019)
    frame = parse_frame(unescape(wire[1:-1])[0])
    assert rewrite_auth(frame, "new") is None


# ---------------------------------------------------------------------------------------------
# The replayer against a fake platform


@dataclasses.dataclass
class Platform:
    """Issues ``issued-N`` codes, accepts only issued ones, acknowledges reports."""

    answer: bool = True
    register_delay_s: float = 0.0
    close_after_frames: int | None = None
    arrivals: list[tuple[int, float, Packet]] = dataclasses.field(default_factory=list)
    opened: list[float] = dataclasses.field(default_factory=list)
    closed: list[float] = dataclasses.field(default_factory=list)
    issued: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._codes = (f"issued-{n}" for n in itertools.count(1))

    def of(self, msg_id: int) -> list[tuple[int, float, Packet]]:
        return [a for a in self.arrivals if a[2].msg_id == msg_id]

    async def serve(self, stream: trio.abc.Stream, conn: int) -> None:
        self.opened.append(trio.current_time())
        decoder = StreamDecoder()
        lock = trio.Lock()
        frames = 0
        # Answers leave in arrival order, as a server's do (one task answering them in turn;
        # a task per frame would let trio's scheduler reorder them).
        answers_in, answers_out = trio.open_memory_channel[Packet](1024)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._answer_in_order, stream, lock, answers_out)
            try:
                while data := await stream.receive_some(65536):
                    decoder.feed(bytes(data))
                    for event in decoder:
                        assert isinstance(event, Packet), event
                        self.arrivals.append((conn, trio.current_time(), event))
                        frames += 1
                        if (
                            self.close_after_frames is not None
                            and frames >= self.close_after_frames
                        ):
                            await stream.aclose()
                            return
                        if self.answer:
                            answers_in.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self.closed.append(trio.current_time())
                nursery.cancel_scope.cancel()

    async def _answer_in_order(
        self,
        stream: trio.abc.Stream,
        lock: trio.Lock,
        packets: trio.MemoryReceiveChannel[Packet],
    ) -> None:
        async for packet in packets:
            await self._answer(stream, lock, packet)

    async def _answer(self, stream: trio.abc.Stream, lock: trio.Lock, packet: Packet) -> None:
        header = packet.header
        message = packet.message
        reply: Message
        if isinstance(message, TerminalRegister):
            await trio.sleep(self.register_delay_s)
            code = next(self._codes)
            self.issued[header.phone] = code
            reply = TerminalRegisterResponse(reply_serial=header.serial, result=0, auth_code=code)
        else:
            ok = not isinstance(message, TerminalAuth) or (
                message.auth_code == self.issued.get(header.phone)
            )
            reply = PlatformGeneralResponse(
                reply_serial=header.serial, reply_msg_id=header.msg_id, result=0 if ok else 1
            )
        wire = encode(reply, phone=header.phone, serial=0, edition=header.layout)
        async with lock:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(wire)


async def run_replay(
    platform: Platform, files: Sequence[Path], **overrides: Any
) -> tuple[ReplayStats, list[CaptureInfo]]:
    infos = [inspect(path) for path in files]
    config = ReplayConfig(port=1, **{"speed": None, **overrides})
    async with trio.open_nursery() as nursery:
        conns = itertools.count()

        async def connect() -> trio.abc.Stream:
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(platform.serve, theirs, next(conns))
            return ours

        stats = await Replayer(config, infos, connect=connect).run()
        nursery.cancel_scope.cancel()
    return stats, infos


async def test_auth_codes_are_rewritten_in_every_connection_of_the_phone(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    first = write_capture(
        tmp_path / "a.jt808cap",
        WALL,
        [(0.0, register(0)), (0.2, auth(1, "recorded-1")), (1.0, report(2)), (2.0, report(3))],
    )
    second = write_capture(
        tmp_path / "b.jt808cap",
        WALL + timedelta(seconds=1),  # overlaps the first: must still wait for it
        [(0.0, auth(0, "recorded-1")), (1.0, report(1))],
    )
    platform = Platform()
    stats, _ = await run_replay(platform, [second, first])
    auths = [a[2].message for a in platform.of(0x0102)]
    assert [getattr(m, "auth_code", None) for m in auths] == ["issued-1", "issued-1"]
    assert [a[0] for a in platform.of(0x0102)] == [0, 1]  # the registering connection first
    assert platform.opened[1] >= platform.closed[0]
    assert stats.auth_rewrites == 2
    assert stats.registrations == 1
    assert (stats.reports_sent, stats.reports_acked, stats.reports_unanswered) == (3, 3, 0)
    assert stats.ack_results == Counter({0: 5})
    assert stats.connections == 2


async def test_a_0x0102_waits_for_the_0x8100(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    path = write_capture(tmp_path / "a.jt808cap", WALL, [(0.0, register(0) + auth(1))])
    platform = Platform(register_delay_s=3.0)
    stats, _ = await run_replay(platform, [path])
    (_, at, packet) = platform.of(0x0102)[0]
    assert at == pytest.approx(3.0, abs=0.01)
    assert getattr(packet.message, "auth_code", None) == "issued-1"
    assert stats.auth_rewrites == 1


async def test_without_a_registration_the_0x0102_goes_out_as_recorded(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    path = write_capture(tmp_path / "a.jt808cap", WALL, [(0.0, auth(1, "kept") + report(2))])
    stats, _ = await run_replay(platform := Platform(), [path])
    assert getattr(platform.of(0x0102)[0][2].message, "auth_code", None) == "kept"
    assert (stats.auth_rewrites, stats.auth_as_recorded) == (0, 1)
    assert stats.ack_results == Counter({1: 1, 0: 1})  # refused (the fake acks reports anyway)


async def test_timed_replay_keeps_the_recorded_offsets(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    early = write_capture(
        tmp_path / "a.jt808cap", WALL, [(0.0, report(1)), (1.0, report(2)), (2.5, report(3))]
    )
    late = write_capture(
        tmp_path / "b.jt808cap", WALL + timedelta(seconds=3), [(0.5, report(1, phone="1"))]
    )
    platform = Platform()
    start = trio.current_time()
    stats, _ = await run_replay(platform, [early, late], speed=2.0)
    times = sorted((conn, at - start) for conn, at, _ in platform.arrivals)
    assert [round(t, 3) for _, t in times] == [0.0, 0.5, 1.25, 1.75]
    assert stats.reports_acked == 4


async def test_a_silent_server_is_left_after_the_linger(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    path = write_capture(tmp_path / "a.jt808cap", WALL, [(0.0, report(1)), (1.0, report(2))])
    platform = Platform(answer=False)
    start = trio.current_time()
    stats, _ = await run_replay(platform, [path], speed=1.0, linger_s=2.0)
    assert platform.closed[0] - start == pytest.approx(3.0)
    assert (stats.reports_unanswered, stats.positions_unanswered) == (2, 2)
    assert replay_cmd.exit_status(stats) == 1


async def test_a_server_that_closes_stops_the_connection(
    tmp_path: Path, replay_clock: trio.testing.MockClock
) -> None:
    path = write_capture(tmp_path / "a.jt808cap", WALL, [(n * 0.1, report(n)) for n in range(10)])
    stats, _ = await run_replay(Platform(close_after_frames=3), [path], speed=1.0)
    assert stats.peer_closed == 1
    assert stats.reports_sent < 10


def test_directories_name_their_capture_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a capture", encoding="utf-8")
    files = capture_files([FIXTURES, tmp_path / "notes.txt"])
    assert [p.name for p in files[:-1]] == sorted(p.name for p in FIXTURES.glob("*.jt808cap"))
    assert files[-1].name == "notes.txt"


# ---------------------------------------------------------------------------------------------
# The command


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    replay_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([str(FIXTURES), "--target", "10.0.0.1:6808"], "not a loopback address"),
        ([str(FIXTURES), "--target", "127.0.0.1"], "expected HOST:PORT"),
        ([str(FIXTURES), "--speed", "0"], "speed must be positive"),
        ([str(FIXTURES), "--linger-s", "60"], "linger_s"),
        ([str(Path(__file__))], "bad magic"),
        (["/nonexistent.jt808cap"], "No such file"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str) -> None:
    err = io.StringIO()
    assert replay_cmd.run(cli_args(*argv), stdout=io.StringIO(), stderr=err) == 2
    assert message in err.getvalue()


def test_the_command_replays_and_ends_with_json(tmp_path: Path) -> None:
    platform = Platform()
    ready = threading.Event()
    port: list[int] = []
    token: list[trio.lowlevel.TrioToken] = []
    stop = trio.Event()

    async def serve() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port.append(listeners[0].socket.getsockname()[1])
        conns = itertools.count()

        async def handle(stream: trio.SocketStream) -> None:
            await platform.serve(stream, next(conns))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            token.append(trio.lowlevel.current_trio_token())
            ready.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    path = write_capture(
        tmp_path / "a.jt808cap", WALL, [(0.0, register(0)), (0.01, auth(1)), (0.02, report(2))]
    )
    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        out, err = io.StringIO(), io.StringIO()
        args = cli_args(str(path), "--target", f"127.0.0.1:{port[0]}", "--speed", "4", "--json")
        status = replay_cmd.run(args, stdout=out, stderr=err)
    finally:
        if token:
            trio.from_thread.run_sync(stop.set, trio_token=token[0])
        thread.join(10)
    assert status == 0, out.getvalue() + err.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("jt808 replay: 1 files to 127.0.0.1:")
    result = json.loads(lines[-1])
    assert result["auth_rewrites"] == 1
    assert result["positions_acked"] == result["positions_sent"] == 1
    assert result["frames_sent"] == {"0x0100": 1, "0x0102": 1, "0x0200": 1}


# ---------------------------------------------------------------------------------------------
# Recorded fixtures through the real server into PostgreSQL

# The columns compared: everything the capture determines (received_at is the replay's own).
STORED = (
    "phone, device_time, msg_id, serial, batch_type, alarm, status, lat, lon, altitude_m,"
    " speed_kmh, direction, mileage_km"
)


def expected_rows(files: Sequence[Path]) -> Counter[tuple[object, ...]]:
    """The positions the captures hold, decoded with our codec, as stored rows would be."""
    rows: Counter[tuple[object, ...]] = Counter()
    for path in files:
        _, records = parse_capture(path.read_bytes())
        decoder = StreamDecoder()
        decoder.feed(b"".join(record.data for record in records))
        for event in decoder:
            assert isinstance(event, Packet), event
            message = event.message
            if isinstance(message, LocationReport):
                located: list[tuple[int | None, Location]] = [(None, message)]
            elif isinstance(message, LocationBatch):
                located = [(message.batch_type, p) for p in message.positions]
            else:
                continue
            for batch_type, fix_ in located:
                mileage = next((i for i in fix_.items if i.item_id == 0x01), None)
                rows[
                    (
                        canonical_phone(event.phone),  # stored in the one phone identity
                        fix_.time,
                        event.msg_id,
                        event.serial,
                        batch_type,
                        fix_.alarm,
                        fix_.status,
                        fix_.latitude / 1e6,
                        fix_.longitude / 1e6,
                        fix_.altitude_m,
                        fix_.speed / 10,
                        fix_.direction,
                        getattr(mileage, "value", 0) / 10 if mileage is not None else None,
                    )
                ] += 1
    return rows


def stored_rows(dsn: str) -> Counter[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return Counter(conn.execute(f"SELECT {STORED} FROM positions").fetchall())


@pytest.fixture
def db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


@asynccontextmanager
async def running_app(dsn: str, spool_dir: Path) -> AsyncIterator[int]:
    writer = PositionWriter(dsn, spool=Spool(spool_dir))
    store = TerminalStore(dsn)
    server = Server(
        ServerConfig(host="127.0.0.1", port=0, http_port=0),
        sink=WriterSink(writer),
        registry=DatabaseRegistry(store, TerminalCodeCache()),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        ports = await nursery.start(server.run)
        try:
            yield ports[0]
        finally:
            nursery.cancel_scope.cancel()
            store.close()


@pytest.mark.db
@pytest.mark.parametrize("speed", [None, 8.0], ids=["fast", "timed-8x"])
async def test_recorded_fixtures_store_exactly_their_positions(
    db: str, tmp_path: Path, speed: float | None
) -> None:
    files = capture_files([FIXTURES])
    expected = expected_rows(files)
    assert len(files) == 6
    assert sum(expected.values()) == 66
    assert {key[2] for key in expected} == {0x0200, 0x0704}
    with trio.fail_after(30):
        async with running_app(db, tmp_path / "spool") as port:
            stats = await replay(ReplayConfig(port=port, speed=speed), files)
    assert stats.auth_rewrites == 6
    assert stats.registrations == 6
    assert stats.positions_sent == stats.positions_acked == sum(expected.values())
    assert stats.reports_unanswered == 0
    assert stats.peer_closed == 0
    assert stored_rows(db) == expected
