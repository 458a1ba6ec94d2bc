"""The training loop against the model alone: does the model ever wait for data?

For each stage resolution of a recipe, alternating rounds of (a) ``train_step`` on one fixed
in-memory batch (model-only throughput) and (b) the real loop -- next batch from cadence's
loader (with the stage's per-image policy), normalise, mix (the stage's mixup/cutmix), ``train_step``
-- on the same Trainer. In-memory sources run the loop two ways: the next batch made by a background
thread during the step ("ahead": training on an accelerator) and each batch made in the step ("in
step": training on the CPU, where the model's threads already have every core).
Prints images/s and the ratio of the medians to model-only (target: loop >= 0.95 x model-only), the
median of each round's ratio ("paired"), and the ratio of the median step times ("per-step medians":
a step that a neighbour of this machine slowed down moves it least).

``--parts`` takes the in-step loop apart instead (in-memory sources): the wall time of each
``train_step`` alone on (a) one fixed batch, (b) that fixed batch with a batch made (and dropped) just
before each step, (c) fresh batches; and of making, normalising and mixing a batch, each step timed by
itself, steps of each kind interleaved, medians compared. (b) against (a): what making a batch does to
the next step (caches); (c) against (b): what a fresh batch does; ``model / (fresh + making)``: the
loop's share of model-only throughput, by its parts.

``--clock cpu`` times by the process's CPU instead of the wall: pinned to one core with one thread
(``taskset -c 1`` and ``OMP_NUM_THREADS=1``) it is the step's own CPU, which this shared VM's swings of
speed move far less than the wall; a thread making batches ahead counts in it too.

    python benchmarks/loop_vs_model.py recipes/cifar10-progressive.yaml --set data.root=/path/to/cifar10
    python benchmarks/loop_vs_model.py recipes/cifar10-progressive.yaml --set data.root=/path/to/cifar10 \
        --set regularization.policy=trivialaugment --set regularization.random_erasing=0.1 \
        --set regularization.mixup=0.2 --set regularization.cutmix=1.0 [--stages 0 --rounds 21 [--parts]]
"""

from __future__ import annotations

import argparse
import statistics
import time

