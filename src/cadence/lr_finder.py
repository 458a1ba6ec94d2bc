"""LR range test (Smith 2015, as popularised by fastai's ``lr_find``).

The suggestion rules are pure functions of ``(lrs, losses)``; ``range_test`` runs the trainer's own
step (same data pipeline, precision, memory format) with the LR rising, and puts model, optimizer,
scaler, scheduler and RNG back exactly as they were.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from cadence.errors import FieldError


class RangeTestError(ValueError):
    """The curve has no usable descent: the loss never falls, or it diverges at once."""


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first value is not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def steepest(lrs: list[float], losses: list[float]) -> float:
    """LR where the loss falls fastest per decade of LR (most negative d loss / d log lr), searched
    up to the minimum of the loss."""
    end = min(range(len(losses)), key=losses.__getitem__)
    if end < 2:
        raise RangeTestError("the loss is lowest at the very start of the range: no descent to measure")
    logs = [math.log(v) for v in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, end)]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def minimum_div_10(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the LR at which the loss is lowest."""
    return lrs[min(range(len(losses)), key=losses.__getitem__)] / 10


def valley(lrs: list[float], losses: list[float]) -> float:
    """The middle (in log LR) of the longest stretch over which the loss keeps falling: the longest
    decreasing subsequence of the loss, like fastai's ``valley``."""
    n = len(losses)
    length, prev = [1] * n, [-1] * n
    for i in range(n):
        for j in range(i):
            if losses[j] > losses[i] and length[j] + 1 > length[i]:
                length[i], prev[i] = length[j] + 1, j
    end = max(range(n), key=length.__getitem__)
    start = end
    while prev[start] >= 0:
        start = prev[start]
    if end - start < 2:
        raise RangeTestError("the loss never keeps falling: no valley to suggest from")
    return math.exp((math.log(lrs[start]) + math.log(lrs[end])) / 2)


def divergence_edge(lrs: list[float], losses: list[float], rise: float = 0.25) -> int:
    """Index of the last LR at which the loss is still within ``rise`` of its whole fall (start to
    minimum) above its minimum: past it the loss climbs away and does not come back down.

    Unlike the minimum, this edge stays put from seed to seed. On a long, bumpy floor (label
    smoothing, batch norm) the lowest point wanders by decades, and so did every rule read from it
    (minimum/10, or the LR by which 90% of the fall is done: 0.0145 to 0.74 over three seeds of the
    schedule study's CIFAR-10 curve, whose edge sat at 2.35-3.96)."""
    best = min(range(len(losses)), key=losses.__getitem__)
    level = losses[best] + rise * (losses[0] - losses[best])
    return max(i for i in range(len(losses)) if losses[i] <= level)


@dataclass
class Suggestions:
    steepest: float
    minimum_div_10: float
    valley: float
    edge: float  # where the smoothed loss climbs away for good (divergence_edge)
    recommended: float  # max_lr for a one-cycle: a decade below the edge
    reason: str = ""

    def as_dict(self) -> dict:
        return {"steepest": self.steepest, "minimum/10": self.minimum_div_10, "valley": self.valley,
                "edge": self.edge, "recommended": self.recommended}


