"""Every schedule kind with a torch counterpart reproduces it step for step, to 1e-9 relative.

cadence is driven the way a user drives it: a recipe dict -> ``recipe_from_dict`` -> ``timeline()``
over one stage of one epoch (``train_samples = steps * batch_size``), and the timeline applied to a
real optimizer by ``StepScheduler``. torch is driven by the real optimizer and the real
``torch.optim.lr_scheduler`` class, stepped once per batch. Both the timeline's numbers and the values
that ``StepScheduler`` leaves in the optimizer are compared with what torch leaves in its optimizer.
"""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.optim import SGD, Adam
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    ExponentialLR,
    LinearLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    SequentialLR,
    StepLR,
)

from cadence.cli import main as cadence_main
from cadence.plan import Timeline
from cadence.recipe import load_recipe, recipe_from_dict
from cadence.scheduler import StepScheduler
from helpers import GOOD, ROOT, write_recipe

REL = 1e-9
# torch's recursive schedulers (LinearLR, PolynomialLR, ...) multiply their way down and can land a
# few ulps away from an exact 0 where cadence's closed form gives 0.0; 1e-15 x the peak absorbs that
# and nothing else (every compared LR that is not ~0 is > 1e-12 x the peak).
ZERO = 1e-15

EXAMPLES = settings(max_examples=25)

steps_st = st.integers(2, 240)
batch_st = st.sampled_from([1, 1, 2, 3, 8])
# The contract is stated for ``progress: steps``; with one batch size throughout, counting samples
# must give the same curve, so half the examples check that too.
progress_st = st.sampled_from(["steps", "samples"])
lr_st = st.floats(1e-4, 10.0)
momentum_st = st.floats(0.0, 0.99)


@st.composite
def momentum_pair(draw):
    """``[max, min]`` as a recipe writes it."""
    hi = draw(st.floats(0.5, 0.99))
    lo = draw(st.floats(0.0, hi))
    return [hi, lo]


# ---------------------------------------------------------------------------------------------
# Helpers


def recipe_dict(schedule: dict, *, steps: int, batch: int = 1, lr: float = 0.1, momentum: float = 0.9,
                progress: str = "steps", optimizer: str = "sgd") -> dict:
    return {
        "name": "torch-equivalence",
        "data": {"source": "synthetic", "train_samples": steps * batch},
        "optimizer": {"name": optimizer, "lr": lr, "momentum": momentum},
        "schedule": {"scope": "global", "progress": progress, **schedule},
        "stages": [{"epochs": 1, "resolution": 32, "batch_size": batch}],
    }


def cadence_timeline(schedule: dict, *, steps: int, batch: int = 1, lr: float = 0.1,
                     momentum: float = 0.9, progress: str = "steps") -> Timeline:
    raw = recipe_dict(schedule, steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    timeline = recipe_from_dict(raw, "equivalence.yaml").timeline(train_samples=steps * batch)
    assert len(timeline) == steps
    assert timeline.batch_size == [batch] * steps
    return timeline


def group_momentum(group: dict) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def record(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> tuple[list, list]:
    """LR and momentum of param group 0 in effect for optimizer steps 0 .. steps-1, stepping the
    scheduler after the optimizer as a training loop does."""
    lrs, moms = [], []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group_momentum(group))
        optimizer.step()
        scheduler.step()
    return lrs, moms


def sgd(lr: float, momentum: float) -> SGD:
    return SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr, momentum=momentum)


def torch_run(make_scheduler, steps: int, *, lr: float, momentum: float) -> tuple[list, list]:
    optimizer = sgd(lr, momentum)
    return record(optimizer, make_scheduler(optimizer), steps)


def step_scheduler_run(timeline: Timeline, *, lr: float, momentum: float) -> tuple[list, list]:
    optimizer = sgd(lr, momentum)
    return record(optimizer, StepScheduler(optimizer, timeline), len(timeline))


def assert_matches(actual, expected, *, peak: float, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} steps vs {len(expected)}"
    bad = [(s, a, e) for s, (a, e) in enumerate(zip(actual, expected))
           if not abs(a - e) <= REL * max(abs(a), abs(e)) + ZERO * peak]
    assert not bad, (f"{what}: {len(bad)} of {len(actual)} steps differ; first at step {bad[0][0]}: "
                     f"cadence {bad[0][1]!r} vs torch {bad[0][2]!r}")


