"""The operator console's side of the operator port: its page, its session and its data.

The page (``ingest/console/``, shipped in the package) is served as it is; it holds no data
and asks the endpoints below for it, with the same accounts and roles as every other endpoint
(:mod:`ingest.access`).  :class:`~ingest.http.OperatorHttp` hands requests here
(:meth:`ConsoleApi.kind`, :meth:`ConsoleApi.static`, :meth:`ConsoleApi.serve`).

Page (public)
    ``GET /`` redirects to ``/console/``, which is ``index.html``; ``GET /console/<path>``
    serves the files of the package directory with known extensions (:data:`CONTENT_TYPES`);
    anything else, and any path that tries to leave the directory, is 404.
    ``GET /console/config.json`` is generated: ``{"tile_url", "tile_attribution",
    "offline_after_s"}``.

Session
    ``POST /session`` ``{"token": "jt808_..."}`` answers 200 ``{"name", "role", "unit"}`` and
    sets the cookie ``jt808_session`` (HttpOnly, SameSite=Strict, Path=/, Secure over TLS),
    which then authenticates like a bearer token; a bad token is a failed login (counted,
    rate-limited).  ``GET /session`` answers who the cookie is; ``DELETE /session`` clears it
    (204).  A POST or DELETE authenticated by the cookie must carry ``X-JT808-Console: 1``.

Data (each limited to a unit-bound account's unit; 404 for a vehicle or alert it may not see)
    ``GET /positions/latest``, ``GET /positions/stream`` (server-sent events: ``snapshot``,
    then ``positions`` at most once a second with the entries that changed),
    ``GET /vehicles/{id}/track?from=&to=``, ``GET /vehicles/{id}/bindings``,
    ``GET /alerts?since=&until=&unit=&rule=&state=&severity=&limit=``, ``GET /alerts/{id}``,
    ``POST /alerts/{id}/notes`` (dispatchers), ``GET /reports/violations?period=&unit=&format=``.

One :class:`PositionsHub` per node reads the positions for every stream and for
``/positions/latest``: the database is asked once a second whoever watches, and each stream
takes what changed from memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import h11
import trio

from ingest import access
from ingest.access import Actor, Principal
from ingest.http import (
    CHINA,
    EVENT_STREAM,
    MAX_SHORT_BODY_BYTES,
    _Answer,
    _error,
    _EventBody,
    _Exchange,
    _json,
    _not_allowed,
    _path,
    _unknown_value,
    _until_closed,
    bounded_int,
    parse_json,
)
from ingest.interfaces import (
    AlertFilter,
    ConsoleData,
    MasterDataRejected,
    ServiceUnavailableError,
    UnknownAlertValueError,
)

if TYPE_CHECKING:
    from ingest.http import OperatorHttp

logger = logging.getLogger(__name__)

# -- the page

# The files the page may consist of, and what they are.  Anything else under the directory
# (a stray source file, a backup) is not served.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
}
# The page itself is checked again after a minute, so an upgrade shows at the next reload;
# vendored libraries change only with a release of the package, so a day is safe; the rest
# (the page's own scripts and styles) five minutes.
CACHE_HTML = "max-age=60"
CACHE_VENDOR = "public, max-age=86400"
CACHE_OTHER = "max-age=300"
# Bytes of page files kept in memory after their first request.  The page is its scripts and
# styles, a map library (~1 MB) and a CJK font subset (a few MB): 32 MiB holds it all with
# room; files past it are read again at each request rather than held.
MAX_STATIC_CACHE_BYTES = 32 * 1024 * 1024
_STATIC_HEADERS = (("x-content-type-options", "nosniff"), ("x-frame-options", "DENY"))

# -- requests

# Console requests running at once (more are answered 503 busy): a browser opens up to six
# connections to a host, so a control room of five screens loading at once is thirty; each
# waits for the database adapter, which runs a few at a time itself.
MAX_CONSOLE_REQUESTS = 32
# Track points at most (evenly thinned beyond): a month of a vehicle reporting every 30 s is
# ~90,000; 20,000 points draw smoothly as one line and are ~1.5 MB of JSON.
MAX_TRACK_POINTS = 20_000
# The longest track window: a month, the period of the violation report.
MAX_TRACK_SPAN = timedelta(days=31)
# Alerts a list answers by default and at most (~1 KB of JSON each: 5 MB at most).
DEFAULT_ALERTS = 500
MAX_ALERTS = 5_000
# A session token as this port hands them out (storage.access: "jt808_" and URL-safe base64)
# and the tests' tokens; anything else is refused before it could reach a header.
_TOKEN = re.compile(r"[A-Za-z0-9_\-]{1,200}")
_TRACK_PATH = re.compile(rb"/vehicles/([0-9]{1,18})/(track|bindings)")
_ALERT_PATH = re.compile(rb"/alerts/([^/]+)")
_NOTES_PATH = re.compile(rb"/alerts/([^/]+)/notes")
# An alert id: the engine's episode id (rule, phone, time, a discriminator); 512 bytes is
# several times the longest.
MAX_ALERT_ID_BYTES = 512
_DATA_PATHS = frozenset({b"/session", b"/positions/latest", b"/alerts", b"/reports/violations"})

# -- positions

# How often the hub asks the database for new positions while anyone watches: the streams'
# pace (at most one update a second).
POLL_S = 1.0
# Positions are read by the time they were received; a batch committed a little after a later
# one was read is still found by reading this far back each round (the writer commits a batch
# within milliseconds; two seconds leave room for a busy database).
RECEIVE_OVERLAP = timedelta(seconds=2)
# Everything is read again this often, for positions committed later than the overlap (a
# spool replayed after an outage) and for changed or removed vehicles.
RESYNC_S = 300.0
# The hub keeps polling this long after the last ``/positions/latest`` with no stream open, so
# a page refreshing the list is answered from memory; then it stops asking the database.
IDLE_S = 60.0
# A request waits this long for the hub's first read (measured at 0.4 s for 10,000 vehicles
# over 129 daily partitions) before it is answered 503.
LOAD_WAIT_S = 15.0
# Vehicles the hub holds.  A city's official fleet is some thousands of vehicles and a
# province's tens of thousands; an entry is ~1.5 KB in memory, so 50,000 are ~75 MB.  Past it
# the vehicles with the highest ids are left out (logged).
MAX_VEHICLES = 50_000
# Speed from which a vehicle counts as moving: GNSS jitter gives a parked vehicle 1-3 km/h,
# walking pace is about 5 (the same threshold as the driving time of the daily report).
MOVING_KMH = 5.0


def _utc_now() -> datetime:
    return datetime.now(UTC)


def vehicle_state(
    *,
    received_at: datetime,
    speed_kmh: float,
    alerting: bool,
    now: datetime,
    offline_after_s: float,
) -> str:
    """``offline`` (nothing received for ``offline_after_s``), else ``alert`` (an open or
    pending alert), else ``moving`` or ``parked`` by speed."""
    if (now - received_at).total_seconds() > offline_after_s:
        return "offline"
    if alerting:
        return "alert"
    return "moving" if speed_kmh >= MOVING_KMH else "parked"


@dataclasses.dataclass(slots=True, eq=False)  # each one is itself (kept in a set)
class _Subscriber:
    """One stream's share of the hub: the entries changed since it last sent (at most one per
    vehicle, the latest: a slow client gets the newest state, never a backlog)."""

    unit: str | None
    pending: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)

    def offer(self, changed: list[dict[str, Any]]) -> None:
        for entry in changed:
            if self.unit is None or entry["unit"] == self.unit:
                self.pending[entry["vehicle_id"]] = entry
        if self.pending:
            self.ready.set()

    def take(self) -> list[dict[str, Any]]:
        taken = list(self.pending.values())
        self.pending = {}
        self.ready = trio.Event()
        return taken


class PositionsHub:
    """Every vehicle's latest position and state, read from the database once a second while
    anyone watches, for all streams and ``/positions/latest`` of the node (cross-node correct:
    it reads what every node stored).  Start :meth:`run`.

    Entries are JSON objects, replaced (never changed) when they change, so a stream may hold
    them while the hub moves on.
    """

    def __init__(
        self,
        data: ConsoleData,
        *,
        offline_after_s: float,
        wall_clock: Callable[[], datetime] = _utc_now,
        poll_s: float = POLL_S,
        resync_s: float = RESYNC_S,
    ) -> None:
        self.data = data
        self.offline_after_s = offline_after_s
        self.wall_clock = wall_clock
        self.poll_s = poll_s
        self.resync_s = resync_s
        self.entries: dict[int, dict[str, Any]] = {}
        self._received: dict[int, datetime] = {}
        self._device: dict[int, datetime] = {}
        self._subscribers: set[_Subscriber] = set()
        self._wanted = trio.Event()
        self._loaded = trio.Event()
        self._last_demand = -math.inf
        self._cursor: datetime | None = None
        self.last_error: str | None = None
        self.rounds = 0

    def subscribe(self, unit: str | None) -> _Subscriber:
        """A stream's subscription (the stream caps bound how many there are)."""
        subscriber = _Subscriber(unit)
        self._subscribers.add(subscriber)
        self._wanted.set()
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def snapshot(self, unit: str | None) -> list[dict[str, Any]]:
        """Every entry (of ``unit``; None: all), once the hub has read them; raises
        :class:`ServiceUnavailableError` when it could not within :data:`LOAD_WAIT_S`."""
        self._last_demand = trio.current_time()
        self._wanted.set()
        with trio.move_on_after(LOAD_WAIT_S):
            await self._loaded.wait()
        if not self._loaded.is_set():
            raise ServiceUnavailableError(
                f"positions could not be read: {self.last_error or 'the database is slow'}"
            )
        return [e for e in self.entries.values() if unit is None or e["unit"] == unit]

    def _in_demand(self) -> bool:
        return bool(self._subscribers) or trio.current_time() - self._last_demand < IDLE_S

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            full_at = -math.inf
            while self._in_demand():
                started = trio.current_time()
                try:
                    if not self._loaded.is_set() or started - full_at >= self.resync_s:
                        await self.refresh(full=True)
                        full_at = started
                    else:
                        await self.refresh(full=False)
                except ServiceUnavailableError as exc:
                    if self.last_error is None:
                        logger.warning("console positions: %s; trying again each second", exc)
                    self.last_error = str(exc)
                except Exception as exc:
                    # A round that fails otherwise (a value the database refuses, a bug) is
                    # this round's: the hub runs in the operator port's nursery, and must not
                    # take the port, its streams and every other request down with it.
                    if self.last_error is None:
                        logger.exception("console positions: a round failed; trying again")
                    self.last_error = f"{type(exc).__name__}: {exc}"
                else:
                    self.last_error = None
                await trio.sleep_until(started + self.poll_s)
            # Nobody watches: stop asking, and read everything again when someone does.
            self._wanted = trio.Event()
            self._loaded = trio.Event()
            self.entries, self._received, self._device = {}, {}, {}

    async def refresh(self, *, full: bool) -> list[dict[str, Any]]:
        """One round: read (everything, or what was received since the last round), recompute
        the states, offer the entries that changed to the streams; returns those."""
        since = None
        if not full:
            since = (self._cursor or self.wall_clock()) - RECEIVE_OVERLAP
        rows = await self.data.latest_positions(since)
        alerting = await self.data.alerting_vehicles()
        now = self.wall_clock()
        accepted: dict[int, dict[str, Any]] = {}
        dropped = 0
        for row in rows:
            vehicle_id = int(row["vehicle_id"])
            device_time = datetime.fromisoformat(row["device_time"])
            received_at = datetime.fromisoformat(row["received_at"])
            if self._cursor is None or received_at > self._cursor:
                self._cursor = received_at
            known = self._device.get(vehicle_id)
            if known is not None and device_time < known and not full:
                continue  # an older position received late (a back-fill): not the latest
            if known is None and len(self._device) >= MAX_VEHICLES:
                dropped += 1
                continue
            self._device[vehicle_id] = device_time
            self._received[vehicle_id] = received_at
            accepted[vehicle_id] = row
        if dropped:
            logger.warning(
                "console positions: %s vehicles past the cap of %s", dropped, MAX_VEHICLES
            )
        if full:
            for vehicle_id in set(self.entries) - set(accepted):  # removed, or no terminal
                del self.entries[vehicle_id], self._device[vehicle_id], self._received[vehicle_id]
        if self._cursor is None:
            self._cursor = now
        changed: list[dict[str, Any]] = []
        for vehicle_id, entry in self.entries.items():
            if vehicle_id in accepted:
                continue
            state = self._state(vehicle_id, entry, alerting, now)
            if state != entry["state"]:
                self.entries[vehicle_id] = {**entry, "state": state}
                changed.append(self.entries[vehicle_id])
        for vehicle_id, row in accepted.items():
            fresh = {**row, "state": self._state(vehicle_id, row, alerting, now)}
            if fresh != self.entries.get(vehicle_id):
                self.entries[vehicle_id] = fresh
                changed.append(fresh)
        for subscriber in self._subscribers:
            subscriber.offer(changed)
        self.rounds += 1
        self._loaded.set()
        return changed

    def _state(
        self, vehicle_id: int, entry: dict[str, Any], alerting: set[int], now: datetime
    ) -> str:
        return vehicle_state(
            received_at=self._received[vehicle_id],
            speed_kmh=float(entry["speed_kmh"]),
            alerting=vehicle_id in alerting,
            now=now,
            offline_after_s=self.offline_after_s,
        )


