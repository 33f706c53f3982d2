"""A hostile-input campaign against the operator port.

A hypothesis state machine drives a real :class:`~ingest.OperatorHttp` over TCP, wired to the
real database adapters (``tools.rules_db``) on a scratch schema behind
:class:`~tests.db_proxy.DatabaseProxy`, with random sequences of: master-data posts (valid,
invalid, hostile text, huge strings), reads with odd query strings, commands with random JSON,
raw requests (wrong methods, odd paths, bad headers, truncated or cut requests, deep nesting,
invalid UTF-8), alert streams opened, resumed with good and garbage Last-Event-IDs and dropped,
alerts published, and database outages cut and restored in the middle.  The operator console's
API (:mod:`ingest.console_api` over ``tools.console_db``) is attacked the same way: sessions
logged in and out with good, wrong and malformed bodies, bogus cookies, cookie-authenticated
writes with and without ``X-JT808-Console``, traversal attempts on ``/console/``, tracks,
bindings, alert lists, details and reports with valid and hostile query strings (ids past
bigint, malformed and reversed times, spans over the limit, unknown filters, repeated and
percent-encoded parameters), notes with random and hostile bodies, positions stored and
position streams opened and dropped (counted with the alert streams against the streams the
machine holds), ``/filings/{id}`` and ``/audit``.

Invariants after every step:

* ``/healthz`` answers 200 within :data:`HEALTHZ_WITHIN_S`;
* no answer is a 500 and nothing was contained (nothing is injected here: a 500 is a bug);
* the port's open connections are back to the streams the machine holds open;
* nothing invalid is stored: every stored vehicle, fence, filing and alert note comes from a
  request the machine built valid, and every one answered 201 is there;
* open alert streams deliver every matching event, in order, once (checked at each publish);
  open position streams deliver each stored position once (checked at each position stored).

The server runs in a thread of its own (its own ``trio.run``); the machine is a plain client.

CI runs a bounded campaign (:data:`EXAMPLES` runs of :data:`STEPS` steps, ~15 s).  Run it at
length with, for example::

    JT808_CAMPAIGN_EXAMPLES=500 JT808_CAMPAIGN_STEPS=60 .venv/bin/pytest tests/test_http_campaign.py
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

import h11
import hypothesis.strategies as st
import psycopg
import pytest
import trio
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry

import ingest.console_api
import ingest.http
from ingest import (
    AlertFilter,
    BadCommandError,
    Metrics,
    OperatorHttp,
    TerminalOfflineError,
    message_from_json,
)
from ingest.access import ADMIN, DISPATCHER, VIEWER, Principal
from ingest.console_api import ConsoleApi
from ingest.lockout import LockoutPolicy
from protocol import LocalProtocolError
from protocol.header import Edition
from storage import migrate
from storage.alerts import AlertRepository
from storage.masterdata import CATEGORIES
from tests.db_proxy import DatabaseProxy
from tests.operator_auth import PRINCIPAL, TEST_TOKEN, memory_access
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import alert
from tests.test_http_hardening import parse_reply, request_bytes
from tools.console_db import DatabaseConsoleData
from tools.rules_db import DatabaseAlertFeed, DatabaseMasterDataAdmin

pytestmark = pytest.mark.db

# Bounded for CI (a run of the whole campaign takes ~15 s there); raise both to run it at length
# (200 runs of 60 steps: ~7 minutes).
EXAMPLES = int(os.environ.get("JT808_CAMPAIGN_EXAMPLES", "8"))
STEPS = int(os.environ.get("JT808_CAMPAIGN_STEPS", "30"))
# A health probe on loopback answers in milliseconds; a second leaves room for a busy machine
# while still catching a port that waits on anything.
HEALTHZ_WITHIN_S = 1.0
# How long the machine waits for the server to notice a close or for a stream's event.
SETTLE_S = 5.0
# Streams the machine holds open at once, alert and position streams together: under the
# port's cap (8) and the per-user cap (4), so 503 busy or 429 means a leak.
MAX_OPEN_STREAMS = 3
# How often the console's positions hub reads the database: faster than a node's second, so
# a stored position reaches the streams within a step.
POSITIONS_POLL_S = 0.2

# The accounts the machine calls the port as, besides the test admin.
VIEWER_TOKEN = "jt808_campaign-viewer"
GOV_TOKEN = "jt808_campaign-gov-dispatcher"
CAMPAIGN_VIEWER = Principal(name="victor", role=VIEWER)
GOV_DISPATCHER = Principal(name="gina", role=DISPATCHER, unit="gov")

# ---------------------------------------------------------------------------------------------
# The server under test, in a thread


class CampaignNode:
    """An OperatorHttp with the database adapters, served from a thread with its own trio."""

    def __init__(self, proxy: DatabaseProxy) -> None:
        self.proxy = proxy
        self.metrics = Metrics(CollectorRegistry())
        self.feed = DatabaseAlertFeed(proxy.dsn)
        # The console as the serve command wires it: its data adapter on the same database.
        self.console_data = DatabaseConsoleData(proxy.dsn)
        self.console = ConsoleApi(
            data=self.console_data,
            offline_after_s=86_400.0,  # no vehicle turns offline within a run
            poll_s=POSITIONS_POLL_S,
        )
        self.http = OperatorHttp(
            host="127.0.0.1",
            port=0,
            registry=self.metrics.registry,
            terminals=list,
            health=self._health,
            access=memory_access(**{VIEWER_TOKEN: CAMPAIGN_VIEWER, GOV_TOKEN: GOV_DISPATCHER}),
            command=_command_runner,
            alerts=self.feed,
            masterdata=DatabaseMasterDataAdmin(proxy.dsn),
            metrics=self.metrics,
            console=self.console,
            # Bogus tokens and cookies are sent all the time, from one address: a lock-out
            # would turn every later answer into 429 (the lock-out has tests of its own).
            login_lockout=LockoutPolicy(failures=0, window_s=1.0, lockout_s=1.0),
        )
        self.port = 0
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.failure: BaseException | None = None

    def _health(self) -> dict[str, Any]:
        if self.proxy.up:
            return {"status": "ok"}
        return {"status": "degraded", "database": "unreachable"}

    async def _main(self) -> None:
        try:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                (self.port,) = await nursery.start(self.http.run)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except BaseException as exc:  # the port itself ended: the campaign fails on it
            self.failure = exc
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> CampaignNode:
        self._thread.start()
        self._ready.wait(30)
        assert self.failure is None, f"the operator port did not start: {self.failure!r}"
        assert self.port
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)
        self.feed.close()
        self.console_data.close()

    def contained(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "jt808_contained_errors_total", {"where": "http"}
        )
        return value or 0.0


async def _command_runner(phone: str, msg_id: object, body: object) -> dict[str, Any]:
    """What the server does with a command up to sending it: check the phone, build the
    message from JSON, encode it in every edition; the terminal is never online."""
    await trio.lowlevel.checkpoint()
    if not phone.isdigit() or len(phone) > 20:
        raise BadCommandError(f"{phone!r} is not a terminal phone number")
    message = message_from_json(msg_id, body)
    for edition in Edition:
        try:
            message.encode(edition)
        except LocalProtocolError as exc:
            raise BadCommandError(f"does not fit: {exc}") from exc
    raise TerminalOfflineError(f"terminal {phone} is not online")


# ---------------------------------------------------------------------------------------------
# A plain client


@dataclass
class Outcome:
    status: int  # 0: closed without an answer
    body: bytes
    elapsed_s: float
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes, *, method: str = "GET", half_close: bool = False) -> Outcome:
    """Send ``data``, read until the server closes; every answer closes the connection."""
    began = time.monotonic()
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # answered early (413) and closed while we still sent: keep what came
    reply = parse_reply(bytes(received), method)
    return Outcome(reply.status, reply.body, time.monotonic() - began, reply.headers)


def console_bytes(
    method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """A request with only the ``headers`` given (no token unless they carry one)."""
    lines = [f"{method} {target} HTTP/1.1", "host: test", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SyncStream:
    """An ``/alerts/stream`` client on a blocking socket (``head``: the request)."""

    def __init__(self, port: int, head: bytes, filters: AlertFilter):
        self.filters = filters
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SETTLE_S)
        self.conn = h11.Connection(h11.CLIENT)
        self.sock.sendall(head)
        self.conn.send(h11.Request(method="GET", target="/", headers=[("host", "t")]))
        self.conn.send(h11.EndOfMessage())
        self.status = 0
        self.ended = False
        self.buffer = bytearray()
        self.seen: list[int] = []
        while not self.status and not self.ended:
            self._pump()

    def _pump(self) -> None:
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError:
            self.ended = True
            return
        if event is h11.NEED_DATA:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            self.conn.receive_data(data)
        elif isinstance(event, h11.Response):
            self.status = event.status_code
        elif isinstance(event, h11.Data):
            self.buffer += event.data
        elif not isinstance(event, h11.InformationalResponse):
            self.ended = True

    def events_until(self, seq: int) -> list[int]:
        """Event ids received until ``seq`` arrives (or the stream ends or stalls)."""
        deadline = time.monotonic() + SETTLE_S
        got: list[int] = []
        while (not got or got[-1] < seq) and not self.ended and time.monotonic() < deadline:
            while b"\n\n" in self.buffer:
                block, _, rest = bytes(self.buffer).partition(b"\n\n")
                self.buffer = bytearray(rest)
                got += [int(line[4:]) for line in block.split(b"\n") if line.startswith(b"id: ")]
            if not got or got[-1] < seq:
                self._pump()
        self.seen += got
        return got

    def wait_ended(self) -> bool:
        deadline = time.monotonic() + SETTLE_S
        while not self.ended and time.monotonic() < deadline:
            self._pump()
        return self.ended

    def close(self) -> None:
        self.sock.close()


class PositionsStream(SyncStream):
    """A ``/positions/stream`` client: what its events delivered, as ``(vehicle_id,
    device_time, state)``, and the events' kinds in order."""

    def __init__(self, port: int, head: bytes, unit: str | None) -> None:
        super().__init__(port, head, AlertFilter(unit=unit))
        self.unit = unit
        self.kinds: list[str] = []
        self.delivered: list[tuple[int, datetime, str]] = []

    def _take(self) -> None:
        while b"\n\n" in self.buffer:
            block, _, rest = bytes(self.buffer).partition(b"\n\n")
            self.buffer = bytearray(rest)
            lines = block.split(b"\n")
            kind = next((ln[7:].decode() for ln in lines if ln.startswith(b"event: ")), None)
            if kind is None:
                continue  # a heartbeat
            data = json.loads(b"".join(ln[6:] for ln in lines if ln.startswith(b"data: ")))
            self.kinds.append(kind)
            self.delivered += [
                (e["vehicle_id"], datetime.fromisoformat(e["device_time"]), e["state"])
                for e in data
            ]

    def delivers(self, vehicle_id: int, device_time: datetime) -> bool:
        """Whether the position arrives (or arrived) within :data:`SETTLE_S`."""
        deadline = time.monotonic() + SETTLE_S
        while True:
            self._take()
            if any(v == vehicle_id and t == device_time for v, t, _ in self.delivered):
                return True
            if self.ended or time.monotonic() >= deadline:
                return False
            self._pump()


