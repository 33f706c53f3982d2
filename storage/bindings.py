"""Which vehicle a terminal was fitted to at a given time, as the position writer resolves it.

``terminal_bindings`` (migration 10) holds, per terminal phone, the vehicles it was fitted to
and from when to when (article 18: installation, change, removal and recovery of terminals go
through the platform centre).  A position belongs to the vehicle bound to its phone at its
*device* time: a terminal moved from one vehicle to another leaves what it recorded before the
move on the old vehicle, even when it uploads it afterwards (blind-area data, JT/T 808-2019
8.2.5 and 0x0704).

The writer stamps ``positions.vehicle_id`` with that vehicle as it stores a batch, from a
:class:`BindingMap` read under the link lock (:data:`storage.masterdata.LINK_LOCK`, taken
shared by every batch): the map is read again whenever ``masterdata_state.version`` moved, and a
vehicle import that changes bindings re-resolves the stored positions of the phones it touched
under the lock taken exclusively.  So every stored position carries the vehicle of its binding,
whichever commits first; the views, exports and reports join on ``vehicle_id``.  The SQL function
``jt808_vehicle_at(phone, device_time)`` (migration 11) is the same rule for queries.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg

# A binding row as read: phone, vehicle, valid from (None: since always), valid to (None: open).
BindingRow = tuple[str, int, datetime | None, datetime | None]

# -infinity, as a time every device time compares after.
_SINCE_ALWAYS = datetime.min.replace(tzinfo=UTC)

LOAD_BINDINGS = (
    "SELECT phone, vehicle_id, nullif(valid_from, '-infinity'), valid_to "
    "FROM terminal_bindings ORDER BY phone, valid_from"
)


class BindingMap:
    """An immutable snapshot of ``terminal_bindings``, as of master-data version ``version``.

    Size: one entry per binding, bounded by the fleet and its history of terminal changes
    (master data, tens of thousands of rows for a province); it is read whole, like the
    registry the rule engine holds.
    """

    __slots__ = ("_current", "_history", "version")

    def __init__(self, version: int | None, rows: Iterable[BindingRow]) -> None:
        self.version = version
        # The open binding of each phone: (vehicle, valid_from or None).  Nearly every position
        # is resolved by this one lookup and one comparison.
        self._current: dict[str, tuple[int, datetime | None]] = {}
        # Phones with closed bindings: their starts (sorted) and (vehicle, start, end) per start.
        self._history: dict[str, tuple[list[datetime], list[BindingRow]]] = {}
        for row in rows:
            phone, vehicle, valid_from, valid_to = row
            if valid_to is None:
                self._current[phone] = (vehicle, valid_from)
            starts, spans = self._history.setdefault(phone, ([], []))
            starts.append(_SINCE_ALWAYS if valid_from is None else valid_from)
            spans.append(row)

        # Phones whose only binding is open need no history.
        for phone in [p for p, (starts, _) in self._history.items() if len(starts) == 1]:
            if phone in self._current:
                del self._history[phone]

    def __len__(self) -> int:
        return len(self._current) + sum(len(spans) for _, spans in self._history.values())

    def vehicle_at(self, phone: str, when: datetime) -> int | None:
        """The vehicle ``phone`` was fitted to at ``when`` (None: none was)."""
        current = self._current.get(phone)
        if current is not None and (current[1] is None or when >= current[1]):
            return current[0]
        found = self._history.get(phone)
        if found is None:
            return None
        starts, spans = found
        # The last binding that started at or before ``when``.
        index = bisect.bisect_right(starts, when) - 1
        if index < 0:
            return None
        _, vehicle, _, valid_to = spans[index]
        if valid_to is not None and when >= valid_to:
            return None  # between a removal and the next fitting
        return vehicle


class BindingCache:
    """The current :class:`BindingMap`, shared by the writer's stores (one per thread)."""

    def __init__(self) -> None:
        self._map = BindingMap(None, ())
        self._lock = threading.Lock()

    def current(self, cur: psycopg.Cursor[Any], version: int | None) -> BindingMap:
        """The map as of ``version`` (just read in ``cur``'s transaction, under the link lock):
        the cached one, or read again through ``cur``."""
        found = self._map
        if found.version is not None and found.version == version:
            return found
        with self._lock:
            found = self._map
            if found.version is not None and found.version == version:
                return found
            rows = cur.execute(LOAD_BINDINGS).fetchall()
            found = BindingMap(version, rows)
            self._map = found
        return found
