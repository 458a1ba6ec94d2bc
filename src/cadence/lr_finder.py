"""LR range test (Smith 2015, as popularised by fastai's ``lr_find``).

The suggestion rules are pure functions of ``(lrs, losses)``. ``range_test`` runs any step function
on :class:`~cadence.parts.Parts` with the LR rising, and puts model, optimizer, grad scaler and RNG
back exactly as they were; it never steps the scheduler or the EMA (the caller owns their clocks).
``range_test_stage`` runs it with the training step, data pipeline, precision and memory format of a
recipe's stage. The curve's CSV and figure are drawn by :mod:`cadence.report`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from cadence.errors import FieldError
from cadence.smoothing import smooth


class RangeTestError(ValueError):
    """The curve has no usable descent: the loss never falls, or it diverges at once."""


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
    (minimum/10, or the LR by which 90% of the fall is done; benchmarks/RESULTS.md has the seeds of the
    schedule study's CIFAR-10 curve where it did, and where the edge sat)."""
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
        return ("with AdamW a tenth of the edge measured well above a sweep's best peak "
                "(benchmarks/RESULTS.md, the LR claim): treat it as an upper bound")
    return ""


def auto_lr_line(recipe) -> str:
    """The line that says which peak LR the range test of ``optimizer.lr: auto`` chose (``recipe``
    holds it now), with the caveat for the optimizer, if any."""
    note = caveat(recipe.optimizer.name)
    return (f"optimizer.lr: auto -> {recipe.optimizer.lr:.4g} (LR range test on stage 0)"
            + (f"; note: {note}" if note else ""))


def summary_lines(results: list[RangeResult], recipe) -> list[str]:
    """What ``cadence find-lr`` prints: per stage, the rules' LRs and the recommended peak, also as
    ``optimizer.lr`` at the recipe's reference batch; then the optimizer's caveat, if any."""
    from cadence.plan import lr_scale

    o, lines = recipe.optimizer, []
    for res in results:
        head = f"stage {res.stage} ({res.resolution}px, batch {res.batch_size}, {len(res.lrs)} steps"
        head += ", stopped at divergence)" if res.stopped_early else ")"
        if res.suggestions is None:
            lines.append(f"{head}: no suggestion: {res.error}")
            continue
        s = res.suggestions
        ref = o.reference_batch_size or recipe.stages[0].batch_size
        at_ref = s.recommended / lr_scale(res.batch_size, ref, o.lr_scaling)
        lines.append(f"{head}: steepest {s.steepest:.3g}, minimum/10 {s.minimum_div_10:.3g}, valley {s.valley:.3g}, "
                     f"loss climbs away from {s.edge:.3g}")
        lines.append(f"  recommended one-cycle max_lr {s.recommended:.3g} (a tenth of that) at batch "
                     f"{res.batch_size} (optimizer.lr: {at_ref:.3g} at reference batch {ref}, lr_scaling "
                     f"{o.lr_scaling})")
    note = caveat(o.name)
    if note and any(res.suggestions for res in results):
        lines.append(f"  note: {note}")
    return lines


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


def range_test(parts, batches, step, *, start: float = 1e-6, end: float = 10.0, steps: int = 200,
               mode: str = "exp", diverge: float = 4.0, momentum=None, progress: bool = False,
               desc: str = "range test") -> tuple[list[float], list[float], bool]:
    """Run ``step(x, y) -> loss`` on the batches of ``batches(epoch)`` (epoch 0, 1, ... as needed) for
    ``steps`` steps, with the LR of every param group of ``parts.optimizer`` rising from ``start`` to
    ``end`` (and ``momentum(i)``, if given, set for step ``i``); stop once the smoothed loss exceeds
    ``diverge`` x its best, or is not finite. Model, optimizer, grad scaler and RNG state are restored
    afterwards, bit for bit. Returns ``(lrs, losses, stopped_early)``."""
    from tqdm import tqdm

    from cadence import checkpoint
    from cadence.scheduler import set_momentum

    check_range(start, end, steps)
    saved = {"model": copy.deepcopy(parts.model.state_dict()),
             "optimizer": copy.deepcopy(parts.optimizer.state_dict()),
             "scaler": copy.deepcopy(parts.scaler.state_dict()), "rng": checkpoint.rng_state()}
    lrs, losses, stopped = [], [], False
    best, epoch = math.inf, 0
    bar = tqdm(total=steps, disable=not progress, desc=desc, unit="step")
    try:
        while len(lrs) < steps and not stopped:
            for x, y in batches(epoch):
                i = len(lrs)
                if i >= steps:
                    break
                lr = lr_at(i, steps, start, end, mode)
                for g in parts.optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_mult", 1.0)
                if momentum is not None:
                    set_momentum(parts.optimizer, momentum(i))
                value = float(step(x, y))
                lrs.append(lr)
                losses.append(value)
                bar.update(1)
                smoothed = smooth(losses)[-1]
                best = min(best, smoothed)
                if not math.isfinite(value) or (i > 5 and smoothed > diverge * best):
                    stopped = True
                    break
            epoch += 1
    finally:
        bar.close()
        parts.model.load_state_dict(saved["model"])
        parts.optimizer.load_state_dict(saved["optimizer"])
        parts.scaler.load_state_dict(saved["scaler"])
        checkpoint.set_rng_state(saved["rng"])
    return lrs, losses, stopped


def range_test_stage(setup, parts, stage: int = 0, *, start: float = 1e-6, end: float = 10.0, steps: int = 200,
                     mode: str = "exp", diverge: float = 4.0, progress: bool = False) -> RangeResult:
    """The range test on ``stage`` of ``setup``'s recipe (its resolution, batch size and data), with the
    training step of ``parts`` (precision, memory format, DDP; no EMA update) and, where the plan
    cycles momentum, the momentum the plan sets at each of its first steps. The suggestion rules are
    applied to the finite losses."""
    from cadence import data, distributed
    from cadence.mixing import BatchMixer
    from cadence.plan import epoch_samples

    r, t = setup.recipe, setup.timeline
    st, reg = r.stages[stage], t.regularization[stage]
    mixer, steps_done = BatchMixer(reg, r.seed), [0]
    train_data = data.TrainData(setup.source, r.data, seed=r.seed, rank=setup.dist.rank, world=setup.dist.world,
                                device=setup.device)
    n = epoch_samples(len(setup.source.train), st.data_fraction)

    def step(x, y):  # trains as the stage does: its augmentation, mixing (keyed like the plan's first steps)
        x, y = mixer(parts.normalize(x), y.to(parts.device), steps_done[0])
        steps_done[0] += 1
        loss = parts.forward_backward(x, y)
        parts.update(ema=False)
        return distributed.mean_over_ranks(loss)

    momentum = (lambda i: t.momentum[min(i, len(t) - 1)]) if t.cycles_momentum else None
    batches = lambda epoch: train_data.epoch(st, epoch, n, regularization=reg)  # noqa: E731
    lrs, losses, stopped = range_test(parts, batches, step, start=start, end=end,
                                      steps=steps, mode=mode, diverge=diverge, momentum=momentum, progress=progress,
                                      desc=f"range test, stage {stage} {st.resolution}px")
    result = RangeResult(stage, st.resolution, st.batch_size, lrs, losses, stopped)
    finite = [(a, b) for a, b in zip(lrs, losses) if math.isfinite(b)]
    try:
        result.suggestions = suggest([a for a, _ in finite], [b for _, b in finite], diverged=stopped)
    except RangeTestError as e:
        result.error = str(e)
    return result
