"""Stages -> an exact timeline of optimizer steps, and the schedule laid over it. Pure: no torch.

The number of steps in an epoch is what ``DistributedSampler`` + ``DataLoader`` actually yield for
that many samples, that batch size, world size and ``drop_last`` -- computed, never estimated.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np

from cadence.regularization import Regularization
from cadence.schedules import Duration, ScheduleError, ScheduleSpec

Scope = Literal["global", "per_stage"]
Progress = Literal["steps", "samples"]
LrScaling = Literal["none", "linear", "sqrt"]
# Bytes a plan holds per optimizer step while it is made: its nine columns (52) and one scope's knots
# in three units (24), with room for the curve's temporaries (tests/test_plan.py measures it).
BYTES_PER_STEP = 120


def step_budget() -> int:
    """The most steps a plan may have on this machine: half the memory available now (the kernel's
    MemAvailable; all of the physical memory where that is not readable), at ``BYTES_PER_STEP``."""
    try:
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return free // 2 // BYTES_PER_STEP


def _too_many(where: str, value: object, steps: int, detail: str) -> ScheduleError:
    budget = step_budget()
    return ScheduleError(where, value, f"{detail}: a plan of {steps:,} optimizer steps needs about "
                         f"{steps * BYTES_PER_STEP / 2**30:.1f} GiB; half the memory available now allows "
                         f"{budget:,} steps ({budget * BYTES_PER_STEP / 2**30:.1f} GiB)")


class Column:
    """A column of the timeline: a numpy array read as a sequence of Python numbers (``t.lr[s]`` is a
    float, ``t.stage[s]`` an int; slices are columns). ``.array`` is the array itself."""

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, array):
        self.array = np.asarray(array)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        return Column(self.array[i]) if isinstance(i, slice) else self.array[i].item()

    def __iter__(self):
        for start in range(0, len(self.array), 1 << 16):
            yield from self.array[start: start + (1 << 16)].tolist()

    def __array__(self, dtype=None, copy=None):
        return self.array if dtype is None else self.array.astype(dtype)

    def tolist(self) -> list:
        return self.array.tolist()

    def __eq__(self, other):
        if not isinstance(other, (Column, list, tuple, np.ndarray)):
            return NotImplemented  # e.g. pytest.approx compares itself
        other = other.array if isinstance(other, Column) else np.asarray(other)
        return self.array.shape == other.shape and bool((self.array == other).all())

    def __repr__(self) -> str:
        return f"Column({self.array!r})"


MAX_RESOLUTION = 65536  # px: past any image a model is trained on, and inside the plan's int32 columns


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
                  ("resolution", 8 <= self.resolution <= MAX_RESOLUTION, f"must be 8 .. {MAX_RESOLUTION} px"),
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
    if full > step_budget():
        raise _too_many("batch_size", batch_size, full, f"makes {full:,} steps per epoch of {n:,} images")
    return [batch_size] * full + ([rest * world_size] if rest and not drop_last else [])


def lr_scale(batch_size: int, reference_batch_size: int, rule: LrScaling) -> float:
    """Factor on the peak LR for a stage's global batch: ``none``, ``linear`` (Goyal et al.) or ``sqrt``."""
    ratio = batch_size / reference_batch_size
    return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


@dataclass
class Timeline:
    """One entry per optimizer step of the whole run (columns as :class:`Column`, index = global step)."""

    stage: Column = field(default_factory=lambda: Column(np.zeros(0, np.int32)))
    epoch: Column = field(default_factory=lambda: Column(np.zeros(0, np.int32)))  # global epoch index, 0-based
    resolution: Column = field(default_factory=lambda: Column(np.zeros(0, np.int32)))
    batch_size: Column = field(default_factory=lambda: Column(np.zeros(0, np.int32)))  # the stage's global batch
    samples: Column = field(default_factory=lambda: Column(np.zeros(0, np.int32)))  # images in this step
    samples_seen: Column = field(default_factory=lambda: Column(np.zeros(0, np.int64)))  # images seen after it
    epoch_progress: Column = field(default_factory=lambda: Column(np.zeros(0)))  # fractional epoch at step start
    lr: Column = field(default_factory=lambda: Column(np.zeros(0)))
    momentum: Column = field(default_factory=lambda: Column(np.zeros(0)))
    stage_starts: list[int] = field(default_factory=list)  # first step of each stage, and the end
    epoch_starts: Column = field(default_factory=lambda: Column(np.zeros(0, np.int64)))  # each epoch's first step, and the end
    stages: list[Stage] = field(default_factory=list)
    base_lr: float = 0.0  # the recipe's peak LR, before batch-size scaling
    cycles_momentum: bool = False  # the schedule sets momentum (else ``momentum`` is the constant)
    regularization: list[Regularization] = field(default_factory=list)  # each stage's, resolved (if known)
    ema_decay: Column | None = None  # the weight EMA's decay at each step (if the recipe averages)
    ema_half_life: float | None = None  # in samples, when written as a duration

    def __len__(self) -> int:
        return len(self.stage)

    CSV_COLUMNS = ("step", "stage", "epoch", "resolution", "batch_size", "samples_seen", "lr", "momentum")

    def rows(self):
        """Tuples of Python numbers in ``CSV_COLUMNS`` order, made a block at a time."""
        for a in range(0, len(self), 1 << 16):
            b = min(a + (1 << 16), len(self))
            yield from zip(range(a, b), *(getattr(self, c).array[a:b].tolist() for c in self.CSV_COLUMNS[1:]))

    def stage_summary(self) -> list[dict]:
        out = []
        for k in range(len(self.stage_starts) - 1):
            a, b = self.stage_starts[k], self.stage_starts[k + 1]
            lr = self.lr.array[a:b]
            out.append({
                "stage": k, "resolution": self.resolution[a], "batch_size": self.batch_size[a],
                "data_fraction": self.stages[k].data_fraction,
                "epochs": self.epoch[b - 1] - self.epoch[a] + 1, "steps": b - a,
                "samples": int(self.samples.array[a:b].sum(dtype=np.int64)), "first_step": a,
                "lr_min": lr.min().item(), "lr_max": lr.max().item(),
            })
        return out


