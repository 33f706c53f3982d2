"""Coverage-guided fuzzing of the codec with atheris (libFuzzer for Python).

One input is a byte stream as a terminal might send it.  :func:`check_one` runs every entry
point of ``protocol`` that a connection's bytes reach and raises on anything but the allowed
outcomes: messages, need-more-data, and :class:`~protocol.errors.RemoteProtocolError` (plus
:class:`~protocol.errors.LocalProtocolError` from re-encoding a decoded message).  An
``IndexError``, ``struct.error``, construct error, ``UnicodeError``, ``ValueError``... escaping
the codec is a finding, and so is a broken invariant (the assertions below).

Run it (atheris is the ``fuzz`` extra: ``.venv/bin/pip install -e '.[fuzz]'``)::

    mkdir -p /tmp/jt808-fuzz
    .venv/bin/python tests/fuzz/fuzz_codec.py /tmp/jt808-fuzz tests/fuzz/corpus \\
        -max_len=2100 -atheris_runs=1000000 -print_final_stats=1

libFuzzer writes the inputs it finds interesting into the first directory, so give it a scratch
directory first and the seed corpus second; the seeds are read, never written.  ``-max_len=2100``
covers the largest legal frame (2,090 escaped bytes between the flags, ``MAX_ESCAPED_FRAME``)
plus some junk.  Runs with long inputs from the start reach the frame-size caps and streams of
many frames (inputs are fed in reads of at most 64 KiB, as the server does)::

    .venv/bin/python tests/fuzz/fuzz_codec.py /tmp/jt808-fuzz-long tests/fuzz/corpus \\
        -max_len=8192 -len_control=0 -atheris_runs=50000
    .venv/bin/python tests/fuzz/fuzz_codec.py /tmp/jt808-fuzz-huge tests/fuzz/corpus \\
        -max_len=200000 -len_control=0 -atheris_runs=3000

A crashing input is written as ``crash-<sha1>`` in the working directory: copy it into
``tests/fuzz/regressions/`` and fix the codec; ``tests/test_fuzz_corpus.py`` runs
:func:`check_one` over every seed and regression file in CI (without atheris).
``tests/fuzz/make_corpus.py`` rebuilds the seeds.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

from protocol.batch import (
    KIND_INVALID,
    KIND_LOCATION,
    MILEAGE_ABSENT,
    REASON_ERRORS,
    TIME_ABSENT,
    BatchStreamDecoder,
    LocationBatchResult,
)
from protocol.codec import (
    Packet,
    StreamDecoder,
    decode,
    encode,
    encode_general_response,
    general_response_prefix,
)
from protocol.errors import (
    BodyDecodeError,
    InvalidEscapeError,
    LocalProtocolError,
    ReassemblyError,
    RemoteProtocolError,
)
from protocol.framing import MAX_ESCAPED_FRAME, check_code, escape, unescape
from protocol.header import Header
from protocol.messages.base import Fragment, RawMessage
from protocol.messages.control import PlatformRetransmitRequest
from protocol.messages.location import Location, LocationBatch, LocationReport, Mileage
from protocol.messages.passthrough import CompressedReport
from protocol.reassembly import (
    Dropped,
    Reassembled,
    Reassembler,
    ReassemblyLimits,
    Refused,
    RetransmitRequest,
    Undecodable,
    max_retransmit_ids,
)

Event = Packet | RemoteProtocolError

# Small caps so that inputs of about two kilobytes (two full packages) reach every eviction
# and overload branch of the reassembler; the timeouts are the defaults, reached by the clock
# the input drives.
LIMITS = ReassemblyLimits(
    max_packages_per_series=64,
    max_series_per_terminal=3,
    max_bytes_per_terminal=1200,
    max_bytes_total=1600,
    max_packages_total=12,
    max_remembered_packages=32,
)
# 0x0901 bodies are inflated under a cap the caller gives (passthrough.CompressedReport).
_INFLATE_CAP = 4096
# Each expiry round moves a series' deadline or drops it, so draining needs at most this many
# rounds per series (package timeout, then each retransmit round); more means a series never
# leaves.
_ROUNDS_PER_SERIES = LIMITS.max_retransmit_rounds + 2


# The server hands the decoder one socket read at a time, at most 64 KiB
# (framing.DEFAULT_MAX_BUFFERED is sized for that); feeding more at once is our misuse.
_MAX_READ = 64 * 1024


def _chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut at 0-3 points taken from ``seed`` (a checksum of the input), and every
    64 KiB, as socket reads would cut it."""
    cuts = {(seed >> (2 + 10 * i)) % (len(data) + 1) for i in range(seed & 3)}
    cuts.update(range(_MAX_READ, len(data), _MAX_READ))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _frame_cap(seed: int) -> int:
    """The splitter's frame cap: the standard's largest frame for 7 inputs in 8, else small, so
    that the too-large paths (and their resynchronisation) are reached by short inputs too."""
    if seed >> 29:
        return MAX_ESCAPED_FRAME
    return 1 + (seed >> 12) % 300


