"""Timelines: exact step counts, global vs per-stage curves, steps vs samples, durations, and the
files ``cadence plan`` writes."""

from __future__ import annotations

import csv
import glob
import math
import os
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cadence.cli import main as cadence_main
from cadence.errors import FieldError
from cadence import plan
from cadence.plan import Stage, Timeline, epoch_batches, epoch_samples, lr_scale, make_timeline
from cadence.recipe import load_recipe, recipe_from_dict
from cadence.schedules import Duration, MultiStep
from helpers import GOOD, ROOT, write_recipe

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
PROGRESSIVE = os.path.join(ROOT, "recipes", "imagenet-resnet50-progressive.yaml")


def make_recipe(stages: list[dict], schedule: dict, *, lr: float = 1.0, progress: str = "steps",
                scope: str = "global", lr_scaling: str = "none", reference_batch_size: int | None = None,
                drop_last: bool = True, momentum: float = 0.9):
    return recipe_from_dict({
        "name": "plan-test",
        "data": {"source": "synthetic", "drop_last": drop_last},
        "optimizer": {"lr": lr, "momentum": momentum, "lr_scaling": lr_scaling,
                      "reference_batch_size": reference_batch_size},
        "schedule": {"scope": scope, "progress": progress, **schedule},
        "stages": stages,
    }, "plan-test.yaml")


def multipliers(t: Timeline, reference_batch_size: int, rule: str) -> list[float]:
    """The schedule's multiplier at each step: lr / (peak x the stage's batch-size scale)."""
    return [lr / (t.base_lr * lr_scale(b, reference_batch_size, rule)) for lr, b in zip(t.lr, t.batch_size)]


def positions(t: Timeline, progress: str, a: int = 0, b: int | None = None) -> list[float]:
    """Where each step of ``[a, b)`` starts on the curve's x-axis."""
    b = len(t) if b is None else b
    if progress == "steps":
        return [float(s - a) for s in range(a, b)]
    start = t.samples_seen[a] - t.samples[a]
    return [float(t.samples_seen[s] - t.samples[s] - start) for s in range(a, b)]


def assert_one_peak(m: list[float], what: str) -> int:
    """Strictly up to the maximum, never up again after it. Returns the peak's index."""
    peak = max(range(len(m)), key=m.__getitem__)
    rises = [i for i in range(peak) if not m[i] < m[i + 1]]
    assert not rises, f"{what}: not rising before the peak at step {peak}: step {rises[0]}"
    climbs = [i for i in range(peak, len(m) - 1) if m[i + 1] > m[i]]
    assert not climbs, (f"{what}: rises again after the peak at step {peak}: step {climbs[0]} "
                        f"{m[climbs[0]]!r} -> {m[climbs[0] + 1]!r}")
    return peak


stage_st = st.fixed_dictionaries({
    "epochs": st.integers(1, 3),
    "resolution": st.sampled_from([64, 96, 128, 160]),
    "batch_size": st.sampled_from([8, 12, 16, 24, 32, 64]),
    "data_fraction": st.sampled_from([0.25, 0.3, 0.5, 0.77, 1.0]),
})


# ---------------------------------------------------------------------------------------------
# Global vs per-stage one-cycle over stages with different batch sizes and data fractions


@settings(max_examples=30)
@given(stages=st.lists(stage_st, min_size=2, max_size=4), train=st.integers(2000, 5000),
       progress=st.sampled_from(["steps", "samples"]), anneal=st.sampled_from(["cos", "linear"]),
       pct_start=st.floats(0.15, 0.6), div=st.floats(2.0, 50.0), final_div=st.floats(1.0, 1.0e4),
       rule=st.sampled_from(["none", "linear", "sqrt"]), drop_last=st.booleans())