def layout(stages: list[Stage], train_samples: int, *, world_size: int = 1,
           drop_last: bool = True) -> Timeline:
    """The steps of every stage and epoch, with no learning rates yet."""
    if world_size < 1:
        raise ScheduleError("world_size", world_size, "must be >= 1")
    t = Timeline(stages=list(stages))
    blocks: dict[str, list[np.ndarray]] = {c: [] for c in ("stage", "epoch", "resolution", "batch_size", "samples",
                                                          "epoch_progress")}
    epoch_starts, steps, epoch, budget = [], 0, 0, step_budget()
    for k, st in enumerate(stages):
        t.stage_starts.append(steps)
        n = epoch_samples(train_samples, st.data_fraction)
        try:
            sizes = epoch_batches(n, st.batch_size, world_size, drop_last)
        except ScheduleError as e:
            raise e.within(f"stages.{k}") from None
        if not sizes:
            raise ScheduleError(f"stages.{k}.batch_size", st.batch_size,
                                f"{n} images per epoch make no full batch on {world_size} rank(s)")
        m = len(sizes)
        if steps + st.epochs * m > budget:
            raise _too_many(f"stages.{k}.epochs", st.epochs, steps + st.epochs * m,
                            f"take the plan to {steps + st.epochs * m:,} steps ({m:,} per epoch)")
        count = st.epochs * m
        blocks["stage"].append(np.full(count, k, np.int32))
        epochs = np.repeat(np.arange(epoch, epoch + st.epochs, dtype=np.int32), m)
        blocks["epoch"].append(epochs)
        blocks["resolution"].append(np.full(count, st.resolution, np.int32))
        blocks["batch_size"].append(np.full(count, st.batch_size, np.int32))
        blocks["samples"].append(np.tile(np.array(sizes, np.int32), st.epochs))
        blocks["epoch_progress"].append(epochs + np.tile(np.arange(m) / m, st.epochs))  # epoch + j / m, as before
        epoch_starts.append(steps + m * np.arange(st.epochs, dtype=np.int64))
        steps += count
        epoch += st.epochs
    for name, parts in blocks.items():
        setattr(t, name, Column(np.concatenate(parts)))
    t.samples_seen = Column(np.cumsum(t.samples.array, dtype=np.int64))
    t.stage_starts.append(steps)
    t.epoch_starts = Column(np.concatenate(epoch_starts + [np.array([steps], np.int64)]))
    return t


