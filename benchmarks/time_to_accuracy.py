"""Time to accuracy on CIFAR-10, side by side: a recipe against a baseline (e.g. the same network
at a fixed resolution with cosine + warmup), over seeds. For each run, the wall time (data loading,
model building, training and every evaluation included) at which held-out top-1 first reached each
threshold, and the final top-1.

    python benchmarks/time_to_accuracy.py --root /tmp/cifar --recipe RECIPE --baseline RECIPE \\
        --seeds 0 1 2 [--thresholds 0.85 0.90] [--set key=value ...]

Evaluations happen where the recipe says (``train.eval_every``), so a time to reach is the time
of the first evaluation at or above the threshold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from cadence import train
from cadence.recipe import load_recipe


def one_run(path: str, sets: list[str], seed: int, thresholds: list[float]) -> dict:
    start = time.perf_counter()
    recipe = load_recipe(path, sets + [f"seed={seed}"])
    setup = train.prepare(recipe, path)
    loading = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as out:
        trainer = train.Trainer.create(setup, out)
        final = trainer.fit(progress=False)
        evals = [r for r in train.read_metrics(out) if "val_top1" in r]
    reach = {th: next((loading + r["wall"] for r in evals if r["val_top1"] >= th), None) for th in thresholds}
    return {"name": recipe.name, "seed": seed, "top1": final["val_top1"], "wall": loading + evals[-1]["wall"],
            "reach": reach}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="CIFAR-10 as an ImageFolder of the JPEGs")
    p.add_argument("--recipe", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.90])
    p.add_argument("--set", dest="sets", action="append", default=[])
    a = p.parse_args()
    sets = [f"data.root={a.root}", *a.sets]
    results = {"recipe": [], "baseline": []}
    for seed in a.seeds:
        for role, path in (("recipe", a.recipe), ("baseline", a.baseline)):
            r = one_run(path, sets, seed, a.thresholds)
            results[role].append(r)
            reach = ", ".join(f"{100 * th:g}% at " + ("never" if t is None else f"{t:.0f} s") for th, t in r["reach"].items())
            print(f"seed {seed} {r['name']}: top-1 {100 * r['top1']:.2f}% after {r['wall']:.0f} s; {reach}", flush=True)
    print()
    for th in a.thresholds:
        cells = []
        for role in ("recipe", "baseline"):
            times = [r["reach"][th] for r in results[role]]
            cells.append("never (some seed)" if None in times else
                         f"{statistics.mean(times):.0f} +- {statistics.stdev(times) if len(times) > 1 else 0:.0f} s")
        ratio = ""
        if "never" not in cells[0] and "never" not in cells[1]:
            ratio = f", ratio {statistics.mean(r['reach'][th] for r in results['recipe']) / statistics.mean(r['reach'][th] for r in results['baseline']):.2f}"
        print(f"time to {100 * th:g}%: {os.path.basename(a.recipe)} {cells[0]}, {os.path.basename(a.baseline)} {cells[1]}{ratio}")
    for role in ("recipe", "baseline"):
        accs = [r["top1"] for r in results[role]]
        print(f"final top-1, {role}: {100 * statistics.mean(accs):.2f} +- "
              f"{100 * (statistics.stdev(accs) if len(accs) > 1 else 0):.2f}% (seeds {a.seeds})")


if __name__ == "__main__":
    main()
