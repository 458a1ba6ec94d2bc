"""The training loop's step taken apart, for one stage of an in-memory recipe: the wall time of each
``train_step`` alone on (a) one fixed batch, (b) that fixed batch with a batch made (and dropped) just
before each step, (c) fresh batches; and of making, normalising and mixing a batch. Each step is timed
by itself and the medians compared, so a step that a neighbour of the machine slowed moves little.
(b) against (a): what making a batch does to the next step (caches); (c) against (b): what a fresh
batch does; ``model / (fresh + making)``: the loop's share of model-only throughput, by its parts
(benchmarks/loop_vs_model.py measures it end to end, in rounds).

    python benchmarks/loop_parts.py recipes/cifar10-progressive.yaml --set data.root=/path/to/cifar10 \\
        --set regularization.policy=trivialaugment --set regularization.random_erasing=0.1 \\
        --set regularization.mixup=0.2 --set regularization.cutmix=1.0 --stage 0 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

from cadence import parts, train
from cadence.recipe import load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--steps", type=int, default=6, help="steps of each kind per round")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    recipe = load_recipe(a.recipe, a.sets)
    trainer = train.Trainer(parts.build_setup(recipe, a.recipe), run_dir="")
    k, t = a.stage, trainer.timeline
    epoch = t.epoch[t.stage_starts[k]]

    def batches():  # in the step, as training on the CPU makes them; epoch after epoch
        while True:
            loader = trainer.loader(k, epoch)
            loader.made_ahead = False
            yield from loader

    made = batches()
    x0, y0 = next(made)
    fixed = trainer.parts.normalize(x0), y0
    trainer.train_step(*fixed)  # warm-up at this size
    times: dict[str, list[float]] = {"fixed": [], "fixed, a batch made before": [], "fresh": [], "making": []}

    def timed(name: str, batch) -> None:
        start = time.perf_counter()
        trainer.train_step(*batch)
        times[name].append(time.perf_counter() - start)

    for _ in range(a.rounds):
        trainer.step = trainer.parts.scheduler.last_epoch = t.stage_starts[k]  # inside the plan
        for _ in range(a.steps):
            timed("fixed", fixed)
        for _ in range(a.steps):
            next(made)
            timed("fixed, a batch made before", fixed)
        for i in range(a.steps):
            start = time.perf_counter()
            x, y = next(made)
            batch = trainer.mixers[k](trainer.parts.normalize(x), y, t.stage_starts[k] + i)
            times["making"].append(time.perf_counter() - start)
            timed("fresh", batch)
    med = {name: statistics.median(v) for name, v in times.items()}
    stage = recipe.stages[k]
    print(f"stage {k} ({stage.resolution}px, batch {stage.batch_size}), medians of {a.rounds * a.steps} steps each:")
    for name, v in times.items():
        print(f"  {name:28s} {med[name] * 1e3:7.1f} ms  (mean {statistics.mean(v) * 1e3:.1f})")
    print(f"  loop / model by its parts: {med['fixed'] / (med['fresh'] + med['making']):.3f}")


if __name__ == "__main__":
    main()
