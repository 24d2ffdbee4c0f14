import os
from pathlib import Path

import pytest
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

DISTRIBUTED = Path(__file__).parent / "distributed"


def pytest_collection_modifyitems(config, items):
    """Multi-process tests are ``distributed`` and ``slow``: ``pytest -m "not slow"`` is the quick loop.
    Tests elsewhere that launch processes say so themselves (e.g. the experiments' smoke run)."""
    for item in items:
        if DISTRIBUTED in Path(item.fspath).parents:
            item.add_marker(pytest.mark.distributed)
            item.add_marker(pytest.mark.slow)
