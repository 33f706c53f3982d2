"""The operator console's live map with 10,000 vehicles, in Debian's chromium.

    .venv/bin/python bench/console_map.py [--quick] [--vehicles 10000] [--seconds 20]

The page (``ingest/console/``, as shipped) is served by a small stand-in for the operator port
in this process: the session, ``/console/config.json`` (no tiles: a plain background),
``/fences`` (none) and a **synthetic position feed** -- ``/positions/stream`` sends the snapshot
of every vehicle, then *every* vehicle moved, once a second (the contract's worst case: the
real stream sends only the vehicles that changed, at most once a second).  Each entry's
``received_at`` is the wall time the event was built, so the page's drawing time minus it is
the whole way from the server to the screen: serialising, sending, parsing, drawing.

Playwright drives chromium (``--executable-path``, default ``/usr/bin/chromium``) through two
phases of ``--seconds`` each: the overview (zoom 11, vehicles aggregated per screen cell) and
street level (zoom 15, every vehicle drawn on its own), each while the mouse drags the map
back and forth and the wheel zooms in and out.  Figures per phase:

* ``update_interval_ms``: between two consecutive position updates drawn on the map (the
  acceptance: at least one a second);
* ``arrival_to_drawn_ms``: from the browser receiving an event to the map having drawn it;
* ``server_to_drawn_ms``: from the server building the event to the map having drawn it;
* ``frame_interval_ms``: ``requestAnimationFrame`` intervals (16.7 ms is 60 frames a second;
  what the page feels like while it is dragged and zoomed);
* ``draw_ms``: one redraw of the vehicle layer; ``long_tasks``: main-thread tasks over 50 ms.

Medians, 95th percentiles and maxima.  The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import mimetypes
import random
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
CONSOLE = _ROOT / "ingest" / "console"
KUNMING = (25.04, 102.71)
# The fleet spreads over about 50 x 50 km around the city, as a province's capital fleet does.
SPREAD_DEG = 0.25
STATES = ("moving", "parked", "offline", "alert")
STATE_WEIGHTS = (0.6, 0.3, 0.07, 0.03)


class Fleet:
    """Synthetic vehicles; :meth:`step` moves every moving one and stamps the time."""

    def __init__(self, n: int, seed: int = 808) -> None:
        rng = random.Random(seed)
        self.rng = rng
        self.vehicles: list[dict[str, Any]] = []
        for i in range(n):
            state = rng.choices(STATES, STATE_WEIGHTS)[0]
            self.vehicles.append(
                {
                    "vehicle_id": i + 1,
                    "plate": f"云A{i + 1:05d}",
                    "unit": f"单位{i % 40:02d}",
                    "category": ("retained", "platform", "rental")[i % 3],
                    "phone": f"{13_800_000_000 + i:012d}",
                    "device_time": "",
                    "received_at": "",
                    "lat": KUNMING[0] + rng.uniform(-SPREAD_DEG, SPREAD_DEG),
                    "lon": KUNMING[1] + rng.uniform(-SPREAD_DEG, SPREAD_DEG),
                    "speed_kmh": 0.0,
                    "direction": rng.randrange(360),
                    "state": state,
                }
            )
        self.lock = threading.Lock()
        self.step()

    def step(self) -> bytes:
        """Move the fleet one second on; the whole fleet as JSON."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self.lock:
            for v in self.vehicles:
                if v["state"] == "moving":
                    speed = 20 + self.rng.random() * 60
                    v["direction"] = (v["direction"] + self.rng.uniform(-10, 10)) % 360
                    metres = speed / 3.6
                    rad = math.radians(v["direction"])
                    v["lat"] += metres * math.cos(rad) / 111_000
                    v["lon"] += metres * math.sin(rad) / 100_000
                    v["speed_kmh"] = round(speed, 1)
                v["device_time"] = now
                v["received_at"] = now
            return json.dumps(self.vehicles, ensure_ascii=False).encode()