def check_one(data: bytes) -> None:
    """Feed ``data`` to every decoder; raise on any outcome the codec does not allow.

    * :class:`StreamDecoder` fed ``data`` in a few chunks (cut where a checksum of the input
      says), drained after each; its buffer stays within one unfinished frame;
    * :class:`BatchStreamDecoder` fed the same chunks reports the same events, frame by frame,
      with the same positions;
    * :func:`decode` on each 0x7E-delimited piece gives what the stream gave for that frame;
    * every decoded message re-encodes (or raises LocalProtocolError), decodes back to itself,
      renders as JSON, and every frame with a header can be answered with 0x8001;
    * the sub-packages go through a :class:`Reassembler` on a clock the input drives, whose
      caps hold after every step and which ends empty once every deadline has passed.

    All of it runs twice: on ``data`` as it is, and with each piece's body-length field and
    check code set to what the piece holds, so that mutated bodies reach the body schemas
    instead of stopping at the check code.
    """
    seed = zlib.crc32(data)
    _check_stream(data, seed)
    repaired = repair(data)
    if repaired != data:
        _check_stream(repaired, seed)


def repair(data: bytes) -> bytes:
    """Each 0x7E-delimited piece of ``data`` as a frame whose declared body length (when the
    10-bit field can hold it) and check code agree with its content (clause 4.4.3, 4.4.4)."""
    out = []
    for piece in data.split(b"\x7e"):
        if not piece:
            continue
        try:
            content, _ = unescape(piece)
        except InvalidEscapeError:
            content = piece
        if len(content) < 5:
            out.append(b"\x7e" + escape(content) + b"\x7e")
            continue
        head = content[:-1]
        props = head[2] << 8 | head[3]
        size = (17 if props & 0x4000 else 12) + (4 if props & 0x2000 else 0)
        body_length = len(head) - size
        if 0 <= body_length <= 0x3FF:
            props = (props & ~0x3FF) | body_length
            head = head[:2] + bytes((props >> 8, props & 0xFF)) + head[4:]
        out.append(b"\x7e" + escape(head + bytes((check_code(head),))) + b"\x7e")
    return b"".join(out)


def _check_stream(data: bytes, seed: int) -> None:
    cap = _frame_cap(seed)
    stream = StreamDecoder(max_frame_bytes=cap)
    batch = BatchStreamDecoder(max_frame_bytes=cap)
    reassembly = _Reassembly()
    events: list[Event] = []
    for chunk in _chunks(data, seed):
        stream.feed(chunk)
        fed = list(stream)
        # After draining, the splitter holds at most one unfinished frame: its opening flag
        # and at most ``cap`` bytes (framing.FrameSplitter).
        assert stream.buffered <= cap + 1, (stream.buffered, cap)
        result = batch.feed(chunk)
        assert batch.buffered == stream.buffered, (batch.buffered, stream.buffered)
        _assert_batch_agrees(result, fed)
        for event in fed:
            _check_event(event, reassembly)
        reassembly.expire()
        events.extend(fed)
    assert batch.junk_bytes == stream.junk_bytes, (batch.junk_bytes, stream.junk_bytes)
    reassembly.drain()
    _check_pieces(data, events, cap)


# ---------------------------------------------------------------------------------------------
# Events and messages


def _check_event(event: Event, reassembly: _Reassembly) -> None:
    if isinstance(event, RemoteProtocolError):
        _check_error(event)
        return
    assert isinstance(event, Packet), type(event)
    _check_packet(event)
    if isinstance(event.message, Fragment):
        reassembly.feed(event)


def _check_error(error: RemoteProtocolError) -> None:
    assert isinstance(error.kind, str)
    assert isinstance(error.detail, str)
    # A bad frame is logged with its detail: it must stay a log line, not a dump of the frame.
    assert len(error.detail) <= 400, len(error.detail)
    if error.header is not None:
        _check_reply(error.header, error.result_code)


def _check_reply(header: Header, result: int) -> None:
    """The server answers every frame that has a header with 0x8001; that must always encode."""
    prefix = general_response_prefix(header.phone, header.layout, header.protocol_version or 1)
    wire = encode_general_response(
        prefix, serial=0xFFFF, reply_serial=header.serial, reply_msg_id=header.msg_id, result=result
    )
    assert wire[0] == wire[-1] == 0x7E


