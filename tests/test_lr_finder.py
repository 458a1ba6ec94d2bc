"""LR range test: the suggestion rules on curves whose answer is known, state restored bit for bit,
`cadence find-lr`, and `optimizer.lr: auto`."""

from __future__ import annotations

import copy
import csv
import math
import os

import pytest
import torch
import yaml

from cadence import cli, lr_finder, parts, rundir, smoothing
from cadence.recipe import recipe_from_dict
from helpers import TINY, write_recipe

GRID = [1e-6 * (1e7) ** (i / 199) for i in range(200)]  # 1e-6 .. 10, 200 points


def synthetic_curve(steepest_at: float, minimum_at: float) -> list[float]:
    """Loss that falls as -tanh around ``steepest_at`` (in log LR) and blows up past ``minimum_at``."""
    x0, xm = math.log(steepest_at), math.log(minimum_at)
    return [2.0 - math.tanh(math.log(lr) - x0) + (20 * (math.log(lr) - xm) ** 2 if lr > minimum_at else 0)
            for lr in GRID]


def nearest(lr: float) -> int:
    return min(range(len(GRID)), key=lambda i: abs(math.log(GRID[i] / lr)))


def test_smoothing_is_bias_corrected():
    assert smoothing.smooth([3.0] * 10) == pytest.approx([3.0] * 10, rel=1e-12)
    s = smoothing.smooth([1.0, 0.0], beta=0.9)
    assert s[1] == pytest.approx(0.9 * 0.1 / (1 - 0.81))


@pytest.mark.parametrize("steep, minimum", [(1e-3, 0.3), (3e-2, 1.0), (1e-4, 1e-2)])
def test_rules_find_the_known_answers(steep, minimum):
    losses = synthetic_curve(steep, minimum)
    step = math.log(GRID[1] / GRID[0])
    assert abs(math.log(lr_finder.steepest(GRID, losses) / steep)) <= step
    true_min = GRID[min(range(len(losses)), key=losses.__getitem__)]
    assert lr_finder.minimum_div_10(GRID, losses) == pytest.approx(true_min / 10)
    v = lr_finder.valley(GRID, losses)  # the whole curve falls from the start to the minimum
    assert abs(math.log(v) - (math.log(GRID[0]) + math.log(true_min)) / 2) <= step
    s = lr_finder.suggest(GRID, losses, beta=0.0)  # beta 0: no smoothing, exact rules
    # the edge: the last LR at which the loss is within a quarter of its fall (start 3, minimum 1)
    # above the minimum; past the minimum the loss is 1 + 20 d^2 (d in log LR), so 1.5 at d = 0.158
    level = min(losses) + 0.25 * (losses[0] - min(losses))
    last = max(i for i, v in enumerate(losses) if v <= level)
    assert s.edge == GRID[last] and abs(math.log(s.edge / (true_min * math.exp(0.5 ** 0.5 / 20 ** 0.5)))) <= step
    assert s.recommended == s.edge / 10


def test_the_edge_stays_put_where_on_a_bumpy_floor_the_minimum_falls():
    # a fall to a long floor with a bump, then the climb: the floor's lowest point is noise, early
    # (a) or late (b); minimum/10 moves 40 steps (1.4 decades), the edge not at all
    curve = [3.0 - 0.01 * i for i in range(100)] + [2.0] * 80 + [2.0 + 0.2 * i for i in range(1, 21)]
    curve[120:125] = [2.5] * 5  # a bump above the level that recovers is not the edge
    a, b = list(curve), list(curve)
    a[130], b[170] = 1.999, 1.999
    sa, sb = lr_finder.suggest(GRID, a, beta=0.0), lr_finder.suggest(GRID, b, beta=0.0)
    assert sa.edge == sb.edge == GRID[180]  # level 1.999 + 0.25 * 1.001 = 2.249: 2.2 at 180 is within, 2.4 not
    assert sb.minimum_div_10 / sa.minimum_div_10 == pytest.approx(GRID[170] / GRID[130])


def test_a_range_that_ends_before_the_loss_climbs_away_gets_a_message():
    falling = [3.0 - 0.01 * i for i in range(200)]
    with pytest.raises(lr_finder.RangeTestError, match="before the loss climbed away"):
        lr_finder.suggest(GRID, falling, beta=0.0)
    # a run the range test stopped for a non-finite loss did climb away, after its last finite point
    assert lr_finder.suggest(GRID, falling, beta=0.0, diverged=True).edge == GRID[-1]


