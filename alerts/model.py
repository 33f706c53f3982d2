"""The engine's input data: vehicles, trip filings and batches of positions.

These are plain records the wiring builds from the database (vehicles, filings) and from the
decoder (positions); nothing here does I/O.  Vehicles are addressed by their *index* in the
:class:`Registry` inside position batches (a numpy-friendly int), and by their stable ``id``
(the database key) everywhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol.batch import MILEAGE_ABSENT, TIME_ABSENT
from protocol.messages.location import STATUS_SOUTH, STATUS_WEST

__all__ = ["Filing", "PositionBatch", "Registry", "Vehicle"]

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
U32 = npt.NDArray[np.uint32]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Vehicle:
    """A registered vehicle (article 5 categories; ``exempt``: article 7 special vehicles).

    ``max_speed_kmh`` is the vehicle's default speed limit where no fence sets one (None: the
    rules' default).
    """

    id: int
    phone: str
    plate: str
    unit: str
    category: str = ""
    exempt: bool = False
    max_speed_kmh: float | None = None


class Registry:
    """The vehicles, in index order (index = position in the sequence)."""

    def __init__(self, vehicles: Sequence[Vehicle]) -> None:
        self.vehicles: tuple[Vehicle, ...] = tuple(vehicles)
        self.index_of_id: dict[int, int] = {}
        self.index_of_phone: dict[str, int] = {}
        for i, vehicle in enumerate(self.vehicles):
            if vehicle.id in self.index_of_id:
                raise ValueError(f"duplicate vehicle id {vehicle.id}")
            if vehicle.phone in self.index_of_phone:
                raise ValueError(f"duplicate terminal phone {vehicle.phone}")
            self.index_of_id[vehicle.id] = i
            self.index_of_phone[vehicle.phone] = i
        self.exempt = np.array([v.exempt for v in self.vehicles], dtype=bool)

    def __len__(self) -> int:
        return len(self.vehicles)

    def __getitem__(self, index: int) -> Vehicle:
        return self.vehicles[index]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Filing:
    """A trip filing (报备, article 17) or dispatch order (article 20).

    ``vehicle`` is the vehicle's id; ``start``/``end`` the filed window; ``destination_fence``
    the id of the fence the trip goes to (None: no particular area); ``filed_at`` when the
    filing reached the platform, as the platform stamped it -- after the trip started it is a
    back-filing (article 21).  Only filings that count (approved, not cancelled) are given to
    the engine.

    A filing corrected after it was filed has several versions (``version``, 1 first), each
    given to the engine as its own :class:`Filing` with the same ``id``: a version is in force
    from its ``filed_at`` until the next version's (``superseded_at``; None: in force now), and
    covers only what happens meanwhile.  ``claimed_at`` is the filing time the dispatcher's
    system claimed (None: it claimed none); a claim well before ``filed_at`` is reported.
    """

    id: int
    vehicle: int
    start: datetime
    end: datetime
    filed_at: datetime
    destination_fence: int | None = None
    purpose: str = ""
    passengers: str = ""
    approver: str = ""
    version: int = 1
    superseded_at: datetime | None = None
    claimed_at: datetime | None = None

    def __post_init__(self) -> None:
        for name in ("start", "end", "filed_at", "superseded_at", "claimed_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"filing {self.id}: {name} must be timezone-aware")
        if self.end <= self.start:
            raise ValueError(f"filing {self.id}: ends before it starts")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "vehicle": self.vehicle,
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "filed_at": self.filed_at.isoformat(),
            "destination_fence": self.destination_fence,
            "purpose": self.purpose,
            "passengers": self.passengers,
            "approver": self.approver,
            "version": self.version,
            "superseded_at": None if self.superseded_at is None else self.superseded_at.isoformat(),
            "claimed_at": None if self.claimed_at is None else self.claimed_at.isoformat(),
        }

    @property
    def key(self) -> tuple[int, int]:
        """(filing, version): what identifies one version among the engine's filings."""
        return (self.id, self.version)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PositionBatch:
    """Positions as parallel arrays, in any order (the engine sorts them).

    ``vehicle`` is the registry index (-1: not a registered vehicle, ignored); ``time`` the
    device's time as POSIX seconds (``protocol.batch.TIME_ABSENT`` if the report had none);
    ``lon``/``lat`` signed degrees; ``speed_kmh``; ``status`` and ``alarm`` the JT/T 808 bit
    words (tables 24/25); ``mileage`` item 0x01 in 1/10 km or -1; ``received`` when the
    platform received the report (POSIX seconds; the device time when not known): a terminal's
    liveness is judged by when it was last heard, not by the times it reports, which are old
    in a blind-area upload.
    """

    vehicle: I64
    time: I64
    lon: F64
    lat: F64
    speed_kmh: F64
    status: U32
    alarm: U32
    mileage: I64
    received: I64

    def __post_init__(self) -> None:
        n = self.vehicle.size
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, np.ndarray) or value.ndim != 1 or value.size != n:
                raise ValueError(f"PositionBatch.{field.name} must be a 1-d array of length {n}")

    def __len__(self) -> int:
        return int(self.vehicle.size)

    def take(self, rows: npt.NDArray[np.bool_]) -> PositionBatch:
        """The rows where ``rows`` is true, in order."""
        return PositionBatch(
            **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)}
        )

    @classmethod
    def from_arrays(
        cls,
        *,
        vehicle: npt.ArrayLike,
        time: npt.ArrayLike,
        lon: npt.ArrayLike,
        lat: npt.ArrayLike,
        speed_kmh: npt.ArrayLike,
        status: npt.ArrayLike,
        alarm: npt.ArrayLike | None = None,
        mileage: npt.ArrayLike | None = None,
        received: npt.ArrayLike | None = None,
    ) -> PositionBatch:
        """Build from anything array-like, with the dtypes the engine uses."""
        v = np.asarray(vehicle, dtype=np.int64).ravel()
        n = v.size
        t = np.asarray(time, dtype=np.int64).ravel()
        return cls(
            vehicle=v,
            time=t,
            lon=np.asarray(lon, dtype=np.float64).ravel(),
            lat=np.asarray(lat, dtype=np.float64).ravel(),
            speed_kmh=np.asarray(speed_kmh, dtype=np.float64).ravel(),
            status=np.asarray(status, dtype=np.uint32).ravel(),
            alarm=np.zeros(n, np.uint32)
            if alarm is None
            else np.asarray(alarm, dtype=np.uint32).ravel(),
            mileage=np.full(n, MILEAGE_ABSENT, np.int64)
            if mileage is None
            else np.asarray(mileage, dtype=np.int64).ravel(),
            received=t.copy() if received is None else np.asarray(received, np.int64).ravel(),
        )

    @classmethod
    def from_locations(
        cls, locations: npt.NDArray[np.void], index_of_phone: Mapping[str, int]
    ) -> PositionBatch:
        """From ``protocol.batch`` location rows (``LOCATION_DTYPE``): phones mapped through
        ``index_of_phone`` (unknown phones get -1), hemispheres from status bits 2/3, speed
        from 1/10 km/h.  2013 phones are 12 digits, 2019 phones 20; both are looked up as the
        decoder gives them."""
        phones, inverse = np.unique(locations["phone"], return_inverse=True)
        lookup = np.array(
            [index_of_phone.get(p.decode("ascii"), -1) for p in phones.tolist()], dtype=np.int64
        )
        status = locations["status"].astype(np.uint32)
        lat = locations["latitude"] / 1e6
        lon = locations["longitude"] / 1e6
        lat = np.where(status & STATUS_SOUTH, -lat, lat)
        lon = np.where(status & STATUS_WEST, -lon, lon)
        time = locations["time"].astype(np.int64)
        return cls(
            vehicle=lookup[inverse.ravel()] if phones.size else np.zeros(0, np.int64),
            time=time,
            lon=lon.astype(np.float64),
            lat=lat.astype(np.float64),
            speed_kmh=locations["speed"] / 10.0,
            status=status,
            alarm=locations["alarm"].astype(np.uint32),
            mileage=locations["mileage"].astype(np.int64),
            received=time.copy(),
        )


def time_present(time: I64) -> npt.NDArray[np.bool_]:
    """Rows whose device time is known."""
    return np.asarray(time != TIME_ABSENT, dtype=bool)


def finite(value: float | None) -> float:
    """``value`` or +inf (no limit)."""
    return math.inf if value is None else float(value)