def _check_packet(packet: Packet) -> None:
    message = packet.message
    _check_reply(packet.header, 0)
    json.dumps(message.to_json(), ensure_ascii=False)
    if isinstance(message, CompressedReport):
        with contextlib.suppress(BodyDecodeError):  # not gzip, cut short or past the cap
            assert len(message.decompress(_INFLATE_CAP)) <= _INFLATE_CAP
    try:
        body = message.encode(packet.edition)
    except LocalProtocolError:
        return
    assert isinstance(body, bytes)
    if not isinstance(message, RawMessage | Fragment):
        again = type(message).decode(body, packet.edition)
        assert again == message, (message, again)
    try:
        wire = encode(
            message,
            phone=packet.header.phone,
            serial=packet.header.serial,
            edition=packet.edition,
            protocol_version=packet.header.protocol_version or 1,
        )
    except LocalProtocolError:
        return
    _decode_or_error(wire)


def _decode_or_error(wire: bytes) -> Event:
    try:
        return decode(wire)
    except RemoteProtocolError as exc:
        return exc


# ---------------------------------------------------------------------------------------------
# Reassembly


class _Reassembly:
    """A :class:`Reassembler` on a clock that the packages' serials advance."""

    def __init__(self) -> None:
        self.reassembler = Reassembler(LIMITS)
        self.now = 0.0
        self.phones: set[str] = set()

    def feed(self, packet: Packet) -> None:
        # 0-63 s between packages: around the 30 s package timeout, so that series time out,
        # are asked for again and complete late, as the input decides.
        self.now += packet.header.serial & 0x3F
        self.phones.add(packet.header.phone)
        result = self.reassembler.feed(packet, now=self.now)
        outcome = result.outcome
        if isinstance(outcome, Reassembled):
            _check_packet(outcome.packet)
        elif isinstance(outcome, Undecodable):
            assert outcome.error.header is outcome.header
            _check_error(outcome.error)
        elif isinstance(outcome, Refused):
            assert isinstance(outcome.error, ReassemblyError)
            assert outcome.error.header is packet.header
            _check_error(outcome.error)
        for dropped in result.dropped:
            _check_dropped(dropped)
        self._check_caps()

    def expire(self) -> None:
        for expiry in self.reassembler.expire(self.now):
            if isinstance(expiry, RetransmitRequest):
                _check_retransmit(expiry)
            else:
                _check_dropped(expiry)
        self._check_caps()

    def drain(self) -> None:
        """Pass every deadline; every series must leave within its retransmit rounds."""
        rounds = _ROUNDS_PER_SERIES * max(1, self.reassembler.series_in_flight)
        for _ in range(rounds):
            deadline = self.reassembler.next_deadline()
            if deadline is None:
                break
            self.now = max(self.now, deadline)
            self.expire()
        r = self.reassembler
        assert r.next_deadline() is None
        assert (r.series_in_flight, r.packages_in_flight, r.bytes_in_flight) == (0, 0, 0)
        assert all(r.terminal_bytes(p) == r.terminal_series(p) == 0 for p in self.phones)

    def _check_caps(self) -> None:
        r = self.reassembler
        assert r.bytes_in_flight <= LIMITS.max_bytes_total
        assert r.packages_in_flight <= LIMITS.max_packages_total
        for phone in self.phones:
            assert r.terminal_series(phone) <= LIMITS.max_series_per_terminal
            assert r.terminal_bytes(phone) <= LIMITS.max_bytes_per_terminal


def _check_dropped(dropped: Dropped) -> None:
    assert isinstance(dropped.error, ReassemblyError)
    assert dropped.error.header is not None
    _check_error(dropped.error)


def _check_retransmit(request: RetransmitRequest) -> None:
    """The 0x8003 the server sends for a late series (8.4) encodes for the series' terminal."""
    header = request.header
    assert request.missing
    assert all(1 <= i <= request.key.total for i in request.missing)
    for ids in request.batches(max_retransmit_ids(header.layout)):
        encode(
            PlatformRetransmitRequest(original_serial=request.key.first_serial, packet_ids=ids),
            phone=header.phone,
            serial=0,
            edition=header.layout,
            protocol_version=header.protocol_version or 1,
        )


# ---------------------------------------------------------------------------------------------
# The batch decoder against the stream, and decode() on each piece


