from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Shared machines are noisy: no per-example deadline; CI runs the same examples every time it
# is given the same code (derandomize) so a red run can be reproduced.
settings.register_profile("default", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") == "true" else "default")
