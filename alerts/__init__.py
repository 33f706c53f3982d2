"""The rule engine: trips, the working-day calendar, rules and the alert lifecycle.

Pure: positions, filings and the clock come in as data (``now`` is always a parameter); alert
records and trips go out.  Persistence is behind :class:`AlertStore`.  May import ``protocol``
and ``geofence`` only.
"""

from __future__ import annotations

from alerts.calendar import SealingPeriod, WorkingCalendar
from alerts.engine import EngineResult, RuleEngine, TripRecord
from alerts.lifecycle import Alert, AlertStore, InMemoryAlertStore, Lifecycle, episode_id
from alerts.model import Filing, PositionBatch, Registry, Vehicle
from alerts.rules import RULE_NAMES, AlertState, RuleConfigError, RulesConfig, Severity
from alerts.trips import Trip, TripConfig, TripDetector

__all__ = [
    "RULE_NAMES",
    "Alert",
    "AlertState",
    "AlertStore",
    "EngineResult",
    "Filing",
    "InMemoryAlertStore",
    "Lifecycle",
    "PositionBatch",
    "Registry",
    "RuleConfigError",
    "RuleEngine",
    "RulesConfig",
    "SealingPeriod",
    "Severity",
    "Trip",
    "TripConfig",
    "TripDetector",
    "TripRecord",
    "Vehicle",
    "WorkingCalendar",
    "episode_id",
]
