"""Scenario files: parsing into frozen dataclasses, typed errors, and the fleet they make."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from pathlib import Path

import pytest

import tools.scenario
from protocol.fields import GMT8
from protocol.header import Edition
from protocol.messages.location import ALARM_EMERGENCY, ALARM_POWER_CUT
from tools.scenario import (
    AlarmEvent,
    MissingKeyError,
    ScenarioError,
    ScenarioSyntaxError,
    ScenarioValueError,
    UnknownKeyError,
    Waypoint,
    alarm_mask,
    load_scenario,
    parse_scenario,
)
from tools.simulate import SimConfig, scenario_config, scenario_fleet

MINIMAL = """
[fleet]
start = 2024-05-01T08:00:00+08:00

[[vehicle]]
phone = "13800000001"
plate = "云A12345"
waypoints = [[102.71, 25.04]]
"""


def docstring_example() -> str:
    doc = tools.scenario.__doc__
    assert doc is not None
    block = doc.split("Example::", 1)[1].split("Semantics:", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines())


def test_the_documented_example_parses() -> None:
    scenario = parse_scenario(docstring_example(), source="example.toml")
    fleet = scenario.fleet
    assert fleet.start == datetime(2024, 5, 1, 7, 59, tzinfo=GMT8)
    assert (fleet.time_scale, fleet.interval_s, fleet.heartbeat_s) == (10.0, 10.0, 60.0)
    assert fleet.duration_s is None
    (vehicle,) = scenario.vehicles
    assert vehicle.phone == "13800000001"
    assert vehicle.plate == "云A12345"
    assert vehicle.edition is Edition.V2019
    assert vehicle.start == datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
    assert (vehicle.speed_kmh, vehicle.mileage_km, vehicle.plate_color) == (40.0, 12000.0, 1)
    assert vehicle.waypoints == (
        Waypoint(lon=102.71, lat=25.04),
        Waypoint(lon=102.72, lat=25.04, speed_kmh=95.0),
        Waypoint(lon=102.72, lat=25.05, dwell_s=60.0),
        Waypoint(lon=102.73, lat=25.05, park_s=600.0),
    )
    assert vehicle.alarms == (
        AlarmEvent(
            bits=ALARM_POWER_CUT, at=datetime(2024, 5, 1, 8, 5, tzinfo=GMT8), duration_s=120.0
        ),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        vehicle.phone = "1"  # type: ignore[misc]


def test_defaults_and_local_times_in_gmt8() -> None:
    text = MINIMAL.replace("2024-05-01T08:00:00+08:00", "2024-05-01T08:00:00")
    scenario = parse_scenario(text)
    assert scenario.fleet.start == datetime(2024, 5, 1, 8, 0, tzinfo=GMT8)
    vehicle = scenario.vehicles[0]
    assert vehicle.edition is Edition.V2013
    assert vehicle.start is None
    assert vehicle.interval_s is None
    assert vehicle.alarms == ()
    assert vehicle.altitude_m == 1890


def test_alarm_masks() -> None:
    assert alarm_mask("power_cut") == ALARM_POWER_CUT
    assert alarm_mask(["emergency", 8]) == ALARM_EMERGENCY | ALARM_POWER_CUT
    assert alarm_mask(["31"]) == 1 << 31
    for bad in ([], ["nope"], [32], [True], [1.5]):
        with pytest.raises(ValueError, match="alarm"):
            alarm_mask(bad)


@pytest.mark.parametrize(
    ("edit", "error", "where"),
    [
        (("[fleet]", "[fleet]\nspeed = 1"), UnknownKeyError, "fleet.speed"),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\ncolour = 1'),
            UnknownKeyError,
            "vehicle[0].colour",
        ),
        (
            ("[[102.71, 25.04]]", "[{lon = 102.71, lat = 25.04, speeed_kmh = 3}]"),
            UnknownKeyError,
            "vehicle[0].waypoints[0].speeed_kmh",
        ),
        (("[fleet]", "[extra]\n[fleet]"), UnknownKeyError, "extra"),
        (('phone = "13800000001"\n', ""), MissingKeyError, "vehicle[0].phone"),
        (("start = 2024-05-01T08:00:00+08:00\n", ""), MissingKeyError, "fleet.start"),
        (("[[102.71, 25.04]]", "[{lon = 102.71}]"), MissingKeyError, "vehicle[0].waypoints[0].lat"),
        (
            ("start = 2024-05-01T08:00:00+08:00", "start = 2024-05-01"),
            ScenarioValueError,
            "fleet.start",
        ),
        (("start = 2024-05-01T08:00:00+08:00", 'start = "8am"'), ScenarioValueError, "fleet.start"),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\nedition = 2011'),
            ScenarioValueError,
            "vehicle[0].edition",
        ),
        (
            ('phone = "13800000001"', 'phone = "1380000000100"'),
            ScenarioValueError,
            "vehicle[0].phone",
        ),
        (
            ('phone = "13800000001"', 'phone = "1380000000x"'),
            ScenarioValueError,
            "vehicle[0].phone",
        ),
        (('phone = "13800000001"', "phone = 13800000001"), ScenarioValueError, "vehicle[0].phone"),
        (
            ("[[102.71, 25.04]]", "[[200.0, 25.04]]"),
            ScenarioValueError,
            "vehicle[0].waypoints[0].lon",
        ),
        (("[[102.71, 25.04]]", "[[102.71]]"), ScenarioValueError, "vehicle[0].waypoints[0]"),
        (("[[102.71, 25.04]]", "[]"), ScenarioValueError, "vehicle[0].waypoints"),
        (
            ("[[102.71, 25.04]]", '[["a", 25.04]]'),
            ScenarioValueError,
            "vehicle[0].waypoints[0].lon",
        ),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\nspeed_kmh = 0'),
            ScenarioValueError,
            "vehicle[0].speed_kmh",
        ),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\nspeed_kmh = 500'),
            ScenarioValueError,
            "vehicle[0].speed_kmh",
        ),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\nplate_color = 7'),
            ScenarioValueError,
            "vehicle[0].plate_color",
        ),
        (
            ('plate = "云A12345"', 'plate = "云A12345"\naltitude_m = -5'),
            ScenarioValueError,
            "vehicle[0].altitude_m",
        ),
        (("[fleet]", "[fleet]\ntime_scale = 0"), ScenarioValueError, "fleet.time_scale"),
        (("[fleet]", "[fleet]\ninterval_s = true"), ScenarioValueError, "fleet.interval_s"),
        (("[fleet]", "[fleet]\nduration_s = nan"), ScenarioValueError, "fleet.duration_s"),
    ],
)
def test_typed_errors_name_the_key(
    edit: tuple[str, str], error: type[ScenarioError], where: str
) -> None:
    old, new = edit
    assert old in MINIMAL
    with pytest.raises(error) as caught:
        parse_scenario(MINIMAL.replace(old, new, 1), source="fleet.toml")
    assert caught.value.where == where
    assert str(caught.value).startswith(f"fleet.toml: {where}: ")


ALARM = """
[[vehicle.alarm]]
bits = {bits}
at = {at}
"""


@pytest.mark.parametrize(
    ("bits", "at", "where"),
    [
        ('["nope"]', "2024-05-01T08:00:00+08:00", "vehicle[0].alarm[0].bits"),
        ("[40]", "2024-05-01T08:00:00+08:00", "vehicle[0].alarm[0].bits"),
        ('["power_cut"]', '"soon"', "vehicle[0].alarm[0].at"),
    ],
)
def test_alarm_errors(bits: str, at: str, where: str) -> None:
    with pytest.raises(ScenarioValueError) as caught:
        parse_scenario(MINIMAL + ALARM.format(bits=bits, at=at))
    assert caught.value.where == where


def test_alarm_tables_reject_unknown_keys() -> None:
    text = MINIMAL + ALARM.format(bits='["power_cut"]', at="2024-05-01T08:00:00+08:00")
    with pytest.raises(UnknownKeyError) as caught:
        parse_scenario(text + "until = 2024-05-01T09:00:00+08:00\n")
    assert caught.value.where == "vehicle[0].alarm[0].until"
    assert "duration_s" in caught.value.allowed


def test_fleet_level_errors() -> None:
    with pytest.raises(ScenarioSyntaxError):
        parse_scenario("[fleet\n", source="broken.toml")
    with pytest.raises(MissingKeyError, match="vehicle"):
        parse_scenario("[fleet]\nstart = 2024-05-01T08:00:00+08:00\n")
    twice = MINIMAL + MINIMAL.split("[[vehicle]]", 1)[1].join(["[[vehicle]]", ""])
    with pytest.raises(ScenarioValueError, match="also vehicle\\[0\\]"):
        parse_scenario(twice)
    padded = twice.replace('"13800000001"', '"013800000001"', 1)
    with pytest.raises(ScenarioValueError):  # the same terminal, written with a leading zero
        parse_scenario(padded)


def test_load_scenario_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_scenario(path).source == str(path)
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(path)


def test_a_scenario_becomes_a_fleet_and_a_run() -> None:
    scenario = parse_scenario(docstring_example())
    (spec,) = scenario_fleet(scenario)
    assert spec.phone == "13800000001"
    assert spec.edition is Edition.V2019
    assert spec.motion_offset_s == 60.0  # starts a minute after the fleet
    assert spec.interval_s == 10.0
    assert spec.mileage0_m == 12_000_000.0
    (alarm,) = spec.alarms
    assert (alarm.bits, alarm.start_s, alarm.end_s) == (ALARM_POWER_CUT, 360.0, 480.0)
    config = scenario_config(scenario, SimConfig(), duration_s=None)
    assert config.start_time == scenario.fleet.start
    assert config.time_scale == 10.0
    assert config.terminals == 1
    assert config.heartbeat_s == 6.0  # 60 device seconds at ten times real time
    # Until the route and its stops are done, plus two intervals, in real seconds.
    device_s = 60.0 + spec.timeline.period_s + 20.0
    assert config.duration_s == pytest.approx(device_s / 10.0)
    assert scenario_config(scenario, SimConfig(), duration_s=5.0).duration_s == 5.0
    fixed = dataclasses.replace(
        scenario, fleet=dataclasses.replace(scenario.fleet, duration_s=1200.0)
    )
    assert scenario_config(fixed, SimConfig(), duration_s=None).duration_s == 120.0


def test_an_open_ended_alarm_lasts_to_the_end() -> None:
    text = MINIMAL + ALARM.format(bits="[0]", at="2024-05-01T08:10:00+08:00")
    (spec,) = scenario_fleet(parse_scenario(text))
    assert spec.alarms[0].start_s == 600.0
    assert spec.alarms[0].end_s == math.inf
    config = scenario_config(parse_scenario(text), SimConfig(), duration_s=None)
    assert config.duration_s == 600.0  # the alarm's start is the last scripted event
