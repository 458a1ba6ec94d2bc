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


@pytest.fixture(autouse=True)
def _pictures_built_not_rendered(request, monkeypatch):
    """Every training run draws its plan and its curves: ~3 s of the ~3.5 s of CPU a tiny run takes
    here, mostly matplotlib rendering ticks and text. In a test not marked ``pictures`` each picture is
    still built (every line of cadence's plotting runs on the run's own numbers) but not rendered: its
    file is written empty. Tests marked ``pictures`` look at what is drawn, and subprocesses (the
    demo, torchrun, the command line's Ctrl-C) render as a user's run does."""
    if request.node.get_closest_marker("pictures"):
        return
    from cadence import report

    build = report._figure

    def unrendered(*args, **kwargs):
        fig, axes = build(*args, **kwargs)
        fig.savefig = lambda path, **_: open(path, "wb").close()
        return fig, axes

    monkeypatch.setattr(report, "_figure", unrendered)
