"""The session's guards before the registry: identity-field caps, lock-outs, and registry
answers that cannot be decided now."""

from __future__ import annotations

import pytest

from ingest.interfaces import RegistrationOutcome
from ingest.lockout import AuthLockout, LockoutPolicy
from ingest.session import (
    MAX_AUTH_CODE_CHARS,
    MAX_PLATE_CHARS,
    Authenticate,
    DedupCache,
    Log,
    Register,
    Send,
    Session,
    SessionPolicy,
)
from protocol.errors import RESULT_FAILURE, RESULT_MESSAGE_ERROR
from protocol.messages.terminal import (
    REGISTER_TERMINAL_TAKEN,
    PlatformGeneralResponse,
    TerminalAuth,
    TerminalRegister,
    TerminalRegisterResponse,
)
from tests.test_ingest_session import WALL, packet


def session(lockout: AuthLockout | None = None) -> Session:
    return Session(
        policy=SessionPolicy(),
        dedup=DedupCache(window_s=60, max_entries=10),
        new_auth_code=lambda: "code",
        lockout=lockout,
        peer_host="10.0.0.7",
    )


def registration(plate: str = "云A12345") -> TerminalRegister:
    return TerminalRegister(
        province=53,
        city=1,
        manufacturer="ACME",
        model="M",
        terminal_id="T1",
        plate_color=1,
        plate=plate,
    )


def results(actions: list[object]) -> list[int]:
    return [
        a.message.result
        for a in actions
        if isinstance(a, Send) and isinstance(a.message, PlatformGeneralResponse)
    ]


@pytest.mark.parametrize(
    "message",
    [
        registration(plate="A" * (MAX_PLATE_CHARS + 1)),
        TerminalAuth(auth_code="c" * (MAX_AUTH_CODE_CHARS + 1)),
    ],
)
def test_over_long_identity_fields_are_a_message_error(message: object) -> None:
    s = session()
    actions = s.receive(packet(message, 1), now=0, wall=WALL)  # type: ignore[arg-type]
    assert results(actions) == [RESULT_MESSAGE_ERROR]
    assert not any(isinstance(a, Register | Authenticate) for a in actions)
    assert s.failures == 1


def test_undecided_registry_answers_nothing_and_counts_no_failure() -> None:
    s = session()
    (register,) = [
        a for a in s.receive(packet(registration(), 1), now=0, wall=WALL) if isinstance(a, Register)
    ]
    actions = s.registration_done(register, RegistrationOutcome(result=None), now=1)
    assert not any(isinstance(a, Send) for a in actions)
    assert [a.kind for a in actions if isinstance(a, Log)] == ["login_unanswered"]
    (auth,) = s.receive(packet(TerminalAuth(auth_code="x"), 2), now=2, wall=WALL)
    assert isinstance(auth, Authenticate)
    assert not any(isinstance(a, Send) for a in s.authentication_done(auth, None, now=3))
    assert s.failures == 0
    assert not s.authenticated


def test_a_locked_phone_is_refused_without_the_registry() -> None:
    policy = LockoutPolicy(failures=2, window_s=60, lockout_s=300)
    lockout = AuthLockout(
        per_phone=policy, per_address=LockoutPolicy(failures=0, window_s=1, lockout_s=1)
    )
    s = session(lockout)
    for serial in (1, 2):
        (auth,) = s.receive(packet(TerminalAuth(auth_code="wrong"), serial), now=serial, wall=WALL)
        assert isinstance(auth, Authenticate)
        assert results(s.authentication_done(auth, False, now=serial)) == [RESULT_FAILURE]
    actions = s.receive(packet(TerminalAuth(auth_code="right"), 3), now=3, wall=WALL)
    assert results(actions) == [RESULT_FAILURE]
    assert not any(isinstance(a, Authenticate) for a in actions)
    assert [a.kind for a in actions if isinstance(a, Log)] == ["auth_locked"]


def test_a_refused_takeover_counts_against_the_address() -> None:
    policy = LockoutPolicy(failures=2, window_s=60, lockout_s=300)
    lockout = AuthLockout(
        per_phone=LockoutPolicy(failures=0, window_s=1, lockout_s=1), per_address=policy
    )
    for n in range(2):
        s = session(lockout)
        (register,) = [
            a
            for a in s.receive(packet(registration(), 1), now=n, wall=WALL)
            if isinstance(a, Register)
        ]
        outcome = RegistrationOutcome(result=REGISTER_TERMINAL_TAKEN)
        (send,) = [a for a in s.registration_done(register, outcome, now=n) if isinstance(a, Send)]
        assert isinstance(send.message, TerminalRegisterResponse)
        assert send.message.result == REGISTER_TERMINAL_TAKEN
    assert lockout.locked(phone="any", address="10.0.0.7", now=3) == "address"
