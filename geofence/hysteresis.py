"""Enter/exit transitions that do not flap when GPS jitter straddles a border.

Two mechanisms, usable together:

* a **distance margin**: :class:`geofence.index.FenceIndex` gives each position a signal of +1
  (inside the fence shrunk by the margin: clearly inside), -1 (outside the fence grown by the
  margin: clearly outside) or 0 (in the band between).  A band position never changes the
  state -- a Schmitt trigger;
* **N consecutive samples**: the state only changes after ``samples`` clear positions in a row
  on the other side.  A band position breaks the run: it is not clearly on either side.

:func:`debounce` runs this over many objects at once (rows grouped by object, time-ordered) and
carries the state and the unfinished run of each object to the next call, so feeding a track
in one call or in many gives the same states.  :class:`FenceTracker` applies it per (object,
fence) pair and reports enter and exit transitions.

States are +1 (inside), -1 (outside) and 0 (unknown: not yet confirmed either way).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from geofence.index import Hits
from geofence.segments import concat_ranges, ffill_index, run_begin, segment_ends, segment_starts

__all__ = ["FenceTracker", "TrackResult", "debounce", "signal_from"]

I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

INSIDE = 1
OUTSIDE = -1
UNKNOWN = 0

# Pair codes: object * _FENCE_SPAN + fence index.  Fence sets hold thousands of fences, far
# below this; objects (vehicles) stay below 2**63 / 2**24.
_FENCE_SPAN = 1 << 24


def signal_from(inside: Bools, near: Bools) -> I8:
    """+1 where clearly inside, -1 where clearly outside (not even near), 0 in the band."""
    return np.where(inside, np.int8(INSIDE), np.where(near, np.int8(0), np.int8(OUTSIDE)))


def debounce(
    signal: I8,
    starts: Bools,
    group: I64,
    *,
    state: I8,
    run_sign: I8,
    run_len: I32,
    samples: int,
) -> I8:
    """The debounced state after each row (see the module docstring).

    ``signal`` is +1/0/-1 per row; rows are grouped (``starts`` marks each group's first row)
    and ``group`` gives each row's index into the carried arrays ``state``, ``run_sign`` and
    ``run_len``, which hold each group's state before these rows and are updated in place to
    the state after them.  ``samples`` >= 1 clear rows in a row confirm a change.
    """
    if samples < 1:
        raise ValueError("samples must be at least 1")
    n = signal.size
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    # Runs of equal signal (band rows make runs of 0, which count for nothing).
    new_run = starts.copy()
    new_run[1:] |= signal[1:] != signal[:-1]
    idx = np.arange(n, dtype=np.int64)
    begin = np.maximum.accumulate(np.where(new_run, idx, 0))
    pos = idx - begin + 1
    # A group's first run continues the run carried from before if it has the same sign.
    carry = starts[begin] & (signal == run_sign[group]) & (signal != 0)
    pos += np.where(carry, run_len[group].astype(np.int64), 0)
    confirmed = np.where((signal != 0) & (pos >= samples), signal, 0).astype(np.int8)
    last = ffill_index(confirmed != 0, starts)
    out = np.where(last >= 0, confirmed[np.maximum(last, 0)], state[group]).astype(np.int8)

    ends = segment_ends(starts)
    state[group[ends]] = out[ends]
    run_sign[group[ends]] = signal[ends]
    run_len[group[ends]] = np.minimum(pos[ends], samples).astype(np.int32)
    return out


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class TrackResult:
    """What one :meth:`FenceTracker.update` saw.

    Per tracked row (one row per (object, fence) pair and sample of that object, grouped by
    pair, time-ordered): ``sample`` (index into the update's arrays), ``obj``, ``fence``,
    ``state`` after the row and ``since`` (time the pair's current inside state began, -1 when
    not inside); ``starts`` marks each pair's first row.  Transitions: ``enter``/``exit`` are
    row indices where the state became inside / stopped being inside.
    """

    sample: I64
    obj: I64
    fence: I64
    state: I8
    since: I64
    starts: Bools
    enter: I64
    exit: I64


class FenceTracker:
    """Per (object, fence) inside/outside state with hysteresis, across calls.

    Only pairs that are near each other or were inside are held, so memory grows with the
    number of objects inside or near fences, not with objects x fences.  A pair never seen
    before starts outside.
    """

    def __init__(self, *, samples: int = 1) -> None:
        if samples < 1:
            raise ValueError("samples must be at least 1")
        self.samples = samples
        self._keys = np.zeros(0, dtype=np.int64)
        self._state = np.zeros(0, dtype=np.int8)
        self._run_sign = np.zeros(0, dtype=np.int8)
        self._run_len = np.zeros(0, dtype=np.int32)
        self._since = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        """Pairs currently held."""
        return int(self._keys.size)

    def inside_pairs(self) -> tuple[I64, I64]:
        """(object, fence) of the pairs currently inside."""
        keys = self._keys[self._state == INSIDE]
        return keys // _FENCE_SPAN, keys % _FENCE_SPAN

    def seed(self, obj: I64, fence: I64, since: I64) -> None:
        """Declare (object, fence) pairs inside since the given times (restoring a saved
        state); existing pairs are replaced."""
        keys = obj.astype(np.int64) * _FENCE_SPAN + fence
        keep = ~np.isin(self._keys, keys)
        merged = np.concatenate([self._keys[keep], keys])
        order = np.argsort(merged, kind="stable")
        n = keys.size
        self._keys = merged[order]
        self._state = np.concatenate([self._state[keep], np.full(n, INSIDE, np.int8)])[order]
        self._run_sign = np.concatenate([self._run_sign[keep], np.full(n, INSIDE, np.int8)])[order]
        self._run_len = np.concatenate([self._run_len[keep], np.full(n, self.samples, np.int32)])[
            order
        ]
        self._since = np.concatenate([self._since[keep], since.astype(np.int64)])[order]

    def pairs_of(self, obj: I64) -> dict[str, npt.NDArray[Any]]:
        """The held pairs of the given objects (``object, fence, state, run_sign, run_len,
        since``), to be given back to :meth:`restore`."""
        mine = np.isin(self._keys // _FENCE_SPAN, obj)
        keys = self._keys[mine]
        return {
            "object": keys // _FENCE_SPAN,
            "fence": keys % _FENCE_SPAN,
            "state": self._state[mine],
            "run_sign": self._run_sign[mine],
            "run_len": self._run_len[mine],
            "since": self._since[mine],
        }

    def restore(self, pairs: Mapping[str, npt.NDArray[Any]]) -> None:
        """Put back pairs from :meth:`pairs_of` (after :meth:`forget` of their objects)."""
        keys = pairs["object"].astype(np.int64) * _FENCE_SPAN + pairs["fence"].astype(np.int64)
        keep = ~np.isin(self._keys, keys)
        merged = np.concatenate([self._keys[keep], keys])
        order = np.argsort(merged, kind="stable")
        self._keys = merged[order]
        self._state = np.concatenate([self._state[keep], pairs["state"].astype(np.int8)])[order]
        self._run_sign = np.concatenate([self._run_sign[keep], pairs["run_sign"].astype(np.int8)])[
            order
        ]
        self._run_len = np.concatenate([self._run_len[keep], pairs["run_len"].astype(np.int32)])[
            order
        ]
        self._since = np.concatenate([self._since[keep], pairs["since"].astype(np.int64)])[order]

    def forget(self, obj: I64) -> None:
        """Drop every pair of the given objects: they start outside every fence again (an
        object whose history is judged anew)."""
        keep = ~np.isin(self._keys // _FENCE_SPAN, obj)
        self._keys = self._keys[keep]
        self._state = self._state[keep]
        self._run_sign = self._run_sign[keep]
        self._run_len = self._run_len[keep]
        self._since = self._since[keep]

    def remap(self, new_position: I64) -> None:
        """Renumber fences after the fence set changed: ``new_position[old]`` is the fence's
        new index, or -1 if it is gone (its pairs are dropped)."""
        obj, fence = self._keys // _FENCE_SPAN, self._keys % _FENCE_SPAN
        moved = new_position[fence] if fence.size else fence
        keep = moved >= 0
        keys = obj[keep] * _FENCE_SPAN + moved[keep]
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._state = self._state[keep][order]
        self._run_sign = self._run_sign[keep][order]
        self._run_len = self._run_len[keep][order]
        self._since = self._since[keep][order]

    def update(self, obj: I64, time: I64, hits: Hits) -> TrackResult:
        """Feed rows (``obj`` grouped and time-ordered, ``time`` POSIX seconds) and the hits
        of the fences to track for those rows (``hits.sample`` indexes the rows)."""
        n = obj.size
        starts = segment_starts(obj)
        seg_first = np.flatnonzero(starts)
        seg_obj = obj[seg_first]
        seg_count = np.diff(np.append(seg_first, n))

        hit_codes = obj[hits.sample] * _FENCE_SPAN + hits.fence
        # Pairs to evaluate: those hit now, and held pairs of objects present in these rows.
        held_present = np.isin(self._keys // _FENCE_SPAN, seg_obj)
        keys = np.union1d(np.unique(hit_codes), self._keys[held_present])
        key_obj = keys // _FENCE_SPAN
        key_fence = keys % _FENCE_SPAN
        seg_of_key = np.searchsorted(seg_obj, key_obj)
        count = seg_count[seg_of_key]
        rows = concat_ranges(seg_first[seg_of_key], count)
        row_key = np.repeat(np.arange(keys.size, dtype=np.int64), count)

        # Signal per row: the pair's hit at that sample (+1 inside, 0 band) or -1 if none.
        pair = rows * _FENCE_SPAN + key_fence[row_key]
        hit_pair = hits.sample * _FENCE_SPAN + hits.fence
        order = np.argsort(hit_pair, kind="stable")
        sorted_pair = hit_pair[order]
        at = np.searchsorted(sorted_pair, pair)
        found = at < sorted_pair.size
        found[found] = sorted_pair[at[found]] == pair[found]
        signal = np.full(rows.size, OUTSIDE, dtype=np.int8)
        signal[found] = np.where(hits.inside[order[at[found]]], INSIDE, 0)

        # Carried state for these keys (new keys start outside with no run).
        where = np.searchsorted(self._keys, keys)
        known = where < self._keys.size
        known[known] = self._keys[where[known]] == keys[known]
        state = np.full(keys.size, OUTSIDE, dtype=np.int8)
        run_sign = np.zeros(keys.size, dtype=np.int8)
        run_len = np.zeros(keys.size, dtype=np.int32)
        since = np.full(keys.size, -1, dtype=np.int64)
        state[known] = self._state[where[known]]
        run_sign[known] = self._run_sign[where[known]]
        run_len[known] = self._run_len[where[known]]
        since[known] = self._since[where[known]]
        before = state.copy()

        row_starts = segment_starts(row_key)
        out = debounce(
            signal,
            row_starts,
            row_key,
            state=state,
            run_sign=run_sign,
            run_len=run_len,
            samples=self.samples,
        )
        prev = np.empty(out.size, dtype=np.int8)
        if out.size:
            prev[1:] = out[:-1]
            prev[row_starts] = before[row_key[row_starts]]
        inside = out == INSIDE
        enter = np.flatnonzero(inside & (prev != INSIDE))
        leave = np.flatnonzero(~inside & (prev == INSIDE))
        # since: the time of the row where the inside run began, or the carried time when the
        # run continues from before this call.
        t = time[rows]
        begin = run_begin(inside, row_starts)
        row_since = np.where(begin >= 0, t[np.maximum(begin, 0)], -1)
        continued = inside & (begin >= 0) & row_starts[np.maximum(begin, 0)]
        continued &= prev[np.maximum(begin, 0)] == INSIDE
        row_since = np.where(continued, since[row_key], row_since)
        ends = segment_ends(row_starts)
        since[row_key[ends]] = row_since[ends]

        # Merge back: replace evaluated keys, keep the rest, drop pairs that are outside with
        # nothing pending.
        keep_old = ~np.isin(self._keys, keys)
        live = (state != OUTSIDE) | (run_sign == INSIDE)
        merged = np.concatenate([self._keys[keep_old], keys[live]])
        order = np.argsort(merged, kind="stable")
        self._keys = merged[order]
        self._state = np.concatenate([self._state[keep_old], state[live]])[order]
        self._run_sign = np.concatenate([self._run_sign[keep_old], run_sign[live]])[order]
        self._run_len = np.concatenate([self._run_len[keep_old], run_len[live]])[order]
        self._since = np.concatenate([self._since[keep_old], since[live]])[order]

        return TrackResult(
            sample=rows,
            obj=key_obj[row_key],
            fence=key_fence[row_key],
            state=out,
            since=row_since,
            starts=row_starts,
            enter=enter,
            exit=leave,
        )