def check(schedule: dict, make_scheduler, *, steps: int, batch: int, lr: float, momentum: float,
          progress: str, upto: int | None = None) -> Timeline:
    """The timeline and StepScheduler against torch, for steps ``0 .. upto`` (all by default)."""
    timeline = cadence_timeline(schedule, steps=steps, batch=batch, lr=lr, momentum=momentum,
                                progress=progress)
    want_lr, want_mom = torch_run(make_scheduler, steps, lr=lr, momentum=momentum)
    got_lr, got_mom = step_scheduler_run(timeline, lr=lr, momentum=momentum)
    n = steps if upto is None else upto + 1
    assert_matches(timeline.lr[:n], want_lr[:n], peak=lr, what="timeline lr")
    assert_matches(timeline.momentum[:n], want_mom[:n], peak=1.0, what="timeline momentum")
    assert_matches(got_lr[:n], want_lr[:n], peak=lr, what="optimizer lr (StepScheduler)")
    assert_matches(got_mom[:n], want_mom[:n], peak=1.0, what="optimizer momentum (StepScheduler)")
    return timeline


# ---------------------------------------------------------------------------------------------
# One test per torch class


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), gamma=st.floats(0.01, 1.0))
def test_step_matches_steplr(steps, batch, progress, lr, momentum, data, gamma):
    size = data.draw(st.integers(1, steps), label="step_size")
    timeline = check({"kind": "step", "step_size": f"{size} steps", "gamma": gamma},
                     lambda o: StepLR(o, step_size=size, gamma=gamma),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[0] == lr
    if size < steps:
        assert timeline.lr[size] == pytest.approx(lr * gamma, rel=REL)
        assert timeline.lr[size - 1] == lr


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), gamma=st.floats(0.01, 1.0))
def test_multistep_matches_multisteplr(steps, batch, progress, lr, momentum, data, gamma):
    marks = sorted(data.draw(st.sets(st.integers(1, steps), min_size=1, max_size=5), label="milestones"))
    timeline = check({"kind": "multistep", "milestones": [f"{m} steps" for m in marks], "gamma": gamma},
                     lambda o: MultiStepLR(o, milestones=marks, gamma=gamma),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    for k, m in enumerate(marks):
        if m < steps:
            assert timeline.lr[m] == pytest.approx(lr * gamma ** (k + 1), rel=REL)


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       gamma=st.floats(0.9, 1.0))
def test_exponential_matches_exponentiallr(steps, batch, progress, lr, momentum, gamma):
    timeline = check({"kind": "exponential", "gamma": gamma}, lambda o: ExponentialLR(o, gamma=gamma),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[-1] == pytest.approx(lr * gamma ** (steps - 1), rel=REL)


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), floor=st.floats(0.0, 0.95))
def test_cosine_matches_closed_form_and_cosineannealinglr(steps, batch, progress, lr, momentum, data,
                                                         floor):
    t_max = data.draw(st.one_of(st.none(), st.integers(1, steps)), label="duration")
    schedule = {"kind": "cosine", "floor": floor}
    if t_max is not None:
        schedule["duration"] = f"{t_max} steps"
    T = steps if t_max is None else t_max
    eta_min = floor * lr
    # torch's recursive form agrees with the closed form up to T_max (after it, torch climbs back up
    # the cosine and cadence holds the floor), so compare stepping torch up to T_max ...
    timeline = check(schedule, lambda o: CosineAnnealingLR(o, T_max=T, eta_min=eta_min),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress,
                     upto=min(T, steps - 1))
    # ... and the closed form, eta_min + (base - eta_min)(1 + cos(pi t / T)) / 2, at every step.
    closed = [eta_min + (lr - eta_min) * (1 + math.cos(math.pi * min(s, T) / T)) / 2 for s in range(steps)]
    assert_matches(timeline.lr, closed, peak=lr, what="closed form")
    if T < steps:
        assert timeline.lr[T:] == pytest.approx([eta_min] * (steps - T), rel=REL, abs=ZERO * lr)


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), t_mult=st.sampled_from([1, 1, 2, 3]), floor=st.floats(0.0, 0.95))
def test_cosine_restarts_matches_cosineannealingwarmrestarts(steps, batch, progress, lr, momentum, data,
                                                             t_mult, floor):
    t0 = data.draw(st.integers(1, min(steps, 40)), label="period")
    timeline = check({"kind": "cosine_restarts", "period": f"{t0} steps", "period_mult": t_mult,
                      "floor": floor},
                     lambda o: CosineAnnealingWarmRestarts(o, T_0=t0, T_mult=t_mult, eta_min=floor * lr),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[0] == pytest.approx(lr, rel=REL)
    if t0 < steps:  # the first restart is back at the peak
        assert timeline.lr[t0] == pytest.approx(lr, rel=REL)


def torch_momentum_kwargs(cycle):
    """cadence's ``momentum: [max, min]`` as OneCycleLR/CyclicLR arguments."""
    if cycle is None:
        return {"cycle_momentum": False}
    return {"cycle_momentum": True, "max_momentum": cycle[0], "base_momentum": cycle[1]}


@settings(max_examples=60)
@given(steps=st.integers(10, 240), batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       three_phase=st.booleans(), anneal=st.sampled_from(["cos", "linear"]), data=st.data(),
       div_factor=st.floats(1.0, 100.0), final_div_factor=st.floats(1.0, 1.0e4),
       cycle=st.one_of(st.none(), momentum_pair()))
def test_one_cycle_matches_onecyclelr(steps, batch, progress, lr, momentum, three_phase, anneal, data,
                                      div_factor, final_div_factor, cycle):
    pct_start = data.draw(st.floats(0.02, 0.49 if three_phase else 0.98), label="pct_start")
    assume(pct_start * steps > 1.01)  # torch's first phase must end after step 0
    schedule = {"kind": "one_cycle", "pct_start": pct_start, "div_factor": div_factor,
                "final_div_factor": final_div_factor, "anneal": anneal, "three_phase": three_phase}
    if cycle is not None:
        schedule["momentum"] = cycle

    def make(o):
        kwargs = torch_momentum_kwargs(cycle)
        return OneCycleLR(o, max_lr=lr, total_steps=steps, pct_start=pct_start, anneal_strategy=anneal,
                          div_factor=div_factor, final_div_factor=final_div_factor,
                          three_phase=three_phase, **kwargs)

    timeline = check(schedule, make, steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[0] == pytest.approx(lr / div_factor, rel=REL)
    assert timeline.lr[-1] == pytest.approx(lr / div_factor / final_div_factor, rel=REL)
    assert timeline.cycles_momentum == (cycle is not None)
    if cycle is not None:
        assert timeline.momentum[0] == pytest.approx(cycle[0], rel=REL)


@settings(max_examples=60)
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       mode=st.sampled_from(["triangular", "triangular2", "exp_range"]), data=st.data(),
       base_factor=st.floats(0.0, 0.95), gamma=st.floats(0.95, 1.0),
       cycle=st.one_of(st.none(), momentum_pair()))
def test_cyclic_matches_cycliclr(steps, batch, progress, lr, momentum, mode, data, base_factor, gamma,
                                 cycle):
    up = data.draw(st.integers(1, min(steps, 60)), label="step_size_up")
    down = data.draw(st.one_of(st.none(), st.integers(1, min(steps, 60))), label="step_size_down")
    schedule = {"kind": "cyclic", "step_size_up": f"{up} steps", "base_factor": base_factor,
                "mode": mode, "gamma": gamma}
    if down is not None:
        schedule["step_size_down"] = f"{down} steps"
    if cycle is not None:
        schedule["momentum"] = cycle

    def make(o):
        kwargs = torch_momentum_kwargs(cycle)
        return CyclicLR(o, base_lr=base_factor * lr, max_lr=lr, step_size_up=up, step_size_down=down,
                        mode=mode, gamma=gamma, **kwargs)

    timeline = check(schedule, make, steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[0] == pytest.approx(base_factor * lr, rel=REL, abs=ZERO * lr)
    if up < steps:
        assert timeline.lr[up] == pytest.approx(lr * (base_factor + (1 - base_factor) * (
            gamma ** up if mode == "exp_range" else 1.0)), rel=REL)


def test_cyclic_with_a_longer_way_down_and_momentum_fixed_example():
    """A hand-checked case: up 3, down 5, base 0.2: 0.2, 0.4667, 0.7333, 1, 0.84, 0.68, 0.52, 0.36, 0.2."""
    steps, lr = 17, 0.5
    timeline = check({"kind": "cyclic", "step_size_up": "3 steps", "step_size_down": "5 steps",
                      "base_factor": 0.2, "mode": "triangular2", "momentum": [0.95, 0.85]},
                     lambda o: CyclicLR(o, base_lr=0.1, max_lr=0.5, step_size_up=3, step_size_down=5,
                                        mode="triangular2", max_momentum=0.95, base_momentum=0.85),
                     steps=steps, batch=1, lr=lr, momentum=0.9, progress="steps")
    first = [0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0, 0.84, 0.68, 0.52, 0.36]
    second = [0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6, 0.52]  # triangular2 halves the second cycle
    assert timeline.lr[:13] == pytest.approx([lr * f for f in first + second], rel=1e-12)
    assert timeline.momentum[3] == pytest.approx(0.85, rel=1e-12)
    assert timeline.momentum[11] == pytest.approx(0.9, rel=1e-12)


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), power=st.floats(0.2, 4.0))
def test_polynomial_matches_polynomiallr(steps, batch, progress, lr, momentum, data, power):
    total = data.draw(st.integers(1, steps), label="duration")
    timeline = check({"kind": "polynomial", "power": power, "duration": f"{total} steps"},
                     lambda o: PolynomialLR(o, total_iters=total, power=power),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    closed = [lr * (1 - min(s, total) / total) ** power for s in range(steps)]
    assert_matches(timeline.lr, closed, peak=lr, what="closed form")


@EXAMPLES
@given(steps=steps_st, batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), start=st.floats(0.01, 1.0), end=st.floats(0.0, 1.0))
def test_linear_matches_linearlr(steps, batch, progress, lr, momentum, data, start, end):
    total = data.draw(st.one_of(st.none(), st.integers(1, steps)), label="duration")
    schedule = {"kind": "linear", "start_factor": start, "end_factor": end}
    if total is not None:
        schedule["duration"] = f"{total} steps"
    T = steps if total is None else total
    timeline = check(schedule, lambda o: LinearLR(o, start_factor=start, end_factor=end, total_iters=T),
                     steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    closed = [lr * (start + (end - start) * min(s, T) / T) for s in range(steps)]
    assert_matches(timeline.lr, closed, peak=lr, what="closed form")


# ---------------------------------------------------------------------------------------------
# Warmup is a prefix: SequentialLR([LinearLR(start_factor, 1, W), CosineAnnealingLR(T - W)], [W])


@EXAMPLES
@given(steps=st.integers(3, 240), batch=batch_st, progress=progress_st, lr=lr_st, momentum=momentum_st,
       data=st.data(), start_factor=st.floats(0.01, 1.0), floor=st.floats(0.0, 0.9))
def test_linear_warmup_then_cosine_matches_sequentiallr(steps, batch, progress, lr, momentum, data,
                                                        start_factor, floor):
    w = data.draw(st.integers(1, steps - 2), label="warmup steps")
    schedule = {"kind": "cosine", "floor": floor,
                "warmup": {"duration": f"{w} steps", "start_factor": start_factor, "shape": "linear"}}

    def make(o):
        return SequentialLR(o, [LinearLR(o, start_factor=start_factor, end_factor=1.0, total_iters=w),
                                CosineAnnealingLR(o, T_max=steps - w, eta_min=floor * lr)], milestones=[w])

    timeline = check(schedule, make, steps=steps, batch=batch, lr=lr, momentum=momentum, progress=progress)
    assert timeline.lr[0] == pytest.approx(lr * start_factor, rel=REL)
    assert timeline.lr[w] == pytest.approx(lr, rel=REL)  # the cosine starts at its peak on step W


@EXAMPLES
@given(steps=st.integers(3, 240), batch=batch_st, lr=lr_st, data=st.data(),
       start_factor=st.floats(0.0, 1.0))
def test_cos_warmup_shape_closed_form(steps, batch, lr, data, start_factor):
    w = data.draw(st.integers(1, steps - 1), label="warmup steps")
    timeline = cadence_timeline({"kind": "constant", "warmup": {"duration": f"{w} steps",
                                                                "start_factor": start_factor,
                                                                "shape": "cos"}},
                                steps=steps, batch=batch, lr=lr)
    want = [lr * (start_factor + (1 - start_factor) * (1 - math.cos(math.pi * s / w)) / 2) if s < w else lr
            for s in range(steps)]
    assert_matches(timeline.lr, want, peak=lr, what="cos warmup")


# ---------------------------------------------------------------------------------------------
# Adam's beta1, and the numbers `cadence plan --csv` writes


@settings(max_examples=15)
@given(steps=st.integers(10, 200), lr=st.floats(1e-5, 1e-2), pct_start=st.floats(0.1, 0.9),
       anneal=st.sampled_from(["cos", "linear"]), cycle=momentum_pair())
def test_one_cycle_cycles_adam_beta1_like_onecyclelr(steps, lr, pct_start, anneal, cycle):
    assume(pct_start * steps > 1.01)
    raw = recipe_dict({"kind": "one_cycle", "pct_start": pct_start, "anneal": anneal, "momentum": cycle},
                      steps=steps, lr=lr, optimizer="adamw")
    timeline = recipe_from_dict(raw).timeline(train_samples=steps)

    def adam():
        return Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr, betas=(0.9, 0.998))

    theirs = adam()
    want_lr, want_beta1 = record(theirs, OneCycleLR(theirs, max_lr=lr, total_steps=steps,
                                                    pct_start=pct_start, anneal_strategy=anneal,
                                                    max_momentum=cycle[0], base_momentum=cycle[1]), steps)
    ours = adam()
    got_lr, got_beta1 = record(ours, StepScheduler(ours, timeline), steps)
    assert_matches(got_lr, want_lr, peak=lr, what="Adam lr")
    assert_matches(got_beta1, want_beta1, peak=1.0, what="Adam beta1")
    assert ours.param_groups[0]["betas"][1] == 0.998  # beta2 untouched