# ---------------------------------------------------------------------------------------------
# What the machine generates

# Text a client may legitimately send: any character but NUL and unpaired surrogates
# (controls, quotes, backslashes, brackets, RTL marks, emoji, CJK).
LEGAL_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
HOSTILE_TEXT = st.one_of(
    LEGAL_TEXT,
    st.text(st.characters(), max_size=12),  # NUL and unpaired surrogates too
    st.sampled_from(["\x00", "\ud800", "\udfff\ud800", "a\x00b", "\u202e", "\ufeff"]),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**4000), max_value=10**4000),
    st.floats(allow_nan=False, allow_infinity=False),
    HOSTILE_TEXT,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(HOSTILE_TEXT, inner, max_size=4),
    max_leaves=20,
)
ODD_TARGETS = st.one_of(
    st.sampled_from(
        [
            "/",
            "*",
            "//vehicles",
            "/vehicles/",
            "/VEHICLES",
            "/vehicles?since=x",
            "/filings?since=0001-01-01T00:00:00%2B14:00",
            "/filings?since=9999-12-31T23:59:59-23:59",
            "/filings?since=%00",
            "/filings?since=&since=2026-01-01",
            "/fences?%ff=%fe",
            "/terminals/%00/commands",
            "/terminals//commands",
            "/terminals/13800138000/commands/x",
            "/alerts/stream?after=99999999999999999999999",
            "/metrics?x=" + "a" * 8000,
            "/healthz#frag",
            "/../../etc/passwd",
            "http://example/healthz",
            "/" + "a" * 12_000,
        ]
    ),
    # Never a stream's own path: a stream would not end, and streams have rules of their own.
    st.from_regex(r"\A/[!-~]{0,40}\Z").filter(
        lambda t: not t.startswith(("/alerts/stream", "/positions/stream"))
    ),
)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])
BAD_HEADERS = st.sampled_from(
    [
        {"content-length": "-1"},
        {"content-length": "1e3"},
        {"content-length": "5, 6"},
        {"transfer-encoding": "gzip"},
        {"transfer-encoding": "chunked"},
        {"expect": "100-continue"},
        {"expect": "teapot"},
        {"x": "\x01\x7f"},
        {"x y": "z"},
        {"connection": "keep-alive, upgrade", "upgrade": "h2c"},
        {"last-event-id": "\xff"},
        {},
    ]
)


@dataclass
class Model:
    """What the machine has done in one run (each run starts on emptied tables)."""

    requests: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    valid_requests: set[int] = field(default_factory=set)
    confirmed_plates: set[str] = field(default_factory=set)
    confirmed_fences: set[str] = field(default_factory=set)
    published: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # Stored vehicles by id (from the ids a 201 answered), with their terminal's phone.
    vehicle_ids: dict[int, str | None] = field(default_factory=dict)
    # Alert notes (alert id, text) sent valid, and those answered 201.
    valid_notes: set[tuple[str, str]] = field(default_factory=set)
    confirmed_notes: set[tuple[str, str]] = field(default_factory=set)
    filing_ids: set[int] = field(default_factory=set)


def vehicle(request: int, i: int, text: str, *, phone: bool) -> dict[str, Any]:
    return {
        "plate": f"P{request}-{i}-{text}",
        "phone": f"{request:08d}{i:02d}" if phone else None,
        "unit": f"u{text}",
        "category": CATEGORIES[(request + i) % len(CATEGORIES)].upper(),
        "exempt": bool(i % 2),
        "max_speed_kmh": None if i % 3 else 80.5,
        "reason": "campaign",  # an exempt change needs one
    }


INVALID_VEHICLE_CHANGES: list[dict[str, Any]] = [
    {"category": "tank"},
    {"phone": "12ab"},
    {"phone": "1" * 21},
    {"exempt": "maybe"},
    {"max_speed_kmh": -1},
    {"max_speed_kmh": 0},
    {"max_speed_kmh": "inf"},
    {"max_speed_kmh": "nan"},
    {"unit": ["gov"]},
    {"unit": {"a": 1}},
    {"unit": ""},
    {"colour": "red"},
    {"plate": "BAD\x00"},
    {"plate": "BAD\ud800"},
]


def fence(name: str, i: int) -> dict[str, Any]:
    if i % 2:
        geometry = {"type": "Point", "coordinates": [102.7 + i / 100, 25.0]}
        props: dict[str, Any] = {"name": name, "kind": "parking", "radius_m": 300}
    else:
        x, y = 102.0 + i / 100, 25.0
        ring = [[x, y], [x + 0.01, y], [x + 0.01, y + 0.01], [x, y + 0.01], [x, y]]
        geometry = {"type": "Polygon", "coordinates": [ring]}
        props = {"name": name, "kind": "destination"}
    return {"type": "Feature", "geometry": geometry, "properties": props}


INVALID_FENCE_CHANGES: list[dict[str, Any]] = [
    {"geometry": {"type": "Point", "coordinates": [999, 999]}},
    {"geometry": {"type": "Point", "coordinates": ["a", None]}},
    {"geometry": {"type": "LineString", "coordinates": [[1, 2], [3, 4]]}},
    {"geometry": None},
    {"geometry": {"type": "Polygon", "coordinates": [[[1, 2], [3, 4]]]}},
    {"properties": {"kind": "sometimes"}},
    {"properties": {"kind": "parking", "radius_m": -5}},
    {"properties": {"kind": "parking", "radius_m": 10**400}},
    {"properties": {"kind": "parking", "radius_m": 300, "overspeed_duration_s": 10**30}},
    {"properties": {"kind": "parking", "radius_m": 300, "area_id": 2**70}},
    {"properties": {"kind": "parking", "radius_m": 300, "start_time": "25:99"}},
    {"properties": {"kind": "parking", "radius_m": 300, "unknown": 1}},
    {"id": 2**70},
    {"id": "x"},
    {"type": "Nope"},
]


