"""`cadence compare`: plans without data, finished runs without retraining."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib

import pytest

from cadence import cli, parts, rundir, train
from cadence.recipe import load_recipe
from helpers import LONG_TINY, ROOT, TINY, signal_mid_run, write_recipe


@pytest.mark.slow
@pytest.mark.pictures
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


def test_plan_only_checks_each_recipe_against_its_model_as_plan_does(tmp_path, capsys, monkeypatch):
    """A parameter group the model has none of is refused by ``compare --plan-only`` as by ``plan``: the
    same line naming the file and the field, exit 2, nothing drawn; a model it cannot build without timm
    is said to be unchecked, on its recipe's line."""
    from cadence import models

    good = write_recipe(tmp_path, TINY)
    bad = str(tmp_path / "bad.yaml")  # TINY's resnet has no whitening stem
    write_recipe(tmp_path, {**TINY, "name": "bad", "optimizer": {**TINY["optimizer"],
                                                                 "groups": {"whiten_bias": {"epochs": 1}}}}, "bad.yaml")
    plot = tmp_path / "out" / "plans.png"
    assert cli.main(["plan", bad]) == 2
    plan_says = capsys.readouterr().err.strip()
    assert cli.main(["compare", "--plan-only", good, bad, "--plot", str(plot)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == plan_says and len(err.splitlines()) == 1 and "optimizer.groups.whiten_bias" in err, err
    assert bad in err and not plot.parent.exists()
    monkeypatch.setattr(models, "timm_missing", lambda model, optimizer: True)
    assert cli.main(["compare", "--plan-only", good, bad, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.count("(model and parameter groups not checked: it needs timm)") == 1 and "bad: 12 steps, " in out


def _finished_run(folder, raw: dict, seed: int, evals: list[tuple[int, float, float]]) -> str:
    """A run directory as training leaves it, written by hand: the recipe, a placeholder checkpoint
    (compare must not open it) and ``metrics.jsonl`` whose evaluations are ``evals`` as (step,
    training time in s, top-1), each after a training row. TINY's 32 held-out images: top-1 is k/32."""
    d = folder / f"{raw['name']}-{seed}"
    os.makedirs(d / "checkpoints")
    write_recipe(d, {**raw, "seed": seed})
    (d / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    samples_seen = {3: 48, 6: 96, 9: 192, 12: 288}  # TINY: 3 steps of 16, then 3 of 32, per epoch
    with open(d / "metrics.jsonl", "w") as f:
        for step, t, top1 in evals:
            for row in ({"step": step - 1, "lr": 0.05, "loss": 1.0, "samples_seen": samples_seen[step], "time": t},
                        {"step": step, "samples_seen": samples_seen[step], "time": t, "val_loss": 1.0,
                         "val_top1": top1}):
                f.write(json.dumps(row) + "\n")
    return str(d)


@pytest.mark.pictures
def test_compare_finished_runs_without_retraining(tmp_path, capsys):
    """Three recipes, two seeds each, with metrics chosen so every number of the summary is known:
    a seed's std is |a - b| / sqrt(2); times to a top-1 are read off the mean curve of the seeds
    (mean time, mean top-1 per evaluation), or are the mean of each seed's time when the seeds
    evaluated at different steps (tiny-slow), None when one never got there."""
    cosine = TINY | {"name": "tiny-cosine", "schedule": {"kind": "cosine", "floor": 0.01}}
    slow = TINY | {"name": "tiny-slow"}
    dirs = [
        # mean curve (1.25 s, 0.28125) (2.25, 0.46875) (3.25, 0.65625) (4.5, 0.8125)
        _finished_run(tmp_path, TINY, 0, [(3, 1.0, 0.25), (6, 2.0, 0.5), (9, 3.0, 0.625), (12, 4.0, 0.75)]),
        _finished_run(tmp_path, TINY, 1, [(3, 1.5, 0.3125), (6, 2.5, 0.4375), (9, 3.5, 0.6875), (12, 5.0, 0.875)]),
        # mean curve (1.0 s, 0.40625) (2.0, 0.65625) (3.0, 0.8125) (4.0, 0.875)
        _finished_run(tmp_path, cosine, 0, [(3, 0.5, 0.375), (6, 1.5, 0.625), (9, 2.5, 0.75), (12, 3.5, 0.8125)]),
        _finished_run(tmp_path, cosine, 1, [(3, 1.5, 0.4375), (6, 2.5, 0.6875), (9, 3.5, 0.875), (12, 4.5, 0.9375)]),
        # evaluated once per stage, and once per epoch: no common curve
        _finished_run(tmp_path, slow | {"train": TINY["train"] | {"eval_every": "stage"}}, 0,
                      [(6, 2.0, 0.25), (12, 4.0, 0.5)]),
        _finished_run(tmp_path, slow, 1, [(3, 1.0, 0.125), (6, 2.0, 0.25), (9, 3.0, 0.375), (12, 4.0, 0.75)]),
    ]
    before = {p: p.read_bytes() for d in dirs for p in sorted(pathlib.Path(d).rglob("*")) if p.is_file()}
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", *dirs, "--out", str(out_dir), "--thresholds", "0.3", "--baseline", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:7] == [  # best first; then the time to tiny's mean final top-1, 0.8125
        "tiny-cosine: top-1 87.50 +- 8.84% over 2 run(s), 4.0 s",
        "tiny: top-1 81.25 +- 8.84% over 2 run(s), 4.5 s",
        "tiny-slow: top-1 62.50 +- 17.68% over 2 run(s), 4.0 s",
        "time to reach tiny's final top-1 (81.25%), against its 4.5 s:",
        "  tiny: 4.5 s, ratio 1.00",  # the baseline reaches its own mean at its end
        "  tiny-cosine: 3.0 s, ratio 0.67",  # its mean curve is exactly at 0.8125 at 3.0 s: reached
        "  tiny-slow: never (mean over seeds)",  # seed 0 ends at 0.5
    ]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary == {
        "tiny": {"top1_mean": 0.8125, "top1_std": pytest.approx(0.125 / math.sqrt(2)), "n": 2, "time_mean": 4.5,
                 "finals": [0.75, 0.875], "reach": [[0.3, 2.25], [0.8125, 4.5]]},
        "tiny-cosine": {"top1_mean": 0.875, "top1_std": pytest.approx(0.125 / math.sqrt(2)), "n": 2,
                        "time_mean": 4.0, "finals": [0.8125, 0.9375], "reach": [[0.3, 1.0], [0.8125, 3.0]]},
        "tiny-slow": {"top1_mean": 0.625, "top1_std": pytest.approx(0.25 / math.sqrt(2)), "n": 2, "time_mean": 4.0,
                      "finals": [0.5, 0.75], "reach": [[0.3, 3.5], [0.8125, None]]},  # 0.3: seeds at 4.0 and 3.0 s
        "_baseline": {"name": "tiny", "top1": 0.8125, "time": 4.5,
                      "ratios": {"tiny": 1.0, "tiny-cosine": pytest.approx(2 / 3), "tiny-slow": None}},
    }
    page = (out_dir / "compare.html").read_text()
    assert ("Winner: <b>tiny-cosine</b>, 6.25 points ahead of the next; the lead is <b>within</b> the "
            "seed-to-seed spread") in page  # 0.0625 ahead, against a spread of 0.088
    for f in ("plans.png", "accuracy.png"):
        assert (out_dir / f).stat().st_size > 10_000
    assert before == {p: p.read_bytes() for d in dirs for p in sorted(pathlib.Path(d).rglob("*")) if p.is_file()}
    assert cli.main(["compare", *dirs, "--out", str(out_dir), "--baseline", "nope"]) == 2
    assert "--baseline: 'nope': is not one of the recipes compared" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_resumes_an_unfinished_run_and_reuses_finished_ones(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    out_dir = tmp_path / "cmp"
    run = out_dir / "tiny-seed0"
    assert cli.main(["train", recipe, "--out", str(run), "--quiet", "--max-steps", "4", "--set", "seed=0"]) == 0
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    rows = rundir.read_metrics(str(run))
    assert [r["step"] for r in rows if "loss" in r] == list(range(12))  # continued from step 4, not retrained
    capsys.readouterr()
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    assert "already trained, reusing it" in capsys.readouterr().out
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet", "--set", "optimizer.lr=0.07"]) == 2
    assert "holds a run of a different tiny recipe" in capsys.readouterr().err  # never mixed up with stale runs


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_runs_the_range_test_for_lr_auto(tmp_path, capsys):
    """``optimizer.lr: auto`` in compare: the range test picks the LR, as in ``cadence train`` (it
    trained at the plan's placeholder 1.0), and a resumed run keeps the LR it recorded."""
    recipe = write_recipe(tmp_path, TINY | {"optimizer": TINY["optimizer"] | {"lr": "auto"}})
    out_dir = tmp_path / "cmp"
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0
    run = out_dir / "tiny-seed0"
    recorded = load_recipe(str(run / "recipe.yaml"))
    assert "optimizer.lr: auto -> " in capsys.readouterr().out
    with open(run / "lr_find.csv") as f:
        grid = [float(r["lr"]) for r in csv.DictReader(f)]
    assert recorded.optimizer.lr in [lr / 10 for lr in grid]  # a tenth of a range-test LR (the edge), not 1.0
    rows, plan = [r for r in rundir.read_metrics(str(run)) if "lr" in r], recorded.timeline(train_samples=96)
    assert [r["lr"] for r in rows] == pytest.approx([plan.lr[r["step"]] for r in rows])  # trained at the pick
    assert cli.main(["compare", recipe, "--out", str(out_dir), "--quiet"]) == 0  # reused, not a "different recipe"
    assert "already trained, reusing it" in capsys.readouterr().out
    part = tmp_path / "part"  # stopped part-way: compare continues it at the LR the run recorded
    assert cli.main(["train", recipe, "--out", str(part / "tiny-seed0"), "--quiet", "--max-steps", "4",
                     "--set", "seed=0"]) == 0
    picked = load_recipe(str(part / "tiny-seed0" / "recipe.yaml")).optimizer.lr
    assert cli.main(["compare", recipe, "--out", str(part), "--quiet"]) == 0
    rows = [r for r in rundir.read_metrics(str(part / "tiny-seed0")) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(12)) and "auto ->" not in capsys.readouterr().out
    assert load_recipe(str(part / "tiny-seed0" / "recipe.yaml")).optimizer.lr == picked


@pytest.mark.slow
def test_ctrl_c_during_a_study_exits_130_with_one_line_and_the_same_command_continues_it(tmp_path):
    """SIGINT in the middle of a study's training: exit 130, one line naming the compare command that
    continues (with its --out), a checkpoint of the last step; run again, the study ends with weights
    bitwise equal to a run never stopped."""
    import signal

    import torch

    recipe = write_recipe(tmp_path, LONG_TINY)
    out = tmp_path / "study"
    code, err = signal_mid_run(["compare", recipe, "--out", str(out), "--quiet"], out / "tiny-seed0" / "metrics.jsonl",
                               signal.SIGINT)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("cadence: SIGINT at step ") and "checkpoint written" in lines[0]
    assert lines[0].endswith(f"continue with: cadence compare {recipe} --out {out} --quiet")
    stopped = torch.load(out / "tiny-seed0" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 36
    assert cli.main(["compare", recipe, "--out", str(out), "--quiet"]) == 0
    full, _ = train.train(parts.build_setup(load_recipe(recipe, ["seed=0"])), str(tmp_path / "full"), progress=False)
    resumed = torch.load(out / "tiny-seed0" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == 36
    for name, x in full.parts.model.state_dict().items():
        assert torch.equal(x, resumed["model"][name]), name
