"""The non-finite guard: what a training step does when its loss is NaN or inf.

``train.on_nonfinite: stop`` raises :class:`~cadence.errors.Diverged` before the update; ``skip`` has
the step leave weights, BatchNorm statistics and optimizer state as they were (the schedule still
moves on). Under DDP the ranks decide together. On CUDA under ``stop`` the check stays on the device
(no host sync per step) and is read at log steps and before every checkpoint (``check_deferred``).
"""

from __future__ import annotations

import math

import torch

from cadence import distributed
from cadence.errors import Diverged
from cadence.plan import Timeline


class NonFiniteGuard:
    def __init__(self, policy: str, device: torch.device, timeline: Timeline, precision: str):
        self.policy, self.timeline, self.precision = policy, timeline, precision
        # One host sync per step to look at the loss is free on the CPU; on CUDA, under 'stop', the check
        # is kept on the device and read at log steps and before every checkpoint instead.
        self.deferred = device.type == "cuda" and policy == "stop"
        self.first_bad: torch.Tensor | None = None  # deferred: first step with a non-finite loss (inf: none)
        self.skipped = 0  # steps whose update was skipped (policy 'skip')
        self.scale = lambda: None  # the fp16 loss scale, for the message (set by the trainer)
        self.kept = "no checkpoint was written yet"  # what the message says of the last checkpoint

    def should_skip(self, loss: torch.Tensor, step: int) -> bool:
        """True if ``step``'s loss is non-finite on some rank and the update is to be skipped (counted);
        raises Diverged under 'stop' (or notes the step on the device, when the check is deferred)."""
        bad = torch.logical_not(torch.isfinite(loss)).float()
        if self.deferred:
            at = torch.where(bad > 0, float(step), math.inf)
            self.first_bad = at if self.first_bad is None else torch.minimum(self.first_bad, at)
            return False
        if not distributed.all_reduce_sum(bad).item():
            return False
        if self.policy == "stop":
            value = distributed.mean_over_ranks(loss).item()
            raise self.error(f"loss is {value} at step {step}", step)
        self.skipped += 1
        return True

    def check_deferred(self) -> None:
        """Raise Diverged if a deferred check saw a non-finite loss (one host sync)."""
        if self.first_bad is not None:
            first = distributed.all_reduce_min(self.first_bad).item()
            if math.isfinite(first):
                raise self.error(f"loss is not finite at step {int(first)}", int(first))

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Raise Diverged if a weight or buffer of ``model`` is not finite (after step ``step``)."""
        if not all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()):
            raise self.error(f"the weights are not finite after step {step}", step)

    def error(self, what: str, s: int) -> Diverged:
        """The error for a divergence first seen at step ``s``: where, at what LR, and what to change."""
        t = self.timeline
        scale = self.scale()
        scale = f", loss scale {scale:.4g}" if scale is not None else ""
        fixes = "lower optimizer.lr or lengthen the warmup"
        if self.precision == "fp16":
            fixes += ", train in bf16 or fp32"
        if self.policy == "stop":
            fixes += ", or set train.on_nonfinite: skip to skip such batches"
        return Diverged(f"{what} (stage {t.stage[s]}, lr {t.lr[s]:.4g}{scale}); {fixes}; {self.kept}")
