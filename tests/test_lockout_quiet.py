"""The pure pieces that keep the server calm under attack: authentication lock-outs and the
per-kind log budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ingest.lockout import ADDRESS, PHONE, AuthLockout, LockoutPolicy
from ingest.quiet import MANY, LogLimiter


def lockout(**overrides: int) -> tuple[AuthLockout, list[str], list[str]]:
    began: list[str] = []
    refused: list[str] = []
    per_phone = LockoutPolicy(failures=overrides.get("phone", 3), window_s=60, lockout_s=300)
    per_address = LockoutPolicy(failures=overrides.get("address", 10), window_s=60, lockout_s=300)
    limiter = AuthLockout(
        per_phone=per_phone,
        per_address=per_address,
        max_keys=overrides.get("max_keys", 1000),
        on_lockout=began.append,
        on_refused=refused.append,
    )
    return limiter, began, refused


def test_a_phone_is_locked_after_its_failures_within_the_window() -> None:
    limiter, began, refused = lockout()
    for at in (0, 1):
        assert limiter.failure(phone="p", address="a", now=at) == []
    assert limiter.locked(phone="p", address="b", now=2) is None
    assert limiter.failure(phone="p", address="a", now=2) == [PHONE]
    assert began == [PHONE]
    # locked for every address, for lockout_s
    assert limiter.locked(phone="p", address="elsewhere", now=3) == PHONE
    assert limiter.locked(phone="p", address="elsewhere", now=301) == PHONE
    assert limiter.locked(phone="p", address="elsewhere", now=302.5) is None
    assert limiter.locked(phone="other", address="a", now=3) is None
    assert refused == [PHONE, PHONE]


def test_failures_older_than_the_window_do_not_count() -> None:
    limiter, began, _ = lockout()
    for at in (0, 50, 100, 150):
        limiter.failure(phone="p", address="a", now=at)
    assert began == []


def test_a_success_clears_the_phone() -> None:
    limiter, began, _ = lockout()
    limiter.failure(phone="p", address="a", now=0)
    limiter.failure(phone="p", address="a", now=1)
    limiter.success(phone="p")
    limiter.failure(phone="p", address="a", now=2)
    assert began == []


def test_an_address_is_locked_after_failures_for_many_phones() -> None:
    limiter, began, _ = lockout(address=10)
    for n in range(10):
        limiter.failure(phone=f"p{n}", address="10.0.0.7", now=n)
    assert began == [ADDRESS]
    assert limiter.locked(phone="fresh", address="10.0.0.7", now=11) == ADDRESS
    assert limiter.locked(phone="fresh", address="10.0.0.8", now=11) is None


def test_zero_failures_disables_a_scope() -> None:
    limiter, began, _ = lockout(address=0)
    for n in range(100):
        limiter.failure(phone=f"p{n}", address="a", now=n)
    assert began == []
    assert limiter.tracked(ADDRESS) == 0


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 50)), max_size=400))
def test_memory_is_bounded_by_max_keys(attempts: list[tuple[int, int]]) -> None:
    limiter, _, _ = lockout(max_keys=32)
    for at, (phone, address) in enumerate(attempts):
        limiter.failure(phone=str(phone), address=str(address), now=float(at))
        assert limiter.tracked(PHONE) <= 32
        assert limiter.tracked(ADDRESS) <= 32


def test_the_log_budget_holds_back_and_summarises() -> None:
    quiet = LogLimiter(burst=5, window_s=60, max_keys=100)
    allowed = [quiet.allow("checksum", "10.0.0.7", now=t / 100) for t in range(2350)]
    assert allowed.count(True) == 5
    assert quiet.allow("checksum", "10.0.0.8", now=1)  # another address has its own budget
    assert quiet.allow("auth_failed", "10.0.0.7", now=1)  # and another kind
    assert quiet.ended(now=30) == []
    (held,) = [h for h in quiet.ended(now=61) if h.source == "10.0.0.7"]
    assert (held.kind, held.count) == ("checksum", 2345)
    assert quiet.allow("checksum", "10.0.0.7", now=62)  # a new window


def test_the_log_budget_shares_one_entry_past_its_cap() -> None:
    quiet = LogLimiter(burst=1, window_s=60, max_keys=10)
    for n in range(1000):
        quiet.allow("refused", f"10.0.{n // 256}.{n % 256}", now=0)
    assert len(quiet) <= 11
    held = {h.source: h.count for h in quiet.ended(now=60)}
    assert held[MANY] == 1000 - 10 - 1  # every line counted: ten own budgets, one shared
