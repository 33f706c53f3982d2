"""The rules: their names, what each judges, and their configuration.

Every rule has a stable name (the ``rule`` of its alerts), can be switched off, carries a
severity, and has its own thresholds.  :class:`RulesConfig` gathers them with the settings they
share; :meth:`RulesConfig.from_mapping` reads the ``[rules]`` table of the configuration file
(unknown keys are an error, as everywhere in the project's config).

========================  =====================================================================
rule                      raised when (all by the device's time in the report)
========================  =====================================================================
``unfiled_trip``          a trip starts that no filing covers (article 17); opens as
                          ``pending_backfill`` with the article 21 deadline.  The way back of
                          a filed trip (not yet home) counts as covered
``holiday_sealing``       the vehicle moves in a sealed period (non-working day or local
                          sealing) without a covering filing (article 22); same lifecycle.
                          A trip that *starts* sealed raises this instead of ``unfiled_trip``
``out_of_area``           outside every permitted area of the vehicle, and not inside the
                          destination of a filing covering the time (article 9); on the way
                          to a filed destination, for at most ``transit_s`` at a stretch
``forbidden_zone``        inside a forbidden zone longer than ``dwell_s``
``overnight_parking``     parked outside designated parking for ``min_parked_s`` of the night
                          window, without a covering filing
``overdue_return``        a filing's trip is still moving or away from designated parking
                          ``grace_s`` after the filing's end (articles 17, 20)
``overspeed``             above the lowest limit of the fences it is in, or the vehicle's
                          default, for the fence's overspeed duration (else ``duration_s``)
``terminal_tamper``       the terminal's alarm bits for main power cut, GNSS antenna cut or
                          short (JT/T 808 table 24 bits 8, 5, 6; configurable) (article 18)
``terminal_offline``      no report for ``silent_s`` (``parked_silent_s`` after an ACC-off
                          report)
========================  =====================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import time
from enum import StrEnum
from typing import Any, ClassVar, Self

from protocol.messages.location import (
    ALARM_GNSS_ANTENNA_CUT,
    ALARM_GNSS_ANTENNA_SHORT,
    ALARM_POWER_CUT,
)

__all__ = [
    "RULE_NAMES",
    "AlertState",
    "ForbiddenZoneRule",
    "HolidaySealingRule",
    "OutOfAreaRule",
    "OverdueReturnRule",
    "OvernightParkingRule",
    "OverspeedRule",
    "RuleConfigError",
    "RulesConfig",
    "Severity",
    "TerminalOfflineRule",
    "TerminalTamperRule",
    "UnfiledTripRule",
]


class RuleConfigError(ValueError):
    """The rules configuration is not usable (unknown key, bad value)."""


class Severity(StrEnum):
    """How urgent an alert is; ordered low < medium < high."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        return ("low", "medium", "high").index(self.value)


