"""The pure per-connection session: decoded frames in, actions out.

No I/O and no clock: every input carries ``now`` (monotonic seconds) and, where a record is
made, ``wall`` (an aware datetime).  The server performs the returned actions in order and
feeds the outcome of the asynchronous ones back:

=====================  =======================================  ==============================
action                 the server does                          and then calls
=====================  =======================================  ==============================
:class:`Send`          writes ``wire`` to the terminal          --
:class:`Store`         ``sink.submit(records)``, awaits it      :meth:`Session.storage_done`
:class:`Register`      ``registry.register(request)``           :meth:`Session.registration_done`
:class:`Authenticate`  ``registry.authenticate(request)``       :meth:`Session.authentication_done`
:class:`Claim`         takes the phone over in the directory    --
:class:`StoreMedia`    ``media.store(record)``, awaits it       :meth:`Session.media_done`
:class:`Answer`        hands it to the command waiting for it   --
:class:`Close`         stops reading, drains if asked, closes   --
:class:`Log`           logs with the terminal's phone           --
=====================  =======================================  ==============================

States: ``NEW -> REGISTERED -> AUTHENTICATED -> CLOSED`` (registration is optional: a terminal
that registered on an earlier connection authenticates straight away).  Rules, JT/T 808-2019:

* Before authentication only 0x0100, 0x0102 and 0x0003 are accepted (clause 8.5-8.8); anything
  else is answered 0x8001 result 1 and nothing is stored.  A refused message, refused
  registration or failed authentication is a *failure*; ``max_failures`` of them close the
  connection.
* 0x0100 -> 0x8100 (table 9 result; an auth code on success); 0x0102 -> 0x8001 0 or 1;
  0x0002 -> 0x8001 0; 0x0003 -> 0x8001 0 then close; 0x0200/0x0704 -> store, 0x8001 0.
* 0x0800 multimedia event -> 0x8001 0; 0x0801 multimedia data -> :class:`StoreMedia`, then
  0x8800 without retransmit ids once stored (8.51, 8.52); nothing if it could not be stored.
* Answers to downlink commands (0x0001, 0x0104, 0x0201, ... see :mod:`ingest.commands`) are
  not answered; they become :class:`Answer` actions.  0x0702 driver identity, which terminals
  also report on their own, is answered 0x8001 0 as well.
* A frame that does not decode but whose header could be read is answered 0x8001 result 2
  (message error) with its serial; the connection goes on.  Ids we do not handle get 0x8001
  result 3.
* The first frame binds the connection to its phone; frames for another phone are refused.
* Replies use the edition and the phone string of the frame they answer.

Sub-packages (clause 4.4.3) go to the process' :class:`~ingest.uploads.Uploads`.  Every
package is acknowledged with 0x8001 as it arrives (result 0; the reassembler's result code when
it refuses one), except the package that completes a position message (0x0200/0x0704): its
0x8001 is the acknowledgement of the whole message and, like any report's, waits for storage.
The completed message is then handled like one that came in one frame, under the header of
the completing package.  :meth:`Session.upload_expired` turns a series past its deadline into
0x8003 (or 0x8800 naming the missing packages, for multimedia).

Acknowledgements: with ``ack="durable"`` a report's 0x8001 goes out only after
:meth:`Session.storage_done` said its batch is durable, and acks leave in the order the reports
arrived; a batch that is not durable is not acknowledged (the terminal retransmits).  With
``ack="immediate"`` the 0x8001 goes out with the :class:`Store`.

Retransmissions: a report whose (phone, id, serial, body hash) is in flight on this connection
or already durable (a :class:`DedupCache` shared by all connections) is acknowledged again and
not stored again.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal

from ingest.commands import ANSWER_MSG_IDS
from ingest.interfaces import (
    AuthRequest,
    MediaRecord,
    PositionRecord,
    RegistrationOutcome,
    RegistrationRequest,
)
from ingest.lockout import AuthLockout
from ingest.uploads import Uploads
from protocol.codec import (
    MAX_BODY,
    Packet,
    encode,
    encode_general_response,
    encode_split,
    general_response_prefix,
)
from protocol.errors import (
    RESULT_FAILURE,
    RESULT_MESSAGE_ERROR,
    RESULT_NOT_SUPPORTED,
    RESULT_SUCCESS,
    RemoteProtocolError,
)
from protocol.header import Edition, Header
from protocol.messages.base import Fragment, Message
from protocol.messages.control import PlatformRetransmitRequest
from protocol.messages.location import Location, LocationBatch, LocationReport
from protocol.messages.multimedia import (
    MultimediaData,
    MultimediaEvent,
    MultimediaUploadResponse,
)
from protocol.messages.recorder import DriverIdentity
from protocol.messages.terminal import (
    REGISTER_OK,
    REGISTER_TERMINAL_TAKEN,
    Heartbeat,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalGeneralResponse,
    TerminalLogout,
    TerminalRegister,
    TerminalRegisterResponse,
)
from protocol.reassembly import (
    Duplicate,
    Reassembled,
    Refused,
    RetransmitRequest,
    Stored,
    Undecodable,
    max_retransmit_ids,
)

MSG_REGISTER = TerminalRegister.MSG_ID
MSG_AUTH = TerminalAuth.MSG_ID
MSG_LOGOUT = TerminalLogout.MSG_ID
STORED_MSG_IDS = frozenset({LocationReport.MSG_ID, LocationBatch.MSG_ID})
# Clause 8.5-8.8: a terminal registers (once), then authenticates on every connection.
PRE_AUTH_MSG_IDS = frozenset({MSG_REGISTER, MSG_AUTH, MSG_LOGOUT})

SERIAL_MODULUS = 0x10000  # serials are WORDs (table 3)
# Length caps of the identity fields a terminal sends before it is authenticated, checked
# before anything reaches the registry.  The 2019 fixed-width fields (manufacturer 11, model
# 30, terminal id 30, IMEI 15 bytes, table 8 and 10) are bounded by the codec; the 2011/2013
# plate and auth code run to the end of the body.  A plate is at most 8 characters, a VIN 17
# (plate colour 0); auth codes we issue are 16 characters and the 2019 length byte allows 255,
# so 64 leaves room for codes provisioned by another platform; a firmware version is a short
# string (2019 table 10 gives it a one-byte length).
MAX_PLATE_CHARS = 32
MAX_AUTH_CODE_CHARS = 64
MAX_FIRMWARE_CHARS = 64
# 0x8800 counts its retransmit ids in a BYTE (8.52).
MAX_MEDIA_RETRANSMIT_IDS = 0xFF
EXPIRY_STEP_S = 1.0  # the dedup cache drops expired keys at most this often


class SessionState(enum.Enum):
    NEW = "new"
    REGISTERED = "registered"
    AUTHENTICATED = "authenticated"
    CLOSED = "closed"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SessionPolicy:
    ack: Literal["durable", "immediate"] = "durable"
    registration: Literal["open", "registry"] = "open"
    max_failures: int = 5


# ---------------------------------------------------------------------------------------------
# Actions


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """Write ``wire`` (the encoded ``message``).  ``acked_at`` is the monotonic receipt time
    of the report this acknowledges, for the ack-latency histogram."""

    message: Message
    serial: int
    wire: bytes
    acked_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Store:
    ticket: int
    records: tuple[PositionRecord, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Register:
    header: Header
    edition: Edition
    request: RegistrationRequest


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Authenticate:
    header: Header
    edition: Edition
    request: AuthRequest


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    phone: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """Close the connection; with ``drain`` only after the acks in flight went out."""

    reason: str
    drain: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Log:
    """A log line about this connection.  ``kind`` names lines an attacker can make as often
    as they like (bad frames, refused messages, failed logins): the server rate-limits those
    per kind and peer address (ingest.quiet) and counts what it held back."""

    level: int
    message: str
    args: tuple[object, ...] = ()
    kind: str | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoreMedia:
    """Store a multimedia upload; answer with :meth:`Session.media_done`."""

    header: Header
    edition: Edition
    record: MediaRecord


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A terminal's answer to a downlink command (0x0001, 0x0104, ...), or its request to
    resend packages of one (0x0005)."""

    packet: Packet


