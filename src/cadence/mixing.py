"""Batch mixing (mixup, cutmix) and the losses that take its targets.

A batch is mixed by a draw keyed on ``(seed, step)``: whether it is mixed, mixup or cutmix, the
Beta-distributed ratio and cutmix's box are the same on every rank and in a resumed run. Each image
is mixed with the one half a batch away in its rank's batch (local ``j`` with ``(j + n/2) mod n``).
Ranks take every ``world``-th image of the global batch, so with an even per-rank batch these are
the same pairs a single process forms from the whole batch (global ``p`` with ``p + B/2``): one
process and several train on the same mixed images.

The targets stay as labels, partner labels and the ratio (``Targets``); the loss makes them dense
with label smoothing, as timm's ``mixup_target`` does: ``(1 - e) x mixed one-hots + e / classes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cadence.data.keys import key
from cadence.regularization import Regularization

MIX_STREAM = 0x313C  # mixed with (seed, step): the key of a batch's mixing draws


@dataclass
class Targets:
    """What a batch is trained towards: ``lam`` x one-hot(``labels``) + (1 - ``lam``) x
    one-hot(``partner``), smoothed by ``smoothing``. Unmixed: ``partner`` is None."""

    labels: torch.Tensor
    partner: torch.Tensor | None = None
    lam: float = 1.0
    smoothing: float = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: slice) -> Targets:
        """The targets of some of the batch's images (a micro-batch)."""
        return Targets(self.labels[rows], None if self.partner is None else self.partner[rows], self.lam,
                       self.smoothing)

    def dense(self, classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Class probabilities, before smoothing."""
        out = F.one_hot(self.labels, classes).to(dtype)
        if self.partner is not None:
            out = out * self.lam + F.one_hot(self.partner, classes).to(dtype) * (1 - self.lam)
        return out


@dataclass(frozen=True)
class Mix:
    """One batch's draw: ``kind`` is ``None`` (not mixed), ``mixup`` or ``cutmix``; ``box`` is
    cutmix's ``(top, bottom, left, right)`` in pixels; ``lam`` is the share of each image kept
    (for cutmix: 1 - the box's share of the area)."""

    kind: str | None
    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def draw(reg: Regularization, seed: int, step: int, height: int, width: int) -> Mix:
    """The mixing of global step ``step`` at ``height`` x ``width`` px: mixed with probability
    ``mix_prob``; cutmix rather than mixup with probability ``switch_prob`` when both are on; the
    ratio from Beta(alpha, alpha); cutmix's box centred uniformly, its sides sqrt(1 - ratio) of the
    image's, clipped at the border, and the ratio then set from the box actually cut (timm's rule)."""
    if not reg.mixes:
        return Mix(None)
    rng = np.random.Generator(np.random.PCG64(key(seed, MIX_STREAM, step)))
    if rng.random() >= reg.mix_prob:
        return Mix(None)
    cut = reg.cutmix > 0 and (reg.mixup <= 0 or rng.random() < reg.switch_prob)
    lam = float(rng.beta(reg.cutmix, reg.cutmix) if cut else rng.beta(reg.mixup, reg.mixup))
    if not cut:
        return Mix("mixup", lam)
    ratio = np.sqrt(1 - lam)
    ch, cw = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return Mix("cutmix", 1 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))


class BatchMixer:
    """A stage's mixing and label smoothing: ``mixer(x, labels, step) -> (x, Targets)`` on a
    normalised batch on its device."""

    def __init__(self, reg: Regularization, seed: int):
        self.reg, self.seed = reg, seed

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, Targets]:
        mix = draw(self.reg, self.seed, step, x.shape[-2], x.shape[-1])
        if mix.kind is None or len(labels) == 0:
            return x, Targets(labels, smoothing=self.reg.label_smoothing)
        shift = -(len(labels) // 2)  # image i's partner: image (i + n/2) mod n
        if mix.kind == "mixup":
            x = (x * mix.lam).add_(x.roll(shift, 0).mul_(1 - mix.lam))
        else:
            top, bottom, left, right = mix.box
            patch = x[..., top:bottom, left:right].roll(shift, 0)
            x = x.clone()
            x[..., top:bottom, left:right] = patch
        return x, Targets(labels, labels.roll(shift, 0), mix.lam, self.reg.label_smoothing)


class Loss(nn.Module):
    """Cross-entropy (``ce``) or binary cross-entropy per class (``bce``, timm's
    ``BinaryCrossEntropy`` as "ResNet strikes back" trains with) of logits against labels or
    ``Targets``. Plain labels get ``label_smoothing``; ``Targets`` carry their own.

    ``ce``: torch's ``cross_entropy`` (hard labels as before; mixed targets as probabilities, with
    torch's smoothing, which is timm's). ``bce``: targets ``(1 - e) p + e / classes``, then, with
    ``target_threshold``, 1 above it and 0 below; the mean over images and classes."""

    def __init__(self, kind: str = "ce", label_smoothing: float = 0.0, target_threshold: float | None = None):
        super().__init__()
        self.kind, self.label_smoothing, self.target_threshold = kind, label_smoothing, target_threshold

    def forward(self, logits: torch.Tensor, target: torch.Tensor | Targets) -> torch.Tensor:
        if not isinstance(target, Targets):
            target = Targets(target, smoothing=self.label_smoothing)
        e = target.smoothing
        if self.kind == "ce":
            if target.partner is None:
                return F.cross_entropy(logits, target.labels, label_smoothing=e)
            return F.cross_entropy(logits, target.dense(logits.shape[-1]), label_smoothing=e)
        classes = logits.shape[-1]
        p = target.dense(classes, torch.float32 if logits.dtype in (torch.bfloat16, torch.float16) else logits.dtype)
        if e:
            p = p * (1 - e) + e / classes
        if self.target_threshold is not None:
            p = (p > self.target_threshold).to(p.dtype)
        return F.binary_cross_entropy_with_logits(logits, p)  # (autocast computes it in float32)
