"""The geofence package's errors.

Everything here is about input we were given (a fence definition, a GeoJSON document); misuse
of the API (arrays of different lengths) raises ``ValueError`` as numpy does.
"""

from __future__ import annotations

from collections.abc import Sequence


class FenceError(ValueError):
    """A fence definition cannot be used: bad coordinates, an invalid polygon, a bad window."""


class GeoJSONError(FenceError):
    """A GeoJSON document does not describe a usable set of fences.

    ``problems`` lists every problem found, each naming the feature (by index, and by name
    when it has one), so that an import reports all of them at once.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:10])
        more = f" (and {len(self.problems) - 10} more)" if len(self.problems) > 10 else ""
        super().__init__(f"{len(self.problems)} problem(s): {shown}{more}")
