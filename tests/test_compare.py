"""`cadence compare`: plans without data, finished runs without retraining."""

from __future__ import annotations

import copy
import json
import os

import pytest

from cadence import cli, train
from cadence.recipe import load_recipe
from helpers import ROOT, TINY, write_recipe


def test_plan_only_needs_no_data(tmp_path, capsys):
    recipes = [os.path.join(ROOT, "recipes", f) for f in
               ("imagenet-resnet50-progressive.yaml", "imagenet-resnet50-cosine.yaml")]
    plot = tmp_path / "schedules.png"
    assert cli.main(["compare", "--plan-only", *recipes, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "imagenet-resnet50-progressive: 23,766 steps" in out and "imagenet-resnet50-cosine: 112,590 steps" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000
    assert cli.main(["compare", "--plan-only", recipes[1], "--set", "optimizer.lr=auto", "--plot", str(plot)]) == 0
    assert "peak LR auto" in capsys.readouterr().out  # not the placeholder 1 the plan is drawn with


def test_compare_finished_runs_without_retraining(tmp_path, capsys):
    other = copy.deepcopy(TINY)
    other["name"] = "tiny-cosine"
    other["schedule"] = {"kind": "cosine", "floor": 0.01}
    dirs = []
    for raw in (TINY, other):
        for seed in (0, 1):
            d = tmp_path / f"{raw['name']}-{seed}"
            recipe = write_recipe(tmp_path, raw, f"{raw['name']}.yaml")
            assert cli.main(["train", recipe, "--out", str(d), "--quiet", "--set", f"seed={seed}"]) == 0
            dirs.append(str(d))
    before = {d: os.path.getmtime(os.path.join(d, "checkpoints", "last.pt")) for d in dirs}
    capsys.readouterr()
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", *dirs, "--out", str(out_dir), "--thresholds", "0.3", "--baseline", "tiny"]) == 0
    out = capsys.readouterr().out
    finals = {}
    for d in dirs:
        rows = [r for r in train.read_metrics(d) if "val_top1" in r]
        finals.setdefault(os.path.basename(d).rsplit("-", 1)[0], []).append(rows[-1]["val_top1"])
    for name, values in finals.items():
        assert f"{name}: top-1 {100 * sum(values) / 2:.2f}" in out
    page = (out_dir / "compare.html").read_text()
    assert "Winner" in page and "seed-to-seed spread" in page
    for f in ("plans.png", "accuracy.png"):
        assert (out_dir / f).stat().st_size > 10_000
    assert before == {d: os.path.getmtime(os.path.join(d, "checkpoints", "last.pt")) for d in dirs}

    # --baseline: every recipe's time to the baseline's mean final top-1, over the baseline's time
    summary = json.loads((out_dir / "summary.json").read_text())
    target = sum(finals["tiny"]) / 2
    assert summary["_baseline"]["name"] == "tiny" and summary["_baseline"]["top1"] == target
    for name in ("tiny", "tiny-cosine"):  # on the mean curve of the two seeds
        evals = [[r for r in train.read_metrics(d) if "val_top1" in r]
                 for d in dirs if os.path.basename(d).rsplit("-", 1)[0] == name]
        curve = [((a["time"] + b["time"]) / 2, (a["val_top1"] + b["val_top1"]) / 2) for a, b in zip(*evals)]
        hit = next((t for t, top1 in curve if top1 >= target - 1e-12), None)
        ratio = summary["_baseline"]["ratios"][name]
        if hit is None:
            assert ratio is None and f"  {name}: never" in out
        else:
            assert ratio == pytest.approx(hit / summary["tiny"]["time_mean"])
    assert summary["_baseline"]["ratios"]["tiny"] <= 1.0  # the baseline reaches its own mean, at the end at worst
    assert f"time to reach tiny's final top-1 ({100 * target:.2f}%)" in out
    assert cli.main(["compare", *dirs, "--out", str(out_dir), "--baseline", "nope"]) == 2
    assert "--baseline: 'nope': is not one of the recipes compared" in capsys.readouterr().err


def test_compare_resumes_an_unfinished_run_and_reuses_finished_ones(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    out_dir = tmp_path / "cmp"
    run = out_dir / "tiny-seed0"
    assert cli.main(["train", recipe, "--out", str(run), "--quiet", "--max-steps", "4", "--set", "seed=0"]) == 0
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    rows = train.read_metrics(str(run))
    assert [r["step"] for r in rows if "loss" in r] == list(range(12))  # continued from step 4, not retrained
    capsys.readouterr()
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    assert "already trained, reusing it" in capsys.readouterr().out
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet", "--set", "optimizer.lr=0.07"]) == 2
    assert "holds a run of a different tiny recipe" in capsys.readouterr().err  # never mixed up with stale runs


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


def test_compare_runs_the_range_test_for_lr_auto(tmp_path, capsys):
    """``optimizer.lr: auto`` in compare: the range test picks the LR, as in ``cadence train`` (it
    trained at the plan's placeholder 1.0), and a resumed run keeps the LR it recorded."""
    recipe = write_recipe(tmp_path, TINY | {"optimizer": TINY["optimizer"] | {"lr": "auto"}})
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    run = out_dir / "tiny-seed0"
    recorded = load_recipe(str(run / "recipe.yaml"))
    assert "optimizer.lr: auto -> " in capsys.readouterr().out and recorded.optimizer.lr != 1.0
    assert (run / "lr_find.csv").exists()
    rows, plan = [r for r in train.read_metrics(str(run)) if "lr" in r], recorded.timeline(train_samples=96)
    assert [r["lr"] for r in rows] == pytest.approx([plan.lr[r["step"]] for r in rows])  # trained at the pick
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0  # reused, not a "different recipe"
    assert "already trained, reusing it" in capsys.readouterr().out
    part = tmp_path / "part"  # stopped part-way: compare continues it at the LR the run recorded
    assert cli.main(["train", recipe, "--out", str(part / "tiny-seed0"), "--quiet", "--max-steps", "4",
                     "--set", "seed=0"]) == 0
    picked = load_recipe(str(part / "tiny-seed0" / "recipe.yaml")).optimizer.lr
    assert cli.main(["compare", recipe, "--out", str(part), "--quiet"]) == 0
    rows = [r for r in train.read_metrics(str(part / "tiny-seed0")) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(12)) and "auto ->" not in capsys.readouterr().out
    assert load_recipe(str(part / "tiny-seed0" / "recipe.yaml")).optimizer.lr == picked
