"""The hostile-input campaign: the whole server, over TCP, against PostgreSQL, under attack.

A hypothesis state machine drives ``jt808 serve`` (in a thread of its own, with the real
writer, spool, terminal store and cache, through :class:`tests.db_proxy.DatabaseProxy`) with
random sequences of valid, mutated and adversarial frames from attackers that never hold an
auth code (NULs and control bytes in every text field, wrong lengths and editions, junk, bad
escapes, registrations of phones that belong to others, guessed codes), sub-package floods
from an authenticated but hostile terminal, and database outages cut and restored in the
middle.  After every step:

* the process still serves: a well-behaved terminal (the sentinel) reports and gets its ack;
* memory stays under its caps: buffered bytes and reassembly bytes within the configured caps;

and at the end of every example, with the database back, nothing from an unauthenticated
terminal was stored and connections return to the sentinel's alone.

CI runs a bounded number of examples; ``JT808_CAMPAIGN_EXAMPLES=500`` (and optionally
``JT808_CAMPAIGN_STEPS``) runs it at length.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)
from prometheus_client import CollectorRegistry

from ingest import ServerConfig
from protocol import Packet, StreamDecoder, encode
from protocol.codec import encode_split
from protocol.errors import LocalProtocolError
from protocol.fields import GMT8
from protocol.framing import frame
from protocol.header import Edition
from protocol.messages.location import LocationReport
from protocol.messages.multimedia import MultimediaData
from protocol.messages.terminal import (
    Heartbeat,
    TerminalAuth,
    TerminalLogout,
    TerminalRegister,
)
from tests.db_proxy import DatabaseProxy
from tests.storage_fixtures import db_proxy, migrated_db, pg_dsn, pg_schema_dsn  # noqa: F401
from tools.serve_cmd import Running, serve

pytestmark = pytest.mark.db

EXAMPLES = int(os.environ.get("JT808_CAMPAIGN_EXAMPLES", "12"))
STEPS = int(os.environ.get("JT808_CAMPAIGN_STEPS", "25"))

SENTINEL = "013800000001"
HOSTILE = "013800000002"  # authenticated, then misbehaves
ATTACKERS = ("013800000003", "013800000004", "013800000005", "00000000013800000006")
# Attackers connect from their own loopback addresses, so the per-address lock-out they earn
# does not touch the sentinel (127.0.0.1).
ATTACKER_ADDRESSES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
ACK_TIMEOUT_S = 15.0
MAX_BUFFERED = 256 * 1024
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=GMT8)

NASTY_TEXT = st.one_of(
    st.sampled_from(
        ["", "\x00", "ab\x00cd", "\x01\x02\x03", "\x7f", "\t\r\n", "云A\x0012345", "x" * 300]
    ),
    st.text(st.characters(codec="gb18030", exclude_categories=["Cs"]), max_size=40),
)


def location(n: int) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=0b11,
        latitude=25_040_000 + n % 1000,
        longitude=102_710_000,
        altitude_m=1890,
        speed=300,
        direction=90,
        time=T0 + timedelta(seconds=n),
    )


# ---------------------------------------------------------------------------------------------
# The server in a thread of its own


class ServerThread:
    def __init__(self, dsn: str, data_dir: Path, config: ServerConfig) -> None:
        self._args = (config, dsn, data_dir)
        self.registry = CollectorRegistry()
        self.running: Running | None = None
        self.failure: BaseException | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="campaign-server", daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(30) or self.running is None:
            raise RuntimeError(f"server did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def port(self) -> int:
        assert self.running is not None
        return self.running.server.ports[0]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.failure = exc
            self._started.set()

    async def _serve(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config, dsn, data_dir = self._args
        async with trio.open_nursery() as nursery:
            self.running = await nursery.start(
                lambda task_status: serve(
                    config,
                    dsn,
                    data_dir,
                    metrics_registry=self.registry,
                    handle_signals=False,
                    tune_gc=False,
                    task_status=task_status,
                )
            )
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# Blocking terminals


class Client:
    def __init__(self, port: int, phone: str, *, source: str = "127.0.0.1") -> None:
        self.phone = phone
        self.edition = Edition.V2019 if len(phone) == 20 else Edition.V2013
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=(source, 0)
        )
        self.decoder = StreamDecoder()
        self.serial = 0
        self.broken = False

    def next_serial(self) -> int:
        self.serial = (self.serial + 1) % 0x10000
        return self.serial

    def encode(self, message: Any) -> bytes:
        """The frame of ``message``; empty when our own encoder refuses it (a field too long
        for this edition's layout: such a frame is an attack of its own, sent raw elsewhere)."""
        try:
            return encode(
                message, phone=self.phone, serial=self.next_serial(), edition=self.edition
            )
        except LocalProtocolError:
            return b""

    def send(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.broken = True

    def wait_for(self, msg_id: int, reply_serial: int, timeout_s: float) -> Packet | None:
        """The server's answer to our frame ``reply_serial``; None on timeout or close."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.decoder:
                if isinstance(event, Packet) and getattr(event.message, "reply_serial", None) == (
                    reply_serial
                ):
                    return event
            left = deadline - time.monotonic()
            if left <= 0 or self.broken:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            except OSError:
                self.broken = True
                return None
            if not data:
                self.broken = True
                return None
            self.decoder.feed(data)

    def drain(self) -> None:
        """Read and drop whatever arrived (answers to attacks), without waiting."""
        self.sock.setblocking(False)
        try:
            while data := self.sock.recv(65536):
                self.decoder.feed(data)
                list(self.decoder)
            self.broken = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.broken = True
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def login(client: Client, terminal_id: str) -> str:
    serial = client.serial + 1
    client.send(
        client.encode(
            TerminalRegister(
                province=53,
                city=100,
                manufacturer="ACME",
                model="M1",
                terminal_id=terminal_id,
                plate_color=1,
                plate="云A00001",
            )
        )
    )
    answer = client.wait_for(0x8100, serial, ACK_TIMEOUT_S)
    code = getattr(answer.message, "auth_code", None) if answer else None
    assert isinstance(code, str), f"{client.phone} could not register: {answer}"
    authenticate(client, code)
    return code


def authenticate(client: Client, code: str) -> None:
    serial = client.serial + 1
    imei = "860000000000001" if client.edition is Edition.V2019 else None
    version = "1.0" if client.edition is Edition.V2019 else None
    client.send(client.encode(TerminalAuth(auth_code=code, imei=imei, software_version=version)))
    answer = client.wait_for(0x8001, serial, ACK_TIMEOUT_S)
    assert answer is not None
    assert getattr(answer.message, "result", None) == 0, answer


# ---------------------------------------------------------------------------------------------
# What attackers send


@st.composite
def attack_messages(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["register", "auth", "heartbeat", "location", "logout"]))
    if kind == "register":
        return TerminalRegister(
            province=draw(st.integers(0, 0xFFFF)),
            city=draw(st.integers(0, 0xFFFF)),
            manufacturer=draw(NASTY_TEXT.filter(lambda t: len(t.encode("gb18030")) <= 5)),
            model=draw(NASTY_TEXT.filter(lambda t: len(t.encode("gb18030")) <= 20)),
            terminal_id=draw(NASTY_TEXT.filter(lambda t: len(t.encode("gb18030")) <= 7)),
            plate_color=draw(st.integers(0, 255)),
            plate=draw(NASTY_TEXT),
        )
    if kind == "auth":
        return TerminalAuth(auth_code=draw(NASTY_TEXT))
    if kind == "heartbeat":
        return Heartbeat()
    if kind == "logout":
        return TerminalLogout()
    return location(draw(st.integers(0, 10_000)))


def mutate(wire: bytes, how: str, where: int, value: int) -> bytes:
    content = bytearray(wire)
    position = 1 + where % max(1, len(content) - 2)
    if how == "flip":
        content[position] ^= value or 1
    elif how == "truncate":
        del content[position:-1]
    elif how == "insert":
        content.insert(position, value)
    elif how == "bad_escape":
        content[position : position + 1] = b"\x7d" + bytes([value | 0x10])
    elif how == "length":  # rewrite the body length (bits 0-9 of the properties WORD)
        if len(content) > 5:
            content[3] = (content[3] & 0xFC) | (value & 0x03)
            content[4] = value
            return frame(bytes(_unframed(content)))
    elif how == "edition" and len(content) > 5:  # flip the 2019 version bit
        content[3] ^= 0x40
        return frame(bytes(_unframed(content)))
    return bytes(content)


def _unframed(content: bytearray) -> bytearray:
    """Header and body of a frame whose header we rewrote (its check code is recomputed)."""
    inner = bytes(content[1:-2]).replace(b"\x7d\x02", b"\x7e").replace(b"\x7d\x01", b"\x7d")
    return bytearray(inner)


# ---------------------------------------------------------------------------------------------
# The campaign


class Campaign(RuleBasedStateMachine):
    server: ServerThread
    proxy: DatabaseProxy
    sentinel: Client
    sentinel_code: str
    hostile_code: str
    reports = 0

    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.clients: list[Client] = []
        self.cut = False
        self.hostile: Client | None = None

    # -- attackers

    @rule(
        target=conns,
        phone=st.sampled_from((*ATTACKERS, SENTINEL)),
        source=st.sampled_from(ATTACKER_ADDRESSES),
    )
    def connect(self, phone: str, source: str) -> Client:
        client = Client(self.server.port, phone, source=source)
        self.clients.append(client)
        return client

    @rule(conn=conns, message=attack_messages())
    def send_message(self, conn: Client, message: Any) -> None:
        if conn.phone == SENTINEL and isinstance(message, TerminalRegister):
            # Another device registering the sentinel's phone; the same terminal id would be
            # the sentinel itself re-registering (allowed by design), not an attack.
            message = TerminalRegister(
                province=1,
                city=1,
                manufacturer="EVIL",
                model="X",
                terminal_id="EVIL",
                plate_color=1,
                plate=message.plate,
            )
        elif conn.phone == SENTINEL and not isinstance(message, Heartbeat | TerminalLogout):
            return  # guessing the sentinel's code would lock its phone; tested elsewhere
        conn.send(conn.encode(message))
        conn.drain()

    @rule(conn=conns, code=NASTY_TEXT, terminal_id=st.sampled_from(["EVIL", "SENT001", ""]))
    def login_attempt(self, conn: Client, code: str, terminal_id: str) -> None:
        """A registration (of any phone, the sentinel's included) or a guessed code."""
        if conn.phone == SENTINEL:
            # another device claiming the sentinel's phone: refused with result 3
            message: Any = TerminalRegister(
                province=1,
                city=1,
                manufacturer="EVIL",
                model="X",
                terminal_id=terminal_id if terminal_id != "SENT001" else "EVIL",
                plate_color=1,
                plate=code[:20],
            )
        elif terminal_id == "EVIL":
            imei = "860000000000009" if conn.edition is Edition.V2019 else None
            version = "1.0" if conn.edition is Edition.V2019 else None
            message = TerminalAuth(auth_code=code, imei=imei, software_version=version)
        else:
            message = TerminalRegister(
                province=53,
                city=1,
                manufacturer="ACME",
                model="M",
                terminal_id="A1",
                plate_color=1,
                plate=code,
            )
        conn.send(conn.encode(message))
        conn.drain()

    @rule(
        conn=conns,
        message=attack_messages(),
        how=st.sampled_from(["flip", "truncate", "insert", "bad_escape", "length", "edition"]),
        where=st.integers(0, 2000),
        value=st.integers(0, 255),
    )
    def send_mutated(self, conn: Client, message: Any, how: str, where: int, value: int) -> None:
        if conn.phone == SENTINEL:
            return
        conn.send(mutate(conn.encode(message), how, where, value))
        conn.drain()

    @rule(conn=conns, junk=st.binary(max_size=3000))
    def send_junk(self, conn: Client, junk: bytes) -> None:
        conn.send(junk)
        conn.drain()

    @rule(
        conn=conns,
        msg_id=st.integers(0, 0xFFFF),
        body=st.binary(max_size=1023),
        flags=st.integers(0, 0xFC00),
    )
    def send_raw_frame(self, conn: Client, msg_id: int, body: bytes, flags: int) -> None:
        """Any message id with any body and odd property bits, with a correct check code."""
        properties = (len(body) & 0x3FF) | (flags & 0xFC00)
        bcd = bytes.fromhex(conn.phone.rjust(12, "0")[-12:])
        header = msg_id.to_bytes(2, "big") + properties.to_bytes(2, "big") + bcd + b"\x00\x01"
        conn.send(frame(header + body))
        conn.drain()

    @rule(conn=consumes(conns))
    def close(self, conn: Client) -> None:
        conn.close()

    # -- the hostile authenticated terminal

    @rule(packages=st.integers(1, 60), size=st.integers(1, 1023), media_id=st.integers(1, 1000))
    def subpackage_flood(self, packages: int, size: int, media_id: int) -> None:
        """Packages of a large upload that never completes (one package short)."""
        hostile = self._hostile()
        if hostile is None:
            return
        upload = MultimediaData(
            media_id=media_id,
            media_type=0,
            media_format=0,
            event=0,
            channel=1,
            location=location(1),
            data=b"\xff" * (size * (packages + 1)),
        )
        wires = encode_split(
            upload,
            phone=HOSTILE,
            first_serial=hostile.next_serial(),
            edition=hostile.edition,
            max_body=size,
        )
        hostile.serial = (hostile.serial + len(wires)) % 0x10000
        hostile.send(b"".join(wires[:-1]))
        hostile.drain()

    def _hostile(self) -> Client | None:
        if self.hostile is None or self.hostile.broken:
            if self.cut:
                return None  # (logging in needs the cache; the sentinel covers that)
            self.hostile = Client(self.server.port, HOSTILE)
            self.clients.append(self.hostile)
            authenticate(self.hostile, type(self).hostile_code)
        return self.hostile

    # -- the database

    @rule()
    def cut_database(self) -> None:
        self.proxy.cut()
        self.cut = True

    @rule()
    def restore_database(self) -> None:
        self.proxy.restore()
        self.cut = False

    # -- invariants

    @invariant()
    def still_serving(self) -> None:
        assert self.server.alive, f"the server stopped: {self.server.failure!r}"
        sentinel = type(self).sentinel
        if sentinel.broken:  # it never should be: nothing may close it
            raise AssertionError("the sentinel terminal's connection was closed")
        type(self).reports += 1
        serial = sentinel.serial + 1
        sentinel.send(sentinel.encode(location(type(self).reports)))
        ack = sentinel.wait_for(0x8001, serial, ACK_TIMEOUT_S)
        assert ack is not None, "the sentinel's report was not acknowledged"
        assert getattr(ack.message, "result", None) == 0

    @invariant()
    def memory_within_caps(self) -> None:
        open_now = max(1.0, self.server.metric("jt808_connections_open"))
        assert self.server.metric("jt808_buffered_bytes") <= MAX_BUFFERED * open_now
        reassembly = self.server.metric("jt808_reassembly_bytes")
        assert self.server.running is not None
        limits = self.server.running.server.uploads.limits
        assert reassembly <= limits.max_bytes_total

    def teardown(self) -> None:
        for client in self.clients:
            client.close()
        self.proxy.restore()


def campaign_summary(server: ServerThread, rows: dict[str, int]) -> str:
    samples = {
        f"{sample.name}{sample.labels or ''}": sample.value
        for family in server.registry.collect()
        for sample in family.samples
        if sample.value
        and sample.name.endswith("_total")
        and any(
            word in sample.name
            for word in (
                "registrations",
                "decode_errors",
                "refused",
                "auth",
                "identity",
                "contained",
                "login",
                "reassembly",
                "connections_closed",
                "suppressed",
                "restarts",
            )
        )
    }
    lines = [f"campaign: {Campaign.reports} sentinel reports acknowledged, stored {rows}"]
    lines.extend(f"  {name} = {value:g}" for name, value in sorted(samples.items()))
    return "\n".join(lines)


@pytest.fixture
def campaign_server(db: str, tmp_path: Path) -> Iterator[tuple[ServerThread, DatabaseProxy]]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        http_port=0,
        max_buffered_bytes=MAX_BUFFERED,
        # an attacker's junk is closed after its failures; the sentinel never fails
        auth_timeout_s=20.0,
    )
    with DatabaseProxy.for_dsn(db) as proxy, ServerThread(proxy.dsn, tmp_path, config) as server:
        yield server, proxy


def test_the_server_survives_the_hostile_campaign(
    campaign_server: tuple[ServerThread, DatabaseProxy], db: str
) -> None:
    server, proxy = campaign_server
    Campaign.server = server
    Campaign.proxy = proxy
    Campaign.sentinel = Client(server.port, SENTINEL)
    Campaign.sentinel_code = login(Campaign.sentinel, "SENT001")
    hostile = Client(server.port, HOSTILE)
    Campaign.hostile_code = login(hostile, "HOST001")
    hostile.close()
    try:
        run_state_machine_as_test(
            Campaign,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
        assert server.alive
        # Every report acknowledged reaches the database once it is back (each has its own
        # time, so its own row); nothing from a terminal that never authenticated was stored.
        deadline = time.monotonic() + 60
        while True:
            with psycopg.connect(db) as conn:
                rows = dict(
                    conn.execute("SELECT phone, count(*) FROM positions GROUP BY phone").fetchall()
                )
            if rows.get(SENTINEL, 0) >= Campaign.reports or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert rows.get(SENTINEL, 0) == Campaign.reports
        assert set(rows) <= {SENTINEL, HOSTILE}, rows
        print(campaign_summary(server, rows))  # shown with -s: what the campaign exercised
    finally:
        Campaign.sentinel.close()
