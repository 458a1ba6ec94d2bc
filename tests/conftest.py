"""Shared test settings.

Hypothesis runs derandomized (a fixed seed derived from each test) with no per-example deadline, so
CI is reproducible and never fails on a slow machine. ``HYPOTHESIS_PROFILE=explore`` turns the
randomness back on when hunting for new counterexamples locally.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402

# helpers.py (imported by the test modules; tests/ is on sys.path like them) asserts too: rewrite those
# asserts as pytest does in test modules, so their failures show the values compared.
pytest.register_assert_rewrite("helpers")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Decoded-image caches go to a temporary folder, not the user's ~/.cache (subprocesses too)."""
    old = os.environ.get("CADENCE_CACHE_DIR")
    os.environ["CADENCE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("CADENCE_CACHE_DIR", None)
    else:
        os.environ["CADENCE_CACHE_DIR"] = old
