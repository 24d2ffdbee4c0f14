import os

from hypothesis import HealthCheck, settings

# Locally every run explores new examples; CI (CI=true) replays a fixed, derandomized set so that
# its verdict depends on the code alone. HYPOTHESIS_EXAMPLES raises the count for deeper searches.
settings.register_profile(
    "default",
    max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI", "").lower() == "true",
)
settings.load_profile("default")
