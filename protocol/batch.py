"""Vectorised decoding of location traffic: many 0x0200 / 0x0704 frames per numpy pass.

The declarative path (:class:`protocol.StreamDecoder`, construct schemas) costs tens of
microseconds a frame.  A platform ingesting location reports from tens of thousands of vehicles
needs the hot messages -- 0x0200 location report (JT/T 808-2019 8.18, table 23) and 0x0704
batch upload (8.43, table 60) -- decoded in bulk.  :func:`decode_locations` takes a buffer
holding many wire frames and does every step with whole-array numpy operations:

1. framing: every 0x7E both ends a frame and may open the next (clause 4.4, 6.1), exactly as
   :class:`protocol.framing.FrameSplitter` cuts a stream, including its size cap;
2. unescaping 0x7D 0x01 / 0x7D 0x02 (clause 6.1); a frame holding any other 0x7D sequence is
   invalid, a lone 0x7D right before the closing flag is taken literally (``raw_7d`` quirk);
3. the XOR check code (clause 4.4.4) with ``np.bitwise_xor.reduceat``;
4. the header (clause 4.4.3, tables 2-4) with the layout choice of
   :func:`protocol.header.parse_header` and its length checks;
5. the 28-byte basic information (table 23), the BCD time with its calendar checks, and the
   mileage item 0x01 (table 27) found by walking every frame's id/length items in lock step.

Frames of any other message, and sub-packaged or encrypted ones, are returned as offsets for the
declarative path; bad frames as offsets with a reason code naming the error the declarative path
raises for them.  The test suite checks, frame by frame, that both paths agree on arbitrary
input.  Only the location fields are decoded here; a caller needing every additional item
decodes the frame declaratively (``result.wire(frame)`` gives its bytes).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from protocol.errors import (
    BodyDecodeError,
    ChecksumError,
    FrameTooLargeError,
    HeaderTooShortError,
    InvalidEscapeError,
    LengthMismatchError,
    LocalProtocolError,
    RemoteProtocolError,
)
from protocol.framing import ESCAPE, FLAG, MAX_ESCAPED_FRAME

__all__ = [
    "FRAME_DTYPE",
    "KIND_INVALID",
    "KIND_LOCATION",
    "KIND_OTHER",
    "LOCATION_DTYPE",
    "MILEAGE_ABSENT",
    "QUIRK_RAW_7D",
    "QUIRK_VERSION_FLAG",
    "REASON_BODY",
    "REASON_CHECKSUM",
    "REASON_ERRORS",
    "REASON_FRAME_TOO_LARGE",
    "REASON_HEADER_TOO_SHORT",
    "REASON_INVALID_ESCAPE",
    "REASON_LENGTH_MISMATCH",
    "TIME_ABSENT",
    "BatchStreamDecoder",
    "LocationBatchResult",
    "decode_locations",
]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]

# ---------------------------------------------------------------------------------------------
# Output layout

KIND_LOCATION: Final = 0
"""The frame's positions are rows of ``locations`` (a 0x0200, or a 0x0704 with positions)."""
KIND_OTHER: Final = 1
"""A sound frame for the declarative path: another id, a sub-package, an encrypted body, or a
0x0704 without positions."""
KIND_INVALID: Final = 2
"""A bad frame; ``reason`` says which error the declarative path raises for it."""

REASON_INVALID_ESCAPE: Final = 1
REASON_FRAME_TOO_LARGE: Final = 2
REASON_HEADER_TOO_SHORT: Final = 3
REASON_CHECKSUM: Final = 4
REASON_LENGTH_MISMATCH: Final = 5
REASON_BODY: Final = 6
REASON_ERRORS: Final[dict[int, type[RemoteProtocolError]]] = {
    REASON_INVALID_ESCAPE: InvalidEscapeError,
    REASON_FRAME_TOO_LARGE: FrameTooLargeError,
    REASON_HEADER_TOO_SHORT: HeaderTooShortError,
    REASON_CHECKSUM: ChecksumError,
    REASON_LENGTH_MISMATCH: LengthMismatchError,
    REASON_BODY: BodyDecodeError,
}
"""Reason code -> the error class the declarative path reports for that frame."""