def _location_row(packet: Packet, location: Location, frame: int, position: int) -> tuple[int, ...]:
    mileage = location.find(Mileage)
    return (
        frame,
        packet.msg_id,
        position,
        packet.header.serial,
        location.alarm,
        location.status,
        location.latitude,
        location.longitude,
        location.altitude_m,
        location.speed,
        location.direction,
        TIME_ABSENT if location.time is None else int(location.time.timestamp()),
        mileage.value if isinstance(mileage, Mileage) else MILEAGE_ABSENT,
    )


_ROW_FIELDS = (
    "frame",
    "msg_id",
    "position",
    "serial",
    "alarm",
    "status",
    "latitude",
    "longitude",
    "altitude_m",
    "speed",
    "direction",
    "time",
    "mileage",
)


def _assert_batch_agrees(result: LocationBatchResult, events: Sequence[Event]) -> None:
    """The batch decoder reports the stream's events: same count, kinds, errors, positions."""
    assert result.frames.size == len(events), (result.frames.size, len(events))
    expected: list[tuple[int, ...]] = []
    phones: list[str] = []
    for index, (row, event) in enumerate(zip(result.frames, events, strict=True)):
        kind = int(row["kind"])
        if kind == KIND_INVALID:
            assert type(event) is REASON_ERRORS[int(row["reason"])], (index, event)
            continue
        if isinstance(event, RemoteProtocolError):
            assert kind != KIND_LOCATION, (index, event)
            continue
        message = event.message
        if kind != KIND_LOCATION:
            assert not isinstance(message, LocationReport), index
            assert not (isinstance(message, LocationBatch) and message.positions), index
            continue
        if isinstance(message, LocationReport):
            expected.append(_location_row(event, message, index, 0))
            phones.append(event.header.phone)
        else:
            assert isinstance(message, LocationBatch), (index, message)
            for position, location in enumerate(message.positions):
                expected.append(_location_row(event, location, index, position))
                phones.append(event.header.phone)
    rows = [tuple(int(rec[name]) for name in _ROW_FIELDS) for rec in result.locations]
    assert rows == expected, (rows, expected)
    assert [rec["phone"].decode() for rec in result.locations] == phones


def _same_event(a: Event, b: Event) -> bool:
    if isinstance(a, RemoteProtocolError) or isinstance(b, RemoteProtocolError):
        return type(a) is type(b) and str(a) == str(b) and a.header == b.header
    return a == b


def _check_pieces(data: bytes, events: Sequence[Event], cap: int) -> None:
    """decode() each 0x7E-delimited piece; with the standard cap, it must agree with the stream
    (the stream takes the fast path for plain location reports, decode() never does)."""
    pieces = data.split(b"\x7e")
    outcomes = [_decode_or_error(b"\x7e" + piece + b"\x7e") for piece in pieces if piece]
    for outcome in outcomes:
        if isinstance(outcome, RemoteProtocolError):
            _check_error(outcome)
    _decode_or_error(data)
    if len(pieces) < 2 or cap != MAX_ESCAPED_FRAME:
        return
    inner = [piece for piece in pieces[1:-1] if piece]
    if len(pieces[-1]) > cap or any(len(piece) > cap for piece in inner):
        return  # the stream reports those as too large; decode() has no cap
    expected = [_decode_or_error(b"\x7e" + piece + b"\x7e") for piece in inner]
    assert len(expected) == len(events), (len(expected), len(events))
    for index, (mine, theirs) in enumerate(zip(expected, events, strict=True)):
        assert _same_event(mine, theirs), (index, mine, theirs)


# ---------------------------------------------------------------------------------------------
# libFuzzer entry point


def main(argv: list[str]) -> None:
    """Fuzz :func:`check_one` with ``protocol`` instrumented for coverage."""
    import atheris  # noqa: PLC0415 - only the fuzzing run needs it; CI runs check_one alone

    # This script's own imports loaded ``protocol`` without coverage hooks: drop those modules
    # and import the harness again under instrumentation, which loads them afresh.
    # protocol.batch is left uninstrumented: its code is straight-line numpy, with little for
    # coverage to tell apart, and with it instrumented the process grew by some 25 KB an input
    # (70 MB to 270 MB over 8,000 inputs; libFuzzer's 2 GB RSS limit within 100,000), growth
    # that the same inputs run without atheris do not show.
    for name in [n for n in sys.modules if n == "protocol" or n.startswith("protocol.")]:
        del sys.modules[name]
    sys.modules.pop("tests.fuzz.fuzz_codec", None)
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    with atheris.instrument_imports(include=["protocol"], exclude=["protocol.batch"]):
        harness = importlib.import_module("tests.fuzz.fuzz_codec")
    atheris.Setup(argv, harness.check_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
