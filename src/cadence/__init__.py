"""cadence: train image classifiers on a learning-rate schedule you can see before you train.

The pure core (no torch) -- ``cadence.schedules``, ``cadence.plan``, ``cadence.recipe`` -- and the
torch adapter ``cadence.scheduler.StepScheduler`` are meant for use in your own training loop too.
"""

from cadence.errors import FieldError
from cadence.plan import Stage, Timeline, make_timeline
from cadence.recipe import Recipe, load_recipe
from cadence.schedules import Duration

__version__ = "0.1.0"
__all__ = ["FieldError", "Stage", "Timeline", "make_timeline", "Recipe", "load_recipe", "Duration"]