# ---------------------------------------------------------------------------------------------
# The console's requests


@dataclass(frozen=True)
class Caller:
    """How a request authenticates: its headers, the account they name (None: 401), and
    whether a write by it is a forgery (the session cookie without ``X-JT808-Console: 1``)."""

    headers: dict[str, str]
    principal: Principal | None
    forged: bool = False


CALLERS = {
    "admin": Caller({"authorization": f"Bearer {TEST_TOKEN}"}, PRINCIPAL),
    "viewer": Caller({"authorization": f"Bearer {VIEWER_TOKEN}"}, CAMPAIGN_VIEWER),
    "gov dispatcher": Caller({"authorization": f"Bearer {GOV_TOKEN}"}, GOV_DISPATCHER),
    "cookie": Caller(
        {"cookie": f"theme=dark; jt808_session={TEST_TOKEN}", "x-jt808-console": "1"}, PRINCIPAL
    ),
    "cookie, gov": Caller(
        {"cookie": f"jt808_session={GOV_TOKEN}", "x-jt808-console": " 1 "}, GOV_DISPATCHER
    ),
    "cookie without the header": Caller(
        {"cookie": f"jt808_session={TEST_TOKEN}"}, PRINCIPAL, forged=True
    ),
    "cookie with a wrong header": Caller(
        {"cookie": f"jt808_session={GOV_TOKEN}", "x-jt808-console": "true"},
        GOV_DISPATCHER,
        forged=True,
    ),
    "bearer before cookie": Caller(
        {"authorization": f"Bearer {VIEWER_TOKEN}", "cookie": f"jt808_session={TEST_TOKEN}"},
        CAMPAIGN_VIEWER,
    ),
    "bogus cookie": Caller({"cookie": "jt808_session=jt808_bogus"}, None),
    "long bogus cookie": Caller({"cookie": "jt808_session=" + "x" * 3000}, None),
    "empty cookie": Caller({"cookie": "jt808_session=; other=1", "x-jt808-console": "1"}, None),
    "another cookie": Caller({"cookie": f"jt808_sessionx={TEST_TOKEN}"}, None),
    "bogus bearer": Caller({"authorization": "Bearer jt808_nope"}, None),
    "nobody": Caller({}, None),
}
# Callers with an account half of the time, any caller the other half: most requests get past
# the door to what they are about.
CALLER_NAMES = st.sampled_from(
    sorted(k for k, c in CALLERS.items() if c.principal)
) | st.sampled_from(sorted(CALLERS))

CHINA_TIME = timezone(timedelta(hours=8))
WINDOW = datetime(2026, 10, 3, 9, tzinfo=CHINA_TIME)


def _t(value: datetime) -> str:
    return quote(value.isoformat(), safe="")