QUIRK_RAW_7D: Final = 1
"""Bit in ``locations['quirks']``: the check code came as a lone 0x7D (``raw_7d_before_flag``)."""
QUIRK_VERSION_FLAG: Final = 2
"""Bit in ``locations['quirks']``: bit 14 disagrees with the layout used
(``version_flag_mismatch``)."""

TIME_ABSENT: Final = np.iinfo(np.int64).min
"""``locations['time']`` where the reference's ``Location.time`` is None."""
MILEAGE_ABSENT: Final = -1
"""``locations['mileage']`` where the report has no 0x01 item of the standard 4 bytes."""

FRAME_DTYPE: Final = np.dtype(
    [
        ("start", np.int64),  # offset of the opening 0x7E in ``data``
        ("end", np.int64),  # one past the closing 0x7E: data[start:end] is the wire frame
        ("msg_id", np.int32),  # -1 when the header could not be read
        ("kind", np.uint8),  # KIND_*
        ("reason", np.uint8),  # REASON_* when kind == KIND_INVALID, else 0
    ]
)

LOCATION_DTYPE: Final = np.dtype(
    [
        ("frame", np.int64),  # row of ``frames`` this position came from
        ("msg_id", np.uint16),  # 0x0200 or 0x0704
        ("position", np.uint16),  # index inside a 0x0704 body, 0 for 0x0200
        ("batch_type", np.uint8),  # 0x0704 batch type (table 60), 0 for 0x0200
        ("phone", "S20"),  # BCD phone as hex digits: 12 for the 2013 layout, 20 for 2019
        ("serial", np.uint16),
        ("edition", np.uint16),  # header layout used: 2013 (also 2011) or 2019
        ("quirks", np.uint8),  # QUIRK_* bits
        ("alarm", np.uint32),
        ("status", np.uint32),
        ("latitude", np.uint32),  # 1e-6 degree, sign in status bit 2
        ("longitude", np.uint32),  # 1e-6 degree, sign in status bit 3
        ("altitude_m", np.uint16),
        ("speed", np.uint16),  # 1/10 km/h
        ("direction", np.uint16),
        ("time", np.int64),  # device time as POSIX seconds, TIME_ABSENT if not a valid date
        ("mileage", np.int64),  # item 0x01 in 1/10 km, MILEAGE_ABSENT if none
    ]
)

# ---------------------------------------------------------------------------------------------
# Wire constants

_MSG_LOCATION = 0x0200
_MSG_BATCH = 0x0704
_HEADER_2013 = 12  # table 3 (2011/2013): id 2 + properties 2 + phone 6 + serial 2
_HEADER_2019 = 17  # table 3 (2019): + protocol version 1, phone 10 instead of 6
_PACKAGE = 4  # package total + index WORDs when bit 13 is set
_BASIC = 28  # table 23: location basic information
_ITEM_MILEAGE = 0x01  # table 27: mileage DWORD, 1/10 km
_MILEAGE_LEN = 4
_GMT8_S = 8 * 3600  # BCD times are GMT+8 wall clock (clause 4.2, table 1)

# Fixed-size reads (at most 28 bytes: the basic information) start at offsets inside the data;
# this much zero padding after it keeps those made at short or broken frames in bounds.
_PAD = 64

# Table 23 as big-endian numpy fields, read in place from the unescaped bytes.
_BASIC_DTYPE = np.dtype(
    {
        "names": [
            "alarm",
            "status",
            "latitude",
            "longitude",
            "altitude_m",
            "speed",
            "direction",
            "time",
        ],
        "formats": [">u4", ">u4", ">u4", ">u4", ">u2", ">u2", ">u2", ("u1", (6,))],
        "offsets": [0, 4, 8, 12, 16, 18, 20, 22],
        "itemsize": _BASIC,
    }
)
_BASIC_FIELDS = ("alarm", "status", "latitude", "longitude", "altitude_m", "speed", "direction")

