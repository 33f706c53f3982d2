"""The capture replayer behind ``jt808 replay``: recorded connections, sent again to a server.

Each capture file (:mod:`protocol.capture`: one connection's terminal-to-server bytes with
their timing, as ``jt808 serve --capture`` or ``jt808 simulate --capture`` recorded them)
becomes one TCP connection to the target.  The recorded chunks are sent at their recorded
offsets divided by ``speed``, or back to back (``speed=None``, ``--fast``); all files are
replayed concurrently, each connection starting at its recorded start (relative to the
earliest file), except that the connections of one terminal (phone) run one after another
in recorded order -- a terminal holds one connection at a time, and overlapping them would
make the server close the older one as a takeover the recording never had.

The replayer answers nothing.  It reads what the server sends back, decodes it with our codec
and counts it: frames by message id, 0x8001 results, and which sent reports (0x0200/0x0704)
were acknowledged, matched by reply id and serial.  After its last chunk a connection stays
open until every report it sent was answered, or ``linger_s`` passed without a byte from the
server, and never longer than ``max_linger_s``; then it closes.

The one rewrite: authentication codes
    The server issues a new auth code for every registration (0x8100, table 9), so the 0x0102
    of a recording carries a code the target never issued and would be refused.  When a
    replayed 0x0100 is answered with 0x8100 result 0, the replayer remembers the code issued
    for that phone; every later replayed 0x0102 of that phone, in any of its connections, is
    rebuilt with our codec carrying that code instead (header, serial, edition and the other
    fields unchanged; the frame's length and check code change with it).  A 0x0102 whose
    phone has an 0x0100 awaiting its answer waits for it (at most ``auth_wait_s``).  A 0x0102
    of a phone that never registered during the replay goes out as recorded.  Nothing else is
    changed: every other byte is sent exactly as recorded (chunk boundaries included, except
    that an 0x0102 frame split over several chunks goes out whole with its last chunk).

Bounds: at most :data:`MAX_CONNECTIONS` files (two descriptors each: file and socket), one
record plus one :data:`READ_BYTES` read buffered per file, one unfinished frame held per
connection, the linger caps above.  Only loopback targets are accepted
(:func:`tools.simulate.check_loopback`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import trio

from protocol import capture
from protocol.codec import Frame, StreamDecoder, decode_frame, encode, parse_frame
from protocol.errors import RemoteProtocolError
from protocol.framing import MAX_ESCAPED_FRAME, unescape
from protocol.messages.location import LocationBatch, LocationReport
from protocol.messages.terminal import (
    REGISTER_OK,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalRegister,
    TerminalRegisterResponse,
)
from tools.simulate import check_loopback, open_stream

logger = logging.getLogger(__name__)

# A process may hold at most 20,000 descriptors here; each replayed connection holds two (the
# capture file and the socket), so half of that, less a reserve for everything else.
MAX_CONNECTIONS: Final = 9_900
# Each connection reads its file in pieces this large (the whole file is never held).
READ_BYTES: Final = 8 * 1024
# Records fetched per trip to the worker thread that reads the file.
RECORDS_PER_READ: Final = 256
# Platform messages are small (an 0x8001 is 20 bytes); one receive holds many.
RECV_BYTES: Final = 16 * 1024
# After its last chunk a connection waits this long for the server's next byte ...
DEFAULT_LINGER_S: Final = 2.0
# ... and never longer than this in all: a server that keeps talking must not hold it open.
DEFAULT_MAX_LINGER_S: Final = 30.0
# How long a 0x0102 waits for the 0x8100 of the phone's replayed 0x0100.  The terminal's own
# response timeout (parameter 0x0002) is typically 10 s.
DEFAULT_AUTH_WAIT_S: Final = 10.0
# How much of a file :func:`inspect` reads to find the connection's phone.
INSPECT_BYTES: Final = 64 * 1024

MSG_REGISTER: Final = TerminalRegister.MSG_ID
MSG_AUTH: Final = TerminalAuth.MSG_ID
REPORT_IDS: Final = frozenset({LocationReport.MSG_ID, LocationBatch.MSG_ID})
_FLAG: Final = 0x7E
_FLAG_BYTE: Final = b"\x7e"
_WORD = struct.Struct(">H")


# ---------------------------------------------------------------------------------------------
# Pure: a recorded byte stream cut into segments


@dataclasses.dataclass(frozen=True, slots=True)
class SentFrame:
    """A whole frame of the recording: who sent what, and how many positions it carries."""

    phone: str
    msg_id: int
    serial: int
    positions: int


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """Bytes to send at ``offset_ns``; ``frames`` are the frames whose last byte is in them.

    ``auth`` is set when ``data`` is exactly one 0x0102 frame (its content and closing flag;
    the opening flag went out with the segment before), to be rebuilt with the auth code the
    target issued (:func:`rewrite_auth`).
    """

    offset_ns: int
    data: bytes
    frames: tuple[SentFrame, ...] = ()
    auth: Frame | None = None


def sent_frame(content: bytes) -> tuple[Frame, SentFrame] | None:
    """The escaped content between two flags as a checked frame, or None if it is not one."""
    try:
        unescaped, _ = unescape(content)
        frame = parse_frame(unescaped)
    except RemoteProtocolError:
        return None
    header = frame.header
    positions = 0
    if header.msg_id == LocationReport.MSG_ID:
        positions = 1
    elif header.msg_id == LocationBatch.MSG_ID and not header.subpackage and len(frame.body) >= 2:
        positions = _WORD.unpack_from(frame.body)[0]  # table 60: the count WORD comes first
    return frame, SentFrame(header.phone, header.msg_id, header.serial, positions)


def _may_be_auth(content: bytes | bytearray) -> bool:
    """Could escaped frame content starting so be an 0x0102 (its id bytes 01 02 come first;
    escaping touches only 7D and 7E, so they appear as they are)?"""
    return not content or (content[0] == 0x01 and (len(content) == 1 or content[1] == 0x02))


class Segmenter:
    """Cuts a recorded stream into :class:`Segment` s, one record at a time (sans-IO).

    Every byte is passed on in order and as early as recorded, except an 0x0102 frame, which
    is held until complete and then becomes a segment of its own.  Frames longer than the
    largest legal frame are junk (as for the server's splitter) and are not examined.
    """

    def __init__(self) -> None:
        self._partial: bytearray | None = None  # content since the last flag; None: no frame
        self._holding = False  # the partial content is held back (it may be an 0x0102)
        self._plain = bytearray()
        self._frames: list[SentFrame] = []
        self._out: list[Segment] = []
        self._offset = 0

    def feed(self, offset_ns: int, data: bytes) -> list[Segment]:
        """The segments of one record (``data`` recorded at ``offset_ns``)."""
        if not data:
            return []  # no bytes: it resolves nothing, and bytes held until finish() keep
            # the time of the last record that brought any
        self._offset = offset_ns
        pos = 0
        while True:
            flag = data.find(_FLAG_BYTE, pos)
            self._content(data[pos:] if flag < 0 else data[pos:flag])
            if flag < 0:
                break
            self._flag()
            pos = flag + 1
        self._flush()
        out, self._out = self._out, []
        return out

    def finish(self) -> list[Segment]:
        """What is still held at the end of the recording (an unfinished frame)."""
        if self._holding and self._partial:
            self._plain += self._partial
        self._partial = None
        self._holding = False
        self._flush()
        out, self._out = self._out, []
        return out

    def _content(self, piece: bytes) -> None:
        partial = self._partial
        if partial is None:
            self._plain += piece
            return
        partial += piece
        if not self._holding:
            self._plain += piece
        elif not _may_be_auth(partial):
            self._plain += partial
            self._holding = False
        if len(partial) > MAX_ESCAPED_FRAME:  # junk until the next flag
            if self._holding:
                self._plain += partial
            self._partial = None
            self._holding = False

    def _flag(self) -> None:
        partial = self._partial
        found = sent_frame(bytes(partial)) if partial else None
        if self._holding and partial:
            if found is not None and found[1].msg_id == MSG_AUTH and not found[0].header.subpackage:
                self._flush()
                self._out.append(
                    Segment(self._offset, bytes(partial) + _FLAG_BYTE, (found[1],), found[0])
                )
            else:
                self._plain += partial
                self._plain.append(_FLAG)
                if found is not None:
                    self._frames.append(found[1])
        else:
            self._plain.append(_FLAG)
            if found is not None:
                self._frames.append(found[1])
        self._partial = bytearray()
        self._holding = True

    def _flush(self) -> None:
        if self._plain or self._frames:
            self._out.append(Segment(self._offset, bytes(self._plain), tuple(self._frames)))
            self._plain = bytearray()
            self._frames = []


def rewrite_auth(frame: Frame, auth_code: str) -> bytes | None:
    """The 0x0102 ``frame`` carrying ``auth_code`` instead, as escaped content plus closing
    flag (the form of :attr:`Segment.data`); None if it cannot be rebuilt (encrypted, or its
    body does not decode)."""
    try:
        packet = decode_frame(frame)
    except RemoteProtocolError:
        return None
    message = packet.message
    if not isinstance(message, TerminalAuth):
        return None
    header = frame.header
    wire = encode(
        dataclasses.replace(message, auth_code=auth_code),
        phone=header.phone,
        serial=header.serial,
        edition=packet.edition,
        protocol_version=header.protocol_version or 1,
    )
    return wire[1:]


def segments(records: Iterable[capture.Record]) -> list[Segment]:
    """All segments of a recording (for tests and small files)."""
    segmenter = Segmenter()
    out: list[Segment] = []
    for record in records:
        out.extend(segmenter.feed(record.offset_ns, record.data))
    out.extend(segmenter.finish())
    return out


# ---------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CaptureInfo:
    """A capture file and what :func:`inspect` learnt of it without reading it all."""

    path: Path
    header: capture.CaptureHeader
    phone: str | None  # of the first whole frame, None if the first 64 KiB hold none


def inspect(path: Path) -> CaptureInfo:
    """Read a file's header and the phone of its first frame.  Raises CaptureError, OSError."""
    with path.open("rb") as file:
        reader = capture.CaptureReader(file, read_bytes=READ_BYTES)
        segmenter = Segmenter()
        phone = None
        for record in reader:
            found = [f for s in segmenter.feed(record.offset_ns, record.data) for f in s.frames]
            if found:
                phone = found[0].phone
                break
            if reader.bytes_read >= INSPECT_BYTES:
                break
        return CaptureInfo(path=path, header=reader.header, phone=phone)


def capture_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and the capture files (``*.jt808cap``) in the directories named."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(path.glob(f"*{capture.SUFFIX}")))
        else:
            out.append(path)
    return out


def _read_records(reader: capture.CaptureReader, count: int) -> list[capture.Record]:
    out = []
    for record in reader:
        out.append(record)
        if len(out) >= count:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Statistics


class ReplayStats:
    """Counters of one replay (trio runs it on one thread: no locks)."""

    COUNTERS: Final = (
        "files",
        "connections",
        "connect_failures",
        "peer_closed",
        "truncated_files",
        "unreadable_files",
        "bytes_sent",
        "bytes_received",
        "reports_sent",
        "positions_sent",
        "reports_acked",
        "positions_acked",
        "reports_unanswered",
        "positions_unanswered",
        "registrations",
        "auth_rewrites",
        "auth_as_recorded",
        "bad_frames_received",
    )

    def __init__(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.frames_sent: collections.Counter[int] = collections.Counter()
        self.frames_received: collections.Counter[int] = collections.Counter()
        self.ack_results: collections.Counter[int] = collections.Counter()
        self.elapsed_s = 0.0

    files: int
    connections: int
    connect_failures: int
    peer_closed: int  # connections the server closed before the replay ended them
    truncated_files: int
    unreadable_files: int
    bytes_sent: int
    bytes_received: int
    reports_sent: int  # 0x0200 and 0x0704 frames
    positions_sent: int
    reports_acked: int  # answered by 0x8001 result 0
    positions_acked: int
    reports_unanswered: int  # no 0x8001 result 0 when the connection closed
    positions_unanswered: int
    registrations: int  # 0x8100 result 0 received
    auth_rewrites: int
    auth_as_recorded: int
    bad_frames_received: int

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        out["frames_sent"] = {f"0x{k:04x}": v for k, v in sorted(self.frames_sent.items())}
        out["frames_received"] = {f"0x{k:04x}": v for k, v in sorted(self.frames_received.items())}
        out["ack_results"] = {str(k): v for k, v in sorted(self.ack_results.items())}
        out["elapsed_s"] = round(self.elapsed_s, 3)
        return out


# ---------------------------------------------------------------------------------------------
# The replay


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReplayConfig:
    """``speed``: recorded time divided by it (2.0 replays twice as fast); None: no waiting."""

    host: str = "127.0.0.1"
    port: int
    speed: float | None = 1.0
    linger_s: float = DEFAULT_LINGER_S
    max_linger_s: float = DEFAULT_MAX_LINGER_S
    auth_wait_s: float = DEFAULT_AUTH_WAIT_S

    def __post_init__(self) -> None:
        check_loopback(self.host)
        if self.speed is not None and not self.speed > 0:
            raise ValueError("speed must be positive")
        if not 0 <= self.linger_s <= self.max_linger_s:
            raise ValueError("expected 0 <= linger_s <= max_linger_s")
        if self.auth_wait_s < 0:
            raise ValueError("auth_wait_s must not be negative")


class AuthCodes:
    """The codes the target issued during this replay, per phone (see the module docstring)."""

    def __init__(self) -> None:
        self._codes: dict[str, str] = {}
        self._answered: dict[str, trio.Event] = {}

    def registering(self, phone: str) -> None:
        """A 0x0100 of ``phone`` is about to go out: its 0x0102 waits for the answer."""
        self._codes.pop(phone, None)
        self._answered[phone] = trio.Event()

    def answered(self, phone: str, auth_code: str | None) -> None:
        """The 0x8100 for ``phone`` came, with a code on success."""
        if auth_code is not None:
            self._codes[phone] = auth_code
        event = self._answered.get(phone)
        if event is not None:
            event.set()

    async def code_for(self, phone: str, wait_s: float) -> str | None:
        event = self._answered.get(phone)
        if event is not None:
            with trio.move_on_after(wait_s):
                await event.wait()
        return self._codes.get(phone)


Connect = Callable[[], Awaitable[trio.abc.Stream]]


class _Link:
    """One replayed connection's state shared by its sender and reader."""

    def __init__(self, started: float) -> None:
        # (msg id, serial) -> positions of each sent report not yet acknowledged, oldest first
        self.unanswered: dict[tuple[int, int], collections.deque[int]] = {}
        self.unanswered_count = 0
        self.last_received = started
        self.closed = False
        self.changed = trio.Event()

    def sent(self, frame: SentFrame) -> None:
        key = (frame.msg_id, frame.serial)
        self.unanswered.setdefault(key, collections.deque()).append(frame.positions)
        self.unanswered_count += 1

    def acked(self, msg_id: int, serial: int) -> int | None:
        """Positions of the oldest unanswered report (msg_id, serial), None if there is none."""
        queue = self.unanswered.get((msg_id, serial))
        if not queue:
            return None
        positions = queue.popleft()
        if not queue:
            del self.unanswered[(msg_id, serial)]
        self.unanswered_count -= 1
        return positions

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Replayer:
    """Replays ``captures`` (from :func:`inspect`) against ``config``'s target.

    ``connect`` opens one connection (default: TCP to the target); tests pass memory streams.
    """

    def __init__(
        self,
        config: ReplayConfig,
        captures: Sequence[CaptureInfo],
        *,
        connect: Connect | None = None,
    ) -> None:
        if len(captures) > MAX_CONNECTIONS:
            raise ValueError(f"{len(captures)} files; at most {MAX_CONNECTIONS} per replay")
        self.config = config
        self.captures = list(captures)
        self.stats = ReplayStats()
        self.stats.files = len(captures)
        self.auth = AuthCodes()
        self._connect: Connect = connect or self._open_tcp
        self._t0 = 0.0
        self._first_ns = min((c.header.start_wall_ns for c in captures), default=0)

    async def _open_tcp(self) -> trio.abc.Stream:
        return await open_stream(self.config.host, self.config.port)

    async def run(self) -> ReplayStats:
        """Replay every file; returns the statistics when the last connection closed."""
        self._t0 = trio.current_time()
        groups: dict[str | Path, list[CaptureInfo]] = {}
        for info in self.captures:
            groups.setdefault(info.phone or info.path, []).append(info)
        async with trio.open_nursery() as nursery:
            for group in groups.values():
                group.sort(key=lambda info: (info.header.start_wall_ns, info.path.name))
                nursery.start_soon(self._replay_group, group)
        self.stats.elapsed_s = trio.current_time() - self._t0
        return self.stats

    async def _replay_group(self, group: list[CaptureInfo]) -> None:
        for info in group:
            if self.config.speed is not None:
                delay_s = (info.header.start_wall_ns - self._first_ns) / 1e9 / self.config.speed
                await trio.sleep_until(self._t0 + delay_s)
            await self._replay_one(info)

    async def _replay_one(self, info: CaptureInfo) -> None:
        stats = self.stats
        try:
            stream = await self._connect()
        except OSError as exc:
            stats.connect_failures += 1
            logger.warning("%s: cannot connect: %s", info.path.name, exc)
            return
        stats.connections += 1
        link = _Link(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, stream, link)
                await self._send(info, stream, link)
                await self._linger(link)
                nursery.cancel_scope.cancel()
        finally:
            stats.reports_unanswered += link.unanswered_count
            stats.positions_unanswered += sum(sum(q) for q in link.unanswered.values())
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _send(self, info: CaptureInfo, stream: trio.abc.Stream, link: _Link) -> None:
        stats = self.stats
        speed = self.config.speed
        base = trio.current_time()
        try:
            file: BinaryIO = await trio.to_thread.run_sync(info.path.open, "rb")
        except OSError as exc:
            stats.unreadable_files += 1
            logger.warning("%s: cannot open: %s", info.path.name, exc)
            return
        try:
            reader = await trio.to_thread.run_sync(
                lambda: capture.CaptureReader(file, read_bytes=READ_BYTES)
            )
            segmenter = Segmenter()
            while not link.closed:
                records = await trio.to_thread.run_sync(_read_records, reader, RECORDS_PER_READ)
                batch: list[Segment] = []
                for record in records:
                    batch.extend(segmenter.feed(record.offset_ns, record.data))
                if not records:
                    batch.extend(segmenter.finish())
                for segment in batch:
                    if speed is not None:
                        await trio.sleep_until(base + segment.offset_ns / 1e9 / speed)
                    if not await self._send_segment(segment, stream, link):
                        return
                if not records:
                    break
            if reader.truncated:
                stats.truncated_files += 1
        except capture.CaptureError as exc:
            stats.unreadable_files += 1
            logger.warning("%s: %s", info.path.name, exc)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(file.close)

    async def _send_segment(self, segment: Segment, stream: trio.abc.Stream, link: _Link) -> bool:
        """Send one segment (rewriting an 0x0102); False once the server closed the link."""
        stats = self.stats
        if link.closed:
            return False
        data = segment.data
        if segment.auth is not None:
            phone = segment.auth.header.phone
            code = await self.auth.code_for(phone, self.config.auth_wait_s)
            rewritten = rewrite_auth(segment.auth, code) if code is not None else None
            if rewritten is None:
                stats.auth_as_recorded += 1
            else:
                stats.auth_rewrites += 1
                data = rewritten
        for frame in segment.frames:
            stats.frames_sent[frame.msg_id] += 1
            if frame.msg_id == MSG_REGISTER:
                self.auth.registering(frame.phone)  # before sending: the answer may be quick
            elif frame.msg_id in REPORT_IDS:
                stats.reports_sent += 1
                stats.positions_sent += frame.positions
                link.sent(frame)
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            link.closed = True
            return False
        stats.bytes_sent += len(data)
        return True

    async def _read(self, stream: trio.abc.Stream, link: _Link) -> None:
        stats = self.stats
        decoder = StreamDecoder()
        while True:
            try:
                data = await stream.receive_some(RECV_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                stats.peer_closed += 1
                link.closed = True
                link.wake()
                return
            stats.bytes_received += len(data)
            link.last_received = trio.current_time()
            decoder.feed(bytes(data))
            for event in decoder:
                if isinstance(event, RemoteProtocolError):
                    stats.bad_frames_received += 1
                    continue
                stats.frames_received[event.msg_id] += 1
                message = event.message
                if isinstance(message, PlatformGeneralResponse):
                    stats.ack_results[message.result] += 1
                    if message.result == 0 and message.reply_msg_id in REPORT_IDS:
                        positions = link.acked(message.reply_msg_id, message.reply_serial)
                        if positions is not None:
                            stats.reports_acked += 1
                            stats.positions_acked += positions
                elif isinstance(message, TerminalRegisterResponse):
                    ok = message.result == REGISTER_OK
                    stats.registrations += ok
                    self.auth.answered(event.phone, message.auth_code if ok else None)
            link.wake()

    async def _linger(self, link: _Link) -> None:
        """Wait for the answers to the reports sent (see the module docstring)."""
        start = trio.current_time()
        deadline = start + self.config.max_linger_s
        while link.unanswered_count and not link.closed:
            quiet_at = max(link.last_received, start) + self.config.linger_s
            with trio.move_on_at(min(deadline, quiet_at)) as scope:
                await link.changed.wait()
            if scope.cancelled_caught:
                return


async def replay(
    config: ReplayConfig, paths: Sequence[Path], *, connect: Connect | None = None
) -> ReplayStats:
    """Inspect ``paths`` and replay them (see :class:`Replayer`)."""
    infos = [await trio.to_thread.run_sync(inspect, path) for path in paths]
    return await Replayer(config, infos, connect=connect).run()


__all__ = [
    "MAX_CONNECTIONS",
    "AuthCodes",
    "CaptureInfo",
    "ReplayConfig",
    "ReplayStats",
    "Replayer",
    "Segment",
    "Segmenter",
    "SentFrame",
    "capture_files",
    "inspect",
    "replay",
    "rewrite_auth",
    "segments",
    "sent_frame",
]