class AlertState(StrEnum):
    """The lifecycle states of the issue (see :mod:`alerts.lifecycle`)."""

    OPEN = "open"
    PENDING_BACKFILL = "pending_backfill"
    RESOLVED = "resolved"
    VIOLATION = "violation"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Rule:
    NAME: ClassVar[str]
    enabled: bool = True
    severity: Severity = Severity.MEDIUM

    def _check(self) -> None:
        """Validate thresholds (subclasses extend)."""

    def __post_init__(self) -> None:
        if not isinstance(self.severity, Severity):
            raise RuleConfigError(f"{self.NAME}.severity must be a Severity")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if field.name.endswith(("_s", "_kmh", "_days")) and numeric and value < 0:
                raise RuleConfigError(f"{self.NAME}.{field.name} must not be negative")
        self._check()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class UnfiledTripRule(_Rule):
    """``backfill_working_days``: article 21's "within 3 working days"."""

    NAME: ClassVar[str] = "unfiled_trip"
    backfill_working_days: int = 3

    def _check(self) -> None:
        if self.backfill_working_days < 1:
            raise RuleConfigError("unfiled_trip.backfill_working_days must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HolidaySealingRule(_Rule):
    NAME: ClassVar[str] = "holiday_sealing"
    severity: Severity = Severity.HIGH
    backfill_working_days: int = 3

    def _check(self) -> None:
        if self.backfill_working_days < 1:
            raise RuleConfigError("holiday_sealing.backfill_working_days must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OutOfAreaRule(_Rule):
    """``samples``: clear positions in a row (beyond the margin) that confirm a crossing.

    ``transit_s``: while a filing with a destination covers the time, the vehicle may be
    outside both its permitted area and the destination for this long at a stretch -- the
    road there and back crosses areas that are neither (article 9's cross-region trips).
    """

    NAME: ClassVar[str] = "out_of_area"
    severity: Severity = Severity.HIGH
    samples: int = 3
    transit_s: int = 2 * 3600

    def _check(self) -> None:
        if self.samples < 1:
            raise RuleConfigError("out_of_area.samples must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ForbiddenZoneRule(_Rule):
    NAME: ClassVar[str] = "forbidden_zone"
    severity: Severity = Severity.HIGH
    dwell_s: int = 300
    samples: int = 2

    def _check(self) -> None:
        if self.samples < 1:
            raise RuleConfigError("forbidden_zone.samples must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OvernightParkingRule(_Rule):
    """Night window in China time (crossing midnight when ``window_end <= window_start``)."""

    NAME: ClassVar[str] = "overnight_parking"
    window_start: time = time(22, 0)
    window_end: time = time(6, 0)
    min_parked_s: int = 3 * 3600


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OverdueReturnRule(_Rule):
    NAME: ClassVar[str] = "overdue_return"
    grace_s: int = 3600


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OverspeedRule(_Rule):
    """``default_limit_kmh`` applies where neither a fence nor the vehicle sets a limit
    (120 km/h: the expressway limit, Road Traffic Safety Law art. 67).  ``duration_s`` is the
    default overspeed duration (JT/T 808 parameter 0x0056's role).  Fence night limits apply
    between ``night_start`` and ``night_end`` (parameter 0x0032's role)."""

    NAME: ClassVar[str] = "overspeed"
    default_limit_kmh: float = 120.0
    duration_s: int = 10
    tolerance_kmh: float = 0.0
    night_start: time = time(22, 0)
    night_end: time = time(6, 0)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalTamperRule(_Rule):
    NAME: ClassVar[str] = "terminal_tamper"
    severity: Severity = Severity.HIGH
    alarm_mask: int = ALARM_POWER_CUT | ALARM_GNSS_ANTENNA_CUT | ALARM_GNSS_ANTENNA_SHORT

    def _check(self) -> None:
        if not 0 < self.alarm_mask < 1 << 32:
            raise RuleConfigError("terminal_tamper.alarm_mask must select some of 32 bits")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminalOfflineRule(_Rule):
    """``silent_s`` after a report with ACC on (terminals report every 10-60 s while driving),
    ``parked_silent_s`` after one with ACC off (sleeping terminals report hourly or less)."""

    NAME: ClassVar[str] = "terminal_offline"
    severity: Severity = Severity.LOW
    silent_s: int = 900
    parked_silent_s: int = 6 * 3600


_RULE_TYPES: tuple[type[_Rule], ...] = (
    UnfiledTripRule,
    HolidaySealingRule,
    OutOfAreaRule,
    ForbiddenZoneRule,
    OvernightParkingRule,
    OverdueReturnRule,
    OverspeedRule,
    TerminalTamperRule,
    TerminalOfflineRule,
)
RULE_NAMES: tuple[str, ...] = tuple(t.NAME for t in _RULE_TYPES)

# Rules whose alerts follow the back-filing lifecycle (article 21).
BACKFILL_RULES = frozenset({UnfiledTripRule.NAME, HolidaySealingRule.NAME})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RulesConfig:
    """All rules plus shared settings.

    ``filing_early_s``: a filing covers a trip that starts up to this long before the filed
    start (drivers leave a little early); ``filing_late_s``: and up to this long after the
    filed end.  ``margin_m``: the geofence hysteresis band (see :mod:`geofence.hysteresis`).
    """

    unfiled_trip: UnfiledTripRule = UnfiledTripRule()
    holiday_sealing: HolidaySealingRule = HolidaySealingRule()
    out_of_area: OutOfAreaRule = OutOfAreaRule()
    forbidden_zone: ForbiddenZoneRule = ForbiddenZoneRule()
    overnight_parking: OvernightParkingRule = OvernightParkingRule()
    overdue_return: OverdueReturnRule = OverdueReturnRule()
    overspeed: OverspeedRule = OverspeedRule()
    terminal_tamper: TerminalTamperRule = TerminalTamperRule()
    terminal_offline: TerminalOfflineRule = TerminalOfflineRule()
    filing_early_s: int = 1800
    filing_late_s: int = 0
    margin_m: float = 20.0

    def __post_init__(self) -> None:
        if self.filing_early_s < 0 or self.filing_late_s < 0 or self.margin_m < 0:
            raise RuleConfigError("filing_early_s, filing_late_s and margin_m must be >= 0")

    def rule(self, name: str) -> _Rule:
        if name not in RULE_NAMES:
            raise RuleConfigError(f"unknown rule {name!r}")
        rule: _Rule = getattr(self, name)
        return rule

    def enabled(self, name: str) -> bool:
        return self.rule(name).enabled

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Self:
        """From a parsed config table: a sub-table per rule name plus the shared keys.

        Times of day are "HH:MM" strings, severities their names; unknown keys are errors.
        """
        values: dict[str, Any] = {}
        shared = {"filing_early_s", "filing_late_s", "margin_m"}
        for key, value in data.items():
            if key in shared:
                values[key] = value
                continue
            rule_type = next((t for t in _RULE_TYPES if key == t.NAME), None)
            if rule_type is None:
                raise RuleConfigError(f"unknown rules key {key!r}")
            if not isinstance(value, Mapping):
                raise RuleConfigError(f"rules.{key} must be a table")
            values[key] = _rule_from_mapping(rule_type, value)
        try:
            return cls(**values)
        except TypeError as exc:
            raise RuleConfigError(str(exc)) from exc


def _rule_from_mapping(rule_type: type[_Rule], data: Mapping[str, Any]) -> _Rule:
    fields = {f.name: f for f in dataclasses.fields(rule_type)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise RuleConfigError(f"unknown key {rule_type.NAME}.{key}")
        default = getattr(rule_type(), key)
        try:
            if isinstance(default, Severity):
                values[key] = Severity(value)
            elif isinstance(default, time):
                values[key] = time.fromisoformat(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise RuleConfigError(f"{rule_type.NAME}.{key} must be true or false")
                values[key] = value
            elif isinstance(default, int) and not isinstance(value, int):
                raise RuleConfigError(f"{rule_type.NAME}.{key} must be an integer")
            else:
                values[key] = value
        except (ValueError, TypeError) as exc:
            if isinstance(exc, RuleConfigError):
                raise
            raise RuleConfigError(f"{rule_type.NAME}.{key}: {exc}") from exc
    return rule_type(**values)
