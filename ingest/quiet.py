"""Quiet under attack: a log budget per kind of line and source address.

Some log lines are made by the peer as often as it likes: a bad frame, a refused message, a
failed authentication.  Unthrottled, 100 MB of junk once wrote 52 MB of log.  Each such line
has a *kind* (the codec's error kind, "refused", "auth_failed", ...); per (kind, address) the
first ``burst`` lines of a window are logged, the rest are counted, and when the window ends
one line says how many were held back: "2,345 more bad frames (checksum) from 10.0.0.7 in the
last 60 s".  The metrics keep the exact totals (``jt808_decode_errors``, ``jt808_auth_failures``,
``jt808_log_lines_suppressed``).

Pure (time is passed in).  At most ``max_keys`` (kind, address) pairs are tracked; past that,
new addresses share one entry per kind ("many addresses"), so memory stays bounded and no
count is lost.
"""

from __future__ import annotations

import dataclasses

# Lines of one kind from one address logged per window: enough to see what is happening.
BURST = 5
# The summary of what was held back comes once a minute per (kind, address) at most.
WINDOW_S = 60.0
# (kind, address) pairs tracked at once: a flood from many addresses costs at most this many
# small entries (a few hundred KB), then shares one entry per kind.
MAX_KEYS = 4096
MANY = "many addresses"


@dataclasses.dataclass(slots=True)
class _Budget:
    opened: float
    logged: int = 0
    held: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Held:
    """Lines of ``kind`` from ``source`` held back during the window that just ended."""

    kind: str
    source: str
    count: int
    window_s: float


class LogLimiter:
    """See the module docstring."""

    def __init__(
        self, *, burst: int = BURST, window_s: float = WINDOW_S, max_keys: int = MAX_KEYS
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        self._budgets: dict[tuple[str, str], _Budget] = {}

    def __len__(self) -> int:
        return len(self._budgets)

    def allow(self, kind: str, source: str, now: float) -> bool:
        """True to log this line now; False: it is counted and summarised later."""
        key = (kind, source)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self.max_keys:
                key = (kind, MANY)
                budget = self._budgets.get(key)
            if budget is None:
                budget = self._budgets[key] = _Budget(opened=now)
        if budget.logged < self.burst:
            budget.logged += 1
            return True
        budget.held += 1
        return False

    def ended(self, now: float) -> list[Held]:
        """Close the windows that are over; what each held back (only those that held any).

        Call it about every ``window_s``; entries with nothing held are forgotten, so quiet
        sources cost nothing.
        """
        summaries = []
        for key, budget in list(self._budgets.items()):
            if now - budget.opened < self.window_s:
                continue
            del self._budgets[key]
            if budget.held:
                summaries.append(Held(key[0], key[1], budget.held, now - budget.opened))
        return summaries
