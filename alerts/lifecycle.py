"""Alert records, their lifecycle, and where they are kept.

States (the issue's four):

* ``open`` -- an episode in progress (out of area, overspeeding, offline, ...).  When the
  episode ends it is closed as ``violation`` (the conduct happened; it stays on the record for
  the reports) or, for ``terminal_offline``, ``resolved`` (the terminal came back).
* ``pending_backfill`` -- ``unfiled_trip`` and ``holiday_sealing`` (article 21): the use may
  still be back-filed until ``deadline``, the end of the 3rd working day after it started.
  A covering filing filed by the deadline makes it ``resolved`` (``detail.filing`` names it);
  the deadline passing (:meth:`Lifecycle.tick`) makes it ``violation``.  A covering filing
  filed *after* the deadline leaves it ``violation`` and is recorded as ``late_filing``.

An episode has a deterministic id built from its rule, the terminal's phone, the device time it
started and a discriminator (alarm bit, fence, filing), so replaying the same positions, or
feeding them again after a restart, finds the same alert instead of opening a second one.
Every time in a record is derived from the data (device times, filing times, deadlines), never
from the clock, so a replay rebuilds the same records.

:class:`AlertStore` is the small interface the lifecycle needs; :class:`InMemoryAlertStore` is
its in-process implementation (tests, single node).  A PostgreSQL store implements the same
five methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from alerts.calendar import GMT8, posix
from alerts.model import Filing, Vehicle
from alerts.rules import BACKFILL_RULES, AlertState, Severity

__all__ = [
    "Alert",
    "AlertState",
    "AlertStore",
    "InMemoryAlertStore",
    "Lifecycle",
    "episode_id",
    "to_datetime",
]

_ACTIVE = frozenset({AlertState.OPEN, AlertState.PENDING_BACKFILL})

# A filing whose claimed filing time (what the dispatcher's system sent) is earlier than the
# platform's receipt by more than this is reported as "claimed earlier than receipt" (article
# 21: false back-filing).  Ten minutes is well above what a dispatch system's queue and clock
# drift explain, and well below the hours or days a back-dated filing gains.
CLAIM_TOLERANCE_S = 600


def claims_earlier(filing: Filing) -> bool:
    """Whether ``filing`` claims a filing time well before the platform received it."""
    return (
        filing.claimed_at is not None
        and posix(filing.filed_at) - posix(filing.claimed_at) > CLAIM_TOLERANCE_S
    )


def _with_claim(detail: dict[str, Any], filing: Filing) -> dict[str, Any]:
    if not claims_earlier(filing):
        return detail
    assert filing.claimed_at is not None
    claimed = list(detail.get("claimed_earlier", []))
    if filing.id not in claimed:
        claimed.append(filing.id)
    return {
        **detail,
        "claimed_earlier": claimed,
        "claimed_filed_at": filing.claimed_at.astimezone(GMT8).replace(microsecond=0).isoformat(),
    }


def to_datetime(seconds: int) -> datetime:
    """POSIX seconds as an aware China-time datetime."""
    return datetime.fromtimestamp(seconds, GMT8)


def episode_id(rule: str, phone: str, started: int, discriminator: str | int | None = None) -> str:
    """The deterministic id of an episode (see the module docstring)."""
    stamp = to_datetime(started).strftime("%Y%m%dT%H%M%S")
    base = f"{rule}:{phone}:{stamp}"
    return base if discriminator is None else f"{base}:{discriminator}"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """One alert record, the shape of the issue (times aware, China time)."""

    id: str
    rule: str
    state: AlertState
    phone: str
    vehicle: int
    plate: str
    unit: str
    severity: Severity
    opened_at: datetime
    updated_at: datetime
    deadline: datetime | None = None
    closed_at: datetime | None = None
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Still open or awaiting a back-filing."""
        return self.state in _ACTIVE

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "rule": self.rule,
            "state": self.state.value,
            "phone": self.phone,
            "vehicle": self.vehicle,
            "plate": self.plate,
            "unit": self.unit,
            "severity": self.severity.value,
            "opened_at": self.opened_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "deadline": _iso(self.deadline),
            "closed_at": _iso(self.closed_at),
            "detail": dict(self.detail),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alert:
        def when(key: str) -> datetime | None:
            value = data.get(key)
            return None if value is None else datetime.fromisoformat(value)

        opened, updated = when("opened_at"), when("updated_at")
        if opened is None or updated is None:
            raise ValueError("alert needs opened_at and updated_at")
        return cls(
            id=data["id"],
            rule=data["rule"],
            state=AlertState(data["state"]),
            phone=data["phone"],
            vehicle=int(data["vehicle"]),
            plate=data["plate"],
            unit=data["unit"],
            severity=Severity(data["severity"]),
            opened_at=opened,
            updated_at=updated,
            deadline=when("deadline"),
            closed_at=when("closed_at"),
            detail=dict(data.get("detail") or {}),
        )


