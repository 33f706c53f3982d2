"""Whole-array helpers for data grouped into segments (one segment per vehicle, per key...).

Rows are grouped so that each segment is contiguous, and ordered within it (by device time);
``starts[i]`` is True where a segment begins.  These helpers replace per-row Python loops with a
few numpy passes: forward filling, run detection and "first row matching a condition".
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

__all__ = [
    "concat_ranges",
    "ffill_index",
    "first_in_segment",
    "run_begin",
    "segment_ends",
    "segment_starts",
]


def segment_starts(keys: npt.NDArray[np.integer]) -> Bools:
    """True where ``keys`` (grouped: equal keys adjacent) begins a new segment."""
    starts = np.empty(keys.size, dtype=bool)
    if keys.size:
        starts[0] = True
        np.not_equal(keys[1:], keys[:-1], out=starts[1:])
    return starts


def segment_ends(starts: Bools) -> Bools:
    """True on the last row of each segment."""
    ends = np.empty(starts.size, dtype=bool)
    if starts.size:
        ends[-1] = True
        ends[:-1] = starts[1:]
    return ends


def ffill_index(valid: Bools, starts: Bools) -> I64:
    """For each row, the index of the last ``valid`` row at or before it in its segment, or -1."""
    n = valid.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    pos = np.arange(n, dtype=np.int64)
    # A segment start that is not valid still resets the fill: it marks itself, and is then
    # recognised as "no valid row yet" because valid[] is False there.
    last = np.maximum.accumulate(np.where(valid | starts, pos, 0))
    return np.where(valid[last], last, -1)


def run_begin(cond: Bools, starts: Bools) -> I64:
    """For rows where ``cond`` holds, the index of the first row of their run of ``cond`` rows
    within the segment; -1 elsewhere."""
    n = cond.size
    begin = cond.copy()
    if n > 1:
        begin[1:] &= starts[1:] | ~cond[:-1]
    first = ffill_index(begin, starts)
    return np.where(cond, first, -1)


def first_in_segment(mask: Bools, starts: Bools) -> I64:
    """Indices of the first row of each segment where ``mask`` holds (segments without one are
    left out), ascending."""
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        return rows.astype(np.int64)
    seg = np.cumsum(starts)[rows]
    keep = np.empty(rows.size, dtype=bool)
    keep[0] = True
    np.not_equal(seg[1:], seg[:-1], out=keep[1:])
    return rows[keep].astype(np.int64)


def concat_ranges(begin: I64, count: I64) -> I64:
    """``concatenate([arange(b, b + c) for b, c in zip(begin, count)])`` without the loop."""
    count = np.asarray(count, dtype=np.int64)
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    nonempty = count > 0
    b = np.asarray(begin, dtype=np.int64)[nonempty]
    c = count[nonempty]
    offsets = np.cumsum(c) - c
    step = np.ones(total, dtype=np.int64)
    step[0] = b[0]
    step[offsets[1:]] = b[1:] - (b[:-1] + c[:-1] - 1)
    return np.cumsum(step)
