"""Gradient accumulation (``train.micro_batch_size``), clipping by global norm and the logged
gradient norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cadence import rundir
from cadence.cli import main as cadence_main
from cadence.mixing import Loss, Targets
from cadence.errors import FieldError
from cadence.parts import Parts
from cadence.recipe import recipe_from_dict
from helpers import TINY, assert_plan_refuses, assert_same_state, run, write_recipe


def _parts(micro: int | None, kind: str = "ce", clip: float | None = None) -> Parts:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.GELU(), nn.Linear(16, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    return Parts(model, model, None, opt, None, torch.amp.GradScaler("cpu", enabled=False),
                 torch.autocast("cpu", enabled=False), Loss(kind, 0.1), None, torch.device("cpu"),
                 micro_batch=micro, clip_grad_norm=clip)


@pytest.mark.parametrize("kind", ["ce", "bce"])
def test_k_micro_batches_make_the_update_of_one_batch(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 4, 4, generator=g, dtype=torch.float64)
    y = Targets(torch.randint(0, 5, (24,), generator=g), torch.randint(0, 5, (24,), generator=g), 0.7, 0.1)
    whole, split = _parts(None, kind), _parts(6, kind)
    for _ in range(3):  # three steps: momentum carries the accumulated gradient on
        a, b = whole.forward_backward(x, y), split.forward_backward(x, y)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
        whole.update(), split.update()
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_ragged_last_chunk_is_weighted_by_its_share():
    x, y = torch.randn(10, 3, 4, 4, dtype=torch.float64), torch.arange(10) % 5
    whole, split = _parts(None), _parts(4)  # chunks of 4, 4 and 2
    assert whole.forward_backward(x, y).item() == pytest.approx(split.forward_backward(x, y).item(), rel=1e-12)
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_clipping_by_global_norm_in_closed_form():
    parts = _parts(None, clip=1.0)
    parts.optimizer = torch.optim.SGD(parts.model.parameters(), lr=0.5)
    before = [p.detach().clone() for p in parts.model.parameters()]
    grads = [torch.full_like(p, 0.5) for p in parts.model.parameters()]
    for p, gr in zip(parts.model.parameters(), grads):
        p.grad = gr.clone()
    total = torch.sqrt(sum((gr ** 2).sum() for gr in grads))
    norm = parts.update()
    assert norm.item() == pytest.approx(total.item(), rel=1e-12) and total > 1
    for p, b, gr in zip(parts.model.parameters(), before, grads):
        torch.testing.assert_close(p, b - 0.5 * gr / (total + 1e-6), rtol=1e-12, atol=1e-14)  # torch's eps
    unclipped = _parts(None)
    assert unclipped.update() is None  # no clipping and no norm asked for: nothing computed


def test_adaptive_clipping_unit_by_unit_in_closed_form_and_as_timm():
    from cadence.parts import adaptive_clip_

    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.6, 0.8]], dtype=torch.float64))  # unit norms 5 and 1
    w.grad = torch.tensor([[0.3, 0.4], [0.0, 0.02]], dtype=torch.float64)  # unit gradient norms 0.5, 0.02
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # norm 0: the floor eps = 1e-3 counts
    b.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    adaptive_clip_([w, b], 0.05)
    torch.testing.assert_close(w.grad[0], torch.tensor([0.3, 0.4], dtype=torch.float64) * (0.25 / 0.5))  # 0.05 x 5
    torch.testing.assert_close(w.grad[1], torch.tensor([0.0, 0.02], dtype=torch.float64))  # under 0.05 x 1: kept
    torch.testing.assert_close(b.grad, torch.tensor([0.05e-3, 0.0], dtype=torch.float64))
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    model(torch.randn(4, 3, 6, 6)).square().sum().backward()
    ours = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), ours):
        p.grad = g.clone()
    adaptive_clip_(list(model.parameters()), 0.01)
    mine = [p.grad.clone() for p in model.parameters()]
    for p, g in zip(model.parameters(), ours):
        p.grad = g.clone()
    timm.utils.adaptive_clip_grad(list(model.parameters()), 0.01)
    for a, p in zip(mine, model.parameters()):
        torch.testing.assert_close(a, p.grad)


ACCUMULATED = copy.deepcopy(TINY)
ACCUMULATED["train"].update(micro_batch_size=8, clip_grad_norm=0.5, log_every=2)
ACCUMULATED["regularization"] = {"mixup": 0.2, "cutmix": 1.0}


@pytest.mark.slow
@pytest.mark.pictures
def test_an_accumulated_clipped_run_resumes_bit_for_bit_and_logs_the_norm(tmp_path):
    assert recipe_from_dict(ACCUMULATED).timeline().lr == recipe_from_dict(TINY).timeline().lr  # the plan is the same
    whole, _ = run(ACCUMULATED, str(tmp_path / "whole"))
    run(ACCUMULATED, str(tmp_path / "resumed"), stop_at=5)
    resumed, _ = run(ACCUMULATED, str(tmp_path / "resumed"), resume=True)
    assert_same_state(whole, resumed)
    rows = [r for r in rundir.read_metrics(str(tmp_path / "whole")) if "loss" in r and "val_top1" not in r]
    assert [r["step"] for r in rows] == [0, 2, 4, 5, 6, 8, 10, 11]  # every 2nd step and each epoch's last
    assert all(r["grad_norm"] > 0 for r in rows)
    assert (tmp_path / "whole" / "curves.png").stat().st_size > 20_000


@pytest.mark.parametrize("where, value, says", [
    ("train.micro_batch_size", 3, "does not divide stage 0's per-process batch of 10 images"),
    ("train.micro_batch_size", 0, "must be >= 1"),
    ("train.clip_grad_norm", 0, "must be positive and finite"),
    ("train.clip_grad_norm", -1.0, "must be positive and finite"),
    ("train.keep_best", -1, "must be >= 0"),
    ("train.clip_mode", "agc", "needs train.clip_grad_norm"),
    ("train.ema", "'5 samples'", "is a half-life shorter than one optimizer step (20 images)"),
    ("train.ema", "'0.5 steps'", "is a half-life shorter than one optimizer step"),
    ("optimizer.name", "lambda", "must be one of sgd, adamw, lamb, lars, lion"),
    ("train.keep_every", -2, "must be >= 0 epochs"),
])
def test_bad_accumulation_clipping_and_retention_exit_2(tmp_path, capsys, where, value, says):
    assert_plan_refuses(tmp_path, capsys, where, value, says)


def test_memory_limits_parse():
    from cadence.measure import parse_bytes

    assert parse_bytes("40GB") == 40 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("2e9") == 2e9
    for bad in ("", "40XB", "-1GB", "0"):
        with pytest.raises(FieldError, match="--memory-limit"):
            parse_bytes(bad)


@pytest.mark.slow
def test_plan_measure_times_every_stage_and_says_what_fits(tmp_path, capsys):
    """``cadence plan --measure``: one calibration per distinct (resolution, per-process batch), each in
    its own process; a stage's time is its steps x the measured step time; with a memory limit, the
    stages that do not fit get the largest micro-batch that does (here: none, at 1 byte)."""
    from cadence import measure

    recipe = recipe_from_dict(TINY)
    t = recipe.timeline()
    result = measure.measure(recipe, t, steps=2, memory_limit=100 * 2**30)
    rows = result["stages"]
    assert [(r["resolution"], r["local"], r["steps"]) for r in rows] == [(12, 16, 6), (16, 32, 6)]
    for r in rows:
        assert r["img_s"] > 0 and r["peak"] > 0 and r["seconds"] == pytest.approx(6 * r["step_s"])
    assert result["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    assert "every stage fits in 100.00 GB" in measure.table(result, 100 * 2**30)
    one = {**TINY, "stages": [{"epochs": 1, "resolution": 12, "batch_size": 2}]}  # chunks: only 1 to try
    path = write_recipe(tmp_path, one)
    assert cadence_main(["plan", path, "--measure", "--measure-steps", "1", "--memory-limit", "1B"]) == 0
    out = capsys.readouterr().out
    assert "measured on cpu" in out and "stage 0 needs" in out and "no micro-batch fits" in out
