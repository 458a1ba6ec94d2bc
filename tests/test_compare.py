"""`cadence compare`: plans without data, finished runs without retraining."""

from __future__ import annotations

import copy
import os

from cadence import cli, train
from test_train import ROOT, TINY, write_recipe


def test_plan_only_needs_no_data(tmp_path, capsys):
    recipes = [os.path.join(ROOT, "recipes", f) for f in
               ("imagenet-resnet50-progressive.yaml", "imagenet-resnet50-cosine.yaml")]
    plot = tmp_path / "schedules.png"
    assert cli.main(["compare", "--plan-only", *recipes, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "imagenet-resnet50-progressive: 23,766 steps" in out and "imagenet-resnet50-cosine: 112,590 steps" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


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
    assert cli.main(["compare", *dirs, "--out", str(out_dir), "--thresholds", "0.3"]) == 0
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


def test_compare_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
