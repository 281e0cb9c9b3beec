"""Suite-wide test settings.

Under CI (``CI=true``) hypothesis runs derandomized: the same examples on every run, so a red
CI run can be reproduced exactly and a green one is not luck. Developers keep random search.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in {"1", "true", "yes"} else "dev")