class Handler(BaseHTTPRequestHandler):
    """The operator port as far as the live map needs it."""

    fleet: Fleet
    stop: threading.Event

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/":
            self.send_response(302)
            self.send_header("Location", "/console/")
            self.end_headers()
        elif path == "/session":
            self._send(200, b'{"name": "bench", "role": "viewer", "unit": null}')
        elif path == "/console/config.json":
            body = {"tile_url": None, "tile_attribution": "", "offline_after_s": 600}
            self._send(200, json.dumps(body).encode())
        elif path.startswith("/console/"):
            self._static(path.removeprefix("/console/") or "index.html")
        elif path == "/fences":
            self._send(200, b'{"type": "FeatureCollection", "features": []}')
        elif path == "/positions/latest":
            self._send(200, self.fleet.step())
        elif path == "/positions/stream":
            self._positions()
        elif path == "/alerts/stream":
            self._idle_stream()
        elif path in ("/alerts", "/vehicles", "/filings", "/terminals"):
            self._send(200, b"[]")
        else:
            self._send(404, b'{"error": "not_found"}')

    def _static(self, relative: str) -> None:
        file = (CONSOLE / relative).resolve()
        if not file.is_relative_to(CONSOLE) or not file.is_file():
            self._send(404, b"not found", "text/plain")
            return
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind.endswith("javascript"):
            kind += "; charset=utf-8"
        self._send(200, file.read_bytes(), kind)

    def _stream_head(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _positions(self) -> None:
        self._stream_head()
        try:
            self.wfile.write(b"event: snapshot\ndata: " + self.fleet.step() + b"\n\n")
            self.wfile.flush()
            # On a fixed one-second schedule, however long building an event takes.
            due = time.monotonic()
            while not self.stop.wait(max(0.0, (due := due + 1.0) - time.monotonic())):
                self.wfile.write(b"event: positions\ndata: " + self.fleet.step() + b"\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return

    def _idle_stream(self) -> None:
        self._stream_head()
        try:
            while not self.stop.wait(15.0):
                self.wfile.write(b": heartbeat\n\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return


_COLLECT = """
() => {
  const out = { frames: [], longTasks: [], draws: [] };
  window.__bench = out;
  let last = performance.now();
  const frame = (now) => {
    out.frames.push(now - last);
    last = now;
    if (!out.done) requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) out.longTasks.push(e.duration);
    }).observe({ type: "longtask", buffered: false });
  } catch (e) { out.noLongTasks = String(e); }
  const stats = window.jt808Console.liveStats;
  stats.events.length = 0;
  return true;
}
"""

_HARVEST = """
() => {
  const out = window.__bench; out.done = true;
  const events = window.jt808Console.liveStats.events.slice();
  const vehicles = window.jt808Console.liveStats.vehicles;
  return { frames: out.frames, longTasks: out.longTasks, events, vehicles };
}
"""


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "n": len(values),
        "median": round(statistics.median(ordered), 1),
        "p95": round(p95, 1),
        "max": round(ordered[-1], 1),
    }


def phase(page: Any, zoom: int, seconds: float) -> dict[str, Any]:
    """Zoom the map, then drag and wheel-zoom it for ``seconds`` while measuring."""
    page.evaluate(
        "([lat, lon, z]) => window.jt808Console.liveMap.setView([lat, lon], z, {animate: false})",
        [KUNMING[0], KUNMING[1], zoom],
    )
    page.wait_for_timeout(1500)
    page.evaluate(_COLLECT)
    box = page.locator(".live-map").bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    end = time.monotonic() + seconds
    step = 0
    while time.monotonic() < end:
        step += 1
        # A drag of 200 px over ~0.5 s, and back; every fourth time a wheel zoom in and out.
        dx = 200 if step % 2 else -200
        page.mouse.move(cx, cy)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(cx + dx * k / 10, cy + dx * k / 20)
            page.wait_for_timeout(50)
        page.mouse.up()
        if step % 4 == 0:
            page.mouse.wheel(0, -200)
            page.wait_for_timeout(600)
            page.mouse.wheel(0, 200)
        page.wait_for_timeout(400)
    data = page.evaluate(_HARVEST)
    events = data["events"]
    drawn = sorted({e["drawn"] for e in events})
    return {
        "zoom": zoom,
        "vehicles": data["vehicles"],
        "updates_drawn": len(drawn),
        "update_interval_ms": summary([b - a for a, b in itertools.pairwise(drawn)]),
        "arrival_to_drawn_ms": summary([e["drawn"] - e["arrived"] for e in events]),
        "server_to_drawn_ms": summary([e["wall"] - e["newest"] for e in events if e["newest"]]),
        "frame_interval_ms": summary(data["frames"][1:]),
        "long_tasks_ms": summary(data["longTasks"]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional, test extra

    fleet = Fleet(args.vehicles)
    stop = threading.Event()
    handler = type("BoundHandler", (Handler,), {"fleet": fleet, "stop": stop})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/console/#/map"
    results: dict[str, Any] = {
        "vehicles": args.vehicles,
        "feed": "synthetic, every vehicle each second",
    }
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=args.executable_path, args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            results["chromium"] = browser.version
            page.goto(url)
            page.wait_for_function(
                "n => ((window.jt808Console || {}).liveStats || {}).vehicles >= n",
                arg=args.vehicles,
                timeout=60_000,
            )
            results["overview"] = phase(page, 11, args.seconds)
            if args.screenshot:
                page.screenshot(path=args.screenshot)
            results["street"] = phase(page, 15, args.seconds)
            browser.close()
    finally:
        stop.set()
        server.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--quick", action="store_true", help="8 s per phase")
    parser.add_argument("--executable-path", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", metavar="PNG", help="save the overview map here")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 8.0
    results = run(args)
    for name in ("overview", "street"):
        print(f"{name}:")
        for key, value in results[name].items():
            print(f"  {key:>20}: {json.dumps(value)}")
    print(json.dumps({"benchmark": "console_map", **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