class AlertStore(Protocol):
    """Where alerts live.  Ids are unique: ``put`` inserts or replaces."""

    def get(self, alert_id: str) -> Alert | None:
        """The alert with this id, or None."""
        ...

    def put(self, alert: Alert) -> None:
        """Insert or replace (by id)."""
        ...

    def open_alerts(self) -> list[Alert]:
        """Every alert in state ``open`` (the engine reloads its episodes from these)."""
        ...

    def due(self, now: datetime) -> list[Alert]:
        """``pending_backfill`` alerts whose deadline is before ``now``."""
        ...

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[Alert]:
        """Alerts of the back-filing rules for ``vehicle`` opened within [from, to], any state."""
        ...


class InMemoryAlertStore:
    """:class:`AlertStore` in a dict, with indexes for the lifecycle's queries.

    At most ``max_alerts`` are kept: past that, the oldest closed alerts are dropped (a
    process-local store is for tests and single nodes; the database keeps everything).
    """

    def __init__(self, *, max_alerts: int = 1_000_000) -> None:
        self.max_alerts = max_alerts
        self._alerts: dict[str, Alert] = {}
        self._open: set[str] = set()
        self._pending: set[str] = set()
        self._backfill_by_vehicle: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return len(self._alerts)

    def all(self) -> list[Alert]:
        return list(self._alerts.values())

    def get(self, alert_id: str) -> Alert | None:
        return self._alerts.get(alert_id)

    def put(self, alert: Alert) -> None:
        self._alerts[alert.id] = alert
        (self._open.add if alert.state is AlertState.OPEN else self._open.discard)(alert.id)
        pending = alert.state is AlertState.PENDING_BACKFILL
        (self._pending.add if pending else self._pending.discard)(alert.id)
        if alert.rule in BACKFILL_RULES:
            self._backfill_by_vehicle.setdefault(alert.vehicle, set()).add(alert.id)
        if len(self._alerts) > self.max_alerts:
            self._evict()

    def _evict(self) -> None:
        # Drop the oldest closed tenth in insertion order (dicts keep it).
        target = len(self._alerts) - self.max_alerts + self.max_alerts // 10
        for alert_id in [a.id for a in self._alerts.values() if not a.active][:target]:
            alert = self._alerts.pop(alert_id)
            ids = self._backfill_by_vehicle.get(alert.vehicle)
            if ids is not None:
                ids.discard(alert_id)

    def open_alerts(self) -> list[Alert]:
        return [self._alerts[i] for i in sorted(self._open)]

    def due(self, now: datetime) -> list[Alert]:
        out = []
        for alert_id in sorted(self._pending):
            alert = self._alerts[alert_id]
            if alert.deadline is not None and alert.deadline < now:
                out.append(alert)
        return out

    def backfill_alerts(
        self, vehicle: int, opened_from: datetime, opened_to: datetime
    ) -> list[Alert]:
        ids = self._backfill_by_vehicle.get(vehicle, set())
        alerts = [self._alerts[i] for i in sorted(ids)]
        return [a for a in alerts if opened_from <= a.opened_at <= opened_to]