Action = Send | Store | Register | Authenticate | Claim | StoreMedia | Answer | Close | Log


# ---------------------------------------------------------------------------------------------
# Retransmission dedup

DedupKey = tuple[str, int, int, int]  # phone, message id, serial, hash of the decoded body


class DedupCache:
    """Keys of reports already durable, forgotten after ``window_s`` or when full.

    Least recently seen keys go first.  ``max_entries`` bounds memory (see
    ``ServerConfig.dedup_max_entries`` for the sizing); 0 disables dedup across connections.
    """

    def __init__(self, *, window_s: float, max_entries: int) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._seen: OrderedDict[DedupKey, float] = OrderedDict()
        self._next_expiry = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        # At most once per EXPIRY_STEP_S: a pass per frame was a measurable share of a
        # frame's cost, and seen() checks a key's age itself, so what is left over meanwhile
        # only costs memory (bounded by max_entries).
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_STEP_S
        horizon = now - self.window_s
        seen = self._seen
        while seen:
            key, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[key]

    def seen(self, key: DedupKey, now: float) -> bool:
        self._expire(now)
        at = self._seen.get(key)
        if at is None or at < now - self.window_s:
            return False
        self._seen[key] = now
        self._seen.move_to_end(key)
        return True

    def add(self, key: DedupKey, now: float) -> None:
        if self.max_entries <= 0:
            return
        self._expire(now)
        self._seen[key] = now
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)