def _interp(x: float, xs: np.ndarray, ys: np.ndarray) -> float:
    """Piecewise-linear y(x) through increasing knots, extended past the ends."""
    i = min(max(int(np.searchsorted(xs, x, side="right")) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = float(xs[i]), float(xs[i + 1]), float(ys[i]), float(ys[i + 1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _snap(v: float) -> float:
    r = round(v)
    return float(r) if abs(v - r) <= 1e-9 * max(1.0, abs(v)) else v


class _Knots:
    """Step boundaries of one scope in every unit: knot ``i`` is the start of the scope's step ``i``
    (and knot ``n`` its end), as a position in progress units, steps, samples and epochs."""

    def __init__(self, t: Timeline, a: int, b: int, progress: Progress):
        n = b - a
        self.coords = {"steps": np.arange(n + 1, dtype=np.float64)}
        samples = np.zeros(n + 1)
        np.cumsum(t.samples.array[a:b], out=samples[1:])  # sums of whole numbers: exact in float64
        self.coords["samples"] = samples
        e0 = t.epoch_progress[a]
        self.coords["epochs"] = np.append(t.epoch_progress.array[a:b] - e0, t.epoch[b - 1] + 1 - e0)
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
        i = int(np.searchsorted(pos, self.start + self.length * (1 - 1e-12), side="left")) - 1
        return max(float(pos[max(i, 0)]) - self.start, 0.0)

    def measure(self, duration: Duration, where: str) -> float:
        if duration.unit == "fraction":
            return _snap(duration.value * self.length)
        coord = self.knots.coords[duration.unit]
        c0 = _interp(self.start, self.knots.pos, coord)
        return _snap(_interp(c0 + duration.value, coord, self.knots.pos) - self.start)

    def sub(self, offset: float, length: float) -> ScopeSpan:
        return ScopeSpan(self.knots, self.start + offset, length)


def _floats(a: np.ndarray):
    """The array's values as Python floats, a block at a time (no list of them all)."""
    for start in range(0, len(a), 1 << 16):
        yield from a[start: start + (1 << 16)].tolist()


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
    scale = np.array([lr_scale(st.batch_size, ref, lr_scaling) for st in stages])[t.stage.array]
    lrs, moms = np.empty(len(t)), np.empty(len(t))
    bounds = [(0, len(t))] if scope == "global" else list(zip(t.stage_starts, t.stage_starts[1:]))
    for a, b in bounds:
        knots = _Knots(t, a, b, progress)
        curve = schedule.build(ScopeSpan(knots, 0.0, float(knots.pos[-1])))
        mcurve = momentum_schedule.build(ScopeSpan(knots, 0.0, float(knots.pos[-1]))) if momentum_schedule else None
        mult, mom = np.empty(b - a), np.full(b - a, np.nan)  # NaN: the schedule leaves momentum alone
        for i, x in enumerate(_floats(knots.pos[:-1])):
            m, c = curve(x)
            mult[i] = m
            if c is not None:
                mom[i] = c
        cycled = ~np.isnan(mom)
        lrs[a:b] = lr * scale[a:b] * mult
        # the first failing check of this scope, in the order they are made at each step
        fails = []
        if mcurve is not None:
            if cycled.any():
                fails.append((int(np.argmax(cycled)), 0))
            mom = np.fromiter((momentum * mcurve(x)[0] for x in _floats(knots.pos[:-1])), np.float64, b - a)
            if not ((0 <= mom) & (mom < 1)).all():
                fails.append((int(np.argmin((0 <= mom) & (mom < 1))), 1))
        if not ((0 <= lrs[a:b]) & (lrs[a:b] < math.inf)).all():  # a huge peak times a large batch, an overflow
            fails.append((int(np.argmin((0 <= lrs[a:b]) & (lrs[a:b] < math.inf))), 2))
        if fails:
            i, check = min(fails)
            if check == 0:
                raise ScheduleError("momentum_schedule", momentum_schedule.kind, f"the schedule ({schedule.kind}) "
                                    "already cycles momentum: set it in one place")
            if check == 1:
                raise ScheduleError("momentum_schedule", momentum_schedule.kind, f"gives the momentum "
                                    f"{float(mom[i]):g} at step {a + i}: it must be in [0, 1)")
            blame = ("optimizer.lr", lr) if 0 <= mult[i] < math.inf else ("schedule", schedule.kind)
            raise ScheduleError(*blame, f"gives the LR {float(lrs[a + i])} at step {a + i}: it must be finite and >= 0")
        moms[a:b] = mom if mcurve is not None else np.where(cycled, mom, momentum)
        t.cycles_momentum = t.cycles_momentum or bool(cycled.any()) or mcurve is not None
    t.lr, t.momentum = Column(lrs), Column(moms)
    return t


def ema_decays(t: Timeline, *, decay: float | None = None, half_life: Duration | None = None,
               train_samples: int = 0, warmup: bool = False) -> Column:
    """The weight EMA's decay for every step: ``decay`` at every step, or from a ``half_life``
    (``N steps``: ``0.5 ** (1 / N)``; ``N samples`` or ``N epochs`` of ``train_samples`` images:
    ``0.5 ** (images in the step / half-life in images)``, so the average spans the same images
    whatever the stage's batch). ``warmup``: at most ``(1 + s) / (10 + s)`` at step ``s`` (timm's)."""
    if half_life is None:
        out = np.full(len(t), decay, dtype=np.float64)
    elif half_life.unit == "steps":
        out = np.full(len(t), 0.5 ** (1 / half_life.value))
    else:
        images = half_life.value * (train_samples if half_life.unit == "epochs" else 1)
        sizes, where = np.unique(t.samples.array, return_inverse=True)  # a few distinct batch sizes
        out = np.array([0.5 ** (int(b) / images) for b in sizes])[where]
    if warmup:
        s = np.arange(len(t), dtype=np.float64)
        out = np.minimum(out, (1 + s) / (10 + s))
    return Column(out)


def final_decay_start(t: Timeline) -> int:
    """The first step of the run's final LR decay: after the last step at which the LR is still at
    least half its peak."""
    lr = t.lr.array
    return min(int(np.flatnonzero(lr >= lr.max() / 2)[-1]) + 1, len(t) - 1)


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
    return int(np.searchsorted(new.samples_seen.array, seen, side="right"))


__all__ = ["Stage", "Timeline", "Column", "step_budget", "BYTES_PER_STEP", "ScheduleError", "epoch_samples", "epoch_batches", "lr_scale",
           "layout", "make_timeline", "ScopeSpan", "continue_at", "ema_decays", "final_decay_start",
           "ema_horizon_start"]
