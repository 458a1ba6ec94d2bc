"""Regularization as part of the plan: augmentation policies, batch mixing and label smoothing, set
for the whole recipe and overridden per stage. Pure: no torch.

A recipe's ``regularization:`` section and each stage's ``regularization:`` hold the same keys; a
key left out (``None`` here) inherits -- the stage from the recipe, the recipe from ``DEFAULTS``.
``resolve(defaults, recipe, stage)`` gives the values a stage trains with; the plan shows the keys
that are not at their default (a column per key that changes between stages).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from cadence.errors import FieldError

Policy = Literal["none", "trivialaugment", "randaugment", "autoaugment"]
MAGNITUDE_BINS = 31  # torchvision's num_magnitude_bins for RandAugment and TrivialAugmentWide
IN_MEMORY_SOURCES = ("digits", "synthetic", "cifar10")  # pad-cropped batches, not RandomResizedCrop
FILE_ONLY = ("crop_scale", "crop_ratio")
MEMORY_ONLY = ("translate",)
NEVER_FLIPPED = ("digits",)  # sources whose images are never flipped (mirrored digits are not digits)
Flip = Literal["random", "alternate", "none"]


def _check(cond: bool, name: str, value: object, message: str) -> None:
    if not cond:
        raise FieldError(name, value, message)


def _pair(name: str, value, low: float, high: float, what: str) -> None:
    if value is not None:
        a, b = value
        _check(low <= a <= b <= high and a > 0, name, list(value), f"must be [min, max] with 0 < min <= max <= {what}")


@dataclass(frozen=True, kw_only=True)
class Regularization:
    """Every key is optional: ``None`` means "as the recipe (or the default) says"."""

    crop_scale: tuple[float, float] | None = None  # RandomResizedCrop's area fraction (image files)
    crop_ratio: tuple[float, float] | None = None  # RandomResizedCrop's aspect ratio (image files)
    translate: int | None = None  # in-memory: pad-crop by up to this many px, reflect padding (default: 1/8 of the side)
    flip: Flip | None = None  # random: each image by a fair coin; alternate: random at the first epoch, then
    # every image the other way round each epoch (airbench's); none
    policy: Policy | None = None  # per-image policy, torchvision's: TrivialAugmentWide, RandAugment, AutoAugment
    num_ops: int | None = None  # randaugment: ops per image
    magnitude: int | None = None  # randaugment: 0 .. 30 (torchvision's 31 bins)
    color_jitter: float | None = None  # brightness, contrast and saturation factors drawn in [1 - c, 1 + c]
    random_erasing: float | None = None  # probability of erasing a box (filled with the mean colour)
    erasing_scale: tuple[float, float] | None = None  # the box's area fraction
    mixup: float | None = None  # Beta(alpha, alpha) of mixup; 0: off
    cutmix: float | None = None  # Beta(alpha, alpha) of cutmix; 0: off
    mix_prob: float | None = None  # probability that a batch is mixed at all
    switch_prob: float | None = None  # with both on: probability of cutmix rather than mixup, per batch
    label_smoothing: float | None = None

    def __post_init__(self):
        _pair("crop_scale", self.crop_scale, 0, 1, "1")
        _pair("crop_ratio", self.crop_ratio, 0, math.inf, "a finite ratio")
        _check(self.translate is None or 0 <= self.translate <= 64, "translate", self.translate,
               "must be in 0 .. 64 px")
        _check(self.num_ops is None or 1 <= self.num_ops <= 16, "num_ops", self.num_ops, "must be in 1 .. 16")
        _check(self.magnitude is None or 0 <= self.magnitude < MAGNITUDE_BINS, "magnitude", self.magnitude,
               f"must be in 0 .. {MAGNITUDE_BINS - 1} (torchvision's magnitude bins)")
        _check(self.color_jitter is None or 0 <= self.color_jitter <= 1, "color_jitter", self.color_jitter,
               "must be in [0, 1]")
        _check(self.random_erasing is None or 0 <= self.random_erasing <= 1, "random_erasing",
               self.random_erasing, "is a probability: must be in [0, 1]")
        _pair("erasing_scale", self.erasing_scale, 0, 1, "1")
        for name in ("mixup", "cutmix"):
            v = getattr(self, name)
            _check(v is None or 0 <= v < math.inf, name, v, "is a Beta distribution's alpha: must be >= 0 and "
                   "finite (0: off)")
        for name in ("mix_prob", "switch_prob"):
            v = getattr(self, name)
            _check(v is None or 0 <= v <= 1, name, v, "is a probability: must be in [0, 1]")
        _check(self.label_smoothing is None or 0 <= self.label_smoothing < 1, "label_smoothing",
               self.label_smoothing, "must be in [0, 1)")

    def over(self, base: Regularization) -> Regularization:
        """These values where set, ``base``'s elsewhere."""
        return dataclasses.replace(base, **{k: v for k, v in self.items() if v is not None})

    def items(self) -> list[tuple[str, object]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]

    # -- what a stage does (on resolved values) ---------------------------------------------------

    @property
    def mixes(self) -> bool:
        """Batches may be mixed (mixup or cutmix on, with a chance of happening)."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0

    @property
    def per_image(self) -> bool:
        """Images get a per-image policy, colour jitter or erasing (beyond crop and flip)."""
        return self.policy != "none" or self.color_jitter > 0 or self.random_erasing > 0


DEFAULTS = Regularization(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip="random", policy="none", num_ops=2,
                          magnitude=9, color_jitter=0.0, random_erasing=0.0, erasing_scale=(0.02, 0.33),
                          mixup=0.0, cutmix=0.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.0)


def resolve(recipe: Regularization, stages: list[Regularization], *, source: str,
            label_smoothing: float = 0.0) -> list[Regularization]:
    """Each stage's values: the stage's keys over the recipe's over ``DEFAULTS`` (with the older
    ``train.label_smoothing`` as the recipe-wide default of ``label_smoothing``). Raises FieldError
    (field path, value) for a key the source cannot apply: its kind of crop, or flips of images it never
    flips."""
    base = recipe.over(dataclasses.replace(DEFAULTS, label_smoothing=label_smoothing))
    for where, reg in [("regularization", recipe)] + [(f"stages.{k}.regularization", s)
                                                      for k, s in enumerate(stages)]:
        if source in IN_MEMORY_SOURCES:
            for name in FILE_ONLY:
                value = getattr(reg, name)
                _check(value is None or value == getattr(DEFAULTS, name), f"{where}.{name}",
                       list(value or ()), f"applies to image files (RandomResizedCrop); source {source} pads and "
                       "crops its in-memory images instead")
        else:
            for name in MEMORY_ONLY:
                _check(getattr(reg, name) is None, f"{where}.{name}", getattr(reg, name),
                       f"applies to in-memory images (pad and crop); source {source} crops files with "
                       "RandomResizedCrop (crop_scale, crop_ratio)")
        _check(source not in NEVER_FLIPPED or reg.flip != "alternate", f"{where}.flip", reg.flip,
               f"but {source} images are never flipped")
    return [s.over(base) for s in stages]


def set_keys(resolved: list[Regularization]) -> list[str]:
    """The keys not at their default in some stage, in declaration order (the plan CSV's columns)."""
    return [name for name, default in DEFAULTS.items() if any(getattr(r, name) != default for r in resolved)]


def varying(resolved: list[Regularization]) -> list[str]:
    """The keys whose value changes from one stage to another (the plan table's columns)."""
    return [name for name, _ in DEFAULTS.items() if len({getattr(r, name) for r in resolved}) > 1]


def describe(name: str, value: object) -> str:
    """A value as the plan prints it."""
    if isinstance(value, tuple):
        return "-".join(f"{v:.3g}" for v in value)
    if value is None:  # translate's default
        return "1/8 side"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def numeric(name: str, value: object) -> float:
    """A value as the plan draws it: a number as it is, a pair by its lower end, a policy as 0 (none)
    or 1 (on; the table names it)."""
    if isinstance(value, tuple):
        return float(value[0])
    if isinstance(value, str):
        return float(value != "none")
    return math.nan if value is None else float(value)