from cadence import parts, train
from cadence.data import loaders
from cadence.recipe import load_recipe
from step_speed import CLOCKS, fixed_batch_rate, timed  # the same timed steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--stages", type=int, nargs="+", help="only these stages (default: all)")
    p.add_argument("--parts", action="store_true", help="the in-step loop taken apart (in-memory sources)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="what each step is timed by")
    a = p.parse_args()
    clock = CLOCKS[a.clock]
    recipe = load_recipe(a.recipe, a.sets)
    setup = parts.build_setup(recipe, a.recipe)
    trainer = train.Trainer(setup, run_dir="")
    t = trainer.timeline
    for k, stage in enumerate(recipe.stages):
        if a.stages is not None and k not in a.stages:
            continue
        epoch = t.epoch[t.stage_starts[k]]
        batches = len(trainer.loader(k, epoch))
        if batches <= a.steps:
            p.error(f"stage {k} has {batches} batches an epoch: --steps must be fewer")
        if a.parts:
            if not in_memory(trainer):
                p.error("--parts takes apart the in-step loop of an in-memory source; this recipe reads files")
            print_parts(trainer, k, a.rounds, a.steps, a.clock)
            continue
        loops = {"as training runs": lambda: iter(trainer.loader(k, epoch))}
        if in_memory(trainer):  # both ways, whichever training uses here
            loops = {"ahead": lambda: iter(made(trainer.loader(k, epoch), ahead=True)),
                     "in step": lambda: iter(made(trainer.loader(k, epoch), ahead=False))}
        x0, y0 = next(next(iter(loops.values()))())
        fixed = trainer.parts.normalize(x0), y0
        trainer.train_step(*fixed)  # warm-up at this size
        rates: dict[str, list[float]] = {"model": [], **{name: [] for name in loops}}
        steps: dict[str, list[float]] = {name: [] for name in rates}  # each step's seconds
        for _ in range(a.rounds):
            rates["model"].append(fixed_batch_rate(trainer, k, fixed, a.steps, steps["model"], clock))
            for name, make in loops.items():
                rates[name].append(loop_rate(trainer, k, make(), a.steps, steps[name], clock))
        m = statistics.median(rates["model"])
        per_step = {name: statistics.median(steps["model"]) / statistics.median(steps[name]) for name in loops}
        loop = ", ".join(f"loop ({name}) {statistics.median(rates[name]):.0f} img/s = "
                         f"{statistics.median(rates[name]) / m:.3f} (paired {paired(rates[name], rates['model']):.3f}, "
                         f"per-step medians {per_step[name]:.3f})" for name in loops)
        print(f"stage {k} ({stage.resolution}px, batch {stage.batch_size}, {a.clock} clock): "
              f"model only {m:.0f} img/s, {loop}", flush=True)
    if in_memory(trainer):
        print(f"(training on {trainer.device.type} makes its batches {'ahead' if trainer.data.made_ahead else 'in step'})")


def in_memory(trainer: train.Trainer) -> bool:
    return isinstance(trainer.loader(0, 0), loaders.MemoryLoader)


def made(loader: loaders.MemoryLoader, ahead: bool) -> loaders.MemoryLoader:
    """The loader training uses, its batches made ahead (a thread) or in the step."""
    loader.made_ahead = ahead
    return loader


def paired(loop: list[float], model: list[float]) -> float:
    """The median over rounds of each round's loop rate over the model-only rate measured just before
    it: drifts of the machine's speed between rounds cancel."""
    return statistics.median(a / b for a, b in zip(loop, model))


def loop_rate(trainer: train.Trainer, k: int, batches, steps: int, times: list | None = None,
              clock=time.perf_counter) -> float:
    """images/s of ``steps`` steps of the real loop at stage ``k``, in steady state: the round starts
    with one batch in hand (untimed), and each timed step ends by taking the next batch -- made during
    the step (ahead) or then (in step) -- so the timed window makes exactly ``steps`` batches. The
    batches are closed after the clock stops: a thread making batches ahead stops before the next
    model-only round, which it would otherwise share the cores with. Each step's seconds, the taking of
    its next batch included, are added to ``times``."""
    start_step = trainer.parts.scheduler.last_epoch = trainer.timeline.stage_starts[k]
    x, y = next(batches)
    mine: list[float] = []
    n = 0
    for i in range(steps):
        with timed(mine, clock):
            trainer.train_step(*trainer.mixers[k](trainer.parts.normalize(x), y, start_step + i))
            n += len(y)
            x, y = next(batches)
    if hasattr(batches, "close"):
        batches.close()
    if times is not None:
        times.extend(mine)
    return n / sum(mine)


def print_parts(trainer: train.Trainer, k: int, rounds: int, steps: int, clock_name: str = "wall") -> None:
    """``--parts``: the in-step loop of stage ``k`` taken apart (the module's docstring), printed, each
    step timed by ``CLOCKS[clock_name]``."""
    clock = CLOCKS[clock_name]
    t = trainer.timeline
    start_step, epoch = t.stage_starts[k], t.epoch[t.stage_starts[k]]

    def batches():  # made in the step, as training on the CPU makes them; epoch after epoch
        while True:
            yield from made(trainer.loader(k, epoch), ahead=False)

    making = batches()
    x0, y0 = next(making)
    fixed = trainer.parts.normalize(x0), y0
    trainer.train_step(*fixed)  # warm-up at this size
    times: dict[str, list[float]] = {"fixed": [], "fixed, a batch made before": [], "fresh": [], "making": []}
    for _ in range(rounds):
        trainer.step = trainer.parts.scheduler.last_epoch = start_step  # inside the plan
        for _ in range(steps):
            with timed(times["fixed"], clock):
                trainer.train_step(*fixed)
        for _ in range(steps):
            next(making)
            with timed(times["fixed, a batch made before"], clock):
                trainer.train_step(*fixed)
        for i in range(steps):
            with timed(times["making"], clock):
                x, y = next(making)
                batch = trainer.mixers[k](trainer.parts.normalize(x), y, start_step + i)
            with timed(times["fresh"], clock):
                trainer.train_step(*batch)
    med = {name: statistics.median(v) for name, v in times.items()}
    stage = trainer.recipe.stages[k]
    print(f"stage {k} ({stage.resolution}px, batch {stage.batch_size}), medians of {rounds * steps} steps each "
          f"({clock_name} clock):")
    for name, v in times.items():
        print(f"  {name:28s} {med[name] * 1e3:7.1f} ms  (mean {statistics.mean(v) * 1e3:.1f})")
    print(f"  loop / model by its parts: {med['fixed'] / (med['fresh'] + med['making']):.3f}", flush=True)


if __name__ == "__main__":
    main()
