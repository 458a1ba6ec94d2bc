"""Time to accuracy on CIFAR-10, side by side: a recipe against a baseline (e.g. the same network
at a fixed resolution with cosine + warmup), over seeds, and an ablation of the recipe's techniques.
For each run, the wall time (data loading, model building, training and every evaluation included)
at which held-out top-1 first reached each threshold, the same in training time alone (steps only, no
loading or evaluation: fair between recipes that evaluate at different intervals), and the final top-1.

    python benchmarks/time_to_accuracy.py --root /tmp/cifar --recipe recipes/cifar10-fast-bf16.yaml \\
        --baseline recipes/cifar10-fast-bf16-baseline.yaml --seeds 0 1 2 --baseline-seeds 0 \\
        --out runs/tta --ablate "no patch whitening: model.whiten=false" --ablate "no flip TTA: train.tta=none"

Evaluations happen where the recipe says (``train.eval_every``), so a time to reach is the time
of the first evaluation at or above the threshold. Each run is ``cadence train`` in a process of
its own. With ``--out`` the runs are kept there (``<name>-s<seed>``) and a finished one is read
back instead of retrained, so a long comparison can be run in pieces (the recipe's seeds first,
then the baseline's, then the ablations).

An ablation (``"LABEL: key=value[, key=value]"``) is the recipe with those overrides. One that only
changes evaluation (``train.tta``) re-evaluates the recipe's own finished runs; any other is
trained on the first ``--ablate-seeds`` and compared after the same number of images, with its
training time against the recipe's. (Not at a wall-time budget read off sequential runs: this
machine's speed drifts by 15-20% within half an hour, which moved an ablation by whole epochs.
Where an ablation changes the cost of a step, ``benchmarks/step_speed.py`` measures that cost
side by side.) Results go to ``<out>/time_to_accuracy.json`` as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from cadence import parts, rundir
from cadence.recipe import load_recipe

EVAL_ONLY = {"train.tta", "train.eval_batch_size"}  # keys that change evaluation, not training


def _finished(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "timing.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def one_run(path: str, sets: list[str], seed: int, thresholds: list[float], run_dir: str) -> dict:
    """Train ``path`` with ``sets`` at ``seed`` in ``run_dir`` (or read it back if finished there), as
    a user would: ``cadence train`` in a process of its own, timed from start to exit."""
    timing = _finished(run_dir)
    if timing is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run: its times would be wrong, start again
        overrides = [arg for s in [*sets, f"seed={seed}"] for arg in ("--set", s)]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cadence", "train", path, *overrides, "--out", run_dir, "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        command = time.perf_counter() - start
        last = [r for r in rundir.read_metrics(run_dir) if "val_top1" in r][-1]
        # the command's time outside the trainer's clock (start-up, loading the data, the closing report)
        # counts as if spent before the first step: times to reach are, if anything, overstated
        timing = {"loading": command - last["wall"], "command": command, "name": load_recipe(path, sets).name}
        with open(os.path.join(run_dir, "timing.json"), "w") as f:
            json.dump(timing, f)
    evals = [r for r in rundir.read_metrics(run_dir) if "val_top1" in r]
    curve = [(timing["loading"] + r["wall"], r["val_top1"]) for r in evals]
    reach = {th: next((t for t, acc in curve if acc >= th), None) for th in thresholds}
    # the same, counting training steps only (no loading, no evaluation): fair to a finer eval grid
    reach_train = {th: next((r["time"] for r in evals if r["val_top1"] >= th), None) for th in thresholds}
    return {"name": timing["name"], "seed": seed, "top1": curve[-1][1], "wall": curve[-1][0], "reach": reach,
            "reach_train": reach_train, "train_s": evals[-1]["time"], "curve": curve, "run_dir": run_dir}


def reevaluate(run_dir: str, sets: list[str]) -> float:
    """Top-1 of a finished run's last checkpoint, evaluated with ``sets`` applied to its recipe."""
    from cadence import checkpoint
    from cadence.evaluate import evaluate_recipe

    run = rundir.RunDir(run_dir)
    setup = parts.build_setup(load_recipe(run.recipe, sets), run.recipe)
    built = parts.build_parts(setup)
    built.load_weights(checkpoint.load(run.last))
    return evaluate_recipe(built, setup)["val_top1"]