# Query strings with what they are: "ok" (answered from the database), "bad" (400 once the
# request gets that far), "empty" (a parameter given empty: 400 before anything), None (either
# 200 or 400: a form whose reading is the parser's business, such as "+" meaning a space).
TRACK_QUERIES: list[tuple[str, str | None]] = [
    (f"from={_t(WINDOW)}&to={_t(WINDOW + timedelta(hours=6))}", "ok"),
    (f"to={_t(WINDOW + timedelta(days=31))}&from={_t(WINDOW)}", "ok"),  # the limit exactly
    (f"from=junk&from={_t(WINDOW)}&to={_t(WINDOW + timedelta(days=1))}", "ok"),  # the last
    ("from=2026-10-03T09:00&to=2026-10-04", "ok"),  # China time without an offset
    ("from=0001-01-01T00:00:00%2B14:00&to=0001-01-02T00:00:00-12:00", "ok"),
    ("from=9999-12-30T00:00:00-23:59&to=9999-12-31T23:59:59.999999-23:59", "ok"),
    (f"from={_t(WINDOW)}&to={_t(WINDOW)}", "bad"),
    (f"from={_t(WINDOW + timedelta(hours=1))}&to={_t(WINDOW)}", "bad"),
    (f"from={_t(WINDOW)}&to={_t(WINDOW + timedelta(days=31, seconds=1))}", "bad"),
    ("from=0001-01-01&to=9999-12-31", "bad"),
    ("from=2026-02-30&to=2026-03-01", "bad"),
    ("from=2026-10-03T25:00&to=2026-10-04", "bad"),
    ("from=2026-10-03T09:00:00%2B24:00&to=2026-10-04", "bad"),
    ("from=%00&to=2026-10-04", "bad"),
    ("from=%ff%fe&to=2026-10-04", "bad"),
    ("from=" + "9" * 5000 + "&to=2026-10-04", "bad"),
    ("from=-1&to=1", "bad"),
    (f"from={_t(WINDOW)}", "bad"),
    ("", "bad"),
    (f"from={_t(WINDOW)}&to={_t(WINDOW + timedelta(days=1))}&limit=5", "bad"),
    (f"from={_t(WINDOW)}&to={_t(WINDOW + timedelta(days=1))}&FROM=x", "bad"),
    (f"from={_t(WINDOW)}&to=", "empty"),
    ("from=2026-10-03T09:00:00+08:00&to=2026-10-04T09:00:00+08:00", None),
    ("from=2026-10-03&&to=2026-10-04&", None),
]
# A vehicle in a path: "known" (one the machine stored, its id as is or zero-padded),
# "unknown" (a number no vehicle has: 404 once the database answers), "no route" (not an id
# the route takes: 404 at once).
VEHICLE_IDS: list[tuple[str, str]] = [
    ("known", "known"),
    ("padded", "known"),
    ("0", "unknown"),
    ("999999999999999999", "unknown"),
    ("9223372036854775807", "no route"),  # bigint's largest: past the route's 18 digits
    ("9223372036854775808", "no route"),
    ("1" * 40, "no route"),
    ("-1", "no route"),
    ("abc", "no route"),
    ("%31", "no route"),
    ("1.0", "no route"),
    ("1%00", "no route"),
]
ALERT_QUERIES: list[tuple[str, str | None]] = [
    ("", "ok"),
    ("limit=1", "ok"),
    ("limit=5000", "ok"),
    ("limit=0005", "ok"),
    ("limit=5001", "bad"),
    ("limit=0", "bad"),
    ("limit=-1", "bad"),
    ("limit=1e3", "bad"),
    ("limit=%C2%B2", "bad"),  # a superscript two: a digit to str.isdigit, not a number
    ("limit=0000000011000000", "bad"),  # eleven million, behind leading zeros
    ("limit=99999999999999999999999", "bad"),
    ("limit=%D9%A1", None),  # an Arabic-Indic one
    ("limit=" + "0" * 3000 + "7", None),
    ("since=2026-10-01T00:00:00%2B08:00&until=2026-11-01", "ok"),
    ("since=2026-11-01&until=2026-10-01", "ok"),  # an empty window
    ("since=0001-01-01T00:00:00%2B14:00", "ok"),
    ("until=9999-12-31T23:59:59-23:59", "ok"),
    ("since=x", "bad"),
    ("until=2026-13-01", "bad"),
    ("since=%00", "bad"),
    ("rule=holiday_sealing", "ok"),
    ("rule=nope", "bad"),
    ("rule=%ff", "bad"),
    ("rule=holiday_sealing&rule=x", "bad"),
    ("state=pending_backfill", "ok"),
    ("state=maybe", "bad"),
    ("severity=high", "ok"),
    ("severity=%00", "ok"),
    ("unit=gov", "ok"),
    ("unit=police&unit=gov", "ok"),
    ("unit=police", "other unit"),
    ("unit=%00", "other unit"),
    ("unit=gov&unit=police", "other unit"),
    ("foo=1", "bad"),
    ("LIMIT=5", "bad"),
    ("since=", "empty"),
    ("unit=gov&since=", "empty"),
]
REPORT_QUERIES: list[tuple[str, str | None]] = [
    ("period=2026-10", "ok"),
    ("period=2026-10&format=csv", "ok"),
    ("period=2026-10&format=json&unit=gov", "ok"),
    ("format=csv&period=x&period=2026-11", "ok"),
    ("period=2026-10&unit=police", "other unit"),
    ("period=2026-10&unit=%00", None),  # PostgreSQL holds no NUL: 400, or 200 with nothing
    ("", "bad"),
    ("period=2026-10&period=x", "bad"),
    ("period=2026-13", "bad"),
    ("period=2026-1", "bad"),
    ("period=0000-01", "bad"),
    ("period=9999-12", "bad"),  # its end would be the year 10000
    ("period=%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%96-10", "bad"),  # full-width digits
    ("period=2026-10%0A", "bad"),
    ("period=2026-10%0A&format=csv", "bad"),
    ("period=2026-10%0D%0AX-Injected:%201&format=csv", "bad"),
    ("period=2026-10&format=xml", "bad"),
    ("period=2026-10&format=CSV", "bad"),
    ("x=1&period=2026-10", "bad"),
    ("period=", "empty"),
]
# Page paths under /console/ and the status they get: the page's files, and attempts to
# leave its directory or reach a file it does not serve.
CONSOLE_PATHS: list[tuple[str, int]] = [
    ("", 200),
    ("index.html", 200),
    ("config.json", 200),
    ("js/app.js", 200),
    ("console.css", 200),
    ("vendor/leaflet/leaflet.js", 200),
    ("vendor/leaflet/LICENSE", 404),
    ("../http.py", 404),
    ("..%2fhttp.py", 404),
    ("%2e%2e/%2e%2e/README.md", 404),
    ("js/../../http.py", 404),
    ("js/%2e%2e/app.js", 404),
    ("..\\http.py", 404),
    ("%2e%2e%5chttp.py", 404),
    ("/etc/passwd", 404),
    ("%2Fetc%2Fpasswd", 404),
    ("index.html%00.js", 404),
    ("%00", 404),
    (".hidden.js", 404),
    ("%ff%fe.js", 404),
    ("%E6%8E%A7%E5%88%B6.js", 404),
    ("a/" * 2000 + "x.js", 404),
    ("__init__.py", 404),
    ("missing.js", 404),
]
ALERT_IDS: list[tuple[str, str]] = [
    ("published", "published"),
    ("nope", "unknown"),
    ("%00", "unknown"),
    ("%ff", "unknown"),
    ("x%2Fy", "unknown"),
    ("%2e%2e", "unknown"),
    ("%E4%BA%91%F0%9F%98%80", "unknown"),
    ("notes", "unknown"),
    ("a" * 600, "too long"),
]
# Note bodies that are refused (400) whatever the alert, and raw bodies with their answer.
INVALID_NOTES: list[Any] = [
    {"text": ""},
    {"text": "x" * 2001},
    {"text": 5},
    {"text": None},
    {"text": ["a"]},
    {},
    {"text": "a", "acknowledge": "yes"},
    {"text": "a", "acknowledge": 1},
    {"text": "a", "pin": True},
    [{"text": "a"}],
    "text",
    None,
]
RAW_NOTES: list[tuple[bytes, int]] = [
    (b"text=hello", 400),
    (b"\xff\xfe{}", 400),
    (b'{"text": "\xed\xa0\x80"}', 400),  # an encoded surrogate: not UTF-8
    (b"[" * 100_000, 413),
    (b'{"text": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400),
    (b'{"text": "' + b"x" * 20_000 + b'"}', 413),
    (b'{"text": NaN}', 400),
    (b'{"text": 1e999}', 400),
    (b"", 400),
]
LOGIN_BODIES: list[tuple[Any, int]] = [
    ({"token": TEST_TOKEN}, 200),
    ({"token": f" {VIEWER_TOKEN}\t"}, 200),
    ({"token": GOV_TOKEN, "remember": True}, 200),
    ({"token": "jt808_wrong"}, 401),
    ({"token": TEST_TOKEN[:-1]}, 401),
    ({"token": "a\r\nset-cookie: x=1"}, 401),
    ({"token": "x" * 300}, 401),
    ({"token": ""}, 401),
    ({"token": "\ud800"}, 401),
    ({"token": "\x00"}, 401),
    ({"token": 5}, 400),
    ({"token": [TEST_TOKEN]}, 400),
    ({"tok": TEST_TOKEN}, 400),
    ([TEST_TOKEN], 400),
    (TEST_TOKEN, 400),
]
LOGIN_RAW: list[tuple[bytes, int]] = [
    (b"token=" + TEST_TOKEN.encode(), 400),
    (b'{"token": "\xff"}', 400),
    (b"{" * 50_000, 413),
    (b'{"token": ' + b"[" * 1500 + b"]" * 1500 + b"}", 400),
    (b"", 400),
]


def note_valid(document: Any) -> bool:
    """Whether a note body is one the API takes (the contract of ``POST /alerts/{id}/notes``;
    text PostgreSQL cannot hold is refused by the database, 400 too)."""
    if not isinstance(document, dict) or set(document) - {"text", "acknowledge"}:
        return False
    text = document.get("text")
    return (
        isinstance(text, str)
        and 1 <= len(text) <= 2000
        and isinstance(document.get("acknowledge", False), bool)
    )


def _utf8(content: bytes) -> bool:
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def storable(text: str) -> bool:
    return "\x00" not in text and not any("\ud800" <= c <= "\udfff" for c in text)


# ---------------------------------------------------------------------------------------------
# The machine


class OperatorPortCampaign(RuleBasedStateMachine):
    """See the module docstring."""

    node: CampaignNode
    db: str
    repository: AlertRepository
    # Answers seen across the runs, to show the campaign reached what it is about.
    statuses: dict[int, int]

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.open: list[SyncStream] = []
        self.ended_at: list[int] = []  # last ids seen by streams that ended
        # Errors contained by earlier runs (the node serves them all): counted from here, so
        # that hypothesis, replaying a failing run to shrink it, sees it fail the same way
        # (the test fails on any of them at its end all the same).
        self.contained_before = self.node.contained()
        # Each run starts from empty tables, so that what it may draw (filings need stored
        # vehicles) depends on its own steps only: hypothesis replays runs to shrink them.
        with psycopg.connect(self.db, autocommit=True) as conn:
            for attempt in itertools.count():
                try:
                    conn.execute(
                        "TRUNCATE vehicles, fences, filings, alerts, alert_events, positions "
                        "CASCADE"
                    )
                    break
                except psycopg.errors.DeadlockDetected:
                    # The console's positions hub read the same tables meanwhile, and
                    # PostgreSQL chose this statement to break the tie.
                    assert attempt < 5
            # Notes are append-only (no TRUNCATE): this run's are those past the last one now.
            floor = conn.execute("SELECT coalesce(max(id), 0) FROM alert_notes").fetchone()
            self.notes_floor = floor[0] if floor else 0

    # -- talking to the port

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def up(self) -> bool:
        return self.node.proxy.up

    def send(self, data: bytes, *, method: str = "GET", half_close: bool = False) -> Outcome:
        outcome = exchange(self.port, data, method=method, half_close=half_close)
        self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
        assert outcome.status != 500, f"a 500 from real input: {data[:300]!r} -> {outcome.body!r}"
        return outcome

    def post(self, target: str, document: Any, *, escaped: bool = True) -> Outcome:
        """POST ``document`` as JSON: non-ASCII as escapes (an unpaired surrogate reaches the
        server as the string it is), or as UTF-8 (where it cannot be: the bytes are invalid)."""
        if escaped:
            body = json.dumps(document).encode()
        else:
            body = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
        return self.send(request_bytes("POST", target, body))

    def expect_write(self, outcome: Outcome, *, valid: bool) -> None:
        if not self.up and valid:
            assert outcome.status == 503, outcome
            assert outcome.json()["error"] == "unavailable"
        elif valid:
            assert outcome.status == 201, outcome
        else:
            assert outcome.status in (400, 503), outcome

    # -- master data

    @rule(
        texts=st.lists(LEGAL_TEXT, min_size=1, max_size=4),
        phones=st.booleans(),
        bad=st.none() | st.sampled_from(INVALID_VEHICLE_CHANGES),
    )
    def post_vehicles(self, texts: list[str], phones: bool, bad: dict[str, Any] | None) -> None:
        request = next(self.model.requests)
        items = [vehicle(request, i, text, phone=phones) for i, text in enumerate(texts)]
        if bad is not None:
            items.append({**vehicle(request, len(items), "", phone=phones), **bad})
            items = [{**item, "plate": "BAD" + item["plate"]} for item in items]
        else:
            self.model.valid_requests.add(request)
        outcome = self.post("/vehicles", items, escaped=bool(request % 2))
        self.expect_write(outcome, valid=bad is None)
        if outcome.status == 201:
            plates = [str(item["plate"]).strip() for item in items]
            ids = outcome.json()["ids"]
            assert len(ids) == len(plates)
            self.model.confirmed_plates.update(plates)
            self.model.vehicle_ids.update(zip(ids, (item["phone"] for item in items), strict=True))

    @rule(size=st.sampled_from([200_000, 2_000_000]), indexed=st.booleans())
    def post_a_huge_vehicle(self, size: int, indexed: bool) -> None:
        request = next(self.model.requests)
        self.model.valid_requests.add(request)
        text = os.urandom(size // 2).hex()
        item = vehicle(request, 0, text[:size] if indexed else "", phone=False)
        if not indexed:
            item["unit"] = text
        outcome = self.post("/vehicles", [item])
        # An index entry that long is refused by PostgreSQL, as data: 400, never 500.
        assert outcome.status in ((201, 400) if self.up else (400, 503)), outcome
        if outcome.status == 201:
            self.model.confirmed_plates.add(item["plate"])

    @rule(count=st.integers(1, 3), bad=st.none() | st.sampled_from(INVALID_FENCE_CHANGES))
    def post_fences(self, count: int, bad: dict[str, Any] | None) -> None:
        request = next(self.model.requests)
        prefix = "F" if bad is None else "BADF"
        features = [fence(f"{prefix}{request}-{i}", i) for i in range(count)]
        if bad is not None:
            broken = features[-1]
            for key, value in bad.items():
                if key == "properties":
                    broken["properties"] = {"name": broken["properties"]["name"], **value}
                else:
                    broken[key] = value
        else:
            self.model.valid_requests.add(request)
        outcome = self.post("/fences", {"type": "FeatureCollection", "features": features})
        self.expect_write(outcome, valid=bad is None)
        if outcome.status == 201:
            self.model.confirmed_fences.update(f["properties"]["name"] for f in features)

    @precondition(lambda self: bool(self.model.confirmed_plates))
    @rule(
        data=st.data(),
        hours=st.integers(1, 48),
        bad=st.none()
        | st.sampled_from(
            [
                {"end": "2026-10-03T08:00:00+08:00"},
                {"start": "soon"},
                {"plate": "NOPE"},
                {"destination": "nowhere"},
                {"state": "maybe"},
                {"passengers": ["2"]},
                {"filed_at": "10000-01-01"},
            ]
        ),
    )
    def post_filing(self, data: st.DataObject, hours: int, bad: dict[str, Any] | None) -> None:
        request = next(self.model.requests)
        plate = data.draw(st.sampled_from(sorted(self.model.confirmed_plates)))
        fences = sorted(self.model.confirmed_fences)
        destination = data.draw(st.sampled_from([None, *fences[:5]]))
        start = datetime(2026, 10, 3, 9, tzinfo=timezone(timedelta(hours=8)))
        filing = {
            "plate": plate,
            "start": start.isoformat(),
            "end": (start + timedelta(hours=hours)).isoformat(),
            "destination": destination,
            "purpose": f"FP{request}",
            "passengers": hours,
            "approver": "Li",
        }
        if bad is not None:
            filing = {**filing, **bad, "purpose": f"BAD{request}"}
        else:
            self.model.valid_requests.add(request)
        outcome = self.post("/filings", filing)
        self.expect_write(outcome, valid=bad is None)
        if outcome.status == 201:
            self.model.filing_ids.update(outcome.json()["ids"])

    @rule(where=ODD_TARGETS | st.sampled_from(["/vehicles", "/fences", "/filings"]))
    def read_masterdata(self, where: str) -> None:
        outcome = self.send(request_bytes("GET", where))
        if where in ("/vehicles", "/fences", "/filings"):
            assert outcome.status == (200 if self.up else 503), outcome

    # -- commands

    @rule(
        msg_id=st.one_of(
            st.sampled_from(["0x8201", "0x8300", "0x8103", "0x8606", "0x8001"]), JSON_SCALARS
        ),
        body=JSON_VALUES,
        phone=st.sampled_from(["13800138000", "1", "abc", "0" * 25]),
    )
    def post_command(self, msg_id: Any, body: Any, phone: str) -> None:
        outcome = self.post(f"/terminals/{phone}/commands", {"msg_id": msg_id, "body": body})
        assert outcome.status in (400, 404), outcome

    @rule(
        raw=st.sampled_from(
            [
                b"[" * 100_000,
                b'{"msg_id": "0x8201", "body": ' + b"[" * 1500 + b"]" * 1500 + b"}",
                b'{"msg_id": "0x8300", "body": {"flag": 1, "text": "' + b"x" * 900_000 + b'"}}',
                b"\xff\xfe{}",
                b'{"msg_id": 1e999}',
                b'{"msg_id": NaN}',
                b'{"msg_id": "0x8201", "body": {"\\ud800": 1}}',
                b"",
            ]
        ),
        path=st.sampled_from(
            ["/terminals/13800138000/commands", "/vehicles", "/fences", "/filings"]
        ),
    )
    def post_raw_json(self, raw: bytes, path: str) -> None:
        outcome = self.send(request_bytes("POST", path, raw))
        # A filing's plate is looked up in the database: while it is down, 503 comes first.
        assert outcome.status in ((400, 404, 413) if self.up else (400, 404, 413, 503)), outcome

    # -- raw HTTP

    @rule(method=METHODS, where=ODD_TARGETS, headers=BAD_HEADERS, body=st.binary(max_size=64))
    def odd_request(self, method: str, where: str, headers: dict[str, str], body: bytes) -> None:
        data = request_bytes(method, where, body, headers)
        if "content-length" in headers or "transfer-encoding" in headers:
            data = data.replace(f"content-length: {len(body)}\r\n".encode(), b"", 1)
        self.send(data, method=method)  # anything but a 500: 4xx, 501, 503 when down, or 200

    @rule(
        data=st.sampled_from(
            [
                request_bytes("POST", "/vehicles", b"[{}]"),
                request_bytes("GET", "/healthz"),
                request_bytes("POST", "/terminals/1/commands", b'{"msg_id": 1}'),
            ]
        ),
        cut=st.floats(0.0, 0.99),
        half_close=st.booleans(),
    )
    def truncated_request(self, data: bytes, cut: float, half_close: bool) -> None:
        self.send(data[: int(len(data) * cut)], half_close=half_close)

    @rule(junk=st.binary(min_size=1, max_size=200))
    def junk(self, junk: bytes) -> None:
        self.send(junk, half_close=True)

    # -- alert streams

    def alert_streams(self) -> list[SyncStream]:
        return [s for s in self.open if not isinstance(s, PositionsStream)]

    @precondition(lambda self: len(self.open) < MAX_OPEN_STREAMS)
    @rule(
        target=streams,
        unit=st.sampled_from([None, "gov", "police", "%00"]),
        resume=st.sampled_from(["live", "after0", "last", "garbage"]),
        garbage=st.sampled_from(["x", "-1", "1" * 30, "\u00b2", " ", "1 2"]),
    )
    def open_stream(self, unit: str | None, resume: str, garbage: str) -> Any:
        query = "" if unit is None else f"?unit={unit}"
        headers: dict[str, str] = {}
        cursor = self.model.published[-1][0] if self.model.published else 0
        if resume == "after0":
            query += ("&" if query else "?") + "after=0"
            cursor = 0
        elif resume == "last" and self.ended_at:
            cursor = self.ended_at.pop()
            headers["last-event-id"] = str(cursor)
        elif resume == "garbage":
            headers["last-event-id"] = garbage
        filters = AlertFilter(unit=None if unit is None else unit.replace("%00", "\x00"))
        head = request_bytes("GET", f"/alerts/stream{query}", headers=headers)
        stream = SyncStream(self.port, head, filters)
        self.statuses[stream.status] = self.statuses.get(stream.status, 0) + 1
        text = garbage.strip()  # the server strips it too; an empty one is no resume point
        if (
            resume == "garbage"
            and text
            and not (text.isascii() and text.isdigit() and len(text) <= 18)
        ):
            expected = {400}
        else:
            expected = {200} if self.up else {503}
        assert stream.status in expected, (stream.status, resume, garbage)
        if stream.status != 200:
            stream.close()
            return None
        if resume == "garbage" and text:
            cursor = int(text)
        stream.seen.append(cursor)  # the resume point: events after it are expected
        self.open.append(stream)
        return stream

    @rule(stream=consumes(streams))
    def drop_stream(self, stream: SyncStream | None) -> None:
        if stream is not None and stream in self.open:
            self.open.remove(stream)
            stream.close()

    @rule(unit=st.sampled_from(["gov", "police"]))
    def publish_alert(self, unit: str) -> None:
        n = len(self.model.published) + 1
        record = alert(n, unit=unit)
        seq = self.repository.put(record)
        self.model.published.append((seq, record))
        for stream in self.alert_streams():
            expected = [
                s
                for s, a in self.model.published
                if s > stream.seen[-1] and stream.filters.matches(a)
            ]
            if not expected or not self.up:
                continue
            got = stream.events_until(expected[-1])
            assert got == expected, (got, expected, stream.filters)

    # -- the console: sessions and the page

    def call(self, caller: Caller, method: str, target: str, body: bytes = b"") -> Outcome:
        return self.send(console_bytes(method, target, body, caller.headers), method=method)

    @staticmethod
    def refused(caller: Caller, role: str, *, write: bool = False) -> int | None:
        """What the port answers ``caller`` before it looks at the request (None: nothing)."""
        if caller.principal is None:
            return 401
        if not caller.principal.at_least(role):
            return 403
        if write and caller.forged:
            return 403
        return None

    def answers(self, caller: Caller, form: str | None) -> set[int]:
        """The answers to a console read with a query of ``form`` (see TRACK_QUERIES)."""
        principal = caller.principal
        assert principal is not None
        if form in ("bad", "empty"):
            return {400}
        if form == "other unit" and principal.unit is not None:
            return {403}
        if form == "?":  # a random query string
            return {200, 400, 403} if self.up else {400, 403, 503}
        found = {200} if form in ("ok", "other unit") else {200, 400, 403}
        return found if self.up else (found - {200}) | {503}

    @rule(
        body=st.sampled_from(LOGIN_BODIES)
        | st.sampled_from(LOGIN_RAW)
        | JSON_VALUES.map(lambda document: (document, 0)),
        escaped=st.booleans(),
    )
    def log_in(self, body: tuple[Any, int], escaped: bool) -> None:
        document, expected = body
        if isinstance(document, bytes):
            content = document
        elif escaped:
            content = json.dumps(document).encode()
        else:
            content = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if expected == 0:  # random JSON: a login only with a string token (never a right one)
            token = document.get("token") if isinstance(document, dict) else None
            expected = 401 if isinstance(token, str) else 400
        if len(content) > ingest.http.MAX_SHORT_BODY_BYTES:  # a random one may be huge
            expected = 413
        elif not _utf8(content) and expected != 413:
            expected = 400
        # The port's accounts are in memory here: logging in works through an outage.
        outcome = self.send(console_bytes("POST", "/session", content))
        assert outcome.status == expected, (document, outcome)
        if outcome.status != 200:
            assert "set-cookie" not in outcome.headers, outcome
            return
        token = document["token"].strip()
        cookie = outcome.headers["set-cookie"]
        assert cookie.startswith(f"jt808_session={token};"), cookie
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(cookie.split("; ")), cookie
        again = self.send(console_bytes("GET", "/session", headers={"cookie": cookie}))
        assert again.status == 200, again
        assert again.json() == outcome.json()

    @rule(
        caller=CALLER_NAMES,
        method=st.sampled_from(["GET", "HEAD", "DELETE", "PUT", "PATCH"]),
        body=st.sampled_from([b"", b"{}", b"\xff"]),
    )
    def use_the_session(self, caller: str, method: str, body: bytes) -> None:
        who = CALLERS[caller]
        outcome = self.call(who, method, "/session", body)
        if method == "DELETE":  # signing out needs no account
            assert outcome.status == 204, outcome
            assert "Max-Age=0" in outcome.headers["set-cookie"], outcome
            return
        write = method not in ("GET", "HEAD")
        expected = self.refused(who, VIEWER, write=write) or (405 if write else 200)
        assert outcome.status == expected, (caller, outcome)
        if outcome.status == 200 and method == "GET":
            assert who.principal is not None
            assert outcome.json()["name"] == who.principal.name

    @rule(
        cookie=st.sampled_from(
            [
                "jt808_session=\x7f",
                "jt808_session",
                "=; =; jt808_session==",
                "jt808_session=a=b",
                f"jt808_session= {TEST_TOKEN}x",
                "jt808_session=" + "\xff" * 20,
                ";;;;",
            ]
        )
        | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40).map(
            lambda text: f"jt808_session={text}"
        ),
        where=st.sampled_from(["/alerts", "/session", "/positions/latest", "/audit"]),
    )
    def bogus_cookie(self, cookie: str, where: str) -> None:
        outcome = self.send(console_bytes("GET", where, headers={"cookie": cookie}))
        assert outcome.status in (400, 401), (cookie, outcome)

    @rule(
        path=st.sampled_from(CONSOLE_PATHS),
        method=st.sampled_from(["GET", "HEAD", "POST"]),
        caller=CALLER_NAMES,
    )
    def read_the_page(self, path: tuple[str, int], method: str, caller: str) -> None:
        name, status = path
        outcome = self.call(CALLERS[caller], method, f"/console/{name}")  # public: any caller
        assert outcome.status == (405 if method == "POST" else status), (name, outcome)
        if outcome.status == 200 and method == "GET" and name == "config.json":
            assert set(outcome.json()) == {"tile_url", "tile_attribution", "offline_after_s"}

    @rule(
        method=METHODS,
        where=st.sampled_from(
            [
                "/",
                "/console",
                "/session",
                "/positions/latest",
                "/alerts",
                "/alerts/x",
                "/alerts/x/notes",
                "/alerts/x/notes/y",
                "/vehicles/1/track",
                "/vehicles/1/bindings",
                "/vehicles/1/other",
                "/reports/violations",
                "/console/index.html",
                "/filings/1",
                "/audit",
            ]
        ),
        caller=CALLER_NAMES,
        body=st.binary(max_size=64),
    )
    def odd_console_request(self, method: str, where: str, caller: str, body: bytes) -> None:
        outcome = self.call(CALLERS[caller], method, where, body)
        # Anything but a 500, and no 503 but from the database (nothing here is busy).
        assert outcome.status != 0, outcome
        if self.up or where in ("/", "/console", "/console/index.html", "/session", "/audit"):
            assert outcome.status != 503, (method, where, outcome)

    # -- the console: positions

    @rule(caller=CALLER_NAMES, query=st.sampled_from(["", "?unit=police", "?x=1", "?x=", "?%ff"]))
    def read_latest_positions(self, caller: str, query: str) -> None:
        who = CALLERS[caller]
        outcome = self.call(who, "GET", "/positions/latest" + query)
        refused = self.refused(who, VIEWER)
        if refused is not None:
            expected = {refused}
        elif query in ("?x=", "?%ff"):  # a parameter given empty ("%ff" is a name)
            expected = {400}
        else:  # the hub answers from memory what it last read, or 503 when it never could
            expected = {200} if self.up else {200, 503}
        assert outcome.status in expected, (caller, query, outcome)
        if outcome.status == 200:
            assert who.principal is not None
            for entry in outcome.json():
                assert entry["state"] in ("offline", "alert", "moving", "parked"), entry
                assert who.principal.unit in (None, entry["unit"]), entry

    @precondition(lambda self: len(self.open) < MAX_OPEN_STREAMS)
    @rule(target=streams, caller=CALLER_NAMES)
    def open_positions_stream(self, caller: str) -> Any:
        who = CALLERS[caller]
        unit = None if who.principal is None else who.principal.unit
        head = console_bytes("GET", "/positions/stream", headers=who.headers)
        stream = PositionsStream(self.port, head, unit)
        self.statuses[stream.status] = self.statuses.get(stream.status, 0) + 1
        refused = self.refused(who, VIEWER)
        expected = {refused} if refused is not None else {200} if self.up else {200, 503}
        assert stream.status in expected, (caller, stream.status)
        if stream.status != 200:
            stream.close()
            return None
        self.open.append(stream)
        return stream

    @precondition(lambda self: any(self.model.vehicle_ids.values()))
    @rule(data=st.data(), speed=st.sampled_from([0.0, 42.5]))
    def store_position(self, data: st.DataObject, speed: float) -> None:
        with_phone = sorted(v for v, phone in self.model.vehicle_ids.items() if phone)
        vehicle_id = data.draw(st.sampled_from(with_phone))
        now = datetime.now(UTC)
        with psycopg.connect(self.db, autocommit=True) as conn:
            row = conn.execute("SELECT phone FROM vehicles WHERE id = %s", (vehicle_id,))
            (phone,) = row.fetchone() or (None,)
            assert phone is not None
            conn.execute(
                "INSERT INTO positions (device_time, phone, fix_key, received_at, msg_id, serial,"
                " alarm, status, lat, lon, altitude_m, speed_kmh, direction, vehicle_id) VALUES"
                " (%s, %s, 0, %s, 512, 1, 0, 3, 25.0, 102.7, 1900, %s, 90,"
                " jt808_vehicle_at(%s, %s))",
                (now, phone, now, speed, phone, now),
            )
        if not self.up:
            return  # read once the database is back
        for stream in self.open:
            # Every vehicle the machine stores is of a unit "u...": a unit-bound stream of
            # "gov" never sees it.
            if isinstance(stream, PositionsStream) and stream.unit is None:
                assert stream.delivers(vehicle_id, now), (vehicle_id, now, stream.delivered)

    # -- the console: vehicles, alerts, reports

    @rule(
        data=st.data(),
        which=st.sampled_from(VEHICLE_IDS),
        query=st.sampled_from(TRACK_QUERIES)
        | st.from_regex(r"\A[!-~]{0,40}\Z").map(lambda text: (text.replace("#", ""), "?")),
        caller=CALLER_NAMES,
        what=st.sampled_from(["track", "bindings"]),
    )
    def read_vehicle(
        self,
        data: st.DataObject,
        which: tuple[str, str],
        query: tuple[str, str | None],
        caller: str,
        what: str,
    ) -> None:
        segment, kind = which
        if kind == "known" and not self.model.vehicle_ids:
            segment, kind = "0", "unknown"
        elif kind == "known":
            vehicle_id = data.draw(st.sampled_from(sorted(self.model.vehicle_ids)))
            segment = f"{vehicle_id:05d}" if segment == "padded" else str(vehicle_id)
        text, form = query
        if what == "bindings" and form != "?":
            text, form = data.draw(
                st.sampled_from(
                    [("", "ok"), ("x=1", "bad"), ("from=2026-10-03", "bad"), ("x=", "empty")]
                )
            )
        outcome = self.call(CALLERS[caller], "GET", f"/vehicles/{segment}/{what}?{text}")
        who = CALLERS[caller]
        refused = self.refused(who, VIEWER)
        if refused is not None:
            expected = {refused}
        elif kind == "no route":
            expected = {404}
        elif form == "empty":
            expected = {400}
        elif form == "?":  # a random query: also 400 for a parameter given empty
            expected = {200, 400, 404} if self.up else {400, 503}
        elif not self.up:
            expected = {503}
        elif kind == "unknown" or (who.principal is not None and who.principal.unit is not None):
            expected = {404}  # no vehicle the machine stores is of the unit "gov"
        else:
            expected = {"ok": {200}, "bad": {400}}.get(form or "", {200, 400})
        assert outcome.status in expected, (segment, what, text, caller, outcome)
        if outcome.status == 200 and what == "track":
            answer = outcome.json()
            assert set(answer) == {"vehicle", "positions", "thinned", "trips", "alerts"}
            assert answer["vehicle"]["id"] == int(segment)
        elif outcome.status == 200:
            assert isinstance(outcome.json(), list)

    @rule(
        query=st.sampled_from(ALERT_QUERIES)
        | st.from_regex(r"\A[!-~]{0,40}\Z").map(lambda text: (text.replace("#", ""), "?")),
        caller=CALLER_NAMES,
    )
    def list_alerts(self, query: tuple[str, str | None], caller: str) -> None:
        text, form = query
        who = CALLERS[caller]
        outcome = self.call(who, "GET", f"/alerts?{text}")
        refused = self.refused(who, VIEWER)
        expected = {refused} if refused is not None else self.answers(who, form)
        assert outcome.status in expected, (text, caller, outcome)
        if outcome.status == 200:
            assert who.principal is not None
            alerts = outcome.json()
            published = {record["id"] for _, record in self.model.published}
            assert len(alerts) <= ingest.console_api.MAX_ALERTS
            for found in alerts:
                assert found["id"] in published, found
                assert who.principal.unit in (None, found["unit"]), found

    @rule(data=st.data(), which=st.sampled_from(ALERT_IDS), caller=CALLER_NAMES)
    def read_alert(self, data: st.DataObject, which: tuple[str, str], caller: str) -> None:
        alert_id, segment, unit = self.alert_target(data, which)
        who = CALLERS[caller]
        outcome = self.call(who, "GET", f"/alerts/{segment}")
        refused = self.refused(who, VIEWER)
        kind = which[1] if alert_id is None or unit is not None else "unknown"
        if refused is not None:
            expected = refused
        elif kind == "too long":
            expected = 404
        elif not self.up:
            expected = 503
        elif unit is None or who.principal is None or who.principal.unit not in (None, unit):
            expected = 404
        else:
            expected = 200
        assert outcome.status == expected, (segment, caller, outcome)
        if outcome.status == 200:
            answer = outcome.json()
            assert answer["id"] == alert_id
            assert isinstance(answer["events"], list)
            assert isinstance(answer["notes"], list)

    def alert_target(
        self, data: st.DataObject, which: tuple[str, str]
    ) -> tuple[str | None, str, str | None]:
        """The alert id, its path segment and its unit (None: not an alert the machine
        published)."""
        segment, kind = which
        if kind != "published" or not self.model.published:
            return None, "nope" if kind == "published" else segment, None
        _, record = data.draw(st.sampled_from(self.model.published))
        return record["id"], quote(record["id"], safe=""), record["unit"]

    @rule(
        data=st.data(),
        which=st.sampled_from(ALERT_IDS),
        caller=CALLER_NAMES,
        kind=st.sampled_from(["valid", "hostile", "longest", "invalid", "random", "raw"]),
        escaped=st.booleans(),
    )
    def post_note(
        self, data: st.DataObject, which: tuple[str, str], caller: str, kind: str, escaped: bool
    ) -> None:
        alert_id, segment, unit = self.alert_target(data, which)
        who = CALLERS[caller]
        request = next(self.model.requests)
        document: Any = None
        raw_expected = None
        if kind == "raw":
            content, raw_expected = data.draw(st.sampled_from(RAW_NOTES))
        else:
            if kind in ("valid", "hostile"):
                text = data.draw(LEGAL_TEXT if kind == "valid" else HOSTILE_TEXT)
                document = {"text": f"N{request}:{text}"}
                acknowledge = data.draw(st.sampled_from([None, True, False]))
                if acknowledge is not None:
                    document["acknowledge"] = acknowledge
            elif kind == "longest":
                prefix = f"N{request}:"
                document = {"text": prefix + "字" * (2000 - len(prefix))}
            elif kind == "invalid":
                document = data.draw(st.sampled_from(INVALID_NOTES))
            else:
                document = data.draw(JSON_VALUES)
            if escaped:
                content = json.dumps(document).encode()
            else:
                content = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if raw_expected is None and len(content) > ingest.http.MAX_SHORT_BODY_BYTES:
            raw_expected = 413  # a random body may be huge
        valid = raw_expected is None and _utf8(content) and note_valid(document)
        if valid and storable(document["text"]):
            self.model.valid_notes.add((str(alert_id), document["text"]))
        outcome = self.call(who, "POST", f"/alerts/{segment}/notes", content)
        refused = self.refused(who, DISPATCHER, write=True)
        if refused is not None:
            expected = refused
        elif raw_expected is not None:
            expected = raw_expected
        elif not valid:
            expected = 400
        elif which[1] == "too long":
            expected = 404
        elif not self.up:
            expected = 503
        elif alert_id is None:
            expected = 404
        elif who.principal is not None and who.principal.unit not in (None, unit):
            expected = 403
        elif not storable(document["text"]):
            expected = 400  # text PostgreSQL cannot hold (NUL, an unpaired surrogate)
        else:
            expected = 201
        assert outcome.status == expected, (segment, caller, content[:200], outcome)
        if outcome.status == 201:
            note = outcome.json()["note"]
            assert note["text"] == document["text"]
            assert who.principal is not None
            assert note["user"] == who.principal.name
            assert note["acknowledged"] == bool(document.get("acknowledge", False))
            self.model.confirmed_notes.add((str(alert_id), document["text"]))

    @rule(query=st.sampled_from(REPORT_QUERIES), caller=CALLER_NAMES)
    def read_report(self, query: tuple[str, str | None], caller: str) -> None:
        text, form = query
        who = CALLERS[caller]
        outcome = self.call(who, "GET", f"/reports/violations?{text}")
        refused = self.refused(who, VIEWER)
        expected = {refused} if refused is not None else self.answers(who, form)
        assert outcome.status in expected, (text, caller, outcome)
        if outcome.status == 200 and "format=csv" in text:
            assert outcome.headers["content-type"] == "text/csv; charset=utf-8", outcome
        elif outcome.status == 200:
            assert set(outcome.json()) == {"period", "violations", "backfilling"}

    @rule(
        data=st.data(),
        segment=st.sampled_from(
            [
                "stored",
                "0",
                "999999999999999999",
                "9223372036854775807",
                "9223372036854775808",
                "00000000000000000001",
                "-1",
                "abc",
                "%31",
                "1%00",
            ]
        ),
        caller=CALLER_NAMES,
    )
    def read_filing(self, data: st.DataObject, segment: str, caller: str) -> None:
        stored = segment == "stored" and bool(self.model.filing_ids)
        if segment == "stored":
            segment = (
                str(data.draw(st.sampled_from(sorted(self.model.filing_ids)))) if stored else "0"
            )
        who = CALLERS[caller]
        outcome = self.call(who, "GET", f"/filings/{segment}")
        refused = self.refused(who, VIEWER)
        if refused is not None:
            expected = refused
        elif not (segment.isdigit() and len(segment) <= 18):
            expected = 404
        elif not self.up:
            expected = 503
        elif not stored or (who.principal is not None and who.principal.unit is not None):
            expected = 404
        else:
            expected = 200
        assert outcome.status == expected, (segment, caller, outcome)

    @rule(
        query=st.sampled_from(
            [
                ("", 200),
                ("limit=5", 200),
                ("since=2026-01-01T00:00:00%2B08:00&user=gina", 200),
                ("user=%00", 200),
                ("since=", 200),
                ("limit=0000000011000000", 400),
                ("limit=10001", 400),
                ("limit=%C2%B2", 400),
                ("since=x", 400),
                ("foo=1", 400),
            ]
        ),
        caller=CALLER_NAMES,
    )
    def read_audit(self, query: tuple[str, int], caller: str) -> None:
        text, status = query
        who = CALLERS[caller]
        outcome = self.call(who, "GET", f"/audit?{text}")
        # The accounts and their trail are in memory here: no outage reaches them.
        assert outcome.status == (self.refused(who, ADMIN) or status), (text, caller, outcome)

    # -- the database

    @precondition(lambda self: self.up)
    @rule()
    def cut_database(self) -> None:
        self.node.proxy.cut()
        # Position streams go on with what the hub last read (it reads again when it can).
        for stream in self.alert_streams():
            # The feed fails within its poll: the stream ends cleanly; the client resumes later.
            assert stream.wait_ended(), "an open stream outlived the database"
            self.open.remove(stream)
            self.ended_at.append(stream.seen[-1])
            stream.close()

    @precondition(lambda self: not self.up)
    @rule()
    def restore_database(self) -> None:
        self.node.proxy.restore()

    # -- invariants

    @invariant()
    def healthz_answers_quickly(self) -> None:
        outcome = exchange(self.port, request_bytes("GET", "/healthz"))
        assert outcome.status == 200, outcome
        assert outcome.elapsed_s < HEALTHZ_WITHIN_S, outcome
        assert outcome.json()["status"] == ("ok" if self.up else "degraded")

    @invariant()
    def nothing_was_contained(self) -> None:
        assert self.node.contained() == self.contained_before

    @invariant()
    def connections_return_to_the_open_streams(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while self.node.http.open_connections > len(self.open) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.node.http.open_connections == len(self.open)

    @invariant()
    def nothing_invalid_is_stored(self) -> None:
        with psycopg.connect(self.db, autocommit=True) as conn:
            plates = [r[0] for r in conn.execute("SELECT plate FROM vehicles")]
            fences = [r[0] for r in conn.execute("SELECT name FROM fences")]
            purposes = [r[0] for r in conn.execute("SELECT purpose FROM filings")]
            bad = conn.execute(
                "SELECT count(*) FROM vehicles WHERE category <> ALL(%s) "
                "OR phone !~ '^[0-9]{1,20}$'",
                (list(CATEGORIES),),
            ).fetchone()
            windows = conn.execute("SELECT count(*) FROM filings WHERE ends_at <= starts_at")
            assert bad == (0,)
            assert windows.fetchone() == (0,)
        for plate in plates:
            assert plate.startswith("P"), plate
            assert int(plate[1:].split("-", 1)[0]) in self.model.valid_requests, plate
        for name in fences:
            assert name.startswith("F"), name
            assert int(name[1:].split("-", 1)[0]) in self.model.valid_requests, name
        for purpose in purposes:
            assert purpose.startswith("FP"), purpose
            assert int(purpose[2:]) in self.model.valid_requests, purpose
        assert self.model.confirmed_plates <= set(plates)
        assert self.model.confirmed_fences <= set(fences)
        with psycopg.connect(self.db, autocommit=True) as conn:
            notes = set(
                conn.execute(
                    "SELECT alert_id, text FROM alert_notes WHERE id > %s", (self.notes_floor,)
                ).fetchall()
            )
        assert notes <= self.model.valid_notes, notes - self.model.valid_notes
        assert self.model.confirmed_notes <= notes

    @invariant()
    def position_streams_deliver_once(self) -> None:
        for stream in self.open:
            if isinstance(stream, PositionsStream):
                stream._take()  # what has come so far
                assert stream.kinds[:1] in ([], ["snapshot"]), stream.kinds
                assert "snapshot" not in stream.kinds[1:], stream.kinds
                assert len(set(stream.delivered)) == len(stream.delivered), stream.delivered

    def teardown(self) -> None:
        for stream in self.open:
            stream.close()
        self.node.proxy.restore()


@pytest.fixture
def campaign_db(pg_schema_dsn: str) -> str:  # noqa: F811
    with psycopg.connect(pg_schema_dsn, autocommit=True) as conn:
        migrate(conn)
    return pg_schema_dsn


def test_the_operator_port_survives_a_hostile_campaign(
    campaign_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Truncated requests wait out the port's deadlines before they are closed: shorter ones
    # keep each such step short.  Nothing else depends on them.
    monkeypatch.setattr(ingest.http, "HEAD_TIMEOUT_S", 1.0)
    monkeypatch.setattr(ingest.http, "REQUEST_TIMEOUT_S", 3.0)
    # A position read waits this long for a hub that cannot read (the database down) before
    # it is answered 503: the port's 15 s would make each such step as long.
    monkeypatch.setattr(ingest.console_api, "LOAD_WAIT_S", 1.0)
    with (
        DatabaseProxy.for_dsn(campaign_db) as proxy,
        CampaignNode(proxy) as node,
        AlertRepository(campaign_db) as repository,
    ):
        OperatorPortCampaign.node = node
        OperatorPortCampaign.db = campaign_db
        OperatorPortCampaign.statuses = statuses = {}
        OperatorPortCampaign.repository = repository
        run_state_machine_as_test(
            OperatorPortCampaign,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
            ),
        )
        assert node.failure is None
        assert node.contained() == 0
        # The campaign reached the answers it is about.
        assert {200, 201, 400}.issubset(statuses), statuses
