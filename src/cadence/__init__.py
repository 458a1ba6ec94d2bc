"""cadence: train image classifiers on a learning-rate schedule you can see before you train.

The pure core (no torch) -- ``cadence.schedules``, ``cadence.plan``, ``cadence.recipe`` -- and the
torch adapter ``cadence.scheduler.StepScheduler`` are meant for use in your own training loop too.

The names below are imported when first used (PEP 562), so ``import cadence.cli`` -- the command's
entry point -- loads only the standard library before ``main`` is running: a Ctrl-C at start-up
lands in ``main``'s handler (one line, exit 130), not in an import's traceback.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"FieldError": "cadence.errors", "Stage": "cadence.plan", "Timeline": "cadence.plan",
            "make_timeline": "cadence.plan", "Recipe": "cadence.recipe", "load_recipe": "cadence.recipe",
            "Duration": "cadence.schedules"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cadence' has no attribute {name!r}")
