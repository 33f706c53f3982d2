"""Authentication lock-outs: failed 0x0102 attempts are rate-limited per phone and per address.

Pure (time is passed in), shared by the connections of a process.  Auth codes are 16 random
hex digits, so guessing one is hopeless; what the lock-out stops is the cost of trying (every
attempt is a database write) and the noise.  A key (a phone, or a peer address) with
``failures`` failed attempts within ``window_s`` is *locked* for ``lockout_s``: attempts for it
are refused without asking the registry.  A success clears a phone's failures.

Trade-offs, as deployed: a phone's lock-out also refuses its own terminal's new logins while it
lasts (an attacker who knows the phone can delay its reconnection by that long, but cannot take
over its live connection), so the per-phone threshold is low and the window short; many
terminals share one public address behind a carrier's NAT, so the per-address threshold is ten
times higher.

Memory: one entry per key with recent failures, each holding at most ``failures`` timestamps;
at most ``max_keys`` entries, the least recently failed forgotten first.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

PHONE = "phone"
ADDRESS = "address"

# Keys remembered per scope.  Each is a few hundred bytes at most (a deque of at most
# ``failures`` floats); 100,000 keys bound the lock-out's memory to tens of MB in a flood of
# attempts from spoofed phones, and cover far more terminals than one process serves.
MAX_KEYS = 100_000


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LockoutPolicy:
    """``failures`` within ``window_s`` lock a key for ``lockout_s``; 0 failures: never."""

    failures: int
    window_s: float
    lockout_s: float


@dataclasses.dataclass(slots=True)
class _Entry:
    times: collections.deque[float]
    locked_until: float = 0.0


class _Scope:
    """The failure history of one kind of key."""

    __slots__ = ("_entries", "_max_keys", "policy")

    def __init__(self, policy: LockoutPolicy, max_keys: int) -> None:
        self.policy = policy
        self._max_keys = max_keys
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def locked(self, key: str, now: float) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.locked_until > now

    def failure(self, key: str, now: float) -> bool:
        """Record a failure; True if it begins a lock-out."""
        policy = self.policy
        if policy.failures <= 0:
            return False
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(collections.deque(maxlen=policy.failures))
            while len(self._entries) > self._max_keys:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        if entry.locked_until > now:
            return False  # already locked: attempts are refused before they get here
        entry.times.append(now)
        horizon = now - policy.window_s
        while entry.times and entry.times[0] < horizon:
            entry.times.popleft()
        if len(entry.times) >= policy.failures:
            entry.locked_until = now + policy.lockout_s
            entry.times.clear()
            return True
        return False

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)


class AuthLockout:
    """See the module docstring.  ``on_lockout(scope)`` is called when a lock-out begins and
    ``on_refused(scope)`` for every attempt refused by one (metrics)."""

    def __init__(
        self,
        *,
        per_phone: LockoutPolicy,
        per_address: LockoutPolicy,
        max_keys: int = MAX_KEYS,
        on_lockout: Callable[[str], None] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._scopes = {PHONE: _Scope(per_phone, max_keys), ADDRESS: _Scope(per_address, max_keys)}
        self._on_lockout = on_lockout
        self._on_refused = on_refused

    def tracked(self, scope: str) -> int:
        """Keys with recent failures or a lock-out, in ``scope``."""
        return len(self._scopes[scope])

    def locked(self, *, phone: str, address: str, now: float) -> str | None:
        """The scope that refuses an attempt now (``"phone"`` or ``"address"``), or None."""
        for scope, key in ((ADDRESS, address), (PHONE, phone)):
            if key and self._scopes[scope].locked(key, now):
                if self._on_refused is not None:
                    self._on_refused(scope)
                return scope
        return None

    def failure(self, *, phone: str | None, address: str, now: float) -> list[str]:
        """Record a failed attempt; the scopes whose lock-out it begins."""
        begun = []
        for scope, key in ((PHONE, phone), (ADDRESS, address)):
            if key and self._scopes[scope].failure(key, now):
                begun.append(scope)
                if self._on_lockout is not None:
                    self._on_lockout(scope)
        return begun

    def success(self, *, phone: str) -> None:
        """The phone's terminal proved its code: its failures are forgotten."""
        self._scopes[PHONE].clear(phone)
