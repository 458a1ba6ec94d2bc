"""Recipes compared: trained over seeds into one folder (a study), summarised, judged against a
baseline. The library behind ``cadence compare`` and ``benchmarks/time_to_accuracy.py``.

A study is resumable: run it again with the same ``out`` and every run already finished is reused,
every run stopped part-way (Ctrl-C, a kill) continues exactly where its checkpoint left it.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from typing import Callable

import yaml

from cadence.errors import FieldError
from cadence.recipe import as_recorded, load_recipe
from cadence.rundir import RunDir, finished, read_metrics


def _each_once(paths: list[str]) -> None:
    """FieldError if a recipe or run folder is given twice (each counts once in a comparison)."""
    seen = set()
    for p in paths:
        if os.path.realpath(p) in seen:
            raise FieldError("ITEMS", p, "is given twice: each recipe or run counts once")
        seen.add(os.path.realpath(p))


def train_study(recipe_files: list[str], out: str, *, seeds: int = 1, sets: list[str] = (),
                progress: bool = True, say: Callable[[str], None] = print) -> list[str]:
    """Train every recipe for seeds ``0..seeds-1`` into ``out/<name>-seed<k>``, seed by seed (a study
    cut short has every recipe at seed 0 first). All bad input is found before any training. Returns
    the run folders. A folder holding a different recipe's run is refused (FieldError)."""
    from cadence import lr_finder, parts, train

    _each_once(recipe_files)
    sets = list(sets)
    loaded = [load_recipe(p, sets) for p in recipe_files]
    for r, p in zip(loaded, recipe_files):
        parts.build_setup(r, p)
    runs = []
    for seed in range(seeds):
        for r, p in zip(loaded, recipe_files):
            run = RunDir(os.path.join(out, f"{r.name}-seed{seed}"))
            recipe = load_recipe(p, sets + [f"seed={seed}"])
            started = run.has_checkpoint()
            if started:
                saved = load_recipe(run.recipe)
                recipe = as_recorded(recipe, saved)
                if saved.raw != recipe.raw:
                    raise FieldError("--out", out, f"{run} holds a run of a different {r.name} recipe; "
                                     "compare into another folder", file=p)
            setup = parts.build_setup(recipe, p)
            if started and finished(run, len(setup.timeline)):
                say(f"{run}: already trained, reusing it")
            else:  # new, or stopped part-way (a killed study): continue it exactly
                built = None
                if not started and recipe.optimizer.lr == "auto":
                    setup, built = train.find_auto_lr(setup, p, progress=progress)
                    say(f"{run}: {lr_finder.auto_lr_line(setup.recipe)}")
                train.train(setup, run.path, resume=started, progress=progress, parts=built)
            runs.append(run.path)
    return runs


def summarize_runs(run_dirs: list[str], thresholds: tuple[float, ...] = ()) -> dict[str, dict]:
    """Per recipe name (seeds grouped): final top-1 (mean, std, n, per seed), training time and, for each
    threshold, the time to first reach it on the seeds' mean curve (top-1 and training time averaged
    per evaluation; a recipe's seeds evaluate at the same steps), so a recipe reaches its own mean
    final top-1 at the latest at its end. Seeds evaluated at different steps: the mean of each seed's
    time to reach it, None if some seed never did."""
    groups: dict[str, list[list[dict]]] = {}
    for d in run_dirs:
        with open(RunDir(d).recipe) as f:
            name = yaml.safe_load(f)["name"]
        groups.setdefault(name, []).append(read_metrics(d))
    out = {}
    for name, runs in groups.items():
        evals = [[r for r in rows if "val_top1" in r] for rows in runs]
        top1 = [ev[-1]["val_top1"] for ev in evals]
        times = [ev[-1]["time"] for ev in evals]
        curve = None
        if all([r["step"] for r in ev] == [r["step"] for r in evals[0]] for ev in evals):
            curve = [(statistics.mean(r["time"] for r in at), statistics.mean(r["val_top1"] for r in at))
                     for at in zip(*evals)]
        reach = {}
        for th in thresholds:
            if curve is not None:
                reach[th] = next((t for t, top1 in curve if top1 >= th), None)
                continue
            hits = [next((r["time"] for r in ev if r["val_top1"] >= th), None) for ev in evals]
            reach[th] = None if None in hits else statistics.mean(hits)
        out[name] = {"top1_mean": statistics.mean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                     "n": len(top1), "time_mean": statistics.mean(times), "finals": top1, "reach": reach, "runs": runs}
    return out