def test_global_one_cycle_has_one_peak_then_falls_to_its_final_value(stages, train, progress, anneal,
                                                                     pct_start, div, final_div, rule,
                                                                     drop_last):
    lr, ref = 0.8, 32
    recipe = make_recipe(stages, {"kind": "one_cycle", "pct_start": pct_start, "div_factor": div,
                                  "final_div_factor": final_div, "anneal": anneal,
                                  "momentum": [0.95, 0.85]},
                         lr=lr, progress=progress, lr_scaling=rule, reference_batch_size=ref,
                         drop_last=drop_last)
    t = recipe.timeline(train_samples=train)
    m = multipliers(t, ref, rule)
    peak = assert_one_peak(m, "multiplier")
    assert m[0] == pytest.approx(1 / div, rel=1e-12)
    assert m[-1] == pytest.approx(1 / (div * final_div), rel=1e-12)
    assert t.lr[-1] == pytest.approx(lr * lr_scale(t.batch_size[-1], ref, rule) / (div * final_div), rel=1e-12)
    assert max(m) <= 1 + 1e-12
    # The peak is one of the two steps around pct_start of the curve (torch's end of phase one).
    x = positions(t, progress)
    length = len(t) if progress == "steps" else t.samples_seen[-1]
    top = pct_start * length - (1 if progress == "steps" else t.samples[-1])
    before = max(i for i in range(len(x)) if x[i] <= top)
    assert peak in (before, before + 1)
    # Momentum moves inversely: from the maximum down to the minimum around the same step, and back.
    assert t.momentum[0] == pytest.approx(0.95) and t.momentum[-1] == pytest.approx(0.95)
    assert min(range(len(t)), key=t.momentum.__getitem__) in (before, before + 1)
    if rule == "none":
        assert_one_peak(t.lr, "lr")
    else:  # the LR itself jumps with the batch size at stage boundaries; the multiplier does not
        for a in t.stage_starts[1:-1]:
            ratio = lr_scale(t.batch_size[a], ref, rule) / lr_scale(t.batch_size[a - 1], ref, rule)
            assert t.lr[a] / t.lr[a - 1] == pytest.approx(ratio * m[a] / m[a - 1], rel=1e-12)


@settings(max_examples=20)
@given(stages=st.lists(stage_st, min_size=2, max_size=4), train=st.integers(2000, 5000),
       progress=st.sampled_from(["steps", "samples"]), pct_start=st.floats(0.15, 0.6),
       div=st.floats(2.0, 50.0), final_div=st.floats(1.0, 1.0e4), rule=st.sampled_from(["none", "linear"]))
def test_per_stage_one_cycle_restarts_in_every_stage(stages, train, progress, pct_start, div, final_div, rule):
    ref = 16
    schedule = {"kind": "one_cycle", "pct_start": pct_start, "div_factor": div, "final_div_factor": final_div}
    t = make_recipe(stages, schedule, progress=progress, scope="per_stage", lr_scaling=rule,
                    reference_batch_size=ref).timeline(train_samples=train)
    m = multipliers(t, ref, rule)
    bounds = list(zip(t.stage_starts, t.stage_starts[1:]))
    assert len(bounds) == len(stages)
    for k, (a, b) in enumerate(bounds):
        assert m[a] == pytest.approx(1 / div, rel=1e-12), f"stage {k} does not restart"
        assert m[b - 1] == pytest.approx(1 / (div * final_div), rel=1e-12), f"stage {k} does not finish"
        assert_one_peak(m[a:b], f"stage {k}")
        # ... and each stage's curve is exactly the one-cycle of that stage run on its own
        alone = make_recipe([stages[k]], schedule, progress=progress, lr_scaling=rule,
                            reference_batch_size=ref).timeline(train_samples=train)
        assert t.lr[a:b] == alone.lr


def test_global_and_per_stage_differ_on_the_progressive_recipe():
    g = load_recipe(PROGRESSIVE).timeline()
    p = load_recipe(PROGRESSIVE, ["schedule.scope=per_stage"]).timeline()
    ref = 1024
    mg, mp = multipliers(g, ref, "linear"), multipliers(p, ref, "linear")
    assert sum(1 for a in g.stage_starts[:-1] if mg[a] == pytest.approx(1 / 25)) == 1
    assert all(mp[a] == pytest.approx(1 / 25) for a in p.stage_starts[:-1])


# ---------------------------------------------------------------------------------------------
# Step counts are what DataLoader (+ DistributedSampler) yields


def loader_batches(n: int, batch_size: int, world_size: int, drop_last: bool) -> list[list[int]]:
    """Per rank, the size of every batch a real DataLoader yields over ``n`` images."""
    dataset = TensorDataset(torch.arange(n))
    if world_size == 1:
        loaders = [DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last)]
    else:
        loaders = [DataLoader(dataset, batch_size=batch_size // world_size, drop_last=drop_last,
                              sampler=DistributedSampler(dataset, num_replicas=world_size, rank=r,
                                                         shuffle=False, drop_last=drop_last))
                   for r in range(world_size)]
    return [[len(x) for (x,) in loader] for loader in loaders]


