"""What the server needs from the rest of the application, and in-memory stand-ins.

The server never imports ``storage``: the application wiring adapts the real services to these
small protocols.  The in-memory implementations serve the tests and a database-less demo.

* :class:`TerminalRegistry` -- who may register, which auth code each terminal holds.
* :class:`PositionSink` -- where positions go; ``submit`` answers with a :class:`Completion`
  that tells, once awaited, whether the batch is durable.  With ``ack = "durable"`` the server
  acknowledges a report only after its completion said durable.
* :class:`SessionDirectory` -- which connection holds which terminal, so that a reconnecting
  terminal takes over from its stale connection.
* :class:`MediaSink` -- where multimedia uploads (0x0801) go; ``store`` returns once the file
  and its metadata are durable.
* :class:`SessionRecords` and :class:`ClusterTransport` -- the online sessions of all nodes
  (a database table) and the channel that carries commands between nodes (PostgreSQL
  LISTEN/NOTIFY); see :mod:`ingest.cluster`.  Both take and return plain values, so the storage
  implementations satisfy them without importing this package.
* :class:`AlertFeed` -- the numbered alert events that ``GET /alerts/stream`` serves
  (:class:`InMemoryAlertFeed` in one process; the ``alert_events`` table with LISTEN/NOTIFY
  across nodes).  Alerts are plain JSON objects here: the server does not know the rules.
* :class:`MasterDataAdmin` -- vehicles, fences and trip filings read and written by the
  operator port (``/vehicles``, ``/fences``, ``/filings``), as plain JSON values;
  :class:`InMemoryMasterDataAdmin` for tests (the database adapter validates with
  ``storage.masterdata``'s checks).
* :class:`OperatorAccess` -- the operator accounts behind the port's bearer tokens, and the
  audit trail; :class:`InMemoryOperatorAccess` for tests.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

import trio

from ingest.access import Actor, AuditEntry, Principal
from protocol.header import Edition, Header
from protocol.messages.location import Location
from protocol.messages.terminal import (
    REGISTER_OK,
    REGISTER_TERMINAL_TAKEN,
    REGISTER_TERMINAL_UNKNOWN,
    TerminalRegister,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Positions


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PositionRecord:
    """One position to store.

    ``header`` is the header of the frame that carried it (phone, serial, message id, edition
    layout); ``edition`` the edition its body was read as.  ``batch_type`` is None for 0x0200
    and the 0x0704 batch type otherwise (0 normal, 1 back-filled, JT/T 808-2019 table 61);
    ``index`` is the position's place in its 0x0704 (0 for 0x0200).  ``received_at`` is the
    server's wall-clock time of receipt, timezone-aware.
    """

    header: Header
    edition: Edition
    location: Location
    batch_type: int | None
    index: int
    received_at: datetime

    @property
    def phone(self) -> str:
        return self.header.phone

    @property
    def msg_id(self) -> int:
        return self.header.msg_id

    @property
    def serial(self) -> int:
        return self.header.serial


class Completion(Protocol):
    """The outcome of one :meth:`PositionSink.submit`."""

    async def wait(self) -> bool:
        """Wait until the batch is settled: True once durable, False if it was lost."""
        ...

    def outcome(self) -> bool | None:
        """Without waiting: None while in flight, else what :meth:`wait` returns."""
        ...


class PositionSink(Protocol):
    async def submit(self, records: Sequence[PositionRecord]) -> Completion:
        """Take a batch: the positions of one or more messages of one connection, in order
        (the server submits what one read brought together).  May block to push back.

        The returned completion must settle eventually (durable or not), also when the sink
        shuts down, or the connection waiting on it stops reading.

        A sink may also offer ``submit_nowait(records) -> Completion | None``: the same
        without waiting, None (nothing taken) when it would have to wait.  The server then
        handles plain reports without waking the connection's task (:mod:`ingest.readiness`).
        """
        ...


class CompletionEvent:
    """A :class:`Completion` settled once with :meth:`settle` (from the trio thread).

    A sink running its work in a worker thread settles it with
    ``trio.from_thread.run_sync(completion.settle, durable)``.
    """

    __slots__ = ("_durable", "_event")

    def __init__(self) -> None:
        self._event = trio.Event()
        self._durable = False

    @property
    def settled(self) -> bool:
        return self._event.is_set()

    def settle(self, durable: bool) -> None:
        if self._event.is_set():
            raise RuntimeError("completion settled twice")
        self._durable = durable
        self._event.set()

    async def wait(self) -> bool:
        await self._event.wait()
        return self._durable

    def outcome(self) -> bool | None:
        return self._durable if self._event.is_set() else None


class InMemoryPositionSink:
    """Keeps positions in a list.  Start :meth:`run` in a nursery before submitting.

    Test switches: ``delay_s`` waits before each batch becomes durable; :meth:`stall` holds
    every batch until :meth:`resume`; ``durable = False`` settles batches as lost (their
    positions are not kept).
    """

    # Batches waiting for the worker.  Every connection has at most ``max_unacked`` batches
    # in flight; past this the submitters block, which is the sink's own back-pressure.
    QUEUE_BATCHES = 1024

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.durable = True
        self.records: list[PositionRecord] = []
        self.submitted = 0  # positions handed to submit, settled or not
        self._send, self._receive = trio.open_memory_channel[
            tuple[Sequence[PositionRecord], CompletionEvent]
        ](self.QUEUE_BATCHES)
        self._running = trio.Event()
        self._running.set()

    @property
    def stalled(self) -> bool:
        return not self._running.is_set()

    def stall(self) -> None:
        if self._running.is_set():
            self._running = trio.Event()

    def resume(self) -> None:
        self._running.set()

    def phones(self) -> list[str]:
        return [r.phone for r in self.records]

    async def submit(self, records: Sequence[PositionRecord]) -> CompletionEvent:
        completion = CompletionEvent()
        self.submitted += len(records)
        await self._send.send((tuple(records), completion))
        return completion

    def submit_nowait(self, records: Sequence[PositionRecord]) -> CompletionEvent | None:
        completion = CompletionEvent()
        try:
            self._send.send_nowait((tuple(records), completion))
        except trio.WouldBlock:
            return None
        self.submitted += len(records)
        return completion

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for records, completion in self._receive:
            await self._running.wait()
            if self.delay_s:
                await trio.sleep(self.delay_s)
            durable = self.durable
            if durable:
                self.records.extend(records)
            completion.settle(durable)


# ---------------------------------------------------------------------------------------------
# Terminals


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationRequest:
    """A 0x0100 to decide on, with the auth code to issue if it is accepted.

    ``policy`` is the server's registration policy: "open" accepts every terminal (recording
    unprovisioned ones as such), "registry" only provisioned ones.
    """

    phone: str
    edition: Edition
    message: TerminalRegister
    auth_code: str
    policy: str
    at: datetime
    peer: str = ""  # the connection's peer address, for the terminal's event log


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RegistrationOutcome:
    """``result`` is a JT/T 808-2019 table 9 code (0 ok, 1 vehicle already registered,
    2 vehicle not in database, 3 terminal already registered, 4 terminal not in database), or
    None when the registry cannot decide now (its database is unreachable): the 0x0100 is then
    left unanswered and the terminal sends it again on its retransmission schedule, as for a
    report whose storage failed.  ``auth_code`` is the code to send back on success (normally
    the one proposed)."""

    result: int | None
    auth_code: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AuthRequest:
    """A 0x0102; ``imei`` and ``software_version`` are sent by 2019 terminals only."""

    phone: str
    edition: Edition
    auth_code: str
    imei: str | None
    software_version: str | None
    at: datetime
    peer: str = ""


class TerminalRegistry(Protocol):
    """Registrations and authentications (JT/T 808-2019 8.5-8.8).

    Identity (article 18: changes of terminals go through the platform centre): a phone that
    holds an auth code is registered to the terminal that obtained it; a 0x0100 for it from a
    terminal with another manufacturer or terminal id is answered result 3 (terminal already
    registered) until the platform releases the phone.  The same terminal registering again
    (it lost its code) is answered with a new code.  Neither method raises for a broken
    backing store: they answer "cannot decide now" (None) instead.
    """

    async def register(self, request: RegistrationRequest) -> RegistrationOutcome: ...

    async def authenticate(self, request: AuthRequest) -> bool | None:
        """True if the code is the one issued to the terminal (records IMEI and firmware),
        False if not, None if that cannot be decided now."""
        ...

    async def lookup(self, phone: str) -> TerminalInfo | None: ...


@dataclasses.dataclass(slots=True, kw_only=True)
class TerminalInfo:
    """What the in-memory registry knows about one terminal."""

    phone: str
    provisioned: bool
    auth_code: str | None = None
    plate: str | None = None
    terminal_id: str | None = None
    imei: str | None = None
    software_version: str | None = None
    registered_at: datetime | None = None
    authenticated_at: datetime | None = None


class InMemoryTerminalRegistry:
    """A dict-backed :class:`TerminalRegistry`.  :meth:`provision` adds a known terminal."""

    def __init__(self) -> None:
        self.terminals: dict[str, TerminalInfo] = {}

    def provision(self, phone: str, *, auth_code: str | None = None) -> TerminalInfo:
        info = TerminalInfo(phone=phone, provisioned=True, auth_code=auth_code)
        self.terminals[phone] = info
        return info

    async def register(self, request: RegistrationRequest) -> RegistrationOutcome:
        await trio.lowlevel.checkpoint()
        info = self.terminals.get(request.phone)
        if info is None:
            if request.policy != "open":
                return RegistrationOutcome(result=REGISTER_TERMINAL_UNKNOWN)
            info = TerminalInfo(phone=request.phone, provisioned=False)
            self.terminals[request.phone] = info
        elif request.policy != "open" and not info.provisioned:
            return RegistrationOutcome(result=REGISTER_TERMINAL_UNKNOWN)
        if info.auth_code is not None and not same_terminal(
            info.terminal_id, request.message.terminal_id
        ):
            return RegistrationOutcome(result=REGISTER_TERMINAL_TAKEN)
        info.auth_code = request.auth_code
        info.plate = request.message.plate
        info.terminal_id = request.message.terminal_id
        info.registered_at = request.at
        return RegistrationOutcome(result=REGISTER_OK, auth_code=request.auth_code)

    async def authenticate(self, request: AuthRequest) -> bool:
        await trio.lowlevel.checkpoint()
        info = self.terminals.get(request.phone)
        if info is None or info.auth_code is None or info.auth_code != request.auth_code:
            return False
        if request.imei is not None:
            info.imei = request.imei
        if request.software_version is not None:
            info.software_version = request.software_version
        info.authenticated_at = request.at
        return True

    async def lookup(self, phone: str) -> TerminalInfo | None:
        await trio.lowlevel.checkpoint()
        return self.terminals.get(phone)

    def reset(self, phone: str) -> None:
        """Release ``phone`` (the platform centre's ``jt808 terminals reset``)."""
        info = self.terminals.get(phone)
        if info is not None:
            info.auth_code = None
            info.terminal_id = None


def same_terminal(registered: str | None, claimed: str | None) -> bool:
    """Whether a 0x0100's terminal id proves it comes from the terminal that registered.

    An empty id proves nothing (devices that send none must be released by the platform).
    """
    registered = (registered or "").strip()
    return bool(registered) and registered == (claimed or "").strip()


# ---------------------------------------------------------------------------------------------
# Sessions


class SessionHandle(Protocol):
    """A connection as the directory sees it."""

    @property
    def phone(self) -> str | None: ...

    def kick(self) -> None:
        """Close the connection (it lost its terminal to a newer connection)."""
        ...


H = TypeVar("H", bound=SessionHandle)


class SessionDirectory(Protocol[H]):
    def claim(self, phone: str, handle: H) -> H | None:
        """Make ``handle`` the holder of ``phone``; returns the previous holder, if another."""
        ...

    def release(self, phone: str, handle: H) -> None:
        """Forget ``handle`` if it still holds ``phone``."""
        ...

    def get(self, phone: str) -> H | None:
        """The holder of ``phone``, if any."""
        ...

    def holders(self) -> Iterator[H]: ...


class InMemorySessionDirectory(Generic[H]):
    """The directory of one server process (terminals of other workers are not seen).

    Bounded by the server's connection cap: at most one entry per open connection.
    """

    def __init__(self) -> None:
        self._holders: dict[str, H] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def get(self, phone: str) -> H | None:
        return self._holders.get(phone)

    def claim(self, phone: str, handle: H) -> H | None:
        previous = self._holders.get(phone)
        self._holders[phone] = handle
        return previous if previous is not handle else None

    def release(self, phone: str, handle: H) -> None:
        if self._holders.get(phone) is handle:
            del self._holders[phone]

    def holders(self) -> Iterator[H]:
        return iter(list(self._holders.values()))


# ---------------------------------------------------------------------------------------------
# Multimedia


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MediaRecord:
    """One multimedia upload (0x0801, JT/T 808-2019 8.51) to store.

    ``header`` is the header of the frame that completed it (its phone addresses the terminal);
    ``media_type``/``media_format``/``event``/``channel`` are the codes of 8.50 (0 JPEG, 1 TIF,
    2 MP3, 3 WAV, 4 WMV for the format); ``location`` is the position sent with it (None in
    2011); ``received_at`` the server's wall-clock time of receipt.
    """

    header: Header
    media_id: int
    media_type: int
    media_format: int
    event: int
    channel: int
    location: Location | None
    data: bytes
    received_at: datetime

    @property
    def phone(self) -> str:
        return self.header.phone


class MediaSink(Protocol):
    async def store(self, record: MediaRecord) -> bool:
        """Keep ``record``; True once file and metadata are durable (fsynced and committed),
        False if they could not be stored (the upload is then not acknowledged)."""
        ...


class InMemoryMediaSink:
    """Keeps uploads in a list; ``durable = False`` makes every store fail."""

    def __init__(self) -> None:
        self.records: list[MediaRecord] = []
        self.durable = True

    async def store(self, record: MediaRecord) -> bool:
        await trio.lowlevel.checkpoint()
        if self.durable:
            self.records.append(record)
        return self.durable


# ---------------------------------------------------------------------------------------------
# Cluster


# ("online" | "offline", phone, connected_since, peer ("" for offline))
SessionChange = tuple[str, str, datetime, str]
# (phone, connected_since, peer): one online session of a node, as SessionRecords.replace takes it
SessionRow = tuple[str, datetime, str]


class SessionRecords(Protocol):
    """The ``sessions`` table: which node holds which terminal.

    Methods never raise for database trouble: they log and report failure (the rows are
    advisory; a node still serves its own terminals without them).
    """

    async def clear_node(self, node: str) -> bool:
        """Remove every row of ``node`` (its stale rows at start, all of them at stop)."""
        ...

    async def online(self, phone: str, node: str, connected_since: datetime, peer: str) -> bool:
        """Record that ``node`` holds ``phone`` (replacing any other node's row)."""
        ...

    async def offline(self, phone: str, node: str, connected_since: datetime) -> bool:
        """Remove the row of ``phone`` if it is still the one ``node`` recorded."""
        ...

    async def record(self, node: str, changes: Sequence[SessionChange]) -> bool:
        """:meth:`online`/:meth:`offline` for each change, in order, written together."""
        ...

    async def replace(self, node: str, rows: Sequence[SessionRow]) -> bool:
        """Make ``rows`` (phone, connected_since, peer) the whole set of ``node``'s rows, in one
        transaction: the node's other rows are removed, each of ``rows`` is upserted (a phone
        appears at most once).  A row another node wrote for one of these phones with a later
        ``connected_since`` is left alone: that node took the terminal over and this node's
        connection is the stale one, closed at its idle timeout.  Brings the table back in step
        after writes of :meth:`record` were lost."""
        ...

    async def locate(self, phones: Sequence[str]) -> tuple[str, str] | None:
        """(phone, node) of the first of ``phones`` that has a row, or None."""
        ...


class ClusterTransport(Protocol):
    """Carries JSON objects to a node: PostgreSQL LISTEN/NOTIFY in production."""

    async def publish(self, node: str, message: Mapping[str, Any]) -> bool:
        """Send ``message`` to ``node``; False if it could not be sent."""
        ...

    async def listen(
        self,
        node: str,
        inbox: trio.MemorySendChannel[dict[str, Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver the messages published to ``node`` into ``inbox`` until cancelled; report
        readiness once listening."""
        ...


class InMemorySessionRecords:
    """A dict standing in for the ``sessions`` table (one process, or nodes in one test)."""

    async def record(self, node: str, changes: Sequence[SessionChange]) -> bool:
        for kind, phone, since, peer in changes:
            if kind == "online":
                await self.online(phone, node, since, peer)
            else:
                await self.offline(phone, node, since)
        return True

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, datetime, str]] = {}

    async def clear_node(self, node: str) -> bool:
        await trio.lowlevel.checkpoint()
        for phone in [p for p, row in self.rows.items() if row[0] == node]:
            del self.rows[phone]
        return True

    async def online(self, phone: str, node: str, connected_since: datetime, peer: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.rows[phone] = (node, connected_since, peer)
        return True

    async def offline(self, phone: str, node: str, connected_since: datetime) -> bool:
        await trio.lowlevel.checkpoint()
        row = self.rows.get(phone)
        if row is not None and row[:2] == (node, connected_since):
            del self.rows[phone]
        return True

    async def replace(self, node: str, rows: Sequence[SessionRow]) -> bool:
        await trio.lowlevel.checkpoint()
        current = {phone: (since, peer) for phone, since, peer in rows}
        for phone in [p for p, row in self.rows.items() if row[0] == node and p not in current]:
            del self.rows[phone]
        for phone, (since, peer) in current.items():
            held = self.rows.get(phone)
            if held is None or held[0] == node or held[1] <= since:
                self.rows[phone] = (node, since, peer)
        return True

    async def locate(self, phones: Sequence[str]) -> tuple[str, str] | None:
        await trio.lowlevel.checkpoint()
        for phone in phones:
            row = self.rows.get(phone)
            if row is not None:
                return phone, row[0]
        return None


class InMemoryTransport:
    """Delivers messages between nodes of one process (tests)."""

    def __init__(self) -> None:
        self._inboxes: dict[str, trio.MemorySendChannel[dict[str, Any]]] = {}

    async def publish(self, node: str, message: Mapping[str, Any]) -> bool:
        inbox = self._inboxes.get(node)
        if inbox is None:
            await trio.lowlevel.checkpoint()
            return False
        try:
            await inbox.send(dict(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def listen(
        self,
        node: str,
        inbox: trio.MemorySendChannel[dict[str, Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._inboxes[node] = inbox
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            if self._inboxes.get(node) is inbox:
                del self._inboxes[node]


# ---------------------------------------------------------------------------------------------
# Alerts


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AlertFilter:
    """Which alert events a stream wants: each given field must equal the alert's (None: any)."""

    unit: str | None = None
    rule: str | None = None
    state: str | None = None
    severity: str | None = None

    def matches(self, alert: Mapping[str, Any]) -> bool:
        return (
            (self.unit is None or alert.get("unit") == self.unit)
            and (self.rule is None or alert.get("rule") == self.rule)
            and (self.state is None or alert.get("state") == self.state)
            and (self.severity is None or alert.get("severity") == self.severity)
        )


class UnknownAlertValueError(ValueError):
    """A filter names a rule or state that no alert event carries (the operator port answers
    400 with ``field``, ``value`` and the ``valid`` values)."""

    def __init__(self, field: str, value: str, valid: Sequence[str]) -> None:
        self.field = field
        self.value = value
        self.valid = tuple(valid)
        super().__init__(f"unknown {field} {value[:60]!r}; valid: {', '.join(self.valid)}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AlertVocabulary:
    """The values an alert event's ``rule`` and ``state`` can take, in the order to list them;
    None where the feed does not know them (then any value is taken, and matches only events
    that carry it).

    The alert engine owns the lists (``alerts.RULE_NAMES``, ``alerts.AlertState``): this
    package does not import ``alerts``, so the wiring hands them over with the feed.
    """

    rules: tuple[str, ...] | None = None
    states: tuple[str, ...] | None = None

    def check(self, filters: AlertFilter) -> None:
        """Raise :class:`UnknownAlertValueError` for the first of ``filters.rule`` and
        ``filters.state`` that is not a known value."""
        for field, value, valid in (
            ("rule", filters.rule, self.rules),
            ("state", filters.state, self.states),
        ):
            if value is not None and valid is not None and value not in valid:
                raise UnknownAlertValueError(field, value, valid)


class AlertFeed(Protocol):
    """Alert events numbered by a sequence that only grows (``seq`` > 0).

    Each event is an alert record as JSON (the shape of ``alerts.Alert.to_json``) at one moment
    of its life; an alert that changes state appears again under a new ``seq``.

    A method that cannot answer because the store behind the feed is down raises
    :class:`ServiceUnavailableError` (the operator port answers a new stream 503 and ends an
    open one, whose client resumes with Last-Event-ID); it never lets the store's own errors
    out.
    """

    @property
    def vocabulary(self) -> AlertVocabulary:
        """The rule and state values its events carry: a stream filtering on any other value
        is answered 400."""
        ...

    async def last_seq(self) -> int:
        """The newest event's ``seq`` (0 if there is none)."""
        ...

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` events with ``seq`` above the given one that pass ``filters``,
        oldest first."""
        ...

    async def wait_for_new(self, after_seq: int) -> None:
        """Return once an event newer than ``after_seq`` may exist.  It may wait as long as
        nothing is new: the stream's heartbeats are sent by a task of their own, paced by the
        time since the last write, not by this returning.  Spurious returns are allowed, though
        each costs the stream a round of queries.  Must honour cancellation promptly: a stream
        is cancelled when its client leaves."""
        ...


class InMemoryAlertFeed:
    """An :class:`AlertFeed` in a ring buffer: the alert engine of this process calls
    :meth:`publish` (from the trio thread); streams read.

    Only the newest ``max_events`` are kept: a stream resuming from an older ``seq`` misses
    the ones that fell out (the database feed keeps everything).
    """

    # An alert event is ~1 KB of JSON, so 10 000 are ~10 MB -- hours of a large fleet's alerts,
    # far more than a reconnecting ``alerts tail`` needs to catch up.
    MAX_EVENTS = 10_000

    def __init__(
        self, *, max_events: int = MAX_EVENTS, vocabulary: AlertVocabulary | None = None
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        # Unknown by default: whoever publishes decides what rules exist.
        self.vocabulary = vocabulary if vocabulary is not None else AlertVocabulary()
        self._events: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(
            maxlen=max_events
        )
        self._seq = 0
        self._new = trio.Event()

    def publish(self, alert: Mapping[str, Any]) -> int:
        """Append an event; returns its ``seq``."""
        self._seq += 1
        self._events.append((self._seq, dict(alert)))
        self._new.set()
        self._new = trio.Event()
        return self._seq

    async def last_seq(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._seq

    async def events_after(
        self, seq: int, limit: int, filters: AlertFilter
    ) -> list[tuple[int, dict[str, Any]]]:
        await trio.lowlevel.checkpoint()
        if not self._events:
            return []
        first = self._events[0][0]  # seqs in the ring are consecutive
        out: list[tuple[int, dict[str, Any]]] = []
        for event in itertools.islice(self._events, max(0, seq - first + 1), None):
            if filters.matches(event[1]):
                out.append(event)
                if len(out) >= limit:
                    break
        return out

    async def wait_for_new(self, after_seq: int) -> None:
        # Returns at every publish, even of events a stream's filters pass over; the stream's
        # heartbeat does not depend on how often this returns.
        if self._seq > after_seq:
            await trio.lowlevel.checkpoint()
            return
        await self._new.wait()


# ---------------------------------------------------------------------------------------------
# Master data administration


class MasterDataRejected(Exception):  # noqa: N818 - the name says what the caller sees
    """Master data refused as a whole (nothing was written); ``problems`` names each."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


class MasterDataAdmin(Protocol):
    """Vehicles, fences and trip filings for the operator port, as decoded JSON values.

    Writes are all-or-nothing: invalid input raises :class:`MasterDataRejected` listing every
    problem and stores nothing.  A write returns the stored ids in input order, once the
    change is in effect for the rules of this node.  Any method raises
    :class:`ServiceUnavailableError` when the store cannot answer now (a write cut off while it
    committed may or may not have been stored; repeating it is safe, writes are upserts).
    Formats (the keys of the CSV imports):

    * vehicle: ``{"plate", "phone" (digits or null), "unit", "category", "exempt" (bool),
      "max_speed_kmh" (optional)}``, matched by plate;
    * fences: a GeoJSON FeatureCollection (``geofence.geojson``), matched by id or name;
    * filing: ``{"plate", "start", "end" (ISO 8601; China time without an offset),
      "destination" (fence name or null), "purpose", "passengers", "approver", "filed_at"
      (optional: what the client claims; the platform stamps its own receipt, ``received_at``),
      "state" (optional, default approved), "id" (optional: the filing corrected, a new
      version)}``, matched by id, else by vehicle and window.  Read back with an ``"id"`` and
      times as ISO 8601 with their offset.
    """

    async def add_vehicles(self, items: list[Any], *, actor: Actor | None = None) -> list[int]:
        """Store vehicles; ``actor`` (None: unnamed) is who the audit trail names."""
        ...

    async def add_fences(
        self, collection: Mapping[str, Any], *, actor: Actor | None = None
    ) -> list[int]: ...

    async def add_filings(self, items: list[Any], *, actor: Actor | None = None) -> list[int]: ...

    async def vehicles(self) -> list[dict[str, Any]]: ...

    async def fences(self) -> dict[str, Any]: ...

    async def filings(self, since: datetime | None) -> list[dict[str, Any]]:
        """Filings (every state) ending at or after ``since`` (None: all), by id."""
        ...

    async def filing(self, filing_id: int) -> dict[str, Any] | None:
        """One filing as :meth:`filings` gives it, with ``versions``: every version of it,
        oldest first, with when each arrived; None when there is no such filing."""
        ...


_FILING_KEYS = frozenset(
    {"plate", "start", "end", "destination", "purpose", "passengers", "approver"}
)


class InMemoryMasterDataAdmin:
    """A :class:`MasterDataAdmin` in dicts, with only the checks the tests need: objects with
    the required keys, known plates and destinations, ISO times with end after start.
    ``changed`` counts successful writes."""

    def __init__(self, *, wall_clock: Callable[[], datetime]) -> None:
        self.wall_clock = wall_clock
        self._vehicles: dict[str, dict[str, Any]] = {}
        self._fences: dict[str, dict[str, Any]] = {}  # by name
        self._filings: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self.changed = 0

    async def add_vehicles(self, items: list[Any], *, actor: Actor | None = None) -> list[int]:
        await trio.lowlevel.checkpoint()
        required = {"plate", "phone", "unit", "category", "exempt"}
        problems = [
            f"vehicle {i}: missing keys {sorted(required - set(item))}"
            for i, item in enumerate(items)
            if not isinstance(item, Mapping) or not required <= set(item)
        ]
        if problems:
            raise MasterDataRejected(problems)
        ids = []
        for item in items:
            old = self._vehicles.get(item["plate"])
            vehicle_id = next(self._ids) if old is None else old["id"]
            self._vehicles[item["plate"]] = {"max_speed_kmh": None, **item, "id": vehicle_id}
            ids.append(vehicle_id)
        self.changed += 1
        return ids

    async def add_fences(
        self, collection: Mapping[str, Any], *, actor: Actor | None = None
    ) -> list[int]:
        await trio.lowlevel.checkpoint()
        features = collection.get("features")
        if collection.get("type") != "FeatureCollection" or not isinstance(features, list):
            raise MasterDataRejected(["the document is not a GeoJSON FeatureCollection"])
        problems = [
            f"feature {i}: properties.name is required"
            for i, f in enumerate(features)
            if not isinstance(f, Mapping)
            or not isinstance(f.get("properties"), Mapping)
            or not f["properties"].get("name")
        ]
        if problems:
            raise MasterDataRejected(problems)
        ids = []
        for feature in features:
            name = feature["properties"]["name"]
            old = self._fences.get(name)
            fence_id = next(self._ids) if old is None else old["id"]
            self._fences[name] = {**feature, "id": fence_id}
            ids.append(fence_id)
        self.changed += 1
        return ids

    async def add_filings(self, items: list[Any], *, actor: Actor | None = None) -> list[int]:
        await trio.lowlevel.checkpoint()
        problems = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                problems.append(f"filing {i}: expected a JSON object")
                continue
            missing = sorted(_FILING_KEYS - {"destination"} - set(item))
            if missing:
                problems.append(f"filing {i}: missing keys {missing}")
                continue
            if item["plate"] not in self._vehicles:
                problems.append(f"filing {i}: unknown vehicle plate {item['plate']!r}")
            destination = item.get("destination")
            if destination is not None and destination not in self._fences:
                problems.append(f"filing {i}: unknown fence {destination!r} as destination")
            try:
                if datetime.fromisoformat(item["end"]) <= datetime.fromisoformat(item["start"]):
                    problems.append(f"filing {i}: end is not after start")
            except (TypeError, ValueError):
                problems.append(f"filing {i}: start and end must be ISO 8601 times")
        if problems:
            raise MasterDataRejected(problems)
        ids = []
        for item in items:
            key = (item["plate"], item["start"], item["end"])
            old = self._filings.get(key)
            filing_id = next(self._ids) if old is None else old["id"]
            filed_at = item.get("filed_at") or self.wall_clock().isoformat()
            self._filings[key] = {
                "destination": None,
                "state": "approved",
                **item,
                "filed_at": filed_at if old is None else old["filed_at"],
                "id": filing_id,
            }
            ids.append(filing_id)
        self.changed += 1
        return ids

    async def vehicles(self) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        return sorted(self._vehicles.values(), key=lambda v: int(v["id"]))

    async def fences(self) -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        features = sorted(self._fences.values(), key=lambda f: int(f["id"]))
        return {"type": "FeatureCollection", "features": features}

    async def filings(self, since: datetime | None) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        return sorted(
            (
                f
                for f in self._filings.values()
                if since is None or datetime.fromisoformat(f["end"]) >= since
            ),
            key=lambda f: int(f["id"]),
        )

    async def filing(self, filing_id: int) -> dict[str, Any] | None:
        await trio.lowlevel.checkpoint()
        found = next((f for f in self._filings.values() if int(f["id"]) == filing_id), None)
        return None if found is None else {**found, "versions": [dict(found)]}


# ---------------------------------------------------------------------------------------------
# Backing services


class ServiceUnavailableError(Exception):
    """A backing service cannot answer now (the database behind master data or the alert feed
    is unreachable or restarting); the same request may succeed later.  Adapters raise it in
    place of their store's own errors, and the operator port answers 503 ``unavailable``."""


# ---------------------------------------------------------------------------------------------
# Operator access


class OperatorAccess(Protocol):
    """Operator accounts and the audit trail, for the operator port (:mod:`ingest.access`
    decides what each role may do).  Any method raises :class:`ServiceUnavailableError` when
    its store cannot answer now (the port answers 503: it never lets a request through
    unchecked, nor a write unrecorded)."""

    async def authenticate(self, token: str) -> Principal | None:
        """The account holding the bearer ``token``; None when the token is unknown, expired
        or revoked."""
        ...

    async def record(self, entry: AuditEntry) -> None:
        """Append ``entry`` to the audit trail (durably, before returning)."""
        ...

    async def audit(
        self, *, since: datetime | None, user: str | None, unit: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """Audit rows at or after ``since``, by ``user``, about ``unit`` (None: any), oldest
        first, at most ``limit``; JSON values (times as ISO 8601)."""
        ...


class InMemoryOperatorAccess:
    """An :class:`OperatorAccess` in dicts, for tests and a database-less demo: ``tokens``
    maps each bearer token to its principal; ``entries`` is the audit trail."""

    # The audit entries kept: a test makes a few dozen writes; far more means a runaway loop.
    MAX_ENTRIES = 10_000

    def __init__(self, tokens: Mapping[str, Principal] | None = None) -> None:
        self.tokens = dict(tokens or {})
        self.entries: collections.deque[AuditEntry] = collections.deque(maxlen=self.MAX_ENTRIES)

    async def authenticate(self, token: str) -> Principal | None:
        await trio.lowlevel.checkpoint()
        return self.tokens.get(token)

    async def record(self, entry: AuditEntry) -> None:
        await trio.lowlevel.checkpoint()
        self.entries.append(entry)

    async def audit(
        self, *, since: datetime | None, user: str | None, unit: str | None, limit: int
    ) -> list[dict[str, Any]]:
        await trio.lowlevel.checkpoint()
        rows = [
            {
                "actor": e.actor.name,
                "source": e.actor.source,
                "action": e.action,
                "object_kind": e.kind,
                "object_key": e.key,
                "unit": e.unit,
                "before": e.before,
                "after": e.after,
            }
            for e in self.entries
            if (user is None or e.actor.name == user) and (unit is None or e.unit == unit)
        ]
        return rows[:limit]


# ---------------------------------------------------------------------------------------------
# The operator console


class ConsoleData(Protocol):
    """What the operator console reads (:mod:`ingest.console_api`), as JSON values: times are
    ISO 8601 strings in China time (+08:00).  Any method raises
    :class:`ServiceUnavailableError` when its store cannot answer now, and
    :class:`MasterDataRejected` when its store refuses a value it was given (text with NUL or an
    unpaired surrogate, which PostgreSQL cannot hold): the request's fault, answered 400.

    A position entry is ``{"vehicle_id", "plate", "unit", "category", "phone", "device_time",
    "received_at", "lat", "lon", "speed_kmh", "direction"}``; an alert is the record the alert
    stream carries.
    """

    @property
    def vocabulary(self) -> AlertVocabulary:
        """The rule and state values alerts carry (a list filtering on another is 400)."""
        ...

    async def latest_positions(self, received_since: datetime | None) -> list[dict[str, Any]]:
        """The latest position (by device time) of every vehicle that has one; with
        ``received_since``, only of the vehicles with positions received at or after it, each
        the latest of those."""
        ...

    async def alerting_vehicles(self) -> set[int]:
        """The ids of the vehicles with an alert in state open or pending_backfill."""
        ...

    async def vehicle(self, vehicle_id: int) -> dict[str, Any] | None:
        """``{"id", "plate", "phone", "unit", "category", "exempt", "max_speed_kmh"}``."""
        ...

    async def bindings(self, vehicle_id: int) -> list[dict[str, Any]] | None:
        """The terminals fitted to the vehicle, oldest first: ``{"phone", "from", "to"}`` (None
        bounds: open); None when there is no such vehicle."""
        ...

    async def track(
        self, vehicle_id: int, start: datetime, end: datetime, max_points: int
    ) -> dict[str, Any]:
        """``{"positions": [{"device_time", "lat", "lon", "speed_kmh", "direction"}], "thinned",
        "trips": [{"started_at", "ended_at", "distance_km", "filing_id"}], "alerts"}``: the
        positions with device time in [start, end), evenly thinned to ``max_points``."""
        ...

    async def alerts(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        filters: AlertFilter,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Alerts opened in [since, until), newest first, at most ``limit``, each with
        ``"acknowledged"`` and ``"notes"`` (how many)."""
        ...

    async def alert(self, alert_id: str) -> dict[str, Any] | None:
        """The alert with ``"events"`` (``{"seq", "at", "alert"}``) and ``"notes"`` (``{"at",
        "user", "text", "acknowledged"}``), or None."""
        ...

    async def add_note(
        self, alert_id: str, *, text: str, acknowledge: bool, actor: Actor
    ) -> dict[str, Any] | None:
        """Append a note to the alert and its row to the audit trail (``alert.note`` or
        ``alert.acknowledge``), together; the note, or None when there is no such alert."""
        ...

    async def violations(self, period: str, unit: str | None) -> dict[str, Any]:
        """The violation report of the China-time month ``period`` (``YYYY-MM``):
        ``{"period", "violations": [{"unit", "rule", "violations", "vehicles"}],
        "backfilling": [{"unit", "in_time", "late", "claimed_earlier"}]}``; ValueError for a
        bad period."""
        ...

    async def violations_csv(self, period: str, unit: str | None) -> str:
        """The same report as the CSV of ``jt808 report violations --csv``."""
        ...