def _plan_csv(tmp_path, raw: dict) -> dict[str, list]:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "plan.csv"
    assert cadence_main(["plan", str(path), "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in rows[0]}


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cli_plan_csv_matches_cycliclr(tmp_path, capsys, mode):
    steps, lr = 150, 0.3
    raw = recipe_dict({"kind": "cyclic", "step_size_up": "20 steps", "step_size_down": "35 steps",
                       "base_factor": 0.1, "mode": mode, "gamma": 0.99, "momentum": [0.95, 0.8]},
                      steps=steps, lr=lr)
    got = _plan_csv(tmp_path, raw)
    want_lr, want_mom = torch_run(
        lambda o: CyclicLR(o, base_lr=0.03, max_lr=lr, step_size_up=20, step_size_down=35, mode=mode,
                           gamma=0.99, max_momentum=0.95, base_momentum=0.8),
        steps, lr=lr, momentum=0.9)
    assert got["step"] == list(range(steps))
    assert_matches(got["lr"], want_lr, peak=lr, what="csv lr")
    assert_matches(got["momentum"], want_mom, peak=1.0, what="csv momentum")


@pytest.mark.parametrize("three_phase,anneal", [(False, "cos"), (True, "linear")])
def test_cli_plan_csv_matches_onecyclelr(tmp_path, capsys, three_phase, anneal):
    steps, batch, lr = 97, 4, 1.5
    raw = recipe_dict({"kind": "one_cycle", "pct_start": 0.3, "div_factor": 20.0,
                       "final_div_factor": 500.0, "anneal": anneal, "three_phase": three_phase,
                       "momentum": [0.95, 0.85]}, steps=steps, batch=batch, lr=lr)
    got = _plan_csv(tmp_path, raw)
    want_lr, want_mom = torch_run(
        lambda o: OneCycleLR(o, max_lr=lr, total_steps=steps, pct_start=0.3, anneal_strategy=anneal,
                             div_factor=20.0, final_div_factor=500.0, three_phase=three_phase),
        steps, lr=lr, momentum=0.9)
    assert got["samples_seen"] == [batch * (s + 1) for s in range(steps)]
    assert_matches(got["lr"], want_lr, peak=lr, what="csv lr")
    assert_matches(got["momentum"], want_mom, peak=1.0, what="csv momentum")


# ---------------------------------------------------------------------------------------------
# sequence is SequentialLR; exact zeros


@pytest.mark.parametrize("steps", [60, 100, 144])
def test_sequence_matches_sequentiallr(steps):
    """Each piece has its own clock; a fractional piece duration is a share of the whole sequence."""
    lr = 0.4
    schedule = {"kind": "sequence", "pieces": [
        {"kind": "step", "step_size": "5 steps", "gamma": 0.5, "duration": "20 steps"},
        {"kind": "linear", "start_factor": 0.2, "end_factor": 1.0, "duration": 0.25},
        {"kind": "cosine", "floor": 0.05},
    ]}
    quarter = steps // 4

    def make(o):
        return SequentialLR(o, [StepLR(o, step_size=5, gamma=0.5),
                                LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=quarter),
                                CosineAnnealingLR(o, T_max=steps - 20 - quarter, eta_min=0.05 * lr)],
                            milestones=[20, 20 + quarter])

    check(schedule, make, steps=steps, batch=1, lr=lr, momentum=0.9, progress="steps")


def test_linear_to_zero_is_exactly_zero_where_torch_is_a_few_ulps_off():
    """LinearLR multiplies its way to 0 and can land at ~1e-20; cadence's closed form gives 0.0."""
    steps, lr = 70, 0.1
    timeline = check({"kind": "linear", "start_factor": 0.01, "end_factor": 0.0, "duration": "59 steps"},
                     lambda o: LinearLR(o, start_factor=0.01, end_factor=0.0, total_iters=59),
                     steps=steps, batch=1, lr=lr, momentum=0.9, progress="steps")
    assert timeline.lr[59:] == [0.0] * 11
    assert timeline.lr[58] == pytest.approx(lr * 0.01 / 59, rel=1e-12)


@pytest.mark.slow
def test_momentum_schedule_writes_onecycle_full_as_its_formula():
    """recipes/imagenet-resnet50-onecycle-full.yaml: LR linear up over 30% then cosine down; momentum
    (its own curve) linear down over the same 30% then cosine back up -- step for step, to 1e-9."""
    recipe = load_recipe(os.path.join(ROOT, "recipes", "imagenet-resnet50-onecycle-full.yaml"))
    t = recipe.timeline()
    n, peak, lo, hi = len(t), 2.0, 0.85, 0.95
    warm = round(0.3 * n)
    for s in range(n):
        if s < warm:
            lr, mom = peak * (0.04 + 0.96 * s / warm), hi - (hi - lo) * s / warm
        else:
            x = (s - warm) / (n - warm)
            lr, mom = peak * (1 + math.cos(math.pi * x)) / 2, lo + (hi - lo) * (1 - math.cos(math.pi * x)) / 2
        assert t.lr[s] == pytest.approx(lr, rel=1e-9, abs=1e-12), s
        assert t.momentum[s] == pytest.approx(mom, rel=1e-9), s
    assert t.cycles_momentum


def test_momentum_schedule_refuses_a_schedule_that_cycles_momentum_and_momentum_past_1(tmp_path, capsys):
    path = write_recipe(tmp_path, {**GOOD, "momentum_schedule": {"kind": "constant"}})  # GOOD's one_cycle cycles it
    assert cadence_main(["plan", path]) == 2
    assert "already cycles momentum: set it in one place" in capsys.readouterr().err
    raw = {**GOOD, "schedule": {"kind": "cosine"}, "momentum_schedule": {"kind": "linear", "start_factor": 1.2}}
    assert cadence_main(["plan", write_recipe(tmp_path, raw)]) == 2
    assert "momentum_schedule: 'linear': gives the momentum 1.08 at step 0: it must be in [0, 1)" in \
        capsys.readouterr().err
