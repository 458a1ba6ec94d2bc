"""Training-step speed of a recipe's model against variants of it (precision, memory format,
torch.compile), side by side in one process: images/s of ``train_step`` on one fixed batch at each
stage's resolution, and the time of the first step (where torch.compile pays its compile time).

    python benchmarks/step_speed.py recipes/cifar10-fast-bf16.yaml --set data.root=/path/to/cifar10 \\
        --variant "fp32: train.precision=fp32" --variant "NCHW: train.channels_last=false" \\
        --variant "compiled: train.compile=true"

Rounds alternate between the variants, so slow drifts of a shared machine hit all of them alike;
the median round is reported with the ratio to the recipe as written. ``--clock cpu`` times the steps
by the process's CPU (pinned to one core with one thread, what a shared machine moves least).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

from cadence import parts, train
from cadence.recipe import load_recipe
from time_to_accuracy import parse_ablation  # the same 'LABEL: key=value[, ...]' format


def stage_batch(trainer: train.Trainer, k: int):
    """The first batch of stage ``k`` from ``trainer``'s own loader, as it comes (not yet prepped)."""
    t = trainer.timeline
    return next(iter(trainer.loader(k, t.epoch[t.stage_starts[k]])))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@contextlib.contextmanager
def timed(times: list, clock=time.perf_counter):
    """Adds the seconds of the ``with`` block to ``times``: every timed step of the benchmarks is this.
    ``clock``: wall time, or ``time.process_time`` (the process's CPU: on one pinned thread, what a
    shared machine's neighbours and stolen time move least)."""
    start = clock()
    yield
    times.append(clock() - start)


def fixed_batch_rate(trainer: train.Trainer, k: int, batch, steps: int, times: list | None = None,
                     clock=time.perf_counter) -> float:
    """images/s of ``steps`` ``train_step`` calls on one prepped ``batch``, the schedule put back at
    stage ``k``'s start first (so it stays inside the plan however many rounds run); each step's
    seconds (by ``clock``) are added to ``times``."""
    trainer.step = trainer.parts.scheduler.last_epoch = trainer.timeline.stage_starts[k]
    mine: list[float] = []
    for _ in range(steps):
        with timed(mine, clock):
            trainer.train_step(*batch)
    if times is not None:
        times.extend(mine)
    return steps * len(batch[1]) / sum(mine)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL: key=value[, ...]'")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what each step is timed by")
    a = p.parse_args()
    clock = CLOCKS[a.clock]
    variants = [("as written", [])] + [parse_ablation(text) for text in a.variant]
    trainers = {}
    for label, sets in variants:
        recipe = load_recipe(a.recipe, a.sets + sets)
        trainers[label] = train.Trainer(parts.build_setup(recipe, a.recipe), run_dir="")
    first = trainers["as written"]
    for k, stage in enumerate(first.recipe.stages):
        x, y = stage_batch(first, k)
        rates, warm = {label: [] for label in trainers}, {}
        for label, trainer in trainers.items():
            start = clock()
            trainer.train_step(trainer.parts.normalize(x), y)  # first step at this size: compiles, if compiling
            warm[label] = clock() - start
        for _ in range(a.rounds):
            for label, trainer in trainers.items():
                rates[label].append(fixed_batch_rate(trainer, k, (trainer.parts.normalize(x), y), a.steps,
                                                     clock=clock))
        base = statistics.median(rates["as written"])
        for label, r in rates.items():
            m = statistics.median(r)
            print(f"stage {k} {stage.resolution}px batch {len(y)} {label} ({a.clock}): {m:.0f} img/s ({m / base:.2f}x), "
                  f"first step {warm[label]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