def test_range_test_counts_a_non_finite_loss_as_the_edge(tmp_path):
    """A loss that turns NaN while still falling: the range test stops there and the edge is its last
    finite LR (``diverged`` passed through); a range that just ends on a falling loss suggests nothing.
    The range test runs any step function: here one that returns a scripted loss."""
    setup = parts.build_setup(recipe_from_dict(TINY))
    built = parts.build_parts(setup)
    batches = lambda epoch: [(None, None)] * 7  # noqa: E731  (epochs of 7 batches: the test crosses epochs)
    losses = iter([3.0 - 0.05 * i for i in range(30)] + [math.nan] * 10)
    lrs, got, stopped = lr_finder.range_test(built, batches, lambda x, y: torch.tensor(next(losses)),
                                             start=1e-4, end=10.0, steps=40)
    assert stopped and len(lrs) == 31 and math.isnan(got[-1])
    assert lrs == [lr_finder.lr_at(i, 40, 1e-4, 10.0, "exp") for i in range(31)]
    s = lr_finder.suggest(lrs[:30], got[:30], diverged=stopped)
    assert s.edge == lrs[29] and s.recommended == lrs[29] / 10
    losses = iter([3.0 - 0.05 * i for i in range(30)])
    lrs, got, stopped = lr_finder.range_test(built, batches, lambda x, y: torch.tensor(next(losses)),
                                             start=1e-4, end=10.0, steps=30)
    assert not stopped and len(lrs) == 30
    with pytest.raises(lr_finder.RangeTestError, match="before the loss climbed away"):
        lr_finder.suggest(lrs, got, diverged=stopped)


@pytest.mark.slow
def test_lr_auto_with_adamw_says_the_pick_is_an_upper_bound(tmp_path, capsys):
    raw = copy.deepcopy(TINY)
    raw["optimizer"] |= {"name": "adamw", "lr": "auto", "lr_find": {"steps": 30, "start": 1e-5, "end": 100}}
    recipe = write_recipe(tmp_path, raw)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "run"), "--quiet", "--max-steps", "1"]) == 0
    assert "note: with AdamW" in capsys.readouterr().err
    assert lr_finder.caveat("sgd") == ""


def test_a_loss_that_never_falls_gets_a_message_not_a_number():
    flat = [2.3 + 0.01 * math.sin(i) for i in range(100)]
    with pytest.raises(lr_finder.RangeTestError, match="never falls"):
        lr_finder.suggest(GRID[:100], flat)
    rising = [2.3 + 0.05 * i for i in range(100)]
    with pytest.raises(lr_finder.RangeTestError, match="diverges at once"):
        lr_finder.suggest(GRID[:100], rising)


def test_a_range_that_diverges_at_once_gets_a_message():
    losses = [2.3, 2.0, 5.0, 50.0, 500.0, 5000.0, 5e4, 5e5]
    with pytest.raises(lr_finder.RangeTestError, match="diverges at once"):
        lr_finder.suggest(GRID[:8], losses, beta=0.0)


def test_lr_spacing():
    assert lr_finder.lr_at(0, 5, 1e-4, 1.0, "exp") == pytest.approx(1e-4)
    assert lr_finder.lr_at(2, 5, 1e-4, 1.0, "exp") == pytest.approx(1e-2)
    assert lr_finder.lr_at(4, 5, 1e-4, 1.0, "exp") == pytest.approx(1.0)
    assert lr_finder.lr_at(2, 5, 0.0 + 1e-4, 1.0, "linear") == pytest.approx((1e-4 + 1.0) / 2)