@settings(max_examples=40)
@given(train=st.integers(1, 700), world_size=st.sampled_from([1, 1, 2, 3, 4, 8]), drop_last=st.booleans(),
       stages=st.lists(st.tuples(st.integers(1, 40), st.sampled_from([0.1, 0.29, 0.5, 0.77, 1.0]),
                                 st.integers(1, 2)), min_size=1, max_size=3))
def test_steps_per_epoch_match_dataloader_and_distributedsampler(train, world_size, drop_last, stages):
    staged = [{"epochs": e, "resolution": 32, "batch_size": local * world_size, "data_fraction": f}
              for local, f, e in stages]
    recipe = make_recipe(staged, {"kind": "constant"}, drop_last=drop_last)
    expected = []
    for k, st_ in enumerate(staged):
        n = math.floor(train * Fraction(str(st_["data_fraction"])))
        per_rank = loader_batches(n, st_["batch_size"], world_size, drop_last) if n else [[]] * world_size
        assert len({len(r) for r in per_rank}) == 1  # every rank steps together
        sizes = [sum(col) for col in zip(*per_rank)]
        if not sizes:
            with pytest.raises(FieldError) as err:
                recipe.timeline(train_samples=train, world_size=world_size)
            assert err.value.field == f"stages.{k}.batch_size"
            return
        expected.append((n, sizes, st_["epochs"]))
    t = recipe.timeline(train_samples=train, world_size=world_size)
    s = 0
    for k, (n, sizes, epochs) in enumerate(expected):
        assert epoch_samples(train, staged[k]["data_fraction"]) == n
        assert t.stage_starts[k] == s
        for _ in range(epochs):
            assert t.samples[s:s + len(sizes)] == sizes
            assert set(t.stage[s:s + len(sizes)]) == {k}
            s += len(sizes)
    assert len(t) == s == t.stage_starts[-1]
    assert t.samples_seen[-1] == sum(sum(sz) * e for _, sz, e in expected)
    # epochs are numbered across stages, one entry in epoch_starts per epoch
    assert len(t.epoch_starts) - 1 == sum(e for *_, e in expected) == t.epoch[-1] + 1


