"""``StepScheduler``: the torch adapter that applies a :class:`~cadence.plan.Timeline`, per batch."""

from __future__ import annotations

import math
import warnings
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from cadence.plan import Timeline


class StepScheduler(LRScheduler):
    """Sets LR -- and momentum, or Adam's beta1, when the schedule cycles it -- in every param group
    for each optimizer step, exactly as the timeline lists them.

    Each group keeps its own base in ``group['initial_lr']`` and gets
    ``timeline.lr[step] * initial_lr / timeline.base_lr``, so groups with their own LR multipliers
    keep them. Call ``step()`` after ``optimizer.step()``, once per batch, as with any torch
    scheduler; ``last_epoch`` counts optimizer steps. Past the end of the timeline, the last
    values hold. ``state_dict()`` holds the position, not the timeline (rebuild that from the recipe).

    Works in any loop::

        sched = StepScheduler.from_recipe(optimizer, recipe, train_samples=len(dataset))
        for x, y in loader:
            loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad(); sched.step()

    It warns (once) when the optimizer's LR is not the plan's peak (every LR of the plan is then
    scaled by their ratio: ``from_recipe`` sets it), and when it is stepped past the end of its plan
    (the classic mistake of stepping per micro-batch or per epoch; torch's OneCycleLR raises there).
    """

    def __init__(self, optimizer: Optimizer, timeline: Timeline, last_epoch: int = -1):
        if len(timeline) == 0:
            raise ValueError("the timeline has no steps")
        self.timeline = timeline
        self._warned_past_end = False
        first = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        if last_epoch == -1 and not math.isclose(first, timeline.base_lr, rel_tol=1e-12):
            warnings.warn(f"StepScheduler: the optimizer's LR {first:g} is not the plan's peak LR "
                          f"{timeline.base_lr:g} (optimizer.lr): every LR of the plan is scaled by "
                          f"{first / timeline.base_lr:g}. StepScheduler.from_recipe sets the optimizer's LR "
                          "from the recipe", UserWarning, stacklevel=2)
        super().__init__(optimizer, last_epoch)

    @classmethod
    def from_recipe(cls, optimizer: Optimizer, recipe, train_samples: int | None = None,
                    world_size: int = 1) -> StepScheduler:
        """The scheduler of ``recipe``'s plan for ``train_samples`` images on ``world_size`` processes,
        with the optimizer's LR set to the recipe's peak (groups with their own LRs keep their ratio to
        the first group's)."""
        timeline = recipe.timeline(train_samples=train_samples, world_size=world_size)
        ratio = timeline.base_lr / optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
            group.pop("initial_lr", None)
        return cls(optimizer, timeline)

    def _index(self) -> int:
        return min(max(self.last_epoch, 0), len(self.timeline) - 1)

    def get_lr(self) -> list[float]:
        """The plan's LR; a group with its own LR keeps its ratio to the plan's peak, and a group
        trained for its first ``epochs`` (``optimizer.groups``) gets 0 after them: held exactly."""
        i = self._index()
        lr, epoch = self.timeline.lr[i], self.timeline.epoch[i]
        base = self.timeline.base_lr
        return [0.0 if g.get("epochs") is not None and epoch >= g["epochs"] else
                lr if g["initial_lr"] == base else lr * g["initial_lr"] / base
                for g in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        with warnings.catch_warnings():  # a step whose optimizer.step() was skipped (fp16 overflow, an
            # unreadable batch) still moves the plan on, by design: torch's warning about it is not for us
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            super().step(epoch)
        if self.last_epoch > len(self.timeline) and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"StepScheduler stepped past the end of its plan ({len(self.timeline):,} optimizer "
                          "steps): the last LR holds. Step it once per optimizer step -- not per micro-batch, "
                          "not per epoch", UserWarning, stacklevel=2)
        if self.timeline.cycles_momentum:
            set_momentum(self.optimizer, self.timeline.momentum[self._index()])

    def jump(self, step: int) -> None:
        """Continue at ``step`` of the timeline: set its LR (and momentum) now, as if ``step()`` had been
        called ``step`` times (used when a resumed run moves onto a changed recipe's timeline)."""
        self.last_epoch = step
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
        if self.timeline.cycles_momentum:
            set_momentum(self.optimizer, self.timeline.momentum[self._index()])

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("timeline", None)
        state["timeline_steps"] = len(self.timeline)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        steps = state.pop("timeline_steps", len(self.timeline))
        if steps != len(self.timeline):
            raise ValueError(f"the saved scheduler ran a {steps}-step timeline; this one has "
                             f"{len(self.timeline)} steps")
        super().load_state_dict(state)


def set_momentum(optimizer: Optimizer, momentum: float) -> None:
    """SGD/RMSprop ``momentum`` or Adam-family ``betas[0]`` in every param group."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        elif "momentum" in group:
            group["momentum"] = momentum


def get_momentum(optimizer: Optimizer, group: int = 0) -> float:
    g = optimizer.param_groups[group]
    return g["betas"][0] if "betas" in g else g.get("momentum", 0.0)