@pytest.mark.slow
def test_range_test_restores_the_parts_bit_for_bit_and_leaves_scheduler_and_ema_alone(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["train"] = raw["train"] | {"ema": 0.9}
    setup = parts.build_setup(recipe_from_dict(raw))
    built = parts.build_parts(setup)
    before = copy.deepcopy(built.model.state_dict())
    ema_before = copy.deepcopy(built.ema.state_dict())
    opt_before = copy.deepcopy(built.optimizer.state_dict())
    rng_before = torch.get_rng_state().clone()
    res = lr_finder.range_test_stage(setup, built, 1, start=1e-4, end=10.0, steps=30)
    assert len(res.lrs) >= 6 and res.lrs[0] == pytest.approx(1e-4)
    assert res.resolution == 16 and res.batch_size == 32
    for name, x in built.model.state_dict().items():
        assert torch.equal(x, before[name]), name
    for name, x in built.ema.state_dict().items():  # the range test never updates the EMA
        assert torch.equal(x, ema_before[name]), name
    assert built.optimizer.state_dict()["param_groups"] == opt_before["param_groups"]
    assert built.optimizer.state_dict()["state"] == opt_before["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert built.scheduler.last_epoch == 0  # the caller's clock: never stepped


@pytest.mark.slow
@pytest.mark.pictures
def test_find_lr_cli_all_stages(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    code = cli.main(["find-lr", recipe, "--all-stages", "--steps", "40", "--start", "1e-4", "--end", "20",
                     "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert "stage 0" in out and "stage 1" in out
    with open(tmp_path / "out" / "lr_find.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["stage"] for r in rows} == {"0", "1"}
    assert os.path.getsize(tmp_path / "out" / "lr_find.png") > 10_000
    # up to LR 20 each stage's loss climbs away (the range stops there): an edge, so a pick, for both
    assert code == 0 and out.count("recommended one-cycle max_lr") == 2


@pytest.mark.slow
def test_find_lr_says_so_when_the_loss_never_falls(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    code = cli.main(["find-lr", recipe, "--steps", "30", "--start", "1e-9", "--end", "1e-8",
                     "--out", str(tmp_path), "--quiet"])
    assert code == 1
    assert "no suggestion: the loss never falls" in capsys.readouterr().out


def test_bad_range_is_exit_2(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    assert cli.main(["find-lr", recipe, "--start", "1", "--end", "0.1"]) == 2
    assert cli.main(["find-lr", recipe, "--stage", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--start/--end" in err[0] and "--stage" in err[1]


@pytest.mark.slow
def test_lr_auto_records_the_choice(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["optimizer"]["lr"] = "auto"
    recipe = write_recipe(tmp_path, raw)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    text = (tmp_path / "run" / "recipe.yaml").read_text()
    assert text.startswith("# optimizer.lr was auto")
    chosen = yaml.safe_load(text)["optimizer"]["lr"]
    assert os.path.exists(tmp_path / "run" / "lr_find.png") and os.path.exists(tmp_path / "run" / "lr_find.csv")
    with open(tmp_path / "run" / "lr_find.csv") as f:
        grid = [float(r["lr"]) for r in csv.DictReader(f)]
    assert chosen in [lr / 10 for lr in grid]  # a tenth of the edge; stage 0's batch 16 is the reference
    rows = rundir.read_metrics(str(tmp_path / "run"))
    # trained on the plan of the recipe with the chosen LR, step for step (the peak scaled by batch 32/16)
    assert [r["lr"] for r in rows if "lr" in r] == recipe_from_dict(yaml.safe_load(text)).timeline().lr
    # resuming with the same auto recipe is accepted: the run's recorded LR stands in for "auto"
    assert cli.main(["train", recipe, "--resume", str(tmp_path / "run"), "--quiet"]) == 0


@pytest.mark.slow
def test_lr_auto_and_find_lr_use_the_recipes_range(tmp_path, capsys):
    """``optimizer.lr_find`` sets the range ``lr: auto`` runs, and ``cadence find-lr``'s defaults, so
    the command shows what auto would pick; its flags still override it."""
    raw = copy.deepcopy(TINY)
    raw["optimizer"] |= {"lr": "auto", "lr_find": {"steps": 30, "start": 1e-4, "end": 20}}
    recipe = write_recipe(tmp_path, raw)
    assert cli.main(["plan", recipe]) == 0
    assert "the range test (30 steps, LR 0.0001 to 20, on stage 0)" in capsys.readouterr().out
    assert cli.main(["train", recipe, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    with open(tmp_path / "run" / "lr_find.csv") as f:
        auto = [float(r["lr"]) for r in csv.DictReader(f)]
    assert len(auto) <= 30 and auto[0] == 1e-4 and auto[1] == pytest.approx(1e-4 * (20 / 1e-4) ** (1 / 29))
    assert cli.main(["find-lr", recipe, "--out", str(tmp_path / "fl"), "--quiet"]) == 0
    with open(tmp_path / "fl" / "lr_find.csv") as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == auto  # same range, same curve
    chosen = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["optimizer"]["lr"]
    assert f"optimizer.lr: {chosen:.3g} at reference" in capsys.readouterr().out  # and the same pick
    assert cli.main(["find-lr", recipe, "--steps", "12", "--end", "1", "--out", str(tmp_path / "fl12"),
                     "--quiet"]) == 0  # the loss climbs away at the 11th LR (0.43): an edge, so a pick
    with open(tmp_path / "fl12" / "lr_find.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs[0] == 1e-4 and lrs[1] == pytest.approx(1e-4 * (1 / 1e-4) ** (1 / 11))  # flags over the recipe
