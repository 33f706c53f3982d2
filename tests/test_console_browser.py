"""The operator console in a real browser: Debian's chromium, driven by Playwright, against the
whole ``serve`` wiring (rules on) and PostgreSQL.

Terminals of our own codec report every second.  A rules file seals the hours around now (a
local sealing period), so the one drive of the test raises ``holiday_sealing`` as a pending
back-filing.  A dispatcher logs in through the login form, sees the vehicles move on the map,
opens the alert list, receives the alert live when the vehicle sets off, opens it, files the
trip from it and sees it resolve; a viewer then sees neither the filing form nor the notes
form.  Screenshots of the main screens are kept (``JT808_ARTEFACTS_DIR``, else the test's
temporary directory).

Playwright's own browser download cannot work here: the test launches the system chromium.
Without it (or without Playwright) the test skips, except with ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from protocol.fields import GMT8
from protocol.messages.location import LocationReport
from storage.alerts import AlertRepository
from tests.operator_auth import TEST_TOKEN, TEST_USER, store_token
from tests.serving import http, serving
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.terminal_client import Terminal

pytestmark = pytest.mark.db

CHROMIUM = os.environ.get("JT808_CHROMIUM", "/usr/bin/chromium")
DISPATCHER_TOKEN = "jt808_console-dispatcher-token-for-the-browser-test"
VIEWER_TOKEN = "jt808_console-viewer-token-for-the-browser-test"
UNIT = "昆明市财政局"
# The driving vehicle, an exempt one circling (moving, raising nothing), one parked.
DRIVER: dict[str, Any] = {"plate": "云A·10001", "phone": "13800000101", "lat": 25.04, "lon": 102.7}
CIRCLER: dict[str, Any] = {
    "plate": "云A·10002",
    "phone": "13800000102",
    "lat": 25.06,
    "lon": 102.74,
}
PARKED: dict[str, Any] = {"plate": "云A·10003", "phone": "13800000103", "lat": 25.02, "lon": 102.76}
# Vehicles without terminals, of other units, for the report's seeded violations.
REPORT_UNITS = ("云南省审计厅", "昆明市公安局", "昆明市教育局")
STATUS_ACC_FIXED = 0b11
STATUS_FIXED = 0b10
TEST_TIMEOUT_S = 120
# What the page exposes for tests (window.jt808Console: the live map, its layer and stats).
JS_IDS = """() => Object.fromEntries(
    window.jt808Console.liveLayer.records().map(r => [r.plate, r.vehicle_id]))"""
JS_RECORD = """id => {
    const r = window.jt808Console.liveLayer.record(id);
    return r && [r.lat, r.lon];
}"""
JS_MOVED = """([id, was]) => {
    const r = window.jt808Console.liveLayer.record(id);
    return r && (r.lat !== was[0] || r.lon !== was[1]);
}"""
JS_SCREEN_POINT = """id => {
    const m = window.jt808Console.liveMap, r = window.jt808Console.liveLayer.record(id);
    const p = m.latLngToContainerPoint([r.lat, r.lon]);
    const b = m.getContainer().getBoundingClientRect();
    return [b.left + p.x, b.top + p.y];
}"""
JS_STATE = """id => {
    const layer = window.jt808Console.liveLayer;
    return ((layer && layer.record(id)) || {}).state;
}"""
WAIT_MS = 30_000  # the browser's longest wait for one thing


@pytest.fixture
def chromium() -> str:
    """The system chromium (a sync fixture, so a skip keeps its reason)."""
    problem = None
    try:
        import playwright.sync_api  # noqa: F401, PLC0415
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    if problem is None and shutil.which(CHROMIUM) is None and not Path(CHROMIUM).exists():
        problem = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser needed in CI: {problem}", pytrace=False)
        pytest.skip(problem)
    return CHROMIUM


def _china(moment: datetime) -> str:
    return moment.astimezone(GMT8).replace(microsecond=0, tzinfo=None).isoformat()


def _report(lat: float, lon: float, *, speed_kmh: float, acc: bool) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=STATUS_ACC_FIXED if acc else STATUS_FIXED,
        latitude=round(lat * 1e6),
        longitude=round(lon * 1e6),
        altitude_m=1890,
        speed=round(speed_kmh * 10),
        direction=90,
        time=datetime.now(GMT8).replace(microsecond=0),
    )


async def _terminal(port: int, vehicle: dict[str, Any], mode: str, go: trio.Event) -> None:
    """Report once a second until cancelled: ``park``, ``circle``, or ``drive`` (parked until
    ``go``, then east at about 60 m a report)."""
    terminal = await Terminal.connect(port, vehicle["phone"])
    try:
        await terminal.login()
        lat, lon = vehicle["lat"], vehicle["lon"]
        step = 0
        while True:
            step += 1
            if mode == "circle":
                lat = vehicle["lat"] + 0.004 * (step % 40 - 20) / 20
                lon = vehicle["lon"] + 0.006 * ((step // 40) % 2)
                message = _report(lat, lon, speed_kmh=45, acc=True)
            elif mode == "drive" and go.is_set():
                lon += 0.0006
                message = _report(lat, lon, speed_kmh=60, acc=True)
            else:
                message = _report(lat, lon, speed_kmh=0, acc=False)
            await terminal.send(message)
            await terminal.receive()  # the ack: stored
            await trio.sleep(1.0)
    finally:
        await terminal.close()


def _seed_violations(dsn: str, vehicles: dict[str, tuple[str, int]], now: datetime) -> None:
    """Violations of this month for the report (the live part of the test raises none);
    ``vehicles``: unit -> (plate, id)."""
    opened = max(now - timedelta(hours=6), now.replace(day=1, hour=0, minute=0, second=0))
    counts = {
        (REPORT_UNITS[0], "unfiled_trip"): 4,
        (REPORT_UNITS[0], "overspeed"): 2,
        (REPORT_UNITS[1], "holiday_sealing"): 3,
        (REPORT_UNITS[1], "out_of_area"): 1,
        (REPORT_UNITS[2], "unfiled_trip"): 1,
        (UNIT, "overnight_parking"): 2,
    }
    n = 0
    with AlertRepository(dsn) as repository:
        for (unit, rule), count in counts.items():
            plate, vehicle = vehicles[unit]
            for _ in range(count):
                n += 1
                at = (opened + timedelta(minutes=n)).isoformat()
                repository.put(
                    {
                        "id": f"seed-{n}",
                        "rule": rule,
                        "state": "violation",
                        "phone": "013800000999",
                        "vehicle": vehicle,
                        "plate": plate,
                        "unit": unit,
                        "severity": "medium",
                        "opened_at": at,
                        "updated_at": at,
                        "deadline": at,
                        "closed_at": at,
                        "detail": {},
                    }
                )


def _browse(chromium: str, base: str, shots: Path, go: trio.Event) -> dict[str, Any]:
    """The browser's part, in a worker thread (Playwright's sync API)."""
    from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415

    seen: dict[str, Any] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 860}, locale="zh-CN")
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(f"{exc}\n{exc.stack}"))

            # -- log in as the dispatcher through the form
            page.goto(base + "/")
            expect(page.locator("#login-form")).to_be_visible()
            page.fill("#login-token", "not-a-token")
            page.click("#login-form button[type=submit]")
            expect(page.locator("#login-error")).to_be_visible()
            page.fill("#login-token", DISPATCHER_TOKEN)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#whoami")).to_contain_text("调度员")
            assert page.url.endswith("/console/") or "/console/#" in page.url

            # -- the live map: the three vehicles, moving
            page.wait_for_function("() => (window.jt808Console.liveStats || {}).vehicles >= 3")
            ids = page.evaluate(JS_IDS)
            circler = ids[CIRCLER["plate"]]
            first = page.evaluate(JS_RECORD, circler)
            page.wait_for_function(JS_MOVED, arg=[circler, first])
            seen["moved"] = (first, page.evaluate(JS_RECORD, circler))
            seen["updates_drawn"] = page.evaluate(
                "() => window.jt808Console.liveStats.events.length"
            )
            # a click on the parked vehicle shows its card
            point = page.evaluate(JS_SCREEN_POINT, ids[PARKED["plate"]])
            page.mouse.click(point[0], point[1])
            expect(page.locator(".vehicle-card h2")).to_have_text(PARKED["plate"])
            expect(page.locator(".vehicle-card")).to_contain_text(UNIT)

            # -- the alert list, open before the drive: the alert must arrive live
            page.click("#nav a[data-view=alerts]")
            expect(page.locator(".alerts-table")).to_be_visible()
            expect(page.locator(".view-alerts .stream-status[data-state=live]")).to_be_visible()
            expect(page.locator(".view-alerts p.hint")).to_contain_text("条告警")  # the list is in
            trio.from_thread.run_sync(go.set)
            row = page.locator(f"tr[data-rule=holiday_sealing]:has-text('{DRIVER['plate']}')")
            expect(row).to_be_visible(timeout=60_000)
            expect(row).to_have_class(re.compile("fresh"))  # came by the stream, not the list
            expect(row.locator(".state-pill")).to_have_text("待补报")
            page.screenshot(path=shots / "console-alerts.png")

            # -- back on the map the driving vehicle shows in alert, its trip unfiled
            page.click("#nav a[data-view=map]")
            page.wait_for_function(f"id => ({JS_STATE})(id) === 'alert'", arg=ids[DRIVER["plate"]])
            page.fill(".view-map input.search", DRIVER["plate"])
            page.press(".view-map input.search", "Enter")
            expect(page.locator(".vehicle-card .state-pill")).to_have_text("告警")
            expect(page.locator(".vehicle-card .unfiled")).to_be_visible()
            page.mouse.move(5, 400)  # no tooltip in the picture
            page.wait_for_timeout(500)
            page.screenshot(path=shots / "console-map.png")
            page.click("#nav a[data-view=alerts]")

            # -- its detail: deadline, map, no filing yet; file the trip from it
            row.click()
            expect(page.locator(".alert-detail .alert-state")).to_have_attribute(
                "data-state", "pending_backfill"
            )
            expect(page.locator(".deadline-left")).to_contain_text("距补报截止")
            page.wait_for_timeout(1000)  # the track on the small map
            page.screenshot(path=shots / "console-alert-detail.png")
            page.fill(".note-form textarea", "已电话联系驾驶员，补报中")
            page.click(".note-form button[type=submit]")
            expect(page.locator(".notes")).to_contain_text("已电话联系驾驶员")
            expect(page.locator(".notes .ack")).to_be_visible()
            page.click(".file-from-alert")
            form = page.locator(".filing-form")
            expect(form.locator("input[name=plate]")).to_have_value(DRIVER["plate"])
            form.locator("input[name=purpose]").fill("防汛检查")
            form.locator("input[name=passengers]").fill("李伟；张敏")
            form.locator("input[name=approver]").fill("王芳")
            page.wait_for_timeout(300)
            page.screenshot(path=shots / "console-backfiling.png")
            form.locator("button[type=submit]").click()
            expect(page.locator(".filed-note")).to_be_visible()
            expect(page.locator(".alert-detail .alert-state")).to_have_attribute(
                "data-state", "resolved", timeout=60_000
            )
            expect(page.locator(".filing-box")).to_contain_text("防汛检查")
            seen["alert_url"] = page.url

            # -- the report: seeded violations as a chart, and the CSV link
            page.click("#nav a[data-view=reports]")
            expect(page.locator("svg.bar-chart")).to_be_visible()
            expect(page.locator("svg.bar-chart")).to_contain_text(REPORT_UNITS[0])
            href = page.locator("a.csv-link").get_attribute("href")
            assert href is not None
            assert "format=csv" in href
            csv = page.request.get(href)
            assert csv.status == 200, csv.status
            seen["csv"] = csv.text()
            page.screenshot(path=shots / "console-report.png")

            # -- the drive played back, and the vehicle's terminal binding
            page.goto(f"{base}/console/#/track?vehicle={ids[DRIVER['plate']]}")
            expect(page.locator(".player")).to_be_visible()
            expect(page.locator(".view-track .side")).to_contain_text(DRIVER["plate"])
            page.click("#nav a[data-view=fleet]")
            expect(page.locator(".fleet-table tbody tr")).to_have_count(6)
            page.locator(f".fleet-table tr:has-text('{DRIVER['plate']}')").click()
            expect(page.locator(".bindings")).to_contain_text("013800000101")
            expect(page.locator(".vehicle-form")).to_have_count(0)  # admins only

            # -- English switch
            page.click("header .lang-switch")
            expect(page.locator("#nav a[data-view=reports]")).to_have_text("Reports")
            page.click("header .lang-switch")

            # -- a viewer sees neither form
            page.click("#logout")
            expect(page.locator("#login-form")).to_be_visible()
            page.fill("#login-token", VIEWER_TOKEN)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#whoami")).to_contain_text("查看员")
            page.goto(seen["alert_url"])
            expect(page.locator(".alert-detail .alert-state")).to_have_attribute(
                "data-state", "resolved"
            )
            expect(page.locator(".file-from-alert")).to_have_count(0)
            expect(page.locator(".note-form")).to_have_count(0)
            page.click("#nav a[data-view=filings]")
            expect(page.locator(".filings-table tbody tr")).to_have_count(1)
            expect(page.locator(".new-filing")).to_have_count(0)
            page.locator(".filings-table tbody tr").first.click()
            expect(page.locator(".side h2")).to_contain_text(DRIVER["plate"])
            expect(page.locator(".correct-filing")).to_have_count(0)

            # -- an admin makes the parked vehicle exempt: refused without a reason, then saved
            page.click("#logout")
            expect(page.locator("#login-form")).to_be_visible()
            page.fill("#login-token", TEST_TOKEN)
            page.click("#login-form button[type=submit]")
            page.click("#nav a[data-view=fleet]")
            page.locator(f".fleet-table tr:has-text('{PARKED['plate']}')").click()
            form = page.locator(".vehicle-form")
            expect(form).to_be_visible()
            form.locator("input[name=exempt]").check()
            form.locator("textarea[name=reason]").evaluate("node => { node.required = false }")
            form.locator("button[type=submit]").click()
            expect(form.locator("p.error")).to_have_text("修改豁免标志须填写理由。")
            form.locator("textarea[name=reason]").fill("应急救援保障车辆")
            form.locator("button[type=submit]").click()
            expect(form.locator("p.ok")).to_have_text("已保存。")
            seen["errors"] = errors
        finally:
            browser.close()
    return seen


async def test_console_end_to_end(chromium: str, pg_schema_dsn: str, tmp_path: Path) -> None:  # noqa: F811
    dsn = pg_schema_dsn
    shots = Path(os.environ.get("JT808_ARTEFACTS_DIR") or tmp_path) / "console-screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    now = datetime.now(GMT8)
    rules = tmp_path / "rules.toml"
    rules.write_text(
        "[[sealing]]\n"
        'name = "browser test sealing"\n'
        f"start = {_china(now - timedelta(hours=3))}\n"
        f"end = {_china(now + timedelta(hours=3))}\n",
        encoding="utf-8",
    )
    go = trio.Event()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with serving(dsn, tmp_path / "data", rules_file=rules) as running:
            http_port = running.http_ports[0]
            await trio.to_thread.run_sync(
                store_token, dsn, DISPATCHER_TOKEN, "dispatcher-li", "dispatcher"
            )
            await trio.to_thread.run_sync(store_token, dsn, VIEWER_TOKEN, "viewer-zhang", "viewer")
            vehicles: list[dict[str, Any]] = [
                {
                    "plate": v["plate"],
                    "phone": v["phone"],
                    "unit": UNIT,
                    "category": "retained",
                    "exempt": v is CIRCLER,
                    **({"reason": "警卫任务车辆"} if v is CIRCLER else {}),
                }
                for v in (DRIVER, CIRCLER, PARKED)
            ] + [
                {
                    "plate": f"云A·2000{i + 1}",
                    "phone": None,
                    "unit": unit,
                    "category": "platform",
                    "exempt": False,
                }
                for i, unit in enumerate(REPORT_UNITS)
            ]
            status, answer = await http(http_port, "POST", "/vehicles", _json(vehicles))
            assert status == 201, answer
            ids = dict(zip((v["plate"] for v in vehicles), answer["ids"], strict=True))
            fence = {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [
                                [
                                    [102.69, 25.012],
                                    [102.775, 25.012],
                                    [102.775, 25.068],
                                    [102.69, 25.068],
                                    [102.69, 25.012],
                                ]
                            ],
                        },
                        "properties": {"name": "市区", "kind": "permitted"},
                    },
                    {
                        "type": "Feature",
                        "geometry": {
                            "type": "Point",
                            "coordinates": [PARKED["lon"], PARKED["lat"]],
                        },
                        "properties": {
                            "name": "机关停车场",
                            "kind": "parking",
                            "radius_m": 300,
                            "start_time": "22:00",
                            "end_time": "06:00",
                        },
                    },
                ],
            }
            status, answer = await http(http_port, "POST", "/fences", _json(fence))
            assert status == 201, answer
            by_unit = {v["unit"]: (v["plate"], ids[v["plate"]]) for v in reversed(vehicles)}
            await trio.to_thread.run_sync(_seed_violations, dsn, by_unit, now)
            port = running.server.ports[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminal, port, DRIVER, "drive", go)
                nursery.start_soon(_terminal, port, CIRCLER, "circle", go)
                nursery.start_soon(_terminal, port, PARKED, "park", go)
                seen = await trio.to_thread.run_sync(
                    _browse, chromium, f"http://127.0.0.1:{http_port}", shots, go
                )
                nursery.cancel_scope.cancel()
    assert seen["moved"][0] != seen["moved"][1]
    assert seen["updates_drawn"] >= 1
    assert REPORT_UNITS[0] in seen["csv"]
    assert seen["errors"] == []
    with psycopg.connect(dsn) as conn:
        exempted = conn.execute(
            "SELECT actor, reason, (after->>'exempt')::boolean FROM audit_log "
            "WHERE action = 'vehicle.exempt' AND object_key = %s",
            (PARKED["plate"],),
        ).fetchall()
    assert exempted == [(TEST_USER, "应急救援保障车辆", True)]
    for name in ("console-map", "console-alerts", "console-alert-detail", "console-report"):
        assert (shots / f"{name}.png").stat().st_size > 10_000


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()