def test_epoch_samples_use_the_decimal_fraction_written():
    assert epoch_samples(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in binary
    assert epoch_samples(1281167, 0.5) == 640583
    assert epoch_samples(10, 1.0) == 10
    assert epoch_batches(10, 4) == [4, 4]
    assert epoch_batches(10, 4, drop_last=False) == [4, 4, 2]
    assert epoch_batches(10, 4, world_size=2, drop_last=False) == [4, 4, 2]  # 5 per rank: 2, 2, 1
    assert epoch_batches(11, 4, world_size=2, drop_last=False) == [4, 4, 4]  # padded to 6 per rank
    with pytest.raises(FieldError):
        epoch_batches(10, 3, world_size=2)


def test_progressive_recipe_step_counts():
    t = load_recipe(PROGRESSIVE).timeline()
    summary = t.stage_summary()
    # 1,281,167 images: half (640,583) at batch 1024, then all at 768 and 512; drop_last
    assert [s["steps"] for s in summary] == [6 * 625, 6 * 1668, 4 * 2502]
    assert [s["samples"] for s in summary] == [6 * 625 * 1024, 6 * 1668 * 768, 4 * 2502 * 512]
    assert [s["epochs"] for s in summary] == [6, 6, 4]
    assert len(t) == 23766
    # world size 8 splits each global batch: same steps, since 1024, 768 and 512 divide by 8
    assert len(load_recipe(PROGRESSIVE).timeline(world_size=8)) == 23766


# ---------------------------------------------------------------------------------------------
# progress: samples -- the same share of the curve per image before and after a batch-size change


@settings(max_examples=20)
@given(half=st.integers(2, 64), e1=st.integers(1, 3), e2=st.integers(1, 3), train=st.integers(300, 2000),
       f1=st.sampled_from([0.5, 1.0]), drop_last=st.booleans())
def test_samples_progress_gives_each_image_the_same_share(half, e1, e2, train, f1, drop_last):
    big = 2 * half
    stages = [{"epochs": e1, "resolution": 64, "batch_size": big, "data_fraction": f1},
              {"epochs": e2, "resolution": 96, "batch_size": half}]
    linear = {"kind": "linear", "start_factor": 1.0, "end_factor": 0.0}
    try:
        t = make_recipe(stages, linear, progress="samples", drop_last=drop_last).timeline(train_samples=train)
    except FieldError:  # fewer images than one batch of the first stage
        assert train * f1 < big
        return
    total = t.samples_seen[-1]
    # the curve's x is samples seen: step s starts at samples_seen[s] - samples[s] (exactly 1 - x/total)
    for s in range(len(t)):
        assert t.lr[s] == pytest.approx(1 - (t.samples_seen[s] - t.samples[s]) / total, rel=1e-12, abs=1e-15)
    slopes = [(t.lr[s + 1] - t.lr[s]) / t.samples[s] * total for s in range(len(t) - 1)]
    assert all(abs(x + 1) <= 1e-12 for x in slopes), max(abs(x + 1) for x in slopes)
    change = t.stage_starts[1]
    start = positions(t, "samples")
    if change > 1 and len(t) - change > 1:  # the average slope per image in each stage
        before = (t.lr[change - 1] - t.lr[0]) / (start[change - 1] - start[0])
        after = (t.lr[-1] - t.lr[change]) / (start[-1] - start[change])
        assert abs(before - after) * total <= 1e-12
    # Counting steps instead gives the small-batch steps (half the images each) the same share as
    # the big ones: per image the curve falls twice as fast after the change.
    by_steps = make_recipe(stages, linear, progress="steps", drop_last=drop_last).timeline(train_samples=train)
    if drop_last and change > 1 and len(t) - change > 1:
        slope1 = (by_steps.lr[1] - by_steps.lr[0]) / by_steps.samples[0]
        slope2 = (by_steps.lr[-1] - by_steps.lr[-2]) / by_steps.samples[-2]
        assert slope2 == pytest.approx(2 * slope1, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Durations resolve exactly against the timeline

MIXED = [{"epochs": 3, "resolution": 64, "batch_size": 32, "data_fraction": 0.5},
         {"epochs": 2, "resolution": 96, "batch_size": 16},
         {"epochs": 2, "resolution": 128, "batch_size": 24, "data_fraction": 0.77}]


def decays(t: Timeline) -> list[int]:
    """Steps where the LR drops (with lr_scaling none)."""
    return [s for s in range(1, len(t)) if t.lr[s] < t.lr[s - 1] * (1 - 1e-12)]


@pytest.mark.parametrize("progress", ["steps", "samples"])
@pytest.mark.parametrize("drop_last", [True, False])
def test_epoch_milestones_decay_at_the_first_step_of_the_epoch(progress, drop_last):
    recipe = make_recipe(MIXED, {"kind": "multistep", "milestones": ["2 epochs", "5 epochs"], "gamma": 0.5},
                         progress=progress, drop_last=drop_last)
    t = recipe.timeline(train_samples=1003)
    e2, e5 = t.epoch_starts[2], t.epoch_starts[5]
    assert decays(t) == [e2, e5]
    assert t.epoch[e2] == 2 and t.epoch[e2 - 1] == 1 and t.epoch[e5] == 5 and t.epoch[e5 - 1] == 4
    assert set(t.lr[:e2]) == {1.0} and set(t.lr[e2:e5]) == {0.5} and set(t.lr[e5:]) == {0.25}


@settings(max_examples=30)
@given(progress=st.sampled_from(["steps", "samples"]), drop_last=st.booleans(), data=st.data())
def test_step_sample_and_fraction_milestones_resolve_exactly(progress, drop_last, data):
    t0 = make_recipe(MIXED, {"kind": "constant"}, progress=progress, drop_last=drop_last).timeline(
        train_samples=1003)
    n, total = len(t0), t0.samples_seen[-1]
    start = [t0.samples_seen[s] - t0.samples[s] for s in range(n)]
    k_steps = data.draw(st.integers(1, n - 1), label="steps")
    k_samples = data.draw(st.integers(1, start[-1]), label="samples")
    frac = data.draw(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.55, 0.9]), label="fraction")
    for spec, first in [
        (f"{k_steps} steps", k_steps),
        (f"{k_samples} samples", next(s for s in range(n) if start[s] >= k_samples)),
        (frac, next(s for s in range(n) if (s if progress == "steps" else start[s])
                    >= Fraction(str(frac)) * (n if progress == "steps" else total))),
    ]:
        t = make_recipe(MIXED, {"kind": "multistep", "milestones": [spec], "gamma": 0.1},
                        progress=progress, drop_last=drop_last).timeline(train_samples=1003)
        assert decays(t) == [first], spec


