"""The alert lifecycle against a model: no duplicate episodes, no resolution without a
covering filing filed by the deadline, violations exactly when the deadline has passed."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from alerts import AlertState, Filing, InMemoryAlertStore, Lifecycle, Severity, Vehicle
from alerts.calendar import GMT8, WorkingCalendar, posix
from alerts.lifecycle import Alert, episode_id

CALENDAR = WorkingCalendar(years=[2026])
VEHICLES = [
    Vehicle(id=1, phone="013800000001", plate="云A1", unit="gov"),
    Vehicle(id=2, phone="013800000002", plate="云A2", unit="gov"),
]
BASE = datetime(2026, 9, 14, 0, 0, tzinfo=GMT8)  # a Monday; the range runs into National Day
HOUR = timedelta(hours=1)
EARLY = timedelta(minutes=30)


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = InMemoryAlertStore()
        self.lifecycle = Lifecycle(self.store, early_s=int(EARLY.total_seconds()))
        self.episodes: dict[
            str, tuple[int, datetime, datetime]
        ] = {}  # id -> vehicle, start, deadline
        self.filings: list[Filing] = []
        self.now = BASE
        self.ticked: dict[str, datetime] = {}  # id -> latest tick since it was opened

    # -- actions ------------------------------------------------------------------------------

    @rule(
        vehicle=st.integers(0, 1),
        hour=st.integers(0, 24 * 20),
        rule_name=st.sampled_from(["unfiled_trip", "holiday_sealing"]),
    )
    def trip(self, vehicle: int, hour: int, rule_name: str) -> None:
        start = BASE + hour * HOUR
        v = VEHICLES[vehicle]
        alert_id = episode_id(rule_name, v.phone, posix(start))
        deadline = CALENDAR.backfill_deadline(start)
        alert = self.lifecycle.open_backfill(
            alert_id=alert_id,
            rule=rule_name,
            vehicle=v,
            severity=Severity.MEDIUM,
            started_at=posix(start),
            deadline=deadline,
            detail={},
            known_filings=[f for f in self.filings if f.vehicle == v.id],
        )
        if alert_id in self.episodes:
            assert alert is None  # the same episode again: nothing new
        else:
            assert alert is not None
            self.episodes[alert_id] = (v.id, start, deadline)

    @rule(
        vehicle=st.integers(0, 1),
        hour=st.integers(0, 24 * 20),
        length=st.integers(1, 12),
        filed_after=st.integers(-48, 24 * 10),
    )
    def file(self, vehicle: int, hour: int, length: int, filed_after: int) -> None:
        start = BASE + hour * HOUR
        filing = Filing(
            id=len(self.filings) + 1,
            vehicle=VEHICLES[vehicle].id,
            start=start,
            end=start + length * HOUR,
            filed_at=start + filed_after * HOUR,
        )
        self.filings.append(filing)
        changed = self.lifecycle.add_filing(filing)
        for alert in changed:
            assert alert.id in self.episodes

    @rule(hours=st.integers(1, 24 * 4))
    def tick(self, hours: int) -> None:
        self.now += hours * HOUR
        for alert_id in self.episodes:
            self.ticked[alert_id] = self.now
        for alert in self.lifecycle.tick(self.now):
            assert alert.state is AlertState.VIOLATION
            assert alert.deadline is not None
            assert alert.deadline < self.now

    @precondition(lambda self: bool(self.episodes))
    @rule(data=st.data())
    def episode_rule_is_idempotent(self, data: st.DataObject) -> None:
        alert_id = data.draw(st.sampled_from(sorted(self.episodes)))
        before = self.store.get(alert_id)
        vehicle, start, deadline = self.episodes[alert_id]
        again = self.lifecycle.open_backfill(
            alert_id=alert_id,
            rule=alert_id.split(":")[0],
            vehicle=VEHICLES[vehicle - 1],
            severity=Severity.MEDIUM,
            started_at=posix(start),
            deadline=deadline,
            detail={},
        )
        assert again is None
        assert self.store.get(alert_id) == before

    # -- the model ----------------------------------------------------------------------------

    def covering(self, vehicle: int, start: datetime) -> list[Filing]:
        return [
            f for f in self.filings if f.vehicle == vehicle and f.start - EARLY <= start <= f.end
        ]

    @invariant()
    def one_record_per_episode(self) -> None:
        assert len(self.store) == len(self.episodes)
        assert {a.id for a in self.store.all()} == set(self.episodes)

    @invariant()
    def states_follow_the_model(self) -> None:
        for alert_id, (vehicle, start, deadline) in self.episodes.items():
            alert = self.store.get(alert_id)
            assert isinstance(alert, Alert)
            covering = self.covering(vehicle, start)
            in_time = [f for f in covering if f.filed_at.replace(microsecond=0) <= deadline]
            late = [f for f in covering if f.filed_at.replace(microsecond=0) > deadline]
            if in_time:
                assert alert.state is AlertState.RESOLVED
                filing = next(f for f in self.filings if f.id == alert.detail["filing"])
                assert filing in in_time  # resolved only by a covering, in-time filing
                assert alert.closed_at == max(filing.filed_at, alert.opened_at)
            elif late or self.ticked.get(alert_id, BASE) > deadline:
                assert alert.state is AlertState.VIOLATION
                assert alert.closed_at == deadline
            else:
                assert alert.state is AlertState.PENDING_BACKFILL
                assert alert.closed_at is None
            assert alert.opened_at == start
            assert alert.deadline == deadline

    @invariant()
    def times_are_ordered(self) -> None:
        for alert in self.store.all():
            assert alert.opened_at <= alert.updated_at
            if alert.closed_at is not None:
                assert alert.opened_at <= alert.closed_at <= alert.updated_at


TestLifecycle = LifecycleMachine.TestCase
TestLifecycle.settings = settings(max_examples=200, stateful_step_count=40)


def _vehicle() -> Vehicle:
    return VEHICLES[0]


def test_episodes_open_and_close_once() -> None:
    store = InMemoryAlertStore()
    lifecycle = Lifecycle(store)
    start = posix(BASE)
    opened = lifecycle.open_episode(
        alert_id="out_of_area:1:x",
        rule="out_of_area",
        vehicle=_vehicle(),
        severity=Severity.HIGH,
        opened_at=start,
        detail={"lon": 1.0},
    )
    assert opened is not None
    assert opened.state is AlertState.OPEN
    assert store.open_alerts() == [opened]
    assert (
        lifecycle.open_episode(
            alert_id="out_of_area:1:x",
            rule="out_of_area",
            vehicle=_vehicle(),
            severity=Severity.HIGH,
            opened_at=start + 60,
            detail={},
        )
        is None
    )
    closed = lifecycle.close_episode("out_of_area:1:x", at=start + 600, detail={"back": True})
    assert closed is not None
    assert closed.state is AlertState.VIOLATION
    assert closed.closed_at == BASE + timedelta(seconds=600)
    assert closed.detail == {"lon": 1.0, "back": True}
    assert lifecycle.close_episode("out_of_area:1:x", at=start + 900) is None
    assert store.open_alerts() == []


def test_store_cap_drops_oldest_closed() -> None:
    store = InMemoryAlertStore(max_alerts=10)
    lifecycle = Lifecycle(store)
    for i in range(15):
        alert_id = f"overspeed:1:{i}"
        lifecycle.open_episode(
            alert_id=alert_id,
            rule="overspeed",
            vehicle=_vehicle(),
            severity=Severity.LOW,
            opened_at=posix(BASE) + i,
            detail={},
        )
        if i < 12:
            lifecycle.close_episode(alert_id, at=posix(BASE) + i + 1)
    assert len(store) <= 10
    assert {a.id for a in store.open_alerts()} == {f"overspeed:1:{i}" for i in (12, 13, 14)}


def test_json_round_trip() -> None:
    alert = Alert(
        id="x",
        rule="unfiled_trip",
        state=AlertState.PENDING_BACKFILL,
        phone="1",
        vehicle=1,
        plate="云A1",
        unit="gov",
        severity=Severity.MEDIUM,
        opened_at=BASE,
        updated_at=BASE,
        deadline=BASE + timedelta(days=3),
        detail={"trip": 1},
    )
    record = alert.to_json()
    assert record["deadline"] == "2026-09-17T00:00:00+08:00"
    assert record["closed_at"] is None
    assert Alert.from_json(record) == alert
    with pytest.raises(ValueError, match="opened_at"):
        Alert.from_json({**record, "opened_at": None})