class Lifecycle:
    """The state transitions, applied to a store; returns the records it changed.

    ``early_s``/``late_s``: how far before its start and after its end a filing still covers
    a trip (:class:`alerts.rules.RulesConfig` ``filing_early_s``/``filing_late_s``).
    """

    def __init__(self, store: AlertStore, *, early_s: int = 0, late_s: int = 0) -> None:
        self.store = store
        self.early_s = early_s
        self.late_s = late_s

    def covers(self, filing: Filing, when: int) -> bool:
        """Whether ``filing``'s window (with the slack) covers the POSIX time ``when``."""
        return posix(filing.start) - self.early_s <= when <= posix(filing.end) + self.late_s

    # -----------------------------------------------------------------------------------------
    # Episodes (open -> violation / resolved)

    def open_episode(
        self,
        *,
        alert_id: str,
        rule: str,
        vehicle: Vehicle,
        severity: Severity,
        opened_at: int,
        detail: Mapping[str, Any],
    ) -> Alert | None:
        """Open an episode; None if this episode already exists (no duplicate)."""
        if self.store.get(alert_id) is not None:
            return None
        when = to_datetime(opened_at)
        alert = Alert(
            id=alert_id,
            rule=rule,
            state=AlertState.OPEN,
            phone=vehicle.phone,
            vehicle=vehicle.id,
            plate=vehicle.plate,
            unit=vehicle.unit,
            severity=severity,
            opened_at=when,
            updated_at=when,
            detail=dict(detail),
        )
        self.store.put(alert)
        return alert

    def close_episode(
        self,
        alert_id: str,
        *,
        at: int,
        state: AlertState = AlertState.VIOLATION,
        detail: Mapping[str, Any] | None = None,
    ) -> Alert | None:
        """Close an open episode at POSIX time ``at``; None if it is not open."""
        alert = self.store.get(alert_id)
        if alert is None or alert.state is not AlertState.OPEN:
            return None
        when = max(to_datetime(at), alert.opened_at)
        closed = dataclasses.replace(
            alert,
            state=state,
            closed_at=when,
            updated_at=max(when, alert.updated_at),
            detail={**alert.detail, **(detail or {})},
        )
        self.store.put(closed)
        return closed

    # -----------------------------------------------------------------------------------------
    # Back-filing (pending_backfill -> resolved / violation)

    def open_backfill(
        self,
        *,
        alert_id: str,
        rule: str,
        vehicle: Vehicle,
        severity: Severity,
        started_at: int,
        deadline: datetime,
        detail: Mapping[str, Any],
        known_filings: Sequence[Filing] = (),
    ) -> Alert | None:
        """Open a ``pending_backfill`` alert for a use that started at ``started_at``.

        Filings already known that cover the start but were filed after it (back-filings
        the engine learned before it saw the positions, as in a replay) are applied at once,
        so the record comes out as it would have live.  None if the episode exists.
        """
        if self.store.get(alert_id) is not None:
            return None
        when = to_datetime(started_at)
        alert = Alert(
            id=alert_id,
            rule=rule,
            state=AlertState.PENDING_BACKFILL,
            phone=vehicle.phone,
            vehicle=vehicle.id,
            plate=vehicle.plate,
            unit=vehicle.unit,
            severity=severity,
            opened_at=when,
            updated_at=when,
            deadline=deadline,
            detail=dict(detail),
        )
        for filing in sorted(known_filings, key=lambda f: (f.filed_at, f.id)):
            if filing.vehicle == vehicle.id and self.covers(filing, started_at):
                alert = self._apply(alert, filing)
                if not alert.active:
                    break
        self.store.put(alert)
        return alert

    def add_filing(self, filing: Filing) -> list[Alert]:
        """Apply a new filing to the back-filing alerts it covers."""
        lo = to_datetime(posix(filing.start) - self.early_s)
        hi = to_datetime(posix(filing.end) + self.late_s)
        changed = []
        for alert in self.store.backfill_alerts(filing.vehicle, lo, hi):
            updated = self._apply(alert, filing)
            if updated != alert:
                self.store.put(updated)
                changed.append(updated)
        return changed

    def _apply(self, alert: Alert, filing: Filing) -> Alert:
        if alert.state not in (AlertState.PENDING_BACKFILL, AlertState.VIOLATION):
            return alert
        if alert.deadline is None or not self.covers(filing, posix(alert.opened_at)):
            return alert
        filed = filing.filed_at.astimezone(GMT8).replace(microsecond=0)
        if filed <= alert.deadline:
            # In time -- also when a violation was declared before the engine learned of it:
            # the record follows the data, not the order the engine saw it in.
            closed = max(filed, alert.opened_at)
            detail = {
                **alert.detail,
                "filing": filing.id,
                "filing_version": filing.version,
                "filed_at": filed.isoformat(),
                "backfilled": filed > alert.opened_at,
            }
            detail = _with_claim(detail, filing)
            if alert.state is AlertState.VIOLATION:
                detail["corrected_from"] = AlertState.VIOLATION.value
            return dataclasses.replace(
                alert,
                state=AlertState.RESOLVED,
                closed_at=closed,
                updated_at=max(closed, alert.updated_at),
                detail=detail,
            )
        late = list(alert.detail.get("late_filings", []))
        if filing.id in late:
            return alert
        late.append(filing.id)
        detail = _with_claim({**alert.detail, "late_filings": late}, filing)
        return dataclasses.replace(
            alert,
            state=AlertState.VIOLATION,
            closed_at=alert.closed_at or alert.deadline,
            updated_at=max(alert.updated_at, alert.deadline),
            detail=detail,
        )

    def tick(self, now: datetime | int, *, vehicles: Container[int] | None = None) -> list[Alert]:
        """Turn every ``pending_backfill`` alert whose deadline has passed into ``violation``
        (closed at the deadline).  ``now`` is the caller's clock; ``vehicles`` (ids), when
        given, limits this to the alerts of those vehicles (an engine judging some of them)."""
        moment = to_datetime(posix(now)) if isinstance(now, int) else now
        changed = []
        for alert in self.store.due(moment):
            deadline = alert.deadline
            if deadline is None or alert.state is not AlertState.PENDING_BACKFILL:
                continue
            if vehicles is not None and alert.vehicle not in vehicles:
                continue
            updated = dataclasses.replace(
                alert,
                state=AlertState.VIOLATION,
                closed_at=deadline,
                updated_at=max(deadline, alert.updated_at),
            )
            self.store.put(updated)
            changed.append(updated)
        return changed
