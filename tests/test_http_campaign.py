"""A hostile-input campaign against the operator port.

A hypothesis state machine drives a real :class:`~ingest.OperatorHttp` over TCP, wired to the
real database adapters (``tools.rules_db``) on a scratch schema behind
:class:`~tests.db_proxy.DatabaseProxy`, with random sequences of: master-data posts (valid,
invalid, hostile text, huge strings), reads with odd query strings, commands with random JSON,
raw requests (wrong methods, odd paths, bad headers, truncated or cut requests, deep nesting,
invalid UTF-8), alert streams opened, resumed with good and garbage Last-Event-IDs and dropped,
alerts published, and database outages cut and restored in the middle.

Invariants after every step:

* ``/healthz`` answers 200 within :data:`HEALTHZ_WITHIN_S`;
* no answer is a 500 and nothing was contained (nothing is injected here: a 500 is a bug);
* the port's open connections are back to the streams the machine holds open;
* nothing invalid is stored: every stored vehicle, fence and filing comes from a request the
  machine built valid, and every one answered 201 is there;
* open streams deliver every matching event, in order, once (checked at each publish).

The server runs in a thread of its own (its own ``trio.run``); the machine is a plain client.

CI runs a bounded campaign (:data:`EXAMPLES` runs of :data:`STEPS` steps, ~20 s).  Run it at
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
from datetime import datetime, timedelta, timezone
from typing import Any

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

import ingest.http
from ingest import (
    AlertFilter,
    BadCommandError,
    Metrics,
    OperatorHttp,
    TerminalOfflineError,
    message_from_json,
)
from protocol import LocalProtocolError
from protocol.header import Edition
from storage import migrate
from storage.alerts import AlertRepository
from storage.masterdata import CATEGORIES
from tests.db_proxy import DatabaseProxy
from tests.operator_auth import memory_access
from tests.storage_fixtures import pg_dsn, pg_schema_dsn  # noqa: F401
from tests.test_alerts_stream import alert
from tests.test_http_hardening import parse_reply, request_bytes
from tools.rules_db import DatabaseAlertFeed, DatabaseMasterDataAdmin

pytestmark = pytest.mark.db

# Bounded for CI (a run of the whole campaign takes ~20 s there); raise both to run it at length.
EXAMPLES = int(os.environ.get("JT808_CAMPAIGN_EXAMPLES", "8"))
STEPS = int(os.environ.get("JT808_CAMPAIGN_STEPS", "30"))
# A health probe on loopback answers in milliseconds; a second leaves room for a busy machine
# while still catching a port that waits on anything.
HEALTHZ_WITHIN_S = 1.0
# How long the machine waits for the server to notice a close or for a stream's event.
SETTLE_S = 5.0
# Streams the machine holds open at once: under the port's cap (8), so 503 busy means a leak.
MAX_OPEN_STREAMS = 3

# ---------------------------------------------------------------------------------------------
# The server under test, in a thread


class CampaignNode:
    """An OperatorHttp with the database adapters, served from a thread with its own trio."""

    def __init__(self, proxy: DatabaseProxy) -> None:
        self.proxy = proxy
        self.metrics = Metrics(CollectorRegistry())
        self.feed = DatabaseAlertFeed(proxy.dsn)
        self.http = OperatorHttp(
            host="127.0.0.1",
            port=0,
            registry=self.metrics.registry,
            terminals=list,
            health=self._health,
            access=memory_access(),
            command=_command_runner,
            alerts=self.feed,
            masterdata=DatabaseMasterDataAdmin(proxy.dsn),
            metrics=self.metrics,
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
    return Outcome(reply.status, reply.body, time.monotonic() - began)


class SyncStream:
    """An ``/alerts/stream`` client on a blocking socket."""

    def __init__(self, port: int, target: str, headers: dict[str, str], filters: AlertFilter):
        self.filters = filters
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SETTLE_S)
        self.conn = h11.Connection(h11.CLIENT)
        head = request_bytes("GET", target, headers=headers)
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
    st.from_regex(r"\A/[!-~]{0,40}\Z").filter(lambda t: not t.startswith("/alerts/stream")),
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
        # Each run starts from empty tables, so that what it may draw (filings need stored
        # vehicles) depends on its own steps only: hypothesis replays runs to shrink them.
        with psycopg.connect(self.db, autocommit=True) as conn:
            conn.execute("TRUNCATE vehicles, fences, filings, alerts, alert_events CASCADE")

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
            assert len(outcome.json()["ids"]) == len(plates)
            self.model.confirmed_plates.update(plates)

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
        self.expect_write(self.post("/filings", filing), valid=bad is None)

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
        assert outcome.status in (400, 404, 413), outcome

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
        stream = SyncStream(self.port, f"/alerts/stream{query}", headers, filters)
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
        for stream in list(self.open):
            expected = [
                s
                for s, a in self.model.published
                if s > stream.seen[-1] and stream.filters.matches(a)
            ]
            if not expected or not self.up:
                continue
            got = stream.events_until(expected[-1])
            assert got == expected, (got, expected, stream.filters)

    # -- the database

    @precondition(lambda self: self.up)
    @rule()
    def cut_database(self) -> None:
        self.node.proxy.cut()
        for stream in list(self.open):
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
        assert self.node.contained() == 0

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