@pytest.mark.parametrize("progress", ["steps", "samples"])
def test_fractions_that_are_whole_steps_are_not_lost_to_rounding(progress):
    # 0.55 * 100 == 55.00000000000001 in binary: the milestone is still step 55, not 56
    one = [{"epochs": 1, "resolution": 32, "batch_size": 4}]
    t = make_recipe(one, {"kind": "multistep", "milestones": [0.55]}, progress=progress).timeline(train_samples=400)
    assert decays(t) == [55]


def test_fractional_epochs_count_steps_within_the_epoch():
    # epoch 1 of MIXED is 15 steps of 32 images; "1.4 epochs" is 6 of them in
    for progress in ("steps", "samples"):
        t = make_recipe(MIXED, {"kind": "multistep", "milestones": ["1.4 epochs", "3.5 epochs"]},
                        progress=progress).timeline(train_samples=1000)
        e1, e3, e4 = t.epoch_starts[1], t.epoch_starts[3], t.epoch_starts[4]
        assert e1 == 15 and e3 == 45 and e4 - e3 == 62  # epoch 3 is stage 1's first: 62 steps of 16
        assert decays(t) == [e1 + 6, e3 + 31]  # 0.4 x 15 steps, 0.5 x 62 steps
        assert t.epoch_progress[e1 + 6] == pytest.approx(1.4)


def test_duration_units_in_samples_progress_are_converted_exactly():
    t = make_recipe(MIXED, {"kind": "constant"}, progress="samples").timeline(train_samples=1000)
    # epoch 0 is 15 steps of 32 (500 images, drop_last): "1 epochs" = 480 samples = "15 steps"
    spans = {}
    for spec in ("1 epochs", "15 steps", "480 samples", "3 epochs", "45 steps", "1440 samples"):
        r = make_recipe(MIXED, {"kind": "multistep", "milestones": [spec]}, progress="samples")
        spans[spec] = decays(r.timeline(train_samples=1000))
    assert spans["1 epochs"] == spans["15 steps"] == spans["480 samples"] == [15] == [t.epoch_starts[1]]
    assert spans["3 epochs"] == spans["45 steps"] == spans["1440 samples"] == [t.epoch_starts[3]]


def test_per_stage_durations_count_from_each_stage():
    r = make_recipe(MIXED, {"kind": "multistep", "milestones": ["1 epochs"], "gamma": 0.5}, scope="per_stage",
                    progress="samples")
    t = r.timeline(train_samples=1000)
    stage_second_epochs = [t.epoch_starts[t.epoch[a] + 1] for a in t.stage_starts[:-1]]
    assert decays(t) == stage_second_epochs
    assert all(t.lr[a] == 1.0 for a in t.stage_starts[:-1])  # restarts at the top


@pytest.mark.parametrize("shape", ["linear", "cos"])
@pytest.mark.parametrize("progress", ["steps", "samples"])
def test_warmup_in_epochs_is_a_prefix(shape, progress):
    sf = 0.1
    r = make_recipe(MIXED, {"kind": "cosine", "floor": 0.01,
                            "warmup": {"duration": "2 epochs", "start_factor": sf, "shape": shape}},
                    progress=progress, lr=2.0)
    t = r.timeline(train_samples=1000)
    w = t.epoch_starts[2]
    x = positions(t, progress)
    ramp = [(x[s] / x[w]) if shape == "linear" else (1 - math.cos(math.pi * x[s] / x[w])) / 2 for s in range(w)]
    assert t.lr[:w] == pytest.approx([2.0 * (sf + (1 - sf) * p) for p in ramp], rel=1e-12)
    assert t.lr[w] == 2.0  # the cosine starts at the peak on the first step after the warmup
    # ... and runs over what is left, in the same units
    rest = x[-1] + (1 if progress == "steps" else t.samples[-1]) - x[w]
    want = [2.0 * (0.01 + 0.99 * (1 + math.cos(math.pi * (x[s] - x[w]) / rest)) / 2) for s in range(w, len(t))]
    assert t.lr[w:] == pytest.approx(want, rel=1e-12)