# ---------------------------------------------------------------------------------------------
# The console's requests


class ConsoleApi:
    """The console's endpoints on an :class:`~ingest.http.OperatorHttp` (set as its
    ``console``).  ``data`` None serves the page and the session only (the data endpoints
    answer 404).  ``static_root`` is the page's directory (default: ``ingest/console`` of the
    package); ``heartbeat_s`` the streams' comment interval (the port's by default)."""

    def __init__(
        self,
        *,
        data: ConsoleData | None,
        tile_url: str | None = None,
        tile_attribution: str | None = None,
        offline_after_s: float = 600.0,
        static_root: Traversable | None = None,
        wall_clock: Callable[[], datetime] = _utc_now,
        poll_s: float = POLL_S,
    ) -> None:
        self.data = data
        self.tile_url = tile_url
        self.tile_attribution = tile_attribution
        self.offline_after_s = offline_after_s
        self.static_root = (
            static_root if static_root is not None else resources.files("ingest") / "console"
        )
        self.wall_clock = wall_clock
        self.hub = (
            None
            if data is None
            else PositionsHub(
                data, offline_after_s=offline_after_s, wall_clock=wall_clock, poll_s=poll_s
            )
        )
        self.slots = trio.CapacityLimiter(MAX_CONSOLE_REQUESTS)
        self._cache: dict[str, bytes] = {}
        self._cached_bytes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The positions hub (the port runs this while it serves)."""
        if self.hub is None:
            task_status.started()
            await trio.sleep_forever()
        else:
            await self.hub.run(task_status=task_status)

    # -- dispatch

    def kind(self, method: bytes, path: bytes) -> str | None:
        """``positions`` for the position stream (a stream slot), ``console`` for the other
        data and session requests (a console slot), None for the rest (the page: answered
        at once by :meth:`static`, or not the console's)."""
        if path == b"/session":
            return "console"
        if self.data is None:
            return None
        if path == b"/positions/stream" and method == b"GET":
            return "positions"
        if (
            path in _DATA_PATHS
            or _TRACK_PATH.fullmatch(path)
            or _NOTES_PATH.fullmatch(path)
            or (_ALERT_PATH.fullmatch(path) and path != b"/alerts/stream")
        ):
            return "console"
        return None

    def static(self, request: h11.Request) -> _Answer | None:
        """The answer to a request for the page (None: not the page's path)."""
        path = _path(request)
        if path in (b"/", b"/console"):
            if request.method not in (b"GET", b"HEAD"):
                return _not_allowed("GET, HEAD")
            return _Answer(302, b"", "text/plain", headers=(("location", "/console/"),))
        if not path.startswith(b"/console/"):
            return None
        if request.method not in (b"GET", b"HEAD"):
            return _not_allowed("GET, HEAD")
        name = unquote(path[len(b"/console/") :].decode("utf-8", "replace")) or "index.html"
        if name == "config.json":
            config = {
                "tile_url": self.tile_url,
                "tile_attribution": self.tile_attribution,
                "offline_after_s": self.offline_after_s,
            }
            return _Answer(200, _json(config), headers=(("cache-control", CACHE_HTML),))
        content = self._file(name)
        if content is None:
            return _Answer(404, _json({"error": "not found"}))
        suffix = name[name.rfind(".") :]
        cache = (
            CACHE_HTML
            if suffix == ".html"
            else CACHE_VENDOR
            if name.startswith("vendor/")
            else CACHE_OTHER
        )
        headers = (("cache-control", cache), *_STATIC_HEADERS)
        return _Answer(200, content, CONTENT_TYPES[suffix], headers=headers)

    def _file(self, name: str) -> bytes | None:
        """The bytes of the page's file ``name`` (a relative path), or None: not one of the
        page's files (an unknown extension, a hidden file, a path leaving the directory)."""
        parts = name.split("/")
        if any(
            not part or part.startswith(".") or "\\" in part or "\x00" in part for part in parts
        ):
            return None
        suffix = parts[-1][parts[-1].rfind(".") :] if "." in parts[-1] else ""
        if suffix not in CONTENT_TYPES:
            return None
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        target = self.static_root.joinpath(*parts)
        try:
            if not target.is_file():
                return None
            content = target.read_bytes()
        except OSError:
            return None
        if self._cached_bytes + len(content) <= MAX_STATIC_CACHE_BYTES:
            self._cache[name] = content
            self._cached_bytes += len(content)
        return content

    async def serve(
        self, http: OperatorHttp, exchange: _Exchange, request: h11.Request, kind: str
    ) -> None:
        """Answer a request :meth:`kind` named (its slot taken by the port)."""
        if kind == "positions":
            await self._positions_stream(http, exchange)
            return
        path = _path(request)
        method = request.method
        content = b""
        if method in (b"POST", b"DELETE", b"PUT", b"PATCH"):
            deadline = trio.current_time() + http.limits.body_timeout_s
            read = await http._read_body(exchange, MAX_SHORT_BODY_BYTES, deadline)
            if read is None:
                return
            content = read
        try:
            answer = await self._answer(http, exchange, request, path, content)
        except ServiceUnavailableError as exc:
            answer = _error(503, "unavailable", str(exc))
        except MasterDataRejected as exc:  # a value the database cannot hold
            answer = _error(400, "bad_request", str(exc))
        await http._reply(exchange, answer)

    async def _answer(
        self,
        http: OperatorHttp,
        exchange: _Exchange,
        request: h11.Request,
        path: bytes,
        content: bytes,
    ) -> _Answer:
        method = b"GET" if request.method == b"HEAD" else request.method
        principal = exchange.principal
        if path == b"/session":
            return await self._session(http, exchange, method, content)
        assert self.data is not None
        assert self.hub is not None
        query = _query(request)
        if isinstance(query, _Answer):
            return query
        if path == b"/positions/latest":
            if method != b"GET":
                return _not_allowed("GET, HEAD")
            return _Answer(200, _json(await self.hub.snapshot(_unit_of(principal))))
        if path == b"/alerts":
            if method != b"GET":
                return _not_allowed("GET, HEAD")
            return await self._alerts(principal, query)
        if path == b"/reports/violations":
            if method != b"GET":
                return _not_allowed("GET, HEAD")
            return await self._report(principal, query)
        vehicle = _TRACK_PATH.fullmatch(path)
        if vehicle is not None:
            if method != b"GET":
                return _not_allowed("GET, HEAD")
            return await self._vehicle(principal, int(vehicle.group(1)), vehicle.group(2), query)
        notes = _NOTES_PATH.fullmatch(path)
        if notes is not None:
            if method != b"POST":
                return _not_allowed("POST")
            return await self._note(exchange, _alert_id(notes.group(1)), content)
        one = _ALERT_PATH.fullmatch(path)
        assert one is not None
        if method != b"GET":
            return _not_allowed("GET, HEAD")
        return await self._alert(http, principal, _alert_id(one.group(1)))

    # -- session

    async def _session(
        self, http: OperatorHttp, exchange: _Exchange, method: bytes, content: bytes
    ) -> _Answer:
        if method == b"GET":
            principal = exchange.principal
            assert principal is not None  # GET /session is not public
            return _Answer(200, _json(_who(principal)))
        if method == b"DELETE":
            return _Answer(204, b"", headers=(("set-cookie", self._cookie(http, "", 0)),))
        if method != b"POST":
            return _not_allowed("GET, HEAD, POST, DELETE")
        try:
            document = parse_json(content)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if not isinstance(document, dict) or not isinstance(document.get("token"), str):
            return _error(400, "bad_request", 'expected {"token": "jt808_..."}')
        token = document["token"].strip()
        found = await http.login(exchange, token if _TOKEN.fullmatch(token) else "-")
        if isinstance(found, _Answer):
            return found
        headers = (("set-cookie", self._cookie(http, token, None)),)
        return _Answer(200, _json(_who(found)), headers=headers)

    @staticmethod
    def _cookie(http: OperatorHttp, value: str, max_age: int | None) -> str:
        parts = [f"{access.SESSION_COOKIE}={value}", "HttpOnly", "SameSite=Strict", "Path=/"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
        if http.tls is not None:
            parts.append("Secure")
        return "; ".join(parts)

    # -- data

    async def _vehicle(
        self, principal: Principal | None, vehicle_id: int, what: bytes, query: dict[str, str]
    ) -> _Answer:
        assert self.data is not None
        vehicle = await self.data.vehicle(vehicle_id)
        if vehicle is None or not _sees(principal, vehicle.get("unit")):
            return _error(404, "not_found", f"no vehicle {vehicle_id}")
        if what == b"bindings":
            if query:
                return _error(400, "bad_request", "no parameters are known")
            return _Answer(200, _json(await self.data.bindings(vehicle_id) or []))
        unknown = sorted(set(query) - {"from", "to"})
        if unknown or "from" not in query or "to" not in query:
            detail = "from and to (ISO 8601) are required" if not unknown else "known: from, to"
            return _error(400, "bad_request", detail)
        try:
            start, end = _time(query["from"], "from"), _time(query["to"], "to")
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        if not start < end or end - start > MAX_TRACK_SPAN:
            detail = f"to must be after from, at most {MAX_TRACK_SPAN.days} days later"
            return _error(400, "bad_request", detail)
        track = await self.data.track(vehicle_id, start, end, MAX_TRACK_POINTS)
        return _Answer(200, _json({"vehicle": vehicle, **track}))

    async def _alerts(self, principal: Principal | None, query: dict[str, str]) -> _Answer:
        assert self.data is not None
        known = {"since", "until", "unit", "rule", "state", "severity", "limit"}
        unknown = sorted(set(query) - known)
        if unknown:
            return _error(400, "bad_request", f"unknown parameter(s) {', '.join(unknown)}")
        try:
            since = _time(query["since"], "since") if "since" in query else None
            until = _time(query["until"], "until") if "until" in query else None
            limit = _limit(query.get("limit"))
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        filters = AlertFilter(
            unit=query.get("unit"),
            rule=query.get("rule"),
            state=query.get("state"),
            severity=query.get("severity"),
        )
        try:
            self.data.vocabulary.check(filters)
        except UnknownAlertValueError as exc:
            return _unknown_value(exc)
        if principal is not None:
            try:
                filters = dataclasses.replace(
                    filters, unit=access.alert_unit(principal, filters.unit)
                )
            except ValueError as exc:
                return _error(403, "forbidden", str(exc))
        found = await self.data.alerts(since=since, until=until, filters=filters, limit=limit)
        return _Answer(200, _json(found))

    async def _alert(
        self, http: OperatorHttp, principal: Principal | None, alert_id: str | None
    ) -> _Answer:
        assert self.data is not None
        found = None if alert_id is None else await self.data.alert(alert_id)
        if found is None or not _sees(principal, found.get("unit")):
            return _error(404, "not_found", "no such alert")
        filing = None
        filing_id = (found.get("detail") or {}).get("filing")
        if isinstance(filing_id, int) and http.masterdata is not None:
            filing = await http.masterdata.filing(filing_id)
        return _Answer(200, _json({**found, "filing": filing}))

    async def _note(self, exchange: _Exchange, alert_id: str | None, content: bytes) -> _Answer:
        assert self.data is not None
        try:
            document = parse_json(content)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        problem = _note_problem(document)
        if problem is not None:
            return _error(400, "bad_request", problem)
        found = None if alert_id is None else await self.data.alert(alert_id)
        if found is None or alert_id is None:
            return _error(404, "not_found", "no such alert")
        principal = exchange.principal
        if principal is not None and not _sees(principal, found.get("unit")):
            detail = f"the alert is of another unit than {principal.unit}"
            return _error(403, "forbidden", detail)
        actor = Actor(
            name=principal.name if principal is not None else "operator",
            source=exchange.address,
        )
        note = await self.data.add_note(
            alert_id,
            text=document["text"],
            acknowledge=bool(document.get("acknowledge", False)),
            actor=actor,
        )
        if note is None:
            return _error(404, "not_found", "no such alert")
        return _Answer(201, _json({"note": note}))

    async def _report(self, principal: Principal | None, query: dict[str, str]) -> _Answer:
        assert self.data is not None
        unknown = sorted(set(query) - {"period", "unit", "format"})
        if unknown or "period" not in query:
            return _error(400, "bad_request", "period=YYYY-MM is required; known: unit, format")
        form = query.get("format", "json")
        if form not in ("json", "csv"):
            return _error(400, "bad_request", "format is json or csv")
        unit = query.get("unit")
        if principal is not None:
            try:
                unit = access.alert_unit(principal, unit)
            except ValueError as exc:
                return _error(403, "forbidden", str(exc))
        try:
            if form == "csv":
                text = await self.data.violations_csv(query["period"], unit)
                disposition = f'attachment; filename="violations-{query["period"]}.csv"'
                return _Answer(
                    200,
                    text.encode("utf-8"),
                    "text/csv; charset=utf-8",
                    headers=(("content-disposition", disposition),),
                )
            report = await self.data.violations(query["period"], unit)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        return _Answer(200, _json(report))

    # -- the position stream

    async def _positions_stream(self, http: OperatorHttp, exchange: _Exchange) -> None:
        assert self.hub is not None
        unit = _unit_of(exchange.principal)
        subscriber = self.hub.subscribe(unit)
        try:
            try:
                snapshot = await self.hub.snapshot(unit)
            except ServiceUnavailableError as exc:
                await http._reply(exchange, _error(503, "unavailable", str(exc)))
                return
            subscriber.take()  # what the snapshot holds already
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_closed, exchange.stream, nursery.cancel_scope)
                await self._send_positions(http, exchange, snapshot, subscriber, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.hub.unsubscribe(subscriber)

    async def _send_positions(
        self,
        http: OperatorHttp,
        exchange: _Exchange,
        snapshot: list[dict[str, Any]],
        subscriber: _Subscriber,
        nursery: trio.Nursery,
    ) -> None:
        headers = [
            ("content-type", EVENT_STREAM),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
            ("connection", "close"),
        ]
        head = exchange.conn.send(h11.Response(status_code=200, headers=headers)) or b""
        exchange.started = True
        http._count(200)
        body = _EventBody(exchange.conn, exchange.stream)
        if not await body.send(b"event: snapshot\ndata: " + _json(snapshot) + b"\n\n", head=head):
            return
        nursery.start_soon(body.heartbeats, http.heartbeat_s, nursery.cancel_scope)
        assert self.hub is not None
        while True:
            await subscriber.ready.wait()
            sent_at = trio.current_time()
            changed = subscriber.take()
            if not await body.send(b"event: positions\ndata: " + _json(changed) + b"\n\n"):
                return
            await trio.sleep_until(sent_at + self.hub.poll_s)  # at most one update a round


def _who(principal: Principal) -> dict[str, Any]:
    return {"name": principal.name, "role": principal.role, "unit": principal.unit}


def _unit_of(principal: Principal | None) -> str | None:
    return None if principal is None else principal.unit


def _sees(principal: Principal | None, unit: object) -> bool:
    return principal is None or access.sees_unit(principal, unit)


def _alert_id(raw: bytes) -> str | None:
    """The alert id of a path segment, percent-decoded (None: too long to be one)."""
    if len(raw) > MAX_ALERT_ID_BYTES:
        return None
    return unquote(raw.decode("ascii", "replace"))


def _query(request: h11.Request) -> dict[str, str] | _Answer:
    """The query parameters (the last of each), or 400 for a parameter given empty."""
    _, _, text = request.target.partition(b"?")
    params = parse_qs(text.decode("utf-8", "replace"), keep_blank_values=True)
    empty = sorted(k for k, v in params.items() if not v[-1])
    if empty:
        return _error(400, "bad_request", f"empty parameter(s) {', '.join(empty)}")
    return {key: values[-1] for key, values in params.items()}


def _time(text: str, name: str) -> datetime:
    """An ISO 8601 time (China time without an offset); ValueError naming ``name``."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 time, got {text[:60]!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=CHINA)


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_ALERTS
    found = bounded_int(text, 1, MAX_ALERTS)
    if found is None:
        raise ValueError(f"limit must be 1 to {MAX_ALERTS}")
    return found


# The longest note an operator may write (storage keeps the same cap).
MAX_NOTE_CHARS = 2_000


def _note_problem(document: Any) -> str | None:
    if not isinstance(document, dict):
        return 'expected {"text": "...", "acknowledge": true|false}'
    unknown = sorted(set(document) - {"text", "acknowledge"})
    if unknown:
        return f"unknown key(s) {', '.join(unknown)}; known: text, acknowledge"
    text = document.get("text")
    if not isinstance(text, str) or not 1 <= len(text) <= MAX_NOTE_CHARS:
        return f"text must be 1 to {MAX_NOTE_CHARS} characters"
    if not isinstance(document.get("acknowledge", False), bool):
        return "acknowledge must be true or false"
    return None