def dedup_key(packet: Packet) -> DedupKey:
    # The body bytes when at hand (hashing bytes is cheap, and cached); else the decoded
    # message: frozen dataclasses, and equal bodies decode to equal messages.
    body = packet.body
    return (
        packet.phone,
        packet.msg_id,
        packet.serial,
        hash(packet.message if body is None else body),
    )


# ---------------------------------------------------------------------------------------------
# The session


@dataclasses.dataclass(slots=True)
class _Ticket:
    key: DedupKey | None
    durable: bool | None = None  # None while in flight


_ALREADY_DURABLE = _Ticket(key=None, durable=True)


@dataclasses.dataclass(frozen=True, slots=True)
class _PendingAck:
    """A report waiting for its ack (durable mode), in arrival order."""

    ticket: _Ticket
    header: Header
    edition: Edition
    received_at: float


class Session:
    """One connection's protocol state.  See the module docstring for the contract."""

    # One per connection, and a node holds tens of thousands: no per-instance dict.
    __slots__ = (
        "_acks",
        "_dedup",
        "_header",
        "_in_flight",
        "_in_flight_keys",
        "_lockout",
        "_new_auth_code",
        "_next_serial",
        "_next_ticket",
        "_peer_host",
        "_prefix",
        "_prefix_key",
        "_uploads",
        "edition",
        "failures",
        "last_seen",
        "phone",
        "policy",
        "refused",
        "retransmissions",
        "state",
    )

    def __init__(
        self,
        *,
        policy: SessionPolicy,
        dedup: DedupCache,
        new_auth_code: Callable[[], str],
        uploads: Uploads | None = None,
        lockout: AuthLockout | None = None,
        peer_host: str = "",
    ) -> None:
        self.policy = policy
        # Failed authentications are rate-limited per phone and per address, across the
        # connections of a process (ingest.lockout); ``peer_host`` is this connection's address.
        self._lockout = lockout
        self._peer_host = peer_host
        self.state = SessionState.NEW
        self.phone: str | None = None
        self.edition: Edition | None = None
        self.failures = 0
        self.refused = 0  # messages refused (result 1) for want of authentication or phone
        self.retransmissions = 0  # reports acknowledged again without storing
        self.last_seen: float | None = None
        self._dedup = dedup
        self._new_auth_code = new_auth_code
        # Shared by the connections of a process; a private one serves a lone session.
        self._uploads = uploads if uploads is not None else Uploads()
        self._header: Header | None = None  # of the last frame: addresses commands
        self._next_serial = 0
        self._next_ticket = 0
        self._in_flight: dict[int, _Ticket] = {}
        self._in_flight_keys: dict[DedupKey, int] = {}
        self._acks: deque[_PendingAck] = deque()  # bounded by the server's max_unacked
        self._prefix_key: tuple[str, Edition, int] | None = None
        self._prefix = b""

    # -- properties

    @property
    def authenticated(self) -> bool:
        return self.state is SessionState.AUTHENTICATED

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def pending(self) -> int:
        """Reports not yet settled: waiting acks (durable) or batches in flight (immediate).

        The server stops reading while this is at its cap.
        """
        return len(self._acks) if self.policy.ack == "durable" else len(self._in_flight)

    @property
    def in_flight(self) -> int:
        """Batches handed to storage and not yet settled."""
        return len(self._in_flight)

    # -- inputs

    def receive(self, packet: Packet, *, now: float, wall: datetime) -> list[Action]:
        """A decoded frame."""
        if self.closed:
            return []
        self.last_seen = now
        if self.phone is None:
            self.phone = packet.phone
        elif packet.phone != self.phone:
            return self._refuse(
                packet, "frame 0x%04x for another phone %s", packet.msg_id, packet.phone
            )
        self.edition = packet.edition
        self._header = packet.header
        message = packet.message
        msg_id = packet.msg_id
        if isinstance(message, TerminalGeneralResponse):
            return [Answer(packet)]
        if not self.authenticated and msg_id not in PRE_AUTH_MSG_IDS:
            return self._refuse(packet, "0x%04x before authentication", msg_id)
        if isinstance(message, Fragment):
            return self._fragment(packet, now, wall)
        return self._dispatch(packet, now, wall)

    def _dispatch(self, packet: Packet, now: float, wall: datetime) -> list[Action]:
        """A whole message (from one frame, or reassembled) of an authenticated terminal,
        or one of the messages allowed before authentication."""
        message = packet.message
        msg_id = packet.msg_id
        if isinstance(message, TerminalRegister):
            if len(message.plate) > MAX_PLATE_CHARS:
                return self._malformed(packet, "plate of %s characters", len(message.plate))
            return [self._register(packet, message, wall)]
        if isinstance(message, TerminalAuth):
            return self._authenticate(packet, message, now, wall)
        if isinstance(message, Heartbeat):
            return [self._reply(packet.header, packet.edition, RESULT_SUCCESS)]
        if isinstance(message, TerminalLogout):
            self.state = SessionState.CLOSED
            return [
                Log(logging.INFO, "logout"),
                self._reply(packet.header, packet.edition, RESULT_SUCCESS),
                Close(reason="logout", drain=True),
            ]
        if isinstance(message, LocationReport):
            return self._store(packet, [(None, 0, message)], now, wall)
        if isinstance(message, LocationBatch):
            batch = [(message.batch_type, i, p) for i, p in enumerate(message.positions)]
            return self._store(packet, batch, now, wall)
        if isinstance(message, MultimediaData):
            return [self._store_media(packet, message, wall)]
        if isinstance(message, MultimediaEvent):
            log = Log(
                logging.INFO,
                "multimedia event: media %s type %s format %s event %s channel %s",
                (
                    message.media_id,
                    message.media_type,
                    message.media_format,
                    message.event,
                    message.channel,
                ),
            )
            return [log, self._reply(packet.header, packet.edition, RESULT_SUCCESS)]
        if msg_id == DriverIdentity.MSG_ID:
            # Answers 0x8702, and is also reported on its own when a card is inserted (8.48).
            return [Answer(packet), self._reply(packet.header, packet.edition, RESULT_SUCCESS)]
        if msg_id in ANSWER_MSG_IDS:
            return [Answer(packet)]
        return [
            Log(logging.INFO, "0x%04x not supported (%s)", (msg_id, type(message).__name__)),
            self._reply(packet.header, packet.edition, RESULT_NOT_SUPPORTED),
        ]

    def protocol_error(self, error: RemoteProtocolError, *, now: float) -> list[Action]:
        """A frame that did not decode.  Answered (result 2) when its header is known."""
        if self.closed:
            return []
        header = error.header
        log = Log(
            logging.WARNING, "bad frame (%s): %s", (error.kind, error.detail), kind=error.kind
        )
        if header is None:
            return [log]
        self.last_seen = now
        return [log, self._reply(header, header.layout, error.result_code)]

    def registration_done(
        self, action: Register, outcome: RegistrationOutcome, *, now: float
    ) -> list[Action]:
        """The registry's answer to a :class:`Register` action."""
        if outcome.result is None:
            # The registry cannot decide now (its database is down): no answer, so the
            # terminal sends the 0x0100 again on its own schedule (clause 4.5.2), as for a
            # report whose storage failed.  Not the terminal's failure.
            return [
                Log(
                    logging.WARNING,
                    "registration not answered: the terminal registry is unavailable",
                    kind="login_unanswered",
                )
            ]
        ok = outcome.result == REGISTER_OK
        response = TerminalRegisterResponse(
            reply_serial=action.header.serial,
            result=outcome.result,
            auth_code=(outcome.auth_code or action.request.auth_code) if ok else None,
        )
        send = self._send(response, action.header, action.edition)
        if self.closed:
            return [send]
        if ok:
            self.state = SessionState.REGISTERED
            return [Log(logging.DEBUG, "registered (%s)", (action.request.policy,)), send]
        if self._lockout is not None and outcome.result == REGISTER_TERMINAL_TAKEN:
            # A phone registered to another terminal: a takeover attempt, or a terminal the
            # platform has not released.  Counted against the address like a wrong code.
            self._lockout.failure(phone=None, address=self._peer_host, now=now)
        return [send, *self._failure("registration refused, result %s", outcome.result)]

    def authentication_done(
        self, action: Authenticate, ok: bool | None, *, now: float
    ) -> list[Action]:
        """The registry's answer to an :class:`Authenticate` action (None: it cannot decide
        now; the 0x0102 is left unanswered and the terminal sends it again)."""
        if ok is None:
            return [
                Log(
                    logging.WARNING,
                    "authentication not answered: the terminal registry is unavailable",
                    kind="login_unanswered",
                )
            ]
        notes: list[Action] = []
        if self._lockout is not None:
            if ok:
                self._lockout.success(phone=action.request.phone)
            else:
                for scope in self._lockout.failure(
                    phone=action.request.phone, address=self._peer_host, now=now
                ):
                    key = action.request.phone if scope == "phone" else self._peer_host
                    notes.append(
                        Log(
                            logging.WARNING,
                            "repeated authentication failures: %s %s locked out",
                            (scope, key),
                        )
                    )
        result = RESULT_SUCCESS if ok else RESULT_FAILURE
        send = self._reply(action.header, action.edition, result)
        if self.closed:
            return [*notes, send]
        if ok:
            self.state = SessionState.AUTHENTICATED
            phone = action.header.phone
            return [
                Claim(phone=phone),
                Log(logging.DEBUG, "authenticated (edition %s)", (int(action.edition),)),
                send,
            ]
        if self.state is SessionState.AUTHENTICATED:
            self.state = SessionState.NEW
        return [*notes, send, *self._failure("authentication failed", kind="auth_failed")]

    def media_done(self, action: StoreMedia, stored: bool, *, now: float) -> list[Action]:
        """The media sink's answer to a :class:`StoreMedia`: 0x8800 (all received) if stored."""
        record = action.record
        if not stored:
            return [
                Log(
                    logging.ERROR,
                    "multimedia %s could not be stored; not acknowledged",
                    (record.media_id,),
                )
            ]
        response = MultimediaUploadResponse(media_id=record.media_id, retransmit_ids=())
        return [
            Log(
                logging.INFO, "stored multimedia %s (%s bytes)", (record.media_id, len(record.data))
            ),
            self._send(response, action.header, action.edition),
        ]

    def upload_expired(self, request: RetransmitRequest, media_id: int | None) -> list[Action]:
        """A series of this terminal is past its deadline: ask for the missing packages.

        Multimedia (0x0801) with a known ``media_id`` is asked with 0x8800 and the missing
        package indexes (8.52); everything else with 0x8003, the series' first serial and the
        missing package indexes (8.4).  Long lists are split over several messages.
        """
        if self.closed:
            return []
        key, header = request.key, request.header
        edition = header.layout
        log = Log(
            logging.INFO,
            "0x%04x from serial %s: %s of %s packages missing, request %s",
            (key.msg_id, key.first_serial, len(request.missing), key.total, request.round),
        )
        sends: list[Action] = [log]
        if key.msg_id == MultimediaData.MSG_ID and media_id is not None:
            for ids in request.batches(MAX_MEDIA_RETRANSMIT_IDS):
                response = MultimediaUploadResponse(media_id=media_id, retransmit_ids=ids)
                sends.append(self._send(response, header, edition))
            return sends
        for ids in request.batches(max_retransmit_ids(edition)):
            retransmit = PlatformRetransmitRequest(original_serial=key.first_serial, packet_ids=ids)
            sends.append(self._send(retransmit, header, edition))
        return sends

    def downlink(self, message: Message) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
        """Encode a command for this terminal: its serials and wire frames.

        Addressed like the terminal's last frame (phone string, edition, protocol version);
        a body longer than one frame is split into packages with consecutive serials.  Raises
        :class:`~protocol.errors.LocalProtocolError` when the message does not fit its schema,
        :class:`RuntimeError` when no frame arrived yet.
        """
        header, edition = self._header, self.edition
        if header is None or edition is None:
            raise RuntimeError("no frame from the terminal yet")
        body = message.encode(edition)
        version = header.protocol_version or 1
        if len(body) <= MAX_BODY:
            serial = self._take_serials(1)
            wire = encode(
                message,
                phone=header.phone,
                serial=serial,
                edition=edition,
                protocol_version=version,
            )
            return (serial,), (wire,)
        count = -(-len(body) // MAX_BODY)
        first = self._take_serials(count)
        wires = encode_split(
            message,
            phone=header.phone,
            first_serial=first,
            edition=edition,
            protocol_version=version,
        )
        serials = tuple((first + i) % SERIAL_MODULUS for i in range(len(wires)))
        return serials, tuple(wires)

    def storage_done(self, ticket: int, durable: bool, *, now: float) -> list[Action]:
        """Storage settled the batch of a :class:`Store` action."""
        entry = self._in_flight.pop(ticket)
        entry.durable = durable
        if entry.key is not None:
            del self._in_flight_keys[entry.key]
            if durable:
                self._dedup.add(entry.key, now)
        if self.policy.ack == "immediate":
            if durable:
                return []
            return [Log(logging.ERROR, "acknowledged batch was not stored (ticket %s)", (ticket,))]
        actions: list[Action] = []
        if not durable:
            actions.append(Log(logging.WARNING, "batch not durable; left unacknowledged"))
        actions.extend(self._flush_acks())
        return actions

    # -- helpers

    def _fragment(self, packet: Packet, now: float, wall: datetime) -> list[Action]:
        result = self._uploads.feed(packet, now=now)
        actions: list[Action] = [
            Log(
                logging.WARNING,
                "gave up 0x%04x from serial %s (%s): %s",
                (d.key.msg_id, d.key.first_serial, d.reason, d.error.detail),
            )
            for d in result.dropped
        ]
        outcome = result.outcome
        header, edition = packet.header, packet.edition
        match outcome:
            case Stored() | Duplicate():
                actions.append(self._reply(header, edition, RESULT_SUCCESS))
            case Refused():
                actions.append(self._reply(header, edition, outcome.error.result_code))
            case Undecodable():
                actions.append(
                    Log(
                        logging.WARNING,
                        "reassembled 0x%04x does not decode (%s): %s",
                        (outcome.key.msg_id, outcome.error.kind, outcome.error.detail),
                    )
                )
                actions.append(self._reply(header, edition, RESULT_MESSAGE_ERROR))
            case Reassembled():
                whole = Packet(
                    header=header,
                    message=outcome.packet.message,
                    edition=outcome.packet.edition,
                    quirks=outcome.packet.quirks,
                    body=outcome.packet.body,
                )
                actions.append(
                    Log(
                        logging.DEBUG,
                        "reassembled 0x%04x from %s packages",
                        (outcome.key.msg_id, outcome.key.total),
                    )
                )
                handled = self._dispatch(whole, now, wall)
                answered = any(
                    isinstance(a, Send) and isinstance(a.message, PlatformGeneralResponse)
                    for a in handled
                )
                if outcome.key.msg_id not in STORED_MSG_IDS and not answered:
                    actions.append(self._reply(header, edition, RESULT_SUCCESS))
                actions.extend(handled)
        return actions

    def _store_media(self, packet: Packet, message: MultimediaData, wall: datetime) -> StoreMedia:
        record = MediaRecord(
            header=packet.header,
            media_id=message.media_id,
            media_type=message.media_type,
            media_format=message.media_format,
            event=message.event,
            channel=message.channel,
            location=message.location,
            data=message.data,
            received_at=wall,
        )
        return StoreMedia(header=packet.header, edition=packet.edition, record=record)

    def _take_serials(self, count: int) -> int:
        first = self._next_serial
        self._next_serial = (first + count) % SERIAL_MODULUS
        return first

    def _register(self, packet: Packet, message: TerminalRegister, wall: datetime) -> Register:
        request = RegistrationRequest(
            phone=packet.phone,
            edition=packet.edition,
            message=message,
            auth_code=self._new_auth_code(),
            policy=self.policy.registration,
            at=wall,
            peer=self._peer_host,
        )
        return Register(header=packet.header, edition=packet.edition, request=request)

    def _authenticate(
        self, packet: Packet, message: TerminalAuth, now: float, wall: datetime
    ) -> list[Action]:
        if len(message.auth_code) > MAX_AUTH_CODE_CHARS:
            return self._malformed(packet, "auth code of %s characters", len(message.auth_code))
        version = message.software_version
        if version is not None and len(version) > MAX_FIRMWARE_CHARS:
            return self._malformed(packet, "firmware version of %s characters", len(version))
        if self._lockout is not None:
            scope = self._lockout.locked(phone=packet.phone, address=self._peer_host, now=now)
            if scope is not None:
                # Refused unchecked: a locked-out phone or address costs no registry lookup,
                # and the answer tells a guesser nothing.
                reply = self._reply(packet.header, packet.edition, RESULT_FAILURE)
                why = "authentication refused: %s locked out after repeated failures"
                return [reply, *self._failure(why, scope, kind="auth_locked")]
        request = AuthRequest(
            phone=packet.phone,
            edition=packet.edition,
            auth_code=message.auth_code,
            imei=message.imei,
            software_version=message.software_version,
            at=wall,
            peer=self._peer_host,
        )
        return [Authenticate(header=packet.header, edition=packet.edition, request=request)]

    def _malformed(self, packet: Packet, why: str, *args: object) -> list[Action]:
        """A message whose fields break a cap: 0x8001 result 2 (message error), a failure."""
        reply = self._reply(packet.header, packet.edition, RESULT_MESSAGE_ERROR)
        return [reply, *self._failure("0x%04x refused: " + why, packet.msg_id, *args)]

    def _store(
        self,
        packet: Packet,
        positions: Sequence[tuple[int | None, int, Location]],
        now: float,
        wall: datetime,
    ) -> list[Action]:
        key = dedup_key(packet)
        durable_mode = self.policy.ack == "durable"
        ticket_id = self._in_flight_keys.get(key)
        if ticket_id is not None or self._dedup.seen(key, now) or not positions:
            why = "empty batch" if not positions else "retransmission"
            if positions:
                self.retransmissions += 1
            log = Log(logging.DEBUG, "%s 0x%04x serial %s", (why, packet.msg_id, packet.serial))
            if not durable_mode:
                return [log, self._reply(packet.header, packet.edition, RESULT_SUCCESS, now)]
            ticket = _ALREADY_DURABLE if ticket_id is None else self._in_flight[ticket_id]
            self._acks.append(_PendingAck(ticket, packet.header, packet.edition, now))
            return [log, *self._flush_acks()]
        ticket_id = self._next_ticket
        self._next_ticket += 1
        ticket = _Ticket(key=key)
        self._in_flight[ticket_id] = ticket
        self._in_flight_keys[key] = ticket_id
        records = tuple(
            PositionRecord(
                header=packet.header,
                edition=packet.edition,
                location=location,
                batch_type=batch_type,
                index=index,
                received_at=wall,
            )
            for batch_type, index, location in positions
        )
        store = Store(ticket=ticket_id, records=records)
        if not durable_mode:
            return [store, self._reply(packet.header, packet.edition, RESULT_SUCCESS, now)]
        self._acks.append(_PendingAck(ticket, packet.header, packet.edition, now))
        return [store]

    def _flush_acks(self) -> list[Action]:
        out: list[Action] = []
        acks = self._acks
        while acks and acks[0].ticket.durable is not None:
            entry = acks.popleft()
            if entry.ticket.durable:
                out.append(
                    self._reply(entry.header, entry.edition, RESULT_SUCCESS, entry.received_at)
                )
        return out

    def _refuse(self, packet: Packet, why: str, *args: object) -> list[Action]:
        self.refused += 1
        reply = self._reply(packet.header, packet.edition, RESULT_FAILURE)
        return [reply, *self._failure(why, *args, kind="refused")]

    def _failure(self, why: str, *args: object, kind: str = "refused") -> list[Action]:
        self.failures += 1
        limit = self.policy.max_failures
        actions: list[Action] = [
            Log(
                logging.WARNING,
                why + " (failure %s of %s)",
                (*args, self.failures, limit),
                kind=kind,
            )
        ]
        if self.failures >= self.policy.max_failures:
            self.state = SessionState.CLOSED
            actions.append(Close(reason="too many failures", drain=False))
        return actions

    def _reply(
        self, header: Header, edition: Edition, result: int, acked_at: float | None = None
    ) -> Send:
        response = PlatformGeneralResponse(
            reply_serial=header.serial, reply_msg_id=header.msg_id, result=result
        )
        # The reply to (nearly) every frame: framed from a header prefix built once per
        # terminal rather than through the generic encoder.
        key = (header.phone, edition, header.protocol_version or 1)
        if key != self._prefix_key:
            self._prefix_key = key
            self._prefix = general_response_prefix(*key)
        serial = self._take_serials(1)
        wire = encode_general_response(
            self._prefix,
            serial=serial,
            reply_serial=header.serial,
            reply_msg_id=header.msg_id,
            result=result,
        )
        return Send(message=response, serial=serial, wire=wire, acked_at=acked_at)

    def _send(
        self, message: Message, header: Header, edition: Edition, acked_at: float | None = None
    ) -> Send:
        serial = self._take_serials(1)
        wire = encode(
            message,
            phone=header.phone,
            serial=serial,
            edition=edition,
            protocol_version=header.protocol_version or 1,
        )
        return Send(message=message, serial=serial, wire=wire, acked_at=acked_at)