def test_sequence_piece_fractions_are_of_the_whole_sequence():
    r = make_recipe([{"epochs": 1, "resolution": 32, "batch_size": 1}],
                    {"kind": "sequence", "pieces": [{"kind": "constant", "duration": 0.5},
                                                    {"kind": "constant", "scale": 0.5, "duration": 0.3},
                                                    {"kind": "constant", "scale": 0.25}]})
    t = r.timeline(train_samples=100)
    assert t.lr == [1.0] * 50 + [0.5] * 30 + [0.25] * 20
    too_long = make_recipe([{"epochs": 1, "resolution": 32, "batch_size": 1}],
                           {"kind": "sequence", "pieces": [{"kind": "constant", "duration": 0.5},
                                                           {"kind": "constant", "duration": 0.6},
                                                           {"kind": "constant"}]})
    with pytest.raises(FieldError) as err:
        too_long.timeline(train_samples=100)
    assert err.value.field == "schedule.pieces.1.duration"


def test_wsd_holds_then_decays_to_the_floor_on_the_last_step():
    t = make_recipe([{"epochs": 1, "resolution": 32, "batch_size": 1}],
                    {"kind": "wsd", "decay": 0.2, "floor": 0.1, "warmup": {"duration": "10 steps"}}).timeline(
        train_samples=100)
    assert t.lr[:10] == pytest.approx([s / 10 for s in range(10)], rel=1e-12)
    # the warmup is a prefix: "decay: 0.2" is the last 20% of the 90 steps after it, steps 82 .. 99
    assert t.lr[10:83] == [1.0] * 73
    assert t.lr[83:] == pytest.approx([0.1 + 0.9 * (1 - (s - 82) / 17) for s in range(83, 100)], rel=1e-12)
    assert t.lr[-1] == pytest.approx(0.1, rel=1e-12)


def test_duration_parsing():
    assert Duration.parse(0.3) == Duration(0.3, "fraction")
    assert Duration.parse("5 epochs") == Duration(5, "epochs")
    assert Duration.parse("1 epoch") == Duration(1, "epochs")
    assert Duration.parse("1000 steps") == Duration(1000, "steps")
    assert Duration.parse("2M samples") == Duration(2e6, "samples")
    assert Duration.parse("1.5k steps") == Duration(1500, "steps")
    assert Duration.parse("1e3 iters") == Duration(1000, "steps")
    assert Duration.parse("0.25") == Duration(0.25, "fraction")
    for bad in (0, 1.5, -0.1, True, "3 fortnights", "many steps", "0 steps", None, [1]):
        with pytest.raises(ValueError):
            Duration.parse(bad)


def test_lr_scaling_rules():
    stages = [Stage(epochs=1, resolution=32, batch_size=b) for b in (256, 1024, 4096)]
    for rule, want in [("none", [1.0, 1.0, 1.0]), ("linear", [0.25, 1.0, 4.0]), ("sqrt", [0.5, 1.0, 2.0])]:
        t = make_timeline(stages, 8192, MultiStep(milestones=[Duration(1.0)]), lr=0.4,
                          reference_batch_size=1024, lr_scaling=rule)
        peaks = [t.lr[a] for a in t.stage_starts[:-1]]
        assert peaks == pytest.approx([0.4 * w for w in want], rel=1e-15), rule
    # without a reference batch size, the first stage's batch is the reference
    t = make_timeline(stages, 8192, MultiStep(milestones=[Duration(1.0)]), lr=0.4, lr_scaling="linear")
    assert [t.lr[a] for a in t.stage_starts[:-1]] == pytest.approx([0.4, 1.6, 6.4], rel=1e-15)


# ---------------------------------------------------------------------------------------------
# `cadence plan`: the CSV, the PNG, every shipped recipe