@dataclass
class Comparison:
    summary: dict[str, dict]
    thresholds: tuple[float, ...]
    baseline: tuple[str, float] | None = None  # (name, its mean final top-1)
    lines: list[str] = field(default_factory=list)  # what cadence compare prints


def compare_runs(runs: list[str], out: str, thresholds: tuple[float, ...] = (),
                 baseline: str | None = None) -> Comparison:
    """Summarise finished runs (seeds grouped by recipe name) and write ``plans.png``,
    ``accuracy.png``, ``summary.json`` and ``compare.html`` into ``out``. ``baseline``: a recipe name;
    every recipe's time to reach its mean final top-1 is reported."""
    from cadence import report

    _each_once(runs)
    for d in runs:
        run = RunDir(d)
        if not os.path.exists(run.metrics) or not run.has_recipe():
            raise FieldError("ITEMS", d, "is not a finished run directory (no metrics.jsonl or recipe.yaml)")
        steps = len(load_recipe(run.recipe).timeline())
        if not finished(run, steps):
            raise FieldError("ITEMS", d, f"is not finished (no evaluation after its last step, {steps:,}): its "
                             f"last evaluation is not a final one; continue it: cadence train --resume {d}")
    os.makedirs(out, exist_ok=True)
    thresholds = tuple(thresholds)
    summary = summarize_runs(runs, thresholds)
    base = None
    if baseline:
        if baseline not in summary:
            raise FieldError("--baseline", baseline, f"is not one of the recipes compared: {sorted(summary)}")
        target = summary[baseline]["top1_mean"]
        thresholds += (target,)
        summary = summarize_runs(runs, thresholds)
        base = (baseline, target)
    timelines = {}
    for d in runs:
        r = load_recipe(RunDir(d).recipe)
        timelines[r.name] = r.timeline()
    report.plot_plans_overlay(timelines, os.path.join(out, "plans.png"))
    report.plot_runs_overlay(summary, os.path.join(out, "accuracy.png"))
    result = Comparison(summary, thresholds, base)
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["top1_mean"]):
        result.lines.append(f"{name}: top-1 {100 * s['top1_mean']:.2f} +- {100 * s['top1_std']:.2f}% over "
                            f"{s['n']} run(s), {s['time_mean']:.1f} s")
    if base is not None:
        name, target = base
        base_time = summary[name]["time_mean"]
        result.lines.append(f"time to reach {name}'s final top-1 ({100 * target:.2f}%), against its "
                            f"{base_time:.1f} s:")
        for other, s in summary.items():
            t = s["reach"][target]
            result.lines.append(f"  {other}: " + ("never (mean over seeds)" if t is None
                                                  else f"{t:.1f} s, ratio {t / base_time:.2f}"))
    report.write_summary_json(summary, os.path.join(out, "summary.json"), base)
    result.lines.append(f"wrote {report.write_compare_html(summary, out, thresholds, base)}")
    return result


def plan_overlay(recipe_files: list[str], plot: str, sets: list[str] = (),
                 check_model: Callable[..., bool] | None = None) -> list[str]:
    """Draw the plans of several recipes in one figure (no data, no training); returns a line per recipe.
    ``check_model(recipe)``, as ``cadence plan`` runs it, refuses what the model cannot apply (a
    ``FieldError``) and returns whether it could not check (a timm model without timm); every recipe is
    checked before anything is drawn."""
    from cadence import report

    timelines, lines = {}, []
    for p in recipe_files:
        r = load_recipe(p, list(sets))
        try:
            t = timelines[r.name] = r.timeline()
            unchecked = check_model is not None and check_model(r)
        except FieldError as e:
            raise e.within(file=p) from None
        peak = "auto (the range test picks it; plotted as 1)" if r.optimizer.lr == "auto" else f"{max(t.lr):.4g}"
        lines.append(f"{r.name}: {len(t):,} steps, {t.samples_seen[-1]:,} images, peak LR {peak}"
                     + (" (model and parameter groups not checked: it needs timm)" if unchecked else ""))
    os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
    report.plot_plans_overlay(timelines, plot)
    return lines