# Byte -> its two hex digits, as the uint16 whose memory holds them (BcdDigits reads BCD
# phone numbers as hex so that devices' a-f digits survive).
_HEX = np.frombuffer(b"".join(b"%02x" % i for i in range(256)), dtype=np.uint16)

# BCD byte -> 0-99, or 100 when a nibble is above 9.  Every check below fails for 100, so a
# non-digit anywhere makes the time None without a separate test.
_BAD_BCD = 100
_BCD = np.full(256, _BAD_BCD, dtype=np.uint8)
for _byte in range(256):
    if _byte >> 4 <= 9 and _byte & 0x0F <= 9:
        _BCD[_byte] = (_byte >> 4) * 10 + (_byte & 0x0F)

# Indexed by year * 101 + month (year 00-99 = 2000-2099, as bcd_time_to_datetime reads it;
# 100 = bad digit): days in that month (0 for month 0, 13-99 and bad digits, so that every day
# fails), and POSIX seconds at 00:00 GMT+8 on "day 0" of that month.
_EPOCH = datetime.date(1970, 1, 1).toordinal()
_MONTH_DAYS = np.zeros(101 * 101, dtype=np.int32)
_MONTH_SECONDS = np.zeros(101 * 101, dtype=np.int64)
for _yy in range(100):
    for _mo in range(1, 13):
        _first = datetime.date(2000 + _yy, _mo, 1)
        _next = datetime.date(2000 + _yy + _mo // 12, _mo % 12 + 1, 1)
        _MONTH_DAYS[_yy * 101 + _mo] = (_next - _first).days
        _MONTH_SECONDS[_yy * 101 + _mo] = (_first.toordinal() - 1 - _EPOCH) * 86400 - _GMT8_S
del _byte, _yy, _mo, _first, _next


def _view(work: U8, dtype: npt.DTypeLike) -> npt.NDArray[np.generic]:
    """Every offset of ``work`` as the start of a ``dtype`` value (stride 1, no copy)."""
    dt = np.dtype(dtype)
    return np.ndarray(
        shape=(work.size - dt.itemsize + 1,), dtype=dt, buffer=work, offset=0, strides=(1,)
    )


def _records(work: U8, at: I64, dtype: np.dtype[np.void]) -> npt.NDArray[np.void]:
    """Copy ``dtype.itemsize`` bytes at each offset and read them as ``dtype``.

    Gathering opaque ``V<n>`` items is a memcpy per row; indexing the structured view directly
    takes numpy's generic path and is about twenty times slower.
    """
    raw = _view(work, f"V{dtype.itemsize}")[at]
    return raw.view(dtype)


def _bcd_time(raw: U8) -> I64:
    """BCD[6] YYMMDDhhmmss GMT+8 rows -> POSIX seconds, TIME_ABSENT where the reference has None.

    Mirrors :func:`protocol.fields.bcd_time_to_datetime`: any nibble above 9 or a date/time that
    ``datetime`` rejects (month 0, 31 April, 29 February outside leap years, hour 24, second 60)
    gives None.
    """
    val = _BCD[raw]
    yy, mo, dd, hh, mi, ss = (val[:, i].astype(np.int32) for i in range(6))
    month = yy * 101 + mo
    ok = (dd >= 1) & (dd <= _MONTH_DAYS[month]) & (hh <= 23) & (mi <= 59) & (ss <= 59)
    seconds = _MONTH_SECONDS[month] + (dd * 86400 + hh * 3600 + mi * 60 + ss)
    return np.where(ok, seconds, TIME_ABSENT)


def _mileage(work: U8, base: I64, end: I64) -> I64:
    """Item 0x01 of each location whose items run from ``base`` to ``end`` (offsets in work).

    Mirrors :func:`protocol.messages.location.parse_items`: items are id BYTE, length BYTE,
    value; an item running past the end stops the walk (and is no Mileage); the first 0x01 of
    length 4 is the one :meth:`Location.find` returns.  All rows step through their items
    together; a row leaves the walk when its items end or its mileage is found.
    """
    out = np.full(base.size, MILEAGE_ABSENT, dtype=np.int64)
    u4 = _view(work, ">u4")
    rows = np.flatnonzero(base + 2 <= end)
    pos = base[rows]
    stop_at = end[rows]
    while rows.size:
        item_id = work[pos]
        length = work[pos + 1].astype(np.int64)
        nxt = pos + 2 + length
        inside = nxt <= stop_at
        hit = inside & (item_id == _ITEM_MILEAGE) & (length == _MILEAGE_LEN)
        if hit.any():
            out[rows[hit]] = u4[pos[hit] + 2]
        go = inside & ~hit & (nxt + 2 <= stop_at)
        rows, pos, stop_at = rows[go], nxt[go], stop_at[go]
    return out


def _batch_positions(
    work: U8, body: I64, body_len: I64
) -> tuple[Bools, I64, U8, I64, I64, I64, I64]:
    """Walk 0x0704 bodies (table 60): count WORD, type BYTE, then length WORD + location.

    Mirrors :meth:`LocationBatch.decode`: a body under 3 bytes, a position whose length WORD or
    data runs past the body, or a location under 28 bytes fails the whole frame; bytes after the
    declared count are ignored.  Returns per frame (failed, count, batch type) and per position
    (frame row, index, offset, length) for the frames that did not fail.
    """
    end = body + body_len
    failed = body_len < 3
    u2 = _view(work, ">u2")
    count = np.where(failed, 0, u2[body]).astype(np.int64)
    batch_type = np.where(failed, 0, work[body + 2]).astype(np.uint8)
    rows = np.flatnonzero(count > 0)
    pos = body[rows] + 3
    parts: list[tuple[I64, I64, I64, int]] = []
    index = 0
    # Each step consumes at least 2 + 28 bytes of a body of at most 1023, so this loop ends
    # after 35 steps whatever the counts say.
    while rows.size:
        stop_at = end[rows]
        fits = pos + 2 <= stop_at
        length = np.where(fits, u2[pos], 0).astype(np.int64)  # pos <= end: in bounds
        good = fits & (pos + 2 + length <= stop_at) & (length >= _BASIC)
        failed[rows[~good]] = True
        rows, pos, length = rows[good], pos[good], length[good]
        parts.append((rows, pos + 2, length, index))
        pos = pos + 2 + length
        index += 1
        more = count[rows] > index
        rows, pos = rows[more], pos[more]
    if parts:
        frame = np.concatenate([p[0] for p in parts])
        position = np.concatenate([np.full(p[0].size, p[3], dtype=np.int64) for p in parts])
        start = np.concatenate([p[1] for p in parts])
        length = np.concatenate([p[2] for p in parts])
        keep = ~failed[frame]
        frame, position, start, length = frame[keep], position[keep], start[keep], length[keep]
    else:
        frame = position = start = length = np.zeros(0, dtype=np.int64)
    return failed, count, batch_type, frame, position, start, length


def _merge_order(single: I64, multi: I64, position: I64) -> npt.NDArray[np.intp]:
    """The order that puts 0x0200 rows (frame rows ``single``, ascending) and 0x0704 rows
    (frame rows ``multi``, index ``position``, in any order) into frame order, as indexes into
    their concatenation.  A merge by binary search: sorting every row would cost more.
    """
    # A 0x0704 position index is below 35 (see _batch_positions), so frame * 64 + index sorts.
    key = multi * 64 + position
    sort = np.argsort(key, kind="stable")
    at = np.searchsorted(single * 64, key[sort]) + np.arange(sort.size)
    order = np.empty(single.size + multi.size, dtype=np.intp)
    from_multi = np.zeros(order.size, dtype=bool)
    from_multi[at] = True
    order[at] = single.size + sort
    order[~from_multi] = np.arange(single.size)
    return order


# ---------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class LocationBatchResult:
    """What one call decoded.

    ``frames`` has one row per event the declarative :class:`~protocol.StreamDecoder` would
    report for the same bytes, in the same order (``FRAME_DTYPE``); ``locations`` one row per
    decoded position (``LOCATION_DTYPE``), in frame order, linked by ``locations['frame']``.
    All offsets refer to ``data``.  ``tail_start`` is where the unfinished frame begins that a
    stream keeps for the next call (``len(data)`` if none); ``junk_bytes`` counts bytes seen
    outside any frame, as the declarative splitter does.
    """

    data: bytes
    frames: npt.NDArray[np.void]
    locations: npt.NDArray[np.void]
    tail_start: int
    junk_bytes: int

    def wire(self, frame: int) -> bytes:
        """The wire bytes of frame row ``frame``, flags included (for the declarative path)."""
        row = self.frames[frame]
        return self.data[int(row["start"]) : int(row["end"])]

    def rows_of_kind(self, kind: int) -> npt.NDArray[np.intp]:
        """Frame rows of one ``KIND_*``: e.g. ``KIND_OTHER`` for the declarative path."""
        return np.flatnonzero(self.frames["kind"] == kind)


# ---------------------------------------------------------------------------------------------
# Decoding


def _empty_result(data: bytes, tail_start: int, junk: int) -> LocationBatchResult:
    return LocationBatchResult(
        data=data,
        frames=np.zeros(0, dtype=FRAME_DTYPE),
        locations=np.zeros(0, dtype=LOCATION_DTYPE),
        tail_start=tail_start,
        junk_bytes=junk,
    )


def _decode(
    data: bytes, *, skipping: bool, max_frame_bytes: int
) -> tuple[LocationBatchResult, bool]:
    """Decode ``data`` as a splitter in state ``skipping`` would; also return the new state."""
    buf: U8 = np.frombuffer(data, dtype=np.uint8)
    size = buf.size
    flags = np.flatnonzero(buf == FLAG)
    if flags.size == 0:
        # No flag: everything is junk (or the rest of an oversize frame) and nothing is kept.
        return _empty_result(data, size, 0 if skipping else size), skipping
    junk = 0 if skipping else int(flags[0])

    # --- framing: the segment between each pair of neighbouring flags -------------------------
    seg_len = np.diff(flags) - 1
    nonempty = seg_len > 0
    opening = flags[:-1][nonempty]  # the flag before each frame
    closing = flags[1:][nonempty]
    # A frame longer than the cap is one FrameTooLargeError, and the splitter goes on at its
    # closing flag.  An unfinished frame already past the cap is reported after the others,
    # dropped, and the splitter skips to the first flag of a later feed.
    too_big = seg_len[nonempty] > max_frame_bytes
    oversize_tail = size - int(flags[-1]) - 1 > max_frame_bytes
    tail_start = size if oversize_tail else int(flags[-1])
    nframes = opening.size
    start = opening + 1  # content start in work (escaped frames are moved below)
    length = closing - start  # content length (unescaped, below)
    # XOR of [flag, next flag): the opening flag 0x7E and the frame's escaped bytes.
    xor: U8 = np.zeros(0, dtype=np.uint8)
    if nframes:
        segment_xor = np.bitwise_xor.reduceat(buf, flags)[:-1][nonempty]
        xor = (segment_xor ^ FLAG).astype(np.uint8, copy=False)

    # --- escapes ------------------------------------------------------------------------------
    bad_escape = np.zeros(nframes, dtype=bool)
    raw_7d = np.zeros(nframes, dtype=bool)
    side: U8 = np.zeros(0, dtype=np.uint8)
    esc = np.flatnonzero(buf == ESCAPE) if nframes else np.zeros(0, dtype=np.int64)
    if esc.size:
        # A 0x7D belongs to the frame whose opening flag is the last one before it.
        which = np.searchsorted(opening, esc, side="right") - 1
        inside = (which >= 0) & (esc < closing[np.maximum(which, 0)])
        esc, which = esc[inside], which[inside]
        code = buf[esc + 1]  # in bounds: a closing flag follows every escape kept
        lone = code == FLAG  # 7D right before the flag: literal (framing.unescape)
        good = (code == 1) | (code == 2)
        raw_7d[which[lone]] = True
        bad_escape[which[~lone & ~good]] = True
        sel = good & ~bad_escape[which] & ~too_big[which]
        esc, which, code = esc[sel], which[sel], code[sel]
        if esc.size:
            side, start, length, xor = _unescape(
                buf, esc=esc, which=which, code=code, start=start, length=length, xor=xor
            )

    work: U8 = np.concatenate([buf, side, np.zeros(_PAD, dtype=np.uint8)])

    # --- check code and header (in the order codec.parse_frame / header.parse_header check) --
    reason = np.zeros(nframes, dtype=np.uint8)

    def fail(cond: Bools, code: int) -> None:
        reason[(reason == 0) & cond] = code

    fail(too_big, REASON_FRAME_TOO_LARGE)
    fail(bad_escape, REASON_INVALID_ESCAPE)
    fail(length < 2, REASON_HEADER_TOO_SHORT)
    fail(xor != 0, REASON_CHECKSUM)
    data_len = length - 1  # header + body; the last byte is the check code
    fail(data_len < 4, REASON_HEADER_TOO_SHORT)
    word = _view(work, ">u4")[start].astype(np.int64)
    msg_id = word >> 16
    body_len = word & 0x3FF  # table 2: bits 0-9
    encrypted = (word & 0x1C00) != 0  # bits 10-12
    sub = (word >> 13) & 1  # bit 13
    flag_2019 = ((word >> 14) & 1).astype(bool)  # bit 14
    announced = np.where(flag_2019, _HEADER_2019, _HEADER_2013) + _PACKAGE * sub
    other = np.where(flag_2019, _HEADER_2013, _HEADER_2019) + _PACKAGE * sub
    layout_2019 = np.where(
        announced + body_len == data_len,
        flag_2019,
        np.where(other + body_len == data_len, ~flag_2019, flag_2019),
    )
    header_len = np.where(layout_2019, _HEADER_2019, _HEADER_2013) + _PACKAGE * sub
    fail(data_len < header_len, REASON_HEADER_TOO_SHORT)
    fail(data_len - header_len != body_len, REASON_LENGTH_MISMATCH)

    sound = reason == 0
    plain = sound & (sub == 0) & ~encrypted
    is_location = plain & (msg_id == _MSG_LOCATION)
    fail(is_location & (body_len < _BASIC), REASON_BODY)
    is_location &= reason == 0
    body = start + header_len

    kind = np.where(reason != 0, KIND_INVALID, KIND_OTHER).astype(np.uint8)
    kind[is_location] = KIND_LOCATION

    # 0x0704: positions become rows too
    batch_rows = np.flatnonzero(plain & (msg_id == _MSG_BATCH))
    loc_frame = np.flatnonzero(is_location)
    loc_base = body[loc_frame]
    loc_len = body_len[loc_frame]
    loc_msg = np.full(loc_frame.size, _MSG_LOCATION, dtype=np.uint16)
    loc_pos = np.zeros(loc_frame.size, dtype=np.int64)
    loc_type = np.zeros(loc_frame.size, dtype=np.uint8)
    if batch_rows.size:
        failed, count, btype, b_frame, b_pos, b_start, b_len = _batch_positions(
            work, body[batch_rows], body_len[batch_rows]
        )
        reason[batch_rows[failed]] = REASON_BODY
        kind[batch_rows[failed]] = KIND_INVALID
        kind[batch_rows[~failed & (count > 0)]] = KIND_LOCATION
        order = _merge_order(loc_frame, batch_rows[b_frame], b_pos)
        loc_frame = np.concatenate([loc_frame, batch_rows[b_frame]])[order]
        loc_base = np.concatenate([loc_base, b_start])[order]
        loc_len = np.concatenate([loc_len, b_len])[order]
        loc_msg = np.concatenate([loc_msg, np.full(b_frame.size, _MSG_BATCH, np.uint16)])[order]
        loc_pos = np.concatenate([loc_pos, b_pos])[order]
        loc_type = np.concatenate([loc_type, btype[b_frame]])[order]

    # --- frames table ---------------------------------------------------------------------
    nrows = nframes + (1 if oversize_tail else 0)
    frames = np.zeros(nrows, dtype=FRAME_DTYPE)
    frames["start"][:nframes] = opening
    frames["end"][:nframes] = closing + 1
    frames["msg_id"][:nframes] = np.where((data_len >= 4) & ~bad_escape & ~too_big, msg_id, -1)
    frames["kind"][:nframes] = kind
    frames["reason"][:nframes] = reason
    if oversize_tail:
        frames[nframes] = (flags[-1], size, -1, KIND_INVALID, REASON_FRAME_TOO_LARGE)

    # --- locations --------------------------------------------------------------------------
    locations = np.zeros(loc_frame.size, dtype=LOCATION_DTYPE)
    if loc_frame.size:
        _fill_locations(
            locations,
            work,
            loc_frame=loc_frame,
            loc_base=loc_base,
            loc_len=loc_len,
            frame_start=start,
            layout_2019=layout_2019,
            flag_2019=flag_2019,
            raw_7d=raw_7d,
        )
        locations["msg_id"] = loc_msg
        locations["position"] = loc_pos
        locations["batch_type"] = loc_type
    result = LocationBatchResult(
        data=data, frames=frames, locations=locations, tail_start=tail_start, junk_bytes=junk
    )
    return result, oversize_tail


def _unescape(
    buf: U8, *, esc: I64, which: I64, code: U8, start: I64, length: I64, xor: U8
) -> tuple[U8, I64, I64, U8]:
    """Unescape the frames holding valid escapes into a side buffer placed after ``buf``.

    ``esc`` are the 0x7D positions of valid escapes, ``which`` their frames (ascending).  Frames
    without escapes stay where they are: for a buffer with a few escapes this copies a few
    frames instead of the whole buffer.  Returns the side buffer and the frames' new content
    start (in the work buffer ``buf + side``), length and check XOR.
    """
    frames, per_frame = np.unique(which, return_counts=True)
    raw_len = length[frames]
    first = np.cumsum(raw_len) - raw_len  # each frame's first byte in the gathered copy
    gather = np.arange(int(raw_len.sum()), dtype=np.int64) + np.repeat(
        start[frames] - first, raw_len
    )
    out = buf[gather]
    at = np.searchsorted(gather, esc)
    out[at] = code + (ESCAPE - 1)  # 7D 01 -> 7D, 7D 02 -> 7E
    keep = np.ones(out.size, dtype=bool)
    keep[at + 1] = False
    side = out[keep]
    new_len = raw_len - per_frame
    new_first = np.cumsum(new_len) - new_len
    start = start.copy()
    length = length.copy()
    xor = xor.copy()
    start[frames] = buf.size + new_first
    length[frames] = new_len
    xor[frames] = np.bitwise_xor.reduceat(side, new_first)
    return side, start, length, xor


def _fill_locations(
    out: npt.NDArray[np.void],
    work: U8,
    *,
    loc_frame: I64,
    loc_base: I64,
    loc_len: I64,
    frame_start: I64,
    layout_2019: Bools,
    flag_2019: Bools,
    raw_7d: Bools,
) -> None:
    out["frame"] = loc_frame
    basic = _records(work, loc_base, _BASIC_DTYPE)
    for name in _BASIC_FIELDS:
        out[name] = basic[name]
    out["time"] = _bcd_time(basic["time"])
    out["mileage"] = _mileage(work, loc_base + _BASIC, loc_base + loc_len)

    # Header fields, read again for each position of a 0x0704 (those are few).
    fstart = frame_start[loc_frame]
    is_2019 = layout_2019[loc_frame]
    # Phone: BCD[6] at offset 4 (2013) or BCD[10] at 5 (2019, after the version byte).  Read
    # ten bytes for every row and blank the digits a 2013 header does not have.
    digits = _HEX[_view(work, "V10")[fstart + 4 + is_2019].view(np.uint8).reshape(-1, 10)]
    digits[~is_2019, 6:] = 0
    out["phone"] = digits.view("S20").reshape(-1)
    serial_at = np.where(is_2019, _HEADER_2019 - 2, _HEADER_2013 - 2)  # serial ends the header
    out["serial"] = _view(work, ">u2")[fstart + serial_at]
    out["edition"] = np.where(is_2019, 2019, 2013)
    out["quirks"] = np.where(raw_7d[loc_frame], QUIRK_RAW_7D, 0) | np.where(
        flag_2019[loc_frame] != is_2019, QUIRK_VERSION_FLAG, 0
    )


def decode_locations(
    buffer: bytes | bytearray | memoryview, *, max_frame_bytes: int = MAX_ESCAPED_FRAME
) -> LocationBatchResult:
    """Decode every frame in ``buffer`` as a fresh :class:`~protocol.StreamDecoder` fed it once.

    0x0200 reports and 0x0704 positions (not sub-packaged, not encrypted) become rows of
    ``result.locations``; every other frame is a row of ``result.frames`` with its offsets, for
    the declarative path (``KIND_OTHER``) or with the reason it is bad (``KIND_INVALID``).
    Bytes from ``result.tail_start`` on are an unfinished frame.  Never raises for any input.
    """
    if max_frame_bytes < 1:
        raise LocalProtocolError("max_frame_bytes must be at least 1")
    data = buffer if isinstance(buffer, bytes) else bytes(buffer)
    result, _ = _decode(data, skipping=False, max_frame_bytes=max_frame_bytes)
    return result


class BatchStreamDecoder:
    """:func:`decode_locations` for one connection's stream: keeps the unfinished frame.

    ``feed(chunk)`` returns the frames completed by ``chunk``, exactly the events a
    :class:`~protocol.StreamDecoder` fed the same chunks (and drained after each) reports, in
    the same order.  Offsets in the result refer to ``result.data``: the kept tail followed by
    ``chunk``.
    """

    def __init__(self, *, max_frame_bytes: int = MAX_ESCAPED_FRAME) -> None:
        if max_frame_bytes < 1:
            raise LocalProtocolError("max_frame_bytes must be at least 1")
        self.max_frame_bytes = max_frame_bytes
        # The tail is an opening flag plus at most ``max_frame_bytes`` escaped bytes: anything
        # longer cannot be a frame (a 2019 header with sub-package fields, a 1023-byte body and
        # the check code, every byte escaped; framing.MAX_ESCAPED_FRAME) and is reported as
        # too large and dropped, so a connection never holds more than this between reads.
        self.max_tail_bytes = max_frame_bytes + 1
        self._tail = b""
        self._skipping = False
        self.junk_bytes = 0

    @property
    def buffered(self) -> int:
        """Bytes of the unfinished frame held for the next call."""
        return len(self._tail)

    def feed(self, chunk: bytes | bytearray | memoryview) -> LocationBatchResult:
        data = self._tail + bytes(chunk) if self._tail else bytes(chunk)
        result, self._skipping = _decode(
            data, skipping=self._skipping, max_frame_bytes=self.max_frame_bytes
        )
        self._tail = data[result.tail_start :]
        if len(self._tail) > self.max_tail_bytes:  # pragma: no cover - _decode enforces it
            raise LocalProtocolError("unfinished frame passed its cap")
        self.junk_bytes += result.junk_bytes
        return result