@pytest.mark.pictures
def test_cadence_plan_writes_png_and_csv(tmp_path, capsys):
    png, out = tmp_path / "plan.png", tmp_path / "plan.csv"
    assert cadence_main(["plan", PROGRESSIVE, "--plot", str(png), "--csv", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "3,750" in stdout and "10,008" in stdout and "23,766" in stdout  # the per-stage table
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 30_000
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 600
    with open(out, newline="") as f:
        lines = f.read().splitlines()
    # the contract's columns first, then the regularization the recipe sets (train.label_smoothing: 0.1)
    assert lines[0] == "step,stage,epoch,resolution,batch_size,samples_seen,lr,momentum,label_smoothing"
    assert {line.rsplit(",", 1)[1] for line in lines[1:]} == {"0.1"}
    t = load_recipe(PROGRESSIVE).timeline()
    assert len(lines) - 1 == len(t) == 23766
    rows = list(csv.DictReader(lines))
    assert [int(r["step"]) for r in rows] == list(range(len(t)))
    assert [int(r["stage"]) for r in rows] == t.stage
    assert [int(r["epoch"]) for r in rows] == t.epoch
    assert [int(r["resolution"]) for r in rows] == t.resolution
    assert [int(r["batch_size"]) for r in rows] == t.batch_size
    assert [int(r["samples_seen"]) for r in rows] == t.samples_seen
    assert [float(r["lr"]) for r in rows] == t.lr  # written with repr: exact
    assert [float(r["momentum"]) for r in rows] == t.momentum
    assert float(rows[0]["lr"]) == pytest.approx(2.0 / 25, rel=1e-12)
    assert float(rows[-1]["lr"]) == pytest.approx(2.0 * 512 / 1024 / 25 / 1e4, rel=1e-12)


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if "torchvision-v2" in p else p
                                  for p in RECIPES], ids=os.path.basename)  # (750,600 steps: 4 s)
