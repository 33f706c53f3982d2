"""Rules configuration: names, defaults, reading a config table."""

from __future__ import annotations

from datetime import time

import pytest

from alerts.rules import RULE_NAMES, RuleConfigError, RulesConfig, Severity
from protocol.messages.location import ALARM_GNSS_FAULT, ALARM_POWER_CUT


def test_every_rule_of_the_issue_is_named_and_on_by_default() -> None:
    assert RULE_NAMES == (
        "unfiled_trip",
        "holiday_sealing",
        "out_of_area",
        "forbidden_zone",
        "overnight_parking",
        "overdue_return",
        "overspeed",
        "terminal_tamper",
        "terminal_offline",
    )
    config = RulesConfig()
    assert all(config.enabled(name) for name in RULE_NAMES)
    assert config.terminal_tamper.alarm_mask & ALARM_POWER_CUT
    assert config.unfiled_trip.backfill_working_days == 3


def test_from_mapping() -> None:
    config = RulesConfig.from_mapping(
        {
            "filing_early_s": 600,
            "margin_m": 30.0,
            "overnight_parking": {
                "window_start": "23:00",
                "window_end": "05:30",
                "min_parked_s": 7200,
            },
            "overspeed": {"default_limit_kmh": 100.0, "severity": "high"},
            "terminal_tamper": {"alarm_mask": ALARM_POWER_CUT | ALARM_GNSS_FAULT},
            "terminal_offline": {"enabled": False},
        }
    )
    assert config.filing_early_s == 600
    assert config.margin_m == 30.0
    assert config.overnight_parking.window_start == time(23, 0)
    assert config.overnight_parking.window_end == time(5, 30)
    assert config.overspeed.severity is Severity.HIGH
    assert config.overspeed.default_limit_kmh == 100.0
    assert not config.enabled("terminal_offline")
    assert config.rule("out_of_area").severity is Severity.HIGH


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"speeding": {}}, "unknown rules key"),
        ({"overspeed": {"limit": 3}}, "unknown key overspeed.limit"),
        ({"overspeed": {"severity": "extreme"}}, "overspeed.severity"),
        ({"overspeed": {"enabled": "yes"}}, "true or false"),
        ({"overspeed": {"duration_s": 1.5}}, "integer"),
        ({"overspeed": {"duration_s": -1}}, "negative"),
        ({"overnight_parking": {"window_start": "late"}}, "window_start"),
        ({"out_of_area": {"samples": 0}}, "at least 1"),
        ({"terminal_tamper": {"alarm_mask": 0}}, "alarm_mask"),
        ({"overspeed": 3}, "must be a table"),
        ({"margin_m": -1}, ">= 0"),
    ],
)
def test_bad_config_is_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(RuleConfigError, match=message):
        RulesConfig.from_mapping(table)


def test_severity_order() -> None:
    assert [s.rank for s in (Severity.LOW, Severity.MEDIUM, Severity.HIGH)] == [0, 1, 2]
    with pytest.raises(RuleConfigError, match="unknown rule"):
        RulesConfig().rule("speeding")