def suggest(lrs: list[float], losses: list[float], *, beta: float = 0.9, min_drop: float = 0.1,
            diverged: bool = False) -> Suggestions:
    """The rules on the smoothed curve; the recommended one-cycle ``max_lr`` is a tenth of the LR at
    which the loss climbs away (``divergence_edge``): an order of magnitude below where it blows up,
    the usual reading of Smith's range test. The edge is read on the smoothed curve, which trails the
    raw loss by about ``1 / (1 - beta)`` steps, so the factor was measured with this smoothing (and
    200 steps over the default range; benchmarks/RESULTS.md).
    Raises RangeTestError when there is nothing to suggest: the smoothed loss never drops
    ``min_drop`` below its start, the range diverged within its first few steps, or it ended
    (without ``diverged``: a non-finite loss the caller dropped) before the loss climbed away."""
    if len(lrs) != len(losses) or len(lrs) < 5:
        raise RangeTestError(f"the range test has {len(losses)} finite losses; it needs at least 5")
    s = smooth(losses, beta)
    best = min(range(len(s)), key=s.__getitem__)
    if best < 3:
        raise RangeTestError(
            f"the loss diverges at once (lowest at LR {lrs[best]:.2g}, step {best}): start the range lower")
    # "Falls" means: the raw losses around the minimum sit clearly below those at the start, by
    # min_drop and by three standard deviations of the starting losses (batch-to-batch noise).
    k = max(3, len(losses) // 5)
    head = losses[:k]
    mu0 = sum(head) / k
    sd0 = math.sqrt(sum((v - mu0) ** 2 for v in head) / (k - 1))
    around = losses[max(0, best - k // 2): best + 1]  # approaching the minimum, not past it
    drop = mu0 - sum(around) / len(around)
    if drop <= max(min_drop * mu0, 3 * sd0):
        raise RangeTestError(
            f"the loss never falls (mean {mu0:.4g} over the first {k} steps, {mu0 - drop:.4g} around "
            f"the lowest point; LR {lrs[0]:.2g}..{lrs[-1]:.2g}): check the data and model, or start the "
            "range higher")
    edge = divergence_edge(lrs, s)
    if edge == len(s) - 1 and not diverged:
        raise RangeTestError(
            f"the range ended (LR {lrs[-1]:.2g}) before the loss climbed away from its floor, so there "
            "is no edge to stay below: end the range higher")
    curve_lrs, curve = lrs[: best + 1], s[: best + 1]
    steep, vall = _or_nan(steepest, curve_lrs, curve), _or_nan(valley, curve_lrs, curve)
    return Suggestions(steep, minimum_div_10(lrs, s), vall, edge=lrs[edge], recommended=lrs[edge] / 10)


def _or_nan(rule, lrs: list[float], losses: list[float]) -> float:
    """A side rule's answer, or NaN where it has none: it must not block the recommendation."""
    try:
        return rule(lrs, losses)
    except RangeTestError:
        return math.nan


def caveat(optimizer: str) -> str:
    """What to know about the recommendation for ``optimizer`` ('' where nothing): the factor of 10
    below the edge was measured for SGD."""
    if optimizer == "adamw":
        return ("with AdamW a tenth of the edge measured 2.3x above a sweep's best peak "
                "(benchmarks/RESULTS.md): treat it as an upper bound")
    return ""


def lr_at(i: int, steps: int, start: float, end: float, mode: str) -> float:
    """The ``i``-th of ``steps`` LRs from ``start`` to ``end``, exponentially or linearly spaced."""
    t = i / max(steps - 1, 1)
    return start * (end / start) ** t if mode == "exp" else start + (end - start) * t


@dataclass
class RangeResult:
    stage: int
    resolution: int
    batch_size: int
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    suggestions: Suggestions | None = None
    error: str | None = None

    @property
    def smoothed(self) -> list[float]:
        return smooth(self.losses)


def check_range(start: float, end: float, steps: int) -> None:
    if not 0 < start < end < math.inf:
        raise FieldError("--start/--end", [start, end], "need 0 < start < end < inf")
    if steps < 5:
        raise FieldError("--steps", steps, "must be >= 5")


def range_test(trainer, stage: int = 0, *, start: float = 1e-6, end: float = 10.0, steps: int = 200,
               mode: str = "exp", diverge: float = 4.0, progress: bool = False) -> RangeResult:
    """Train ``steps`` batches of ``stage`` (its resolution, batch size and data) with the LR rising
    from ``start`` to ``end``; stop once the smoothed loss exceeds ``diverge`` x its best. Model,
    optimizer, scaler, scheduler and RNG state are restored afterwards, bit for bit."""
    from tqdm import tqdm

    from cadence import checkpoint

    check_range(start, end, steps)
    st = trainer.recipe.stages[stage]
    saved = {"model": copy.deepcopy(trainer.model.state_dict()),
             "optimizer": copy.deepcopy(trainer.optimizer.state_dict()),
             "scaler": copy.deepcopy(trainer.scaler.state_dict()),
             "scheduler": copy.deepcopy(trainer.scheduler.state_dict()), "rng": checkpoint.rng_state()}
    result = RangeResult(stage, st.resolution, st.batch_size)
    smoothed, best, epoch = 0.0, math.inf, 0
    bar = tqdm(total=steps, disable=not progress, desc=f"range test, stage {stage} {st.resolution}px", unit="step")
    try:
        while len(result.lrs) < steps:
            for x, y in trainer.loader(stage, epoch):
                i = len(result.lrs)
                if i >= steps:
                    break
                lr = lr_at(i, steps, start, end, mode)
                for g in trainer.optimizer.param_groups:
                    g["lr"] = lr
                loss = trainer.reduce_mean(trainer.train_step(trainer.prep(x), y.to(trainer.device)))
                value = float(loss)
                result.lrs.append(lr)
                result.losses.append(value)
                bar.update(1)
                smoothed = smooth(result.losses)[-1]
                best = min(best, smoothed)
                if not math.isfinite(value) or (i > 5 and smoothed > diverge * best):
                    result.stopped_early = True
                    break
            if result.stopped_early:
                break
            epoch += 1
    finally:
        bar.close()
        trainer.model.load_state_dict(saved["model"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        trainer.scaler.load_state_dict(saved["scaler"])
        trainer.scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
    finite = [(a, b) for a, b in zip(result.lrs, result.losses) if math.isfinite(b)]
    try:
        result.suggestions = suggest([a for a, _ in finite], [b for _, b in finite], diverged=result.stopped_early)
    except RangeTestError as e:
        result.error = str(e)
    return result


def write_csv(results: list[RangeResult], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "resolution", "batch_size", "step", "lr", "loss", "smoothed_loss"])
        for res in results:
            for i, (lr, loss, sm) in enumerate(zip(res.lrs, res.losses, res.smoothed)):
                w.writerow([res.stage, res.resolution, res.batch_size, i, repr(lr), repr(loss), repr(sm)])


def plot(results: list[RangeResult], path: str, title: str = "") -> None:
    """Smoothed loss against LR (log axis), one curve per stage, the recommended LR marked."""
    from cadence.report import plt

    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for k, res in enumerate(results):
        color = f"C{k}"
        label = f"stage {res.stage}: {res.resolution}px, batch {res.batch_size}"
        ax.plot(res.lrs, res.losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(res.lrs, res.smoothed, color=color, linewidth=1.6, label=label)
        s = res.suggestions
        if s is not None:
            y = res.smoothed[min(range(len(res.lrs)), key=lambda i: abs(math.log(res.lrs[i] / s.recommended)))]
            ax.plot([s.recommended], [y], "o", color=color, markersize=8)
            ax.annotate(f"max_lr {s.recommended:.3g}", (s.recommended, y), xytext=(6, 6),
                        textcoords="offset points", color=color, fontsize=9)
            ax.axvline(s.steepest, color=color, linestyle=":", linewidth=0.8)
            ax.axvline(s.edge, color=color, linestyle="--", linewidth=0.8)
    finite = [v for res in results for v in res.smoothed if math.isfinite(v)]
    if finite:
        lo = min(finite)
        first = max(res.smoothed[0] for res in results if res.smoothed)
        ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed; raw faint)")
    ax.set_title(title or "LR range test")
    ax.text(0.01, 0.01, "dot: recommended max_lr; dashed: where the loss climbs away (10x the dot); "
            "dotted: steepest descent", transform=ax.transAxes, fontsize=8, color="0.35")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