def test_every_shipped_recipe_plans(path, capsys):
    assert cadence_main(["plan", path]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    t = load_recipe(path).timeline()
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[:4] == ["total", str(t.epoch[-1] + 1), f"{len(t):,}", f"{t.samples_seen[-1]:,}"]  # epochs, steps, images
    assert min(t.lr) >= 0 and max(t.lr) > 0 and all(0 <= m < 1 for m in t.momentum)


def test_plan_marks_an_ema_whose_horizon_reaches_back_before_the_final_lr_decay(tmp_path, capsys):
    raw = {**GOOD, "schedule": {"kind": "cosine"}, "stages": [{"epochs": 10, "resolution": 32, "batch_size": 100}]}
    t = load_recipe(write_recipe(tmp_path, {**raw, "train": {"ema": "4.55 epochs"}})).timeline()
    assert t.ema_decay == [0.5 ** (100 / 4550)] * 100
    # the last 46 steps hold more than half the final average's weight (0.5 ** (46 / 45.5) < 0.5); the
    # cosine's LR is below half its peak from step 51 on
    assert plan.ema_horizon_start(t) == 54 and plan.final_decay_start(t) == 51
    for ema, past in (("8 epochs", True), ("2 epochs", False)):
        path = write_recipe(tmp_path, {**raw, "train": {"ema": ema}})
        assert cadence_main(["plan", path]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("weight EMA:"))
        assert line.startswith("weight EMA: decay") and ("PAST the final LR decay" in line) == past, line


# -- plans as arrays: memory per step, the budget, long plans drawn --------------------------------


def test_a_plan_holds_a_few_bytes_per_step_and_its_columns_read_as_python_numbers():
    """The columns are numpy arrays (not lists of Python objects); making a 200,000-step plan peaks
    below ``BYTES_PER_STEP`` a step (tracemalloc sees numpy's buffers), which the budget counts on."""
    import json
    import tracemalloc

    from cadence.schedules import OneCycle

    stages = [Stage(epochs=2, resolution=16, batch_size=1), Stage(epochs=2, resolution=24, batch_size=2)]
    tracemalloc.start()
    t = make_timeline(stages, 66_667, OneCycle(), lr=0.1, momentum=0.9, progress="samples")
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(t) == 200_000 and held / len(t) < 60 and peak / len(t) <= plan.BYTES_PER_STEP
    row = {"stage": t.stage[-1], "epoch": t.epoch[7], "samples_seen": t.samples_seen[-1], "lr": t.lr[3]}
    assert json.loads(json.dumps(row)) == row and type(t.stage[0]) is int and type(t.lr[0]) is float
    assert t.samples_seen[-1] == 2 * 66_667 + 2 * 66_666 and t.stage[:3] == [0, 0, 0] and len(t.lr[10:20]) == 10


def test_a_plan_past_the_measured_memory_budget_is_refused_naming_the_field(tmp_path, capsys, monkeypatch):
    """The cap on steps is half the memory available now at ``BYTES_PER_STEP`` a step, not a fixed count."""
    assert plan.step_budget() * plan.BYTES_PER_STEP <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2
    monkeypatch.setattr(plan, "step_budget", lambda: 250)  # GOOD: 100 + 100 + 25 + 25 steps
    path = write_recipe(tmp_path, GOOD)
    assert cadence_main(["plan", path]) == 0
    capsys.readouterr()
    assert cadence_main(["plan", path, "--set", "stages.1.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and "stages.1.epochs" in err and "275 steps" in err, err
    assert "half the memory available now allows 250 steps" in err, err
    assert cadence_main(["plan", path, "--set", "stages.0.batch_size=1", "--set", "stages.0.epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stages.0.batch_size" in err and "1,000 steps per epoch" in err, err


@pytest.mark.pictures
def test_a_long_plan_is_drawn_through_its_envelope(tmp_path):
    """Past ``PLOT_POINTS`` steps the picture draws each bucket's LR extremes and every stage's first
    and last step: the LR's range and the stage changes are kept, the points are bounded."""
    from cadence import report
    from cadence.schedules import Cyclic

    stages = [Stage(epochs=3, resolution=16, batch_size=2), Stage(epochs=3, resolution=24, batch_size=4)]
    t = make_timeline(stages, 20_000, Cyclic(step_size_up=Duration(1337, "steps")), lr=0.1)
    steps = report.plot_steps(t, limit=2_000)
    lr = t.lr.array
    assert len(t) == 45_000 and len(steps) <= 2_000 + 4 and (steps[1:] > steps[:-1]).all()
    assert lr[steps].max() == lr.max() and lr[steps].min() == lr.min()
    assert {0, 29_999, 30_000, 44_999} <= set(steps.tolist())
    assert (report.plot_steps(t, limit=10 ** 6) == range(len(t))).all()
    report.plot_plan(t, str(tmp_path / "plan.png"))
    assert os.path.getsize(tmp_path / "plan.png") > 10_000


@pytest.mark.pictures
def test_pictures_keep_every_label_inside_the_figure(tmp_path, monkeypatch):
    """The pictures have fixed margins (not a layout engine measuring each label): the longest of the
    plan's labels (two-line y labels, a log LR row, the regularization legend, a long title) and of the
    curves' (log LR, gradient norms) stay inside the figure."""
    from cadence import report

    figures = []
    draw = report._figure
    monkeypatch.setattr(report, "_figure", lambda *a, **kw: figures.append(draw(*a, **kw)) or figures[-1])
    recipe = load_recipe(os.path.join(ROOT, "recipes", "imagenet-resnet50-progressive-learning.yaml"),
                         ["data.train_samples=100000"])  # (fewer steps: the same labels)
    report.plot_plan(recipe.timeline(), str(tmp_path / "plan.png"), title="a plan with a long name " * 3)
    # (stages 0 and 1 short in wall time: their labels on the time axis would overlap on one line)
    rows = [{"step": i, "stage": min(i // 4, 2), "epoch": 0, "time": 0.05 * i if i < 8 else 0.37 * i, "loss": 7 - i / 30,
             "lr": 10.0 ** -(i / 20), "grad_norm": 1e4 / (1 + i), "samples_seen": 1024 * i, "resolution": 128}
            for i in range(100)]
    rows += [{"step": 99, "stage": 1, "epoch": 0, "time": 40.0, "val_top1": 0.7612, "val_top5": 0.93,
              "val_loss": 1.0}]
    report.plot_curves(rows, str(tmp_path / "curves.png"), title="curves")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    assert len(figures) == 2
    for fig, axes in figures:  # (a Figure of its own: an Agg canvas measures it)
        renderer = FigureCanvasAgg(fig).get_renderer()
        inside = fig.get_tightbbox(renderer)
        assert inside.x0 >= 0 and inside.y0 >= 0, inside
        assert inside.x1 <= fig.get_figwidth() and inside.y1 <= fig.get_figheight(), inside
        for ax in axes.flat:  # and no stage's label runs into another's
            boxes = [a.get_window_extent(renderer) for a in ax.texts]
            assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), [t.get_text() for t in ax.texts]
    curves_time_axis = figures[1][1][0][1]  # (the curves' top row, wall time: every stage still labelled)
    assert len(curves_time_axis.texts) == 3