def parse_ablation(text: str) -> tuple[str, list[str]]:
    label, sep, sets = text.partition(":")
    sets = [s.strip() for s in sets.split(",") if s.strip()]
    if not sep or not label.strip() or not sets or not all("=" in s for s in sets):
        raise SystemExit(f"{text!r}: expected 'LABEL: key=value[, key=value]'")
    return label.strip(), sets


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="CIFAR-10 as an ImageFolder of the JPEGs")
    p.add_argument("--recipe", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--baseline-seeds", type=int, nargs="*", default=None, help="default: --seeds")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.85, 0.90])
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--ablate", action="append", default=[], metavar="'LABEL: key=value[, ...]'")
    p.add_argument("--ablate-seeds", type=int, nargs="+", default=None, help="default: the first seed")
    a = p.parse_args()
    ablations = [parse_ablation(t) for t in a.ablate]
    base_seeds = a.seeds if a.baseline_seeds is None else a.baseline_seeds
    ablate_seeds = a.seeds[:1] if a.ablate_seeds is None else a.ablate_seeds
    sets = [f"data.root={a.root}", *a.sets]
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        os.makedirs(out, exist_ok=True)

        def run(role: str, path: str, seed: int, extra: list[str] = (), slug: str = "") -> dict:
            name = load_recipe(path, sets).name
            r = one_run(path, sets + list(extra), seed, a.thresholds,
                        os.path.join(out, f"{name}{'-' + slug if slug else ''}-s{seed}"))
            reach = ", ".join(f"{100 * th:g}% at " + ("never" if t is None else f"{t:.0f} s")
                              for th, t in r["reach"].items())
            print(f"seed {seed} {role}: top-1 {100 * r['top1']:.2f}% after {r['wall']:.0f} s; {reach}", flush=True)
            return r

        results = {"recipe": [run("recipe", a.recipe, seed) for seed in a.seeds],
                   "baseline": [run("baseline", a.baseline, seed) for seed in base_seeds]}
        ablated = []
        for label, extra in ablations:
            if all(s.split("=", 1)[0] in EVAL_ONLY for s in extra):
                accs = [reevaluate(r["run_dir"], extra) for r in results["recipe"]]
                seeds, kind, train_s = [r["seed"] for r in results["recipe"]], "re-evaluated", None
            else:
                slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
                runs = [run(f"ablation '{label}'", a.recipe, seed, extra, slug) for seed in ablate_seeds]
                accs, seeds, kind = [r["top1"] for r in runs], ablate_seeds, "trained"
                train_s = statistics.mean(r["train_s"] for r in runs)
            same = [r for r in results["recipe"] if r["seed"] in seeds]
            ablated.append({"label": label, "sets": extra, "kind": kind, "seeds": seeds, "top1": accs,
                            "recipe_top1": [r["top1"] for r in same], "train_s": train_s,
                            "recipe_train_s": statistics.mean(r["train_s"] for r in same) if same else None})
        report = {"recipe": a.recipe, "baseline": a.baseline, "results": results,
                  "ablations": ablated, "thresholds": a.thresholds}
        with open(os.path.join(out, "time_to_accuracy.json"), "w") as f:
            json.dump(report, f, indent=1)

    print()
    for th in a.thresholds:
        for key, what, ran_key in (("reach", "wall time", "wall"), ("reach_train", "training time", "train_s")):
            cells, means = [], []
            for role in ("recipe", "baseline"):
                times = [r[key][th] for r in results[role]]
                if not times:
                    cells.append("not run")
                    means.append(None)
                elif None in times:
                    ran = max(r[ran_key] for r in results[role])
                    cells.append(f"never within {ran:.0f} s ({times.count(None)} of {len(times)} seeds)")
                    means.append(None)
                else:
                    m, s = _mean_std(times)
                    cells.append(f"{m:.0f} +- {s:.0f} s")
                    means.append(m)
            ratio = f", ratio {means[0] / means[1]:.2f}" if None not in means else ""
            print(f"{what} to {100 * th:g}%: recipe {cells[0]}, baseline {cells[1]}{ratio}")
    for role, seeds in (("recipe", a.seeds), ("baseline", base_seeds)):
        accs = [r["top1"] for r in results[role]]
        if not accs:
            continue
        m, s = _mean_std(accs)
        walls = [r["wall"] for r in results[role]]
        print(f"final top-1, {role}: {100 * m:.2f} +- {100 * s:.2f}% (min {100 * min(accs):.2f}%), "
              f"wall {statistics.mean(walls):.0f} s (max {max(walls):.0f} s), seeds {seeds}")
    for ab in ablated:
        if not ab["recipe_top1"]:
            print(f"ablation '{ab['label']}': seeds {ab['seeds']} are not among the recipe's {a.seeds}")
            continue
        m, _ = _mean_std(ab["top1"])
        delta = m - statistics.mean(ab["recipe_top1"])
        cost = (f"; training time {ab['train_s']:.0f} s against the recipe's {ab['recipe_train_s']:.0f} s "
                f"({ab['train_s'] / ab['recipe_train_s']:.2f}x)") if ab["train_s"] else ""
        print(f"ablation '{ab['label']}' ({ab['kind']}, seeds {ab['seeds']}): top-1 {100 * m:.2f}% after the "
              f"same images, {100 * delta:+.2f} points against the recipe{cost}")


if __name__ == "__main__":
    main()
