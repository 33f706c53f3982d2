"""The pure session state machine: examples, and a stateful test against a small model."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ingest.interfaces import RegistrationOutcome
from ingest.session import (
    Action,
    Authenticate,
    Claim,
    Close,
    DedupCache,
    Log,
    Register,
    Send,
    Session,
    SessionPolicy,
    SessionState,
    Store,
)
from protocol import Edition, Packet, decode, encode
from protocol.errors import (
    RESULT_FAILURE,
    RESULT_MESSAGE_ERROR,
    RESULT_NOT_SUPPORTED,
    ChecksumError,
)
from protocol.fields import GMT8
from protocol.header import Header
from protocol.messages.base import Message
from protocol.messages.location import STATUS_FIXED, LocationBatch, LocationReport
from protocol.messages.terminal import (
    REGISTER_TERMINAL_UNKNOWN,
    Heartbeat,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalGeneralResponse,
    TerminalLogout,
    TerminalRegister,
    TerminalRegisterResponse,
)

PHONE = "013800138000"
WALL = datetime(2024, 5, 1, tzinfo=UTC)


def packet(
    message: Message, serial: int, phone: str = PHONE, edition: Edition = Edition.V2013
) -> Packet:
    return decode(encode(message, phone=phone, serial=serial, edition=edition))


def report(n: int) -> LocationReport:
    return LocationReport(
        alarm=0,
        status=STATUS_FIXED,
        latitude=30_000_000 + n,
        longitude=120_000_000,
        altitude_m=0,
        speed=0,
        direction=0,
        time=datetime(2024, 5, 1, 8, tzinfo=GMT8),
    )


REGISTRATION = TerminalRegister(
    province=31,
    city=100,
    manufacturer="ACME1",
    model="T-808",
    terminal_id="ID00001",
    plate_color=1,
    plate="A12345",
)


def new_session(**policy: object) -> Session:
    codes = (f"code{n}" for n in itertools.count(1))
    return Session(
        policy=SessionPolicy(**policy),  # type: ignore[arg-type]
        dedup=DedupCache(window_s=300, max_entries=1000),
        new_auth_code=lambda: next(codes),
    )


def sends(actions: list[Action]) -> list[Message]:
    return [a.message for a in actions if isinstance(a, Send)]


def ack(serial: int, msg_id: int, result: int = 0) -> PlatformGeneralResponse:
    return PlatformGeneralResponse(reply_serial=serial, reply_msg_id=msg_id, result=result)


def login(session: Session) -> None:
    (register,) = session.receive(packet(REGISTRATION, 1), now=0, wall=WALL)
    assert isinstance(register, Register)
    actions = session.registration_done(
        register, RegistrationOutcome(result=0, auth_code="secret"), now=0
    )
    assert sends(actions) == [
        TerminalRegisterResponse(reply_serial=1, result=0, auth_code="secret")
    ]
    assert session.state is SessionState.REGISTERED
    (auth,) = session.receive(packet(TerminalAuth(auth_code="secret"), 2), now=0, wall=WALL)
    assert isinstance(auth, Authenticate)
    assert auth.request.auth_code == "secret"
    actions = session.authentication_done(auth, True, now=0)
    assert Claim(phone=PHONE) in actions
    assert sends(actions) == [ack(2, 0x0102)]
    assert session.authenticated


# ---------------------------------------------------------------------------------------------
# Examples


def test_only_registration_authentication_and_logout_before_authentication() -> None:
    session = new_session(max_failures=2)
    actions = session.receive(packet(report(1), 5), now=0, wall=WALL)
    assert sends(actions) == [ack(5, 0x0200, RESULT_FAILURE)]
    assert not any(isinstance(a, Store) for a in actions)
    actions = session.receive(packet(Heartbeat(), 6), now=0, wall=WALL)
    assert sends(actions) == [ack(6, 0x0002, RESULT_FAILURE)]
    assert Close(reason="too many failures", drain=False) in actions
    assert session.closed
    assert session.receive(packet(Heartbeat(), 7), now=0, wall=WALL) == []


def test_registration_carries_the_generated_code_and_policy() -> None:
    session = new_session(registration="registry")
    (register,) = session.receive(packet(REGISTRATION, 9), now=0, wall=WALL)
    assert isinstance(register, Register)
    assert register.request.auth_code == "code1"
    assert register.request.policy == "registry"
    assert register.request.at == WALL
    outcome = RegistrationOutcome(result=REGISTER_TERMINAL_UNKNOWN)
    actions = session.registration_done(register, outcome, now=0)
    assert sends(actions) == [TerminalRegisterResponse(reply_serial=9, result=4)]
    assert session.failures == 1
    assert session.state is SessionState.NEW


def test_replies_follow_the_terminals_edition_and_phone() -> None:
    phone = "00000000013912345678"
    session = new_session()
    (register,) = session.receive(
        packet(REGISTRATION, 3, phone=phone, edition=Edition.V2019), now=0, wall=WALL
    )
    assert isinstance(register, Register)
    actions = session.registration_done(register, RegistrationOutcome(result=0), now=0)
    (send,) = [a for a in actions if isinstance(a, Send)]
    reply = decode(send.wire)
    assert reply.header.layout is Edition.V2019
    assert reply.header.phone == phone
    assert reply.message == TerminalRegisterResponse(reply_serial=3, result=0, auth_code="code1")


def test_a_frame_for_another_phone_is_refused() -> None:
    session = new_session()
    login(session)
    actions = session.receive(packet(report(1), 3, phone="013800138999"), now=0, wall=WALL)
    assert sends(actions) == [ack(3, 0x0200, RESULT_FAILURE)]
    assert not any(isinstance(a, Store) for a in actions)


def test_decode_errors_are_answered_when_the_header_is_known() -> None:
    session = new_session()
    header = Header(msg_id=0x0200, body_length=3, phone=PHONE, serial=44)
    actions = session.protocol_error(ChecksumError("bad", header=header), now=0)
    assert sends(actions) == [ack(44, 0x0200, RESULT_MESSAGE_ERROR)]
    actions = session.protocol_error(ChecksumError("bad"), now=0)
    assert sends(actions) == []
    assert [a.level for a in actions if isinstance(a, Log)] == [30]
    assert session.failures == 0


def test_unsupported_messages_and_terminal_responses() -> None:
    session = new_session()
    login(session)
    actions = session.receive(
        packet(TerminalRegisterResponse(reply_serial=1, result=1), 8), now=0, wall=WALL
    )
    assert sends(actions) == [ack(8, 0x8100, RESULT_NOT_SUPPORTED)]
    response = TerminalGeneralResponse(reply_serial=1, reply_msg_id=0x8103, result=0)
    assert sends(session.receive(packet(response, 9), now=0, wall=WALL)) == []


def test_durable_acks_leave_in_arrival_order() -> None:
    session = new_session()
    login(session)
    stores = []
    for serial in (10, 11, 12):
        (store,) = session.receive(packet(report(serial), serial), now=1, wall=WALL)
        assert isinstance(store, Store)
        stores.append(store.ticket)
    assert session.pending == 3
    assert sends(session.storage_done(stores[1], True, now=2)) == []  # waits for serial 10
    assert sends(session.storage_done(stores[0], False, now=2)) == [ack(11, 0x0200)]
    assert sends(session.storage_done(stores[2], True, now=2)) == [ack(12, 0x0200)]
    assert session.pending == 0
    # The lost report is stored again when retransmitted; the durable one is not.
    again = session.receive(packet(report(10), 10), now=3, wall=WALL)
    assert any(isinstance(a, Store) for a in again)
    (store,) = [a for a in again if isinstance(a, Store)]
    again = session.receive(packet(report(11), 11), now=3, wall=WALL)
    assert sends(again) == []  # acknowledged again, but after the report before it
    assert session.retransmissions == 1
    assert sends(session.storage_done(store.ticket, True, now=4)) == [
        ack(10, 0x0200),
        ack(11, 0x0200),
    ]


def test_a_batch_records_every_position() -> None:
    session = new_session()
    login(session)
    batch = LocationBatch(batch_type=1, positions=(report(1), report(2)))
    (store,) = session.receive(packet(batch, 20), now=0, wall=WALL)
    assert isinstance(store, Store)
    assert [(r.batch_type, r.index, r.serial) for r in store.records] == [(1, 0, 20), (1, 1, 20)]
    empty = session.receive(packet(LocationBatch(batch_type=0, positions=()), 21), now=0, wall=WALL)
    assert not any(isinstance(a, Store) for a in empty)
    assert sends(session.storage_done(store.ticket, True, now=0)) == [
        ack(20, 0x0704),
        ack(21, 0x0704),
    ]


def test_immediate_mode_acks_with_the_store() -> None:
    session = new_session(ack="immediate")
    login(session)
    actions = session.receive(packet(report(1), 30), now=0, wall=WALL)
    assert [type(a) for a in actions] == [Store, Send]
    assert session.pending == 1
    (store,) = [a for a in actions if isinstance(a, Store)]
    lost = session.storage_done(store.ticket, False, now=0)
    assert [a.level for a in lost if isinstance(a, Log)] == [40]  # an acked batch was lost
    assert session.pending == 0


def test_logout_replies_then_closes_with_drain() -> None:
    session = new_session()
    actions = session.receive(packet(TerminalLogout(), 4), now=0, wall=WALL)
    assert sends(actions) == [ack(4, 0x0003)]
    assert actions[-1] == Close(reason="logout", drain=True)
    assert session.closed


def test_outgoing_serials_wrap() -> None:
    session = new_session()
    session._next_serial = 0xFFFF
    first = session.receive(packet(TerminalLogout(), 4), now=0, wall=WALL)
    (send,) = [a for a in first if isinstance(a, Send)]
    assert send.serial == 0xFFFF
    assert session._next_serial == 0


def test_dedup_cache_forgets_after_the_window_and_when_full() -> None:
    cache = DedupCache(window_s=10, max_entries=2)
    cache.add(("p", 1, 1, 1), now=0)
    assert cache.seen(("p", 1, 1, 1), now=5)
    assert not cache.seen(("p", 1, 1, 1), now=16)
    for n in range(3):
        cache.add(("p", 1, n, 0), now=20)
    assert len(cache) == 2
    assert not cache.seen(("p", 1, 0, 0), now=20)
    disabled = DedupCache(window_s=10, max_entries=0)
    disabled.add(("p", 1, 1, 1), now=0)
    assert not disabled.seen(("p", 1, 1, 1), now=0)


# ---------------------------------------------------------------------------------------------
# Stateful test against a model

MAX_FAILURES = 5


@dataclass
class Receipt:
    serial: int
    ticket: int | None  # the store it waits for; None once settled
    acked: bool | None = None  # expected outcome once settled


@dataclass
class Model:
    authenticated: bool = False
    closed: bool = False
    failures: int = 0
    issued: str | None = None
    in_flight: dict[tuple[int, int], int] = field(default_factory=dict)  # key -> ticket
    ticket_keys: dict[int, tuple[int, int]] = field(default_factory=dict)
    durable: set[tuple[int, int]] = field(default_factory=set)
    queue: deque[Receipt] = field(default_factory=deque)
    stored: list[tuple[int, int]] = field(default_factory=list)


class SessionMachine(RuleBasedStateMachine):
    """Drives a session with random inputs; the model predicts every reply and store."""

    ACK = "durable"

    def __init__(self) -> None:
        super().__init__()
        self.session = new_session(ack=self.ACK, max_failures=MAX_FAILURES)
        self.model = Model()
        self.now = 0.0
        self.serials = itertools.count(1000)
        self.acks_sent: dict[int, int] = {}

    # -- helpers

    def feed(self, message: Message, serial: int | None = None) -> tuple[int, list[Action]]:
        serial = next(self.serials) if serial is None else serial
        self.now += 1
        return serial, self.session.receive(packet(message, serial), now=self.now, wall=WALL)

    def expect_failure(self, actions: list[Action], serial: int, msg_id: int) -> None:
        assert sends(actions)[0] == ack(serial, msg_id, RESULT_FAILURE)
        self.model.failures += 1
        if self.model.failures >= MAX_FAILURES:
            assert isinstance(actions[-1], Close)
            self.model.closed = True
        else:
            assert not any(isinstance(a, Close) for a in actions)

    def check_report_acks(self, actions: list[Action], immediate: list[int]) -> None:
        """The acks in ``actions`` must be exactly the ones the model releases, in order."""
        expected = list(immediate)
        queue = self.model.queue
        while queue and queue[0].ticket is None:
            receipt = queue.popleft()
            if receipt.acked:
                expected.append(receipt.serial)
        got = [
            m.reply_serial
            for m in sends(actions)
            if isinstance(m, PlatformGeneralResponse) and m.reply_msg_id == 0x0200
        ]
        assert got == expected
        for serial in got:
            self.acks_sent[serial] = self.acks_sent.get(serial, 0) + 1

    # -- rules

    @initialize(logged_in=st.booleans())
    def start(self, logged_in: bool) -> None:
        # Half the runs start authenticated, so that reports and settles get most steps.
        if logged_in:
            self.register(good=True)
            self.authenticate(right=True)

    @precondition(lambda self: not self.model.closed)
    @rule(good=st.booleans(), roll=st.integers(0, 3))
    def reregister(self, good: bool, roll: int) -> None:
        # Registering again (which needs a new authentication) is rare once authenticated.
        if not self.model.authenticated or not roll:
            self.register(good)

    def register(self, good: bool) -> None:
        serial, actions = self.feed(REGISTRATION)
        (register,) = actions
        assert isinstance(register, Register)
        result = 0 if good else REGISTER_TERMINAL_UNKNOWN
        actions = self.session.registration_done(
            register, RegistrationOutcome(result=result, auth_code="x"), now=self.now
        )
        reply = sends(actions)[0]
        assert isinstance(reply, TerminalRegisterResponse)
        assert (reply.reply_serial, reply.result) == (serial, result)
        if good:
            self.model.issued = register.request.auth_code
            assert reply.auth_code == "x"
            self.model.authenticated = False
        else:
            self.model.failures += 1
            if self.model.failures >= MAX_FAILURES:
                self.model.closed = True

    @precondition(lambda self: not self.model.closed)
    @rule(right=st.booleans(), roll=st.integers(0, 3))
    def reauthenticate(self, right: bool, roll: int) -> None:
        # Authenticating again (and losing the session if wrong) is rare once authenticated.
        if not self.model.authenticated or not roll:
            self.authenticate(right)

    def authenticate(self, right: bool) -> None:
        code = self.model.issued if right and self.model.issued else "wrong"
        serial, actions = self.feed(TerminalAuth(auth_code=code))
        (auth,) = actions
        assert isinstance(auth, Authenticate)
        ok = code == self.model.issued
        actions = self.session.authentication_done(auth, ok, now=self.now)
        if ok:
            assert sends(actions) == [ack(serial, 0x0102)]
            assert Claim(phone=PHONE) in actions
            self.model.authenticated = True
        else:
            self.model.authenticated = False
            self.expect_failure(actions, serial, 0x0102)

    @precondition(lambda self: not self.model.closed)
    @rule(serial=st.integers(0, 1), variant=st.integers(0, 1))
    def report(self, serial: int, variant: int) -> None:
        _, actions = self.feed(report(variant), serial)
        stores = [a for a in actions if isinstance(a, Store)]
        model = self.model
        if not model.authenticated:
            assert stores == []
            self.expect_failure(actions, serial, 0x0200)
            return
        key = (serial, variant)
        immediate = self.ACK == "immediate"
        if key in model.in_flight or key in model.durable:
            assert stores == []
            ticket = model.in_flight.get(key)
            if immediate:
                self.check_report_acks(actions, [serial])
                return
            model.queue.append(Receipt(serial, ticket, acked=True if ticket is None else None))
        else:
            (store,) = stores
            assert len(store.records) == 1
            model.in_flight[key] = store.ticket
            model.ticket_keys[store.ticket] = key
            model.stored.append(key)
            if immediate:
                self.check_report_acks(actions, [serial])
                return
            model.queue.append(Receipt(serial, store.ticket))
        self.check_report_acks(actions, [])

    @precondition(lambda self: bool(self.model.ticket_keys))
    @rule(data=st.data(), durable=st.booleans())
    def settle(self, data: st.DataObject, durable: bool) -> None:
        model = self.model
        ticket = data.draw(st.sampled_from(sorted(model.ticket_keys)))
        key = model.ticket_keys.pop(ticket)
        del model.in_flight[key]
        if durable:
            model.durable.add(key)
        for receipt in model.queue:
            if receipt.ticket == ticket:
                receipt.ticket, receipt.acked = None, durable
        self.now += 1
        actions = self.session.storage_done(ticket, durable, now=self.now)
        self.check_report_acks(actions, [])

    @precondition(lambda self: not self.model.closed)
    @rule()
    def heartbeat(self) -> None:
        serial, actions = self.feed(Heartbeat())
        if self.model.authenticated:
            assert sends(actions) == [ack(serial, 0x0002)]
        else:
            self.expect_failure(actions, serial, 0x0002)

    @precondition(lambda self: not self.model.closed)
    @rule()
    def bad_frame(self) -> None:
        header = Header(msg_id=0x0200, body_length=0, phone=PHONE, serial=77)
        actions = self.session.protocol_error(ChecksumError("x", header=header), now=self.now)
        assert sends(actions) == [ack(77, 0x0200, RESULT_MESSAGE_ERROR)]

    @precondition(lambda self: not self.model.closed)
    @rule(roll=st.integers(0, 7))
    def logout(self, roll: int) -> None:
        if roll:  # rarely: a logout ends the run's interesting part
            return
        serial, actions = self.feed(TerminalLogout())
        assert sends(actions) == [ack(serial, 0x0003)]
        assert actions[-1] == Close(reason="logout", drain=True)
        self.model.closed = True

    @precondition(lambda self: self.model.closed)
    @rule()
    def ignored_after_close(self) -> None:
        assert self.feed(Heartbeat())[1] == []

    # -- invariants

    @invariant()
    def state_agrees(self) -> None:
        assert self.session.closed == self.model.closed
        if not self.model.closed:
            assert self.session.authenticated == self.model.authenticated
        assert self.session.in_flight == len(self.model.ticket_keys)

    def teardown(self) -> None:
        # Settle everything durably: every receipt waiting for a store gets exactly one ack.
        for ticket in sorted(self.model.ticket_keys):
            self.settle_ticket(ticket)
        if self.ACK == "durable":
            assert not self.model.queue
            assert self.session.pending == 0

    def settle_ticket(self, ticket: int) -> None:
        key = self.model.ticket_keys.pop(ticket)
        del self.model.in_flight[key]
        self.model.durable.add(key)
        for receipt in self.model.queue:
            if receipt.ticket == ticket:
                receipt.ticket, receipt.acked = None, True
        self.check_report_acks(self.session.storage_done(ticket, True, now=self.now), [])


class ImmediateSessionMachine(SessionMachine):
    ACK = "immediate"


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(max_examples=150, stateful_step_count=40)
TestImmediateSessionMachine = ImmediateSessionMachine.TestCase
TestImmediateSessionMachine.settings = settings(max_examples=75, stateful_step_count=40)


@pytest.mark.parametrize("edition", [Edition.V2011, Edition.V2013, Edition.V2019])
def test_heartbeat_reply_in_every_edition(edition: Edition) -> None:
    session = new_session()
    phone = "00000000013912345678" if edition is Edition.V2019 else PHONE
    session.state = SessionState.AUTHENTICATED
    actions = session.receive(
        packet(Heartbeat(), 5, phone=phone, edition=edition), now=0, wall=WALL
    )
    (send,) = [a for a in actions if isinstance(a, Send)]
    assert decode(send.wire).message == ack(5, 0x0002)
