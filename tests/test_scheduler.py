"""StepScheduler: the torch adapter that applies a timeline to every param group, once per batch."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import SGD, AdamW
from torch.optim.lr_scheduler import OneCycleLR

from cadence.plan import Timeline
from cadence.recipe import recipe_from_dict
from cadence.scheduler import StepScheduler, get_momentum, set_momentum

SCHEDULES = {
    "one_cycle": {"kind": "one_cycle", "pct_start": 0.3, "div_factor": 10, "final_div_factor": 100,
                  "momentum": [0.95, 0.85]},
    "cyclic": {"kind": "cyclic", "step_size_up": "7 steps", "step_size_down": "11 steps",
               "mode": "triangular2", "momentum": [0.9, 0.8]},
    "cosine_warmup": {"kind": "cosine", "floor": 0.01, "warmup": {"duration": "1 epochs", "start_factor": 0.1}},
    "multistep": {"kind": "multistep", "milestones": ["2 epochs", 0.8], "gamma": 0.3},
}


def recipe_raw(kind: str, *, lr: float = 0.2, optimizer: str = "sgd") -> dict:
    return {
        "name": "scheduler-test",
        "data": {"source": "synthetic", "train_samples": 200},
        "optimizer": {"name": optimizer, "lr": lr, "momentum": 0.9, "lr_scaling": "linear",
                      "reference_batch_size": 16},
        "schedule": {"progress": "samples", **SCHEDULES[kind]},
        "stages": [{"epochs": 2, "resolution": 32, "batch_size": 16, "data_fraction": 0.5},
                   {"epochs": 2, "resolution": 48, "batch_size": 8}],
    }


def timeline_for(kind: str, *, lr: float = 0.2, train_samples: int = 200) -> Timeline:
    return recipe_from_dict(recipe_raw(kind, lr=lr)).timeline(train_samples=train_samples)


def two_group_optimizer(name: str, lr: float, ratio: float) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    groups = [{"params": [a]}, {"params": [b], "lr": lr * ratio}]
    if name == "sgd":
        return SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return AdamW(groups, lr=lr, betas=(0.9, 0.99), weight_decay=1e-3)


def train_steps(optimizer, scheduler, n: int) -> list[tuple]:
    """``n`` optimizer steps with a fixed gradient; the LR and momentum of every group at each."""
    seen = []
    for _ in range(n):
        seen.append(tuple((g["lr"], get_momentum(optimizer, i)) for i, g in enumerate(optimizer.param_groups)))
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.cos(p.detach()) + 0.1
        optimizer.step()
        scheduler.step()
    return seen


def params(optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]


# ---------------------------------------------------------------------------------------------


@settings(max_examples=24)
@given(kind=st.sampled_from(sorted(SCHEDULES)), opt=st.sampled_from(["sgd", "adamw"]),
       ratio=st.floats(0.01, 3.0), data=st.data())
@pytest.mark.filterwarnings("ignore:StepScheduler stepped past the end")  # on purpose: the last values hold
def test_state_dict_round_trip_at_any_step_continues_identically(kind, opt, ratio, data):
    lr = 0.2
    timeline = timeline_for(kind, lr=lr)
    n = len(timeline) + 3  # past the end too: the last values hold
    stop = data.draw(st.integers(0, n), label="stop at")

    reference = two_group_optimizer(opt, lr, ratio)
    want = train_steps(reference, StepScheduler(reference, timeline), n)

    first = two_group_optimizer(opt, lr, ratio)
    sched = StepScheduler(first, timeline)
    got = train_steps(first, sched, stop)
    buffer = io.BytesIO()
    torch.save({"params": params(first), "optimizer": first.state_dict(), "scheduler": sched.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain numbers only: safe to load
    assert saved["scheduler"]["timeline_steps"] == len(timeline)
    assert saved["scheduler"]["last_epoch"] == stop

    # a new process: rebuild the timeline from the recipe, the optimizer and scheduler, then load
    rebuilt = timeline_for(kind, lr=lr)
    second = two_group_optimizer(opt, lr, ratio)
    with torch.no_grad():
        for p, value in zip([p for g in second.param_groups for p in g["params"]], saved["params"]):
            p.copy_(value)
    resumed = StepScheduler(second, rebuilt)
    second.load_state_dict(saved["optimizer"])
    resumed.load_state_dict(saved["scheduler"])
    got += train_steps(second, resumed, n - stop)

    assert got == want  # lr and momentum of both groups, bit for bit, at every step
    assert all(torch.equal(x, y) for x, y in zip(params(second), params(reference)))
    assert resumed.last_epoch == n


def test_state_dict_from_a_timeline_of_another_length_is_rejected():
    timeline = timeline_for("one_cycle")
    optimizer = two_group_optimizer("sgd", 0.2, 0.5)
    sched = StepScheduler(optimizer, timeline)
    train_steps(optimizer, sched, 5)
    state = sched.state_dict()
    other = timeline_for("one_cycle", train_samples=400)
    assert len(other) != len(timeline)
    fresh = two_group_optimizer("sgd", 0.2, 0.5)
    with pytest.raises(ValueError, match=rf"{len(timeline)}-step timeline.*{len(other)} steps"):
        StepScheduler(fresh, other).load_state_dict(state)


def test_every_group_keeps_its_own_multiplier_and_momentum_is_set_everywhere():
    lr, ratio = 0.2, 0.25
    timeline = timeline_for("one_cycle", lr=lr)
    for opt in ("sgd", "adamw"):
        optimizer = two_group_optimizer(opt, lr, ratio)
        seen = train_steps(optimizer, StepScheduler(optimizer, timeline), len(timeline))
        assert [s[0][0] for s in seen] == timeline.lr
        assert [s[1][0] for s in seen] == pytest.approx([x * ratio for x in timeline.lr], rel=1e-15)
        assert [s[0][1] for s in seen] == timeline.momentum == [s[1][1] for s in seen]
        if opt == "adamw":
            assert all(g["betas"][1] == 0.99 for g in optimizer.param_groups)


def test_two_groups_match_onecyclelr_with_two_max_lrs():
    steps, lr, ratio = 90, 0.3, 0.1
    raw = {"name": "t", "optimizer": {"lr": lr, "momentum": 0.9},
           "schedule": {"kind": "one_cycle", "pct_start": 0.25, "momentum": [0.95, 0.85]},
           "stages": [{"epochs": 1, "resolution": 32, "batch_size": 1}]}
    timeline = recipe_from_dict(raw).timeline(train_samples=steps)
    ours = two_group_optimizer("sgd", lr, ratio)
    got = train_steps(ours, StepScheduler(ours, timeline), steps)
    theirs = two_group_optimizer("sgd", lr, ratio)
    want = train_steps(theirs, OneCycleLR(theirs, max_lr=[lr, lr * ratio], total_steps=steps, pct_start=0.25),
                       steps)
    for s, (g, w) in enumerate(zip(got, want)):
        for (glr, gm), (wlr, wm) in zip(g, w):
            assert glr == pytest.approx(wlr, rel=1e-9) and gm == pytest.approx(wm, rel=1e-9), s


def test_past_the_end_the_last_values_hold_with_one_warning():
    timeline = timeline_for("cyclic")
    optimizer = two_group_optimizer("sgd", 0.2, 1.0)
    sched = StepScheduler(optimizer, timeline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = train_steps(optimizer, sched, len(timeline))
        assert not caught  # the whole plan, and the step after its last: no warning
        seen += train_steps(optimizer, sched, 5)
    assert [s[0] for s in seen[len(timeline) - 1:]] == [(timeline.lr[-1], timeline.momentum[-1])] * 6
    assert [str(w.message).split(":")[0] for w in caught] == [
        f"StepScheduler stepped past the end of its plan ({len(timeline):,} optimizer steps)"]


def test_an_optimizer_lr_that_is_not_the_plans_peak_warns_and_from_recipe_sets_it():
    from cadence.recipe import recipe_from_dict
    from helpers import GOOD

    recipe = recipe_from_dict(GOOD)  # optimizer.lr: 0.1
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.004}], lr=0.001)
    with pytest.warns(UserWarning, match=r"the optimizer's LR 0.001 is not the plan's peak LR 0.1 .* scaled by 0.01"):
        StepScheduler(optimizer, recipe.timeline())
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.004}], lr=0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = StepScheduler.from_recipe(optimizer, recipe)
    timeline = recipe.timeline()
    assert optimizer.param_groups[0]["lr"] == timeline.lr[0]
    assert optimizer.param_groups[1]["lr"] == pytest.approx(4 * timeline.lr[0])  # its ratio kept
    assert len(sched.timeline) == len(timeline)


def test_a_schedule_that_does_not_cycle_momentum_leaves_it_alone():
    timeline = timeline_for("cosine_warmup")
    assert not timeline.cycles_momentum
    for opt, momentum in (("sgd", 0.9), ("adamw", 0.9)):
        optimizer = two_group_optimizer(opt, 0.2, 1.0)
        for g in optimizer.param_groups:
            set_momentum(optimizer, 0.77) if opt == "adamw" else g.update(momentum=0.77)
        seen = train_steps(optimizer, StepScheduler(optimizer, timeline), len(timeline))
        assert {m for s in seen for (_, m) in s} == {0.77}
        assert [s[0][0] for s in seen] == timeline.lr


def test_the_first_lr_is_set_on_construction_and_an_empty_timeline_is_refused():
    timeline = timeline_for("one_cycle")
    optimizer = two_group_optimizer("sgd", 0.2, 0.5)
    StepScheduler(optimizer, timeline)
    assert optimizer.param_groups[0]["lr"] == timeline.lr[0]
    assert optimizer.param_groups[0]["momentum"] == timeline.momentum[0] == 0.95
    with pytest.raises(ValueError):
        StepScheduler(two_group_optimizer("sgd", 0.2, 0.5), Timeline())
