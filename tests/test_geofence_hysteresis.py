"""Hysteresis: the vectorised debounce and the per-fence tracker against plain scalar models."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from geofence import FenceTracker, Hits
from geofence.hysteresis import INSIDE, OUTSIDE, debounce, signal_from
from geofence.segments import segment_starts


class ScalarDebounce:
    """The reference: one object, one sample at a time."""

    def __init__(self, samples: int, state: int = 0) -> None:
        self.samples = samples
        self.state = state
        self.sign = 0
        self.length = 0

    def feed(self, signal: int) -> int:
        if signal == self.sign:
            self.length += 1
        else:
            self.sign, self.length = signal, 1
        if signal != 0 and self.length >= self.samples:
            self.state = signal
        return self.state


signals = st.lists(
    st.tuples(st.integers(0, 3), st.sampled_from([-1, 0, 1])), min_size=1, max_size=60
)


@settings(max_examples=200)
@given(signals, st.integers(1, 4), st.lists(st.integers(1, 60), max_size=5))
def test_debounce_matches_the_scalar_model_in_any_chunks(
    rows: list[tuple[int, int]], samples: int, cuts: list[int]
) -> None:
    models = {g: ScalarDebounce(samples) for g in range(4)}
    want = [models[g].feed(s) for g, s in rows]
    state = np.zeros(4, dtype=np.int8)
    run_sign = np.zeros(4, dtype=np.int8)
    run_len = np.zeros(4, dtype=np.int32)
    got: list[int] = []
    bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
    for lo, hi in itertools.pairwise(bounds):
        chunk = rows[lo:hi]
        # rows grouped by object, each object's rows in order (stable sort)
        order = sorted(range(len(chunk)), key=lambda i: chunk[i][0])
        group = np.array([chunk[i][0] for i in order], dtype=np.int64)
        sig = np.array([chunk[i][1] for i in order], dtype=np.int8)
        out = debounce(
            sig,
            segment_starts(group),
            group,
            state=state,
            run_sign=run_sign,
            run_len=run_len,
            samples=samples,
        )
        back = np.empty(len(chunk), dtype=np.int8)
        back[order] = out
        got.extend(back.tolist())
    assert got == want
    assert state.tolist() == [models[g].state for g in range(4)]


def test_signal_from() -> None:
    inside = np.array([True, False, False])
    near = np.array([True, True, False])
    assert signal_from(inside, near).tolist() == [1, 0, -1]


class TrackerMachine(RuleBasedStateMachine):
    """Feed random hits for 3 objects x 3 fences in random batches; compare every pair's
    state, enter and exit with a scalar model per pair (which starts outside)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples = 2
        self.tracker = FenceTracker(samples=self.samples)
        self.models: dict[tuple[int, int], ScalarDebounce] = {}
        self.time = 0

    def model(self, obj: int, fence: int) -> ScalarDebounce:
        key = (obj, fence)
        if key not in self.models:
            self.models[key] = ScalarDebounce(self.samples, state=OUTSIDE)
        return self.models[key]

    @rule(
        rows=st.lists(
            st.tuples(
                st.integers(0, 2),
                st.lists(st.sampled_from([-1, 0, 1]), min_size=3, max_size=3),
            ),
            min_size=1,
            max_size=12,
        )
    )
    def feed(self, rows: list[tuple[int, list[int]]]) -> None:
        rows = sorted(rows, key=lambda r: r[0])
        obj = np.array([r[0] for r in rows], dtype=np.int64)
        times = []
        sample, fence, inside = [], [], []
        for i, (_, per_fence) in enumerate(rows):
            self.time += 10
            times.append(self.time)
            for f, s in enumerate(per_fence):
                if s >= 0:
                    sample.append(i)
                    fence.append(f)
                    inside.append(s == 1)
        hits = Hits(
            sample=np.array(sample, dtype=np.int64),
            fence=np.array(fence, dtype=np.int64),
            inside=np.array(inside, dtype=bool),
        )
        result = self.tracker.update(obj, np.array(times, dtype=np.int64), hits)
        got_state = {}
        for row in range(result.sample.size):
            key = (int(result.obj[row]), int(result.fence[row]), int(result.sample[row]))
            got_state[key] = int(result.state[row])
        enters = {
            (int(result.obj[r]), int(result.fence[r]), int(result.sample[r])) for r in result.enter
        }
        exits = {
            (int(result.obj[r]), int(result.fence[r]), int(result.sample[r])) for r in result.exit
        }
        want_enters, want_exits = set(), set()
        for i, (o, per_fence) in enumerate(rows):
            for f, s in enumerate(per_fence):
                model = self.model(o, f)
                before = model.state
                after = model.feed(s)
                if (o, f, i) in got_state:
                    assert got_state[(o, f, i)] == after
                elif after != OUTSIDE:  # pairs not evaluated must be (and stay) outside
                    raise AssertionError(f"pair {(o, f)} not tracked but {after}")
                if after == INSIDE and before != INSIDE:
                    want_enters.add((o, f, i))
                if after != INSIDE and before == INSIDE:
                    want_exits.add((o, f, i))
        assert enters == want_enters
        assert exits == want_exits

    @invariant()
    def inside_pairs_agree(self) -> None:
        obj, fence = self.tracker.inside_pairs()
        got = set(zip(obj.tolist(), fence.tolist(), strict=True))
        want = {k for k, m in self.models.items() if m.state == INSIDE}
        assert got == want


TestTracker = TrackerMachine.TestCase
TestTracker.settings = settings(max_examples=120, stateful_step_count=20)


def test_tracker_since_and_remap() -> None:
    tracker = FenceTracker(samples=1)
    obj = np.zeros(3, dtype=np.int64)
    t = np.array([100, 200, 300], dtype=np.int64)
    hits = Hits(sample=np.array([1, 2]), fence=np.array([5, 5]), inside=np.array([True, True]))
    result = tracker.update(obj, t, hits)
    assert result.state.tolist() == [-1, 1, 1]
    assert result.since.tolist() == [-1, 200, 200]
    more = tracker.update(
        np.zeros(1, dtype=np.int64),
        np.array([400]),
        Hits(sample=np.array([0]), fence=np.array([5]), inside=np.array([True])),
    )
    assert more.since.tolist() == [200]  # the stay continues across calls
    moved = np.full(6, -1, dtype=np.int64)
    moved[5] = 2
    tracker.remap(moved)
    assert [x.tolist() for x in tracker.inside_pairs()] == [[0], [2]]
    tracker.remap(np.full(3, -1, dtype=np.int64))
    assert len(tracker) == 0
