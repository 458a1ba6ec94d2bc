"""Stages -> an exact timeline of optimizer steps, and the schedule laid over it. Pure: no torch.

The number of steps in an epoch is what ``DistributedSampler`` + ``DataLoader`` actually yield for
that many samples, that batch size, world size and ``drop_last`` -- computed, never estimated.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from cadence.regularization import Regularization
from cadence.schedules import Duration, ScheduleError, ScheduleSpec

Scope = Literal["global", "per_stage"]
Progress = Literal["steps", "samples"]
LrScaling = Literal["none", "linear", "sqrt"]
MAX_STEPS = 20_000_000  # a longer plan is a typo (epochs, batch_size), and would fill the memory


@dataclass(frozen=True)
class Stage:
    """``epochs`` passes over ``data_fraction`` of the training set at ``resolution`` px, with
    ``batch_size`` images per optimizer step summed over all ranks."""

    epochs: int
    resolution: int
    batch_size: int
    data_fraction: float = 1.0
    regularization: Regularization = field(default_factory=Regularization)  # overrides the recipe's

    def __post_init__(self):
        checks = [("epochs", self.epochs >= 1, "must be >= 1"),
                  ("resolution", self.resolution >= 8, "must be >= 8 px"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("data_fraction", 0 < self.data_fraction <= 1, "must be in (0, 1]")]
        for name, ok, message in checks:
            if not ok:
                raise ScheduleError(name, getattr(self, name), message)


def epoch_samples(train_samples: int, data_fraction: float) -> int:
    """Images drawn in one epoch of a stage: ``floor(train_samples * data_fraction)``, computed on
    the decimal value written (0.29 x 100 is 29, not 28)."""
    return math.floor(train_samples * Fraction(str(data_fraction)))


def epoch_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> list[int]:
    """Global images in each optimizer step of an epoch over ``n`` images.

    Mirrors ``DistributedSampler(drop_last=drop_last)`` (each rank gets ``n // world`` images, or
    ``ceil(n / world)`` padded with repeats) feeding a ``DataLoader(batch_size=batch_size // world,
    drop_last=drop_last)`` on every rank."""
    if batch_size % world_size:
        raise ScheduleError("batch_size", batch_size, f"is not divisible by the world size {world_size}")
    local = batch_size // world_size
    per_rank = n // world_size if drop_last else -(-n // world_size)
    full, rest = divmod(per_rank, local)
    if full > MAX_STEPS:
        raise ScheduleError("batch_size", batch_size, f"makes {full:,} steps per epoch of {n:,} images "
                            f"(at most {MAX_STEPS:,} in a plan)")
    return [batch_size] * full + ([rest * world_size] if rest and not drop_last else [])


def lr_scale(batch_size: int, reference_batch_size: int, rule: LrScaling) -> float:
    """Factor on the peak LR for a stage's global batch: ``none``, ``linear`` (Goyal et al.) or ``sqrt``."""
    ratio = batch_size / reference_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass
class Timeline:
    """One entry per optimizer step of the whole run (columns as lists, index = global step)."""

    stage: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)  # global epoch index, 0-based
    resolution: list[int] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)  # the stage's global batch size
    samples: list[int] = field(default_factory=list)  # images in this step (smaller if partial)
    samples_seen: list[int] = field(default_factory=list)  # images seen after this step
    epoch_progress: list[float] = field(default_factory=list)  # fractional epoch at step start
    lr: list[float] = field(default_factory=list)
    momentum: list[float] = field(default_factory=list)
    stage_starts: list[int] = field(default_factory=list)  # first step of each stage, and the end
    epoch_starts: list[int] = field(default_factory=list)  # first step of each epoch, and the end
    stages: list[Stage] = field(default_factory=list)
    base_lr: float = 0.0  # the recipe's peak LR, before batch-size scaling
    cycles_momentum: bool = False  # the schedule sets momentum (else ``momentum`` is the constant)
    regularization: list[Regularization] = field(default_factory=list)  # each stage's, resolved (if known)
    ema_decay: list[float] | None = None  # the weight EMA's decay at each step (if the recipe averages)
    ema_half_life: float | None = None  # in samples, when written as a duration

    def __len__(self) -> int:
        return len(self.stage)

    CSV_COLUMNS = ("step", "stage", "epoch", "resolution", "batch_size", "samples_seen", "lr", "momentum")

    def rows(self):
        """Tuples in ``CSV_COLUMNS`` order."""
        for s in range(len(self)):
            yield (s, self.stage[s], self.epoch[s], self.resolution[s], self.batch_size[s],
                   self.samples_seen[s], self.lr[s], self.momentum[s])

    def stage_summary(self) -> list[dict]:
        out = []
        for k in range(len(self.stage_starts) - 1):
            a, b = self.stage_starts[k], self.stage_starts[k + 1]
            out.append({
                "stage": k, "resolution": self.resolution[a], "batch_size": self.batch_size[a],
                "data_fraction": self.stages[k].data_fraction,
                "epochs": self.epoch[b - 1] - self.epoch[a] + 1, "steps": b - a,
                "samples": sum(self.samples[a:b]), "first_step": a,
                "lr_min": min(self.lr[a:b]), "lr_max": max(self.lr[a:b]),
            })
        return out


