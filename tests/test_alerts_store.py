"""AlertRepository: real engine alerts round-trip, the event log, filters and NOTIFY wake-ups."""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timedelta

import psycopg
import pytest

from alerts.calendar import GMT8
from alerts.lifecycle import Alert
from alerts.rules import BACKFILL_RULES, AlertState, Severity
from storage import AlertRepository, StorageError, migrate
from storage.alerts import ALERT_KEYS
from storage.alerts import BACKFILL_RULES as STORED_BACKFILL_RULES
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401

T0 = datetime(2026, 10, 3, 9, 0, tzinfo=GMT8)


def _alert(n: int, rule: str, **changes: object) -> Alert:
    base = Alert(
        id=f"{rule}:01380000000{n}:20261003T0900{n:02d}",
        rule=rule,
        state=AlertState.OPEN,
        phone=f"01380000000{n}",
        vehicle=n,
        plate=f"云A·0000{n}",
        unit="Finance" if n % 2 else "Audit",
        severity=Severity.MEDIUM,
        opened_at=T0 + timedelta(minutes=n),
        updated_at=T0 + timedelta(minutes=n),
        detail={"fence": 7, "lon": 102.712345, "lat": 25.04, "note": "边界"},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def repo(pg_schema_dsn: str) -> AlertRepository:  # noqa: F811
    with psycopg.connect(pg_schema_dsn) as conn:
        migrate(conn, days_ahead=0)
    return AlertRepository(pg_schema_dsn)


def test_backfill_rules_agree_with_the_engine() -> None:
    assert set(STORED_BACKFILL_RULES) == set(BACKFILL_RULES)
    assert set(_alert(1, "overspeed").to_json()) == ALERT_KEYS


def test_round_trip_and_store_queries(repo: AlertRepository) -> None:
    with repo:
        assert repo.get("nope") is None
        assert repo.last_seq() == 0
        a = _alert(1, "out_of_area")
        b = _alert(
            2,
            "unfiled_trip",
            state=AlertState.PENDING_BACKFILL,
            deadline=datetime(2026, 10, 12, 23, 59, 59, tzinfo=GMT8),
        )
        c = _alert(3, "holiday_sealing", state=AlertState.PENDING_BACKFILL, deadline=T0)
        seqs = [repo.put(x.to_json()) for x in (a, b, c)]
        assert seqs == sorted(seqs)
        assert repo.last_seq() == seqs[-1]
        for x in (a, b, c):
            stored = repo.get(x.id)
            assert stored == x.to_json()
            assert Alert.from_json(stored or {}) == x
        assert [Alert.from_json(r) for r in repo.open_alerts()] == [a]
        assert [r["id"] for r in repo.due(T0 + timedelta(days=1))] == [c.id]
        assert repo.due(T0) == []
        window = (T0, T0 + timedelta(hours=1))
        assert [r["id"] for r in repo.backfill_alerts(2, *window)] == [b.id]
        assert repo.backfill_alerts(1, *window) == []  # out_of_area is not a back-filing rule
        # an update replaces the row and appends an event
        closed = dataclasses.replace(
            a, state=AlertState.VIOLATION, closed_at=T0 + timedelta(hours=2)
        )
        seq = repo.put(closed.to_json())
        assert seq > seqs[-1]
        assert repo.get(a.id) == closed.to_json()
        assert repo.open_alerts() == []
        history = [e for e in repo.events_after(0) if e[1]["id"] == a.id]
        assert [e[1]["state"] for e in history] == ["open", "violation"]


def test_events_and_listing_filters(repo: AlertRepository) -> None:
    with repo:
        alerts = [
            _alert(1, "overspeed", severity=Severity.HIGH),
            _alert(2, "overspeed"),
            _alert(3, "terminal_tamper", severity=Severity.HIGH),
            _alert(4, "out_of_area", state=AlertState.VIOLATION),
        ]
        seqs = [repo.put(a.to_json()) for a in alerts]
        events = repo.events_after(0)
        assert [s for s, _ in events] == seqs
        assert [e["id"] for _, e in repo.events_after(seqs[1])] == [a.id for a in alerts[2:]]
        assert len(repo.events_after(0, 2)) == 2
        assert [e["id"] for _, e in repo.events_after(0, unit="Finance")] == [
            alerts[0].id,
            alerts[2].id,
        ]
        high = repo.events_after(0, severity="high", rule="terminal_tamper")
        assert [e["id"] for _, e in high] == [alerts[2].id]
        assert [e["id"] for _, e in repo.events_after(0, state="violation")] == [alerts[3].id]

        assert [r["id"] for r in repo.list_alerts(T0)] == [a.id for a in alerts]
        since = T0 + timedelta(minutes=2)
        assert [r["id"] for r in repo.list_alerts(since, since + timedelta(minutes=2))] == [
            alerts[1].id,
            alerts[2].id,
        ]
        assert [r["id"] for r in repo.list_alerts(T0, rule="overspeed", unit="Audit")] == [
            alerts[1].id
        ]
        assert repo.list_alerts(T0, state="resolved") == []


def test_bad_records_are_refused(repo: AlertRepository) -> None:
    with repo:
        record = _alert(1, "overspeed").to_json()
        with pytest.raises(StorageError, match="lacks"):
            repo.put({k: v for k, v in record.items() if k != "unit"})
        with pytest.raises(StorageError, match="offset"):
            repo.put({**record, "opened_at": "2026-10-03T09:00:00"})
        with pytest.raises(StorageError, match="aware"):
            repo.due(datetime(2026, 10, 3))
        assert repo.last_seq() == 0


def test_put_wakes_a_waiter_in_another_thread(repo: AlertRepository) -> None:
    with repo:
        assert repo.wait_for_events(0, 0.05) is False
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(repo.wait_for_events(0, 10.0)))
        started = time.monotonic()
        waiter.start()
        time.sleep(0.2)
        writer = AlertRepository(repo.dsn)
        with writer:
            seq = writer.put(_alert(1, "overspeed").to_json())
        waiter.join(10.0)
        assert woke == [True]
        assert time.monotonic() - started < 5.0
        # already there: returns at once; nothing newer: times out
        assert repo.wait_for_events(seq - 1, 10.0) is True
        assert repo.wait_for_events(seq, 0.1) is False