def layout(stages: list[Stage], train_samples: int, *, world_size: int = 1,
           drop_last: bool = True) -> Timeline:
    """The steps of every stage and epoch, with no learning rates yet."""
    if world_size < 1:
        raise ScheduleError("world_size", world_size, "must be >= 1")
    t = Timeline(stages=list(stages))
    seen, epoch = 0, 0
    for k, st in enumerate(stages):
        t.stage_starts.append(len(t))
        n = epoch_samples(train_samples, st.data_fraction)
        try:
            sizes = epoch_batches(n, st.batch_size, world_size, drop_last)
        except ScheduleError as e:
            raise e.within(f"stages.{k}") from None
        if not sizes:
            raise ScheduleError(f"stages.{k}.batch_size", st.batch_size,
                                f"{n} images per epoch make no full batch on {world_size} rank(s)")
        if len(t) + st.epochs * len(sizes) > MAX_STEPS:
            raise ScheduleError(f"stages.{k}.epochs", st.epochs, f"take the plan past {MAX_STEPS:,} optimizer "
                                f"steps ({len(sizes):,} per epoch)")
        for _ in range(st.epochs):
            t.epoch_starts.append(len(t))
            for j, b in enumerate(sizes):
                seen += b
                t.stage.append(k)
                t.epoch.append(epoch)
                t.resolution.append(st.resolution)
                t.batch_size.append(st.batch_size)
                t.samples.append(b)
                t.samples_seen.append(seen)
                t.epoch_progress.append(epoch + j / len(sizes))
            epoch += 1
    t.stage_starts.append(len(t))
    t.epoch_starts.append(len(t))
    return t


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through increasing knots, extended past the ends."""
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _snap(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) <= 1e-9 * max(1.0, abs(v)) else v


class _Knots:
    """Step boundaries of one scope in every unit: knot ``i`` is the start of the scope's step ``i``
    (and knot ``n`` its end), as a position in progress units, steps, samples and epochs."""

    def __init__(self, t: Timeline, a: int, b: int, progress: Progress):
        n = b - a
        self.coords = {"steps": [float(i) for i in range(n + 1)]}
        samples = [0.0]
        for s in range(a, b):
            samples.append(samples[-1] + t.samples[s])
        self.coords["samples"] = samples
        e0 = t.epoch_progress[a]
        self.coords["epochs"] = [t.epoch_progress[s] - e0 for s in range(a, b)] + [t.epoch[b - 1] + 1 - e0]
        self.pos = self.coords[progress]


@dataclass(frozen=True)
class ScopeSpan:
    """A span over part of a scope of the timeline; implements ``schedules.Span``."""

    knots: _Knots
    start: float
    length: float

    @property
    def last(self) -> float:
        pos = self.knots.pos
        i = bisect.bisect_left(pos, self.start + self.length * (1 - 1e-12)) - 1
        return max(pos[max(i, 0)] - self.start, 0.0)

    def measure(self, duration: Duration, where: str) -> float:
        if duration.unit == "fraction":
            return _snap(duration.value * self.length)
        coord = self.knots.coords[duration.unit]
        c0 = _interp(self.start, self.knots.pos, coord)
        return _snap(_interp(c0 + duration.value, coord, self.knots.pos) - self.start)

    def sub(self, offset: float, length: float) -> ScopeSpan:
        return ScopeSpan(self.knots, self.start + offset, length)


def make_timeline(stages: list[Stage], train_samples: int, schedule: ScheduleSpec, *, lr: float,
                  momentum: float = 0.0, scope: Scope = "global", progress: Progress = "steps",
                  reference_batch_size: int | None = None, lr_scaling: LrScaling = "none",
                  world_size: int = 1, drop_last: bool = True,
                  momentum_schedule: ScheduleSpec | None = None) -> Timeline:
    """Every optimizer step of the run with the LR and momentum to set for it.

    ``lr`` is the peak at ``reference_batch_size``; each stage's peak is rescaled by ``lr_scaling``
    from its global batch size. With ``scope='global'`` one curve runs across all stages; with
    ``per_stage`` it restarts at every stage. ``momentum`` is used where the schedule does not cycle it;
    ``momentum_schedule`` gives momentum a curve of its own (any kind, over the same scope and
    progress): the momentum is ``momentum`` x its multiplier.
    Raises ``ScheduleError`` (field path, value, reason) if the schedule does not fit the timeline."""
    t = layout(stages, train_samples, world_size=world_size, drop_last=drop_last)
    t.base_lr = lr
    ref = reference_batch_size or stages[0].batch_size
    bounds = [(0, len(t))] if scope == "global" else list(zip(t.stage_starts, t.stage_starts[1:]))
    for a, b in bounds:
        knots = _Knots(t, a, b, progress)
        curve = schedule.build(ScopeSpan(knots, 0.0, knots.pos[-1]))
        mcurve = momentum_schedule.build(ScopeSpan(knots, 0.0, knots.pos[-1])) if momentum_schedule else None
        for s in range(a, b):
            mult, mom = curve(knots.pos[s - a])
            if mcurve is not None:
                if mom is not None:
                    raise ScheduleError("momentum_schedule", momentum_schedule.kind, f"the schedule ({schedule.kind}) "
                                        "already cycles momentum: set it in one place")
                mom = momentum * mcurve(knots.pos[s - a])[0]
                if not 0 <= mom < 1:
                    raise ScheduleError("momentum_schedule", momentum_schedule.kind, f"gives the momentum {mom:g} "
                                        f"at step {s}: it must be in [0, 1)")
            t.lr.append(lr * lr_scale(t.batch_size[s], ref, lr_scaling) * mult)
            if not 0 <= t.lr[-1] < math.inf:  # e.g. a huge peak times a large batch, or an overflowing curve
                blame = ("optimizer.lr", lr) if 0 <= mult < math.inf else ("schedule", schedule.kind)
                raise ScheduleError(*blame, f"gives the LR {t.lr[-1]} at step {s}: it must be finite and >= 0")
            t.momentum.append(momentum if mom is None else mom)
            t.cycles_momentum = t.cycles_momentum or mom is not None
    return t


def ema_decays(t: Timeline, *, decay: float | None = None, half_life: Duration | None = None,
               train_samples: int = 0, warmup: bool = False) -> list[float]:
    """The weight EMA's decay for every step: ``decay`` at every step, or from a ``half_life``
    (``N steps``: ``0.5 ** (1 / N)``; ``N samples`` or ``N epochs`` of ``train_samples`` images:
    ``0.5 ** (images in the step / half-life in images)``, so the average spans the same images
    whatever the stage's batch). ``warmup``: at most ``(1 + s) / (10 + s)`` at step ``s`` (timm's)."""
    if half_life is None:
        out = [decay] * len(t)
    elif half_life.unit == "steps":
        out = [0.5 ** (1 / half_life.value)] * len(t)
    else:
        images = half_life.value * (train_samples if half_life.unit == "epochs" else 1)
        out = [0.5 ** (b / images) for b in t.samples]
    if warmup:
        out = [min(d, (1 + s) / (10 + s)) for s, d in enumerate(out)]
    return out


def final_decay_start(t: Timeline) -> int:
    """The first step of the run's final LR decay: after the last step at which the LR is still at
    least half its peak."""
    top = max(t.lr)
    return min(max(s for s, lr in enumerate(t.lr) if lr >= top / 2) + 1, len(t) - 1)


def ema_horizon_start(t: Timeline) -> int | None:
    """The step from which the final weight average draws half its weight: the product of the
    decays of the steps after it is still >= 1/2. None without an EMA."""
    if t.ema_decay is None:
        return None
    weight = 1.0
    for s in range(len(t) - 1, 0, -1):
        weight *= t.ema_decay[s]
        if weight < 0.5:
            return s
    return 0


def continue_at(old: Timeline, done: int, new: Timeline, policy: Literal["keep-position", "stretch"]) -> int:
    """The step of ``new`` at which a run that has done ``done`` steps of ``old`` continues.

    ``keep-position``: at the same number of images seen. ``stretch``: at the same fraction of all
    the images of the run (images seen / images in the whole timeline). Either way the position is
    rounded down to a step boundary of ``new``: less than one batch is seen again, none is skipped."""
    seen = old.samples_seen[done - 1] if done else 0
    if policy == "stretch":
        seen = seen * new.samples_seen[-1] // old.samples_seen[-1]
    return bisect.bisect_right(new.samples_seen, seen)


__all__ = ["Stage", "Timeline", "ScheduleError", "epoch_samples", "epoch_batches", "lr_scale",
           "layout", "make_timeline", "ScopeSpan", "continue_at", "ema_decays", "final_decay_start",
           "ema_horizon_start"]
