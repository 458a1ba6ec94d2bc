"""Optional extras: timm's models and large-batch optimizers (``pip install 'cadence[timm]'``). Without
the extra installed, asking for them is one line and exit 2; with it, they train, follow the plan's
momentum and resume exactly."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from cadence import parts
from cadence.cli import main as cadence_main
from cadence.recipe import recipe_from_dict
from cadence.scheduler import get_momentum
from helpers import TINY, assert_same_state, run, write_recipe


@pytest.mark.parametrize("where, value", [("model.arch", "timm/resnet10t"), ("optimizer.name", "lamb")])
def test_without_timm_a_timm_model_or_optimizer_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, where, value):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    path = write_recipe(tmp_path, TINY)
    assert cadence_main(["train", path, "--set", f"{where}={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"cadence: error: {path}: {where}: {value!r}: needs timm, an optional extra: "
                                "pip install 'cadence[timm]'"]
    assert not (tmp_path / "r").exists()


def test_an_unknown_timm_model_exits_2(tmp_path, capsys):
    pytest.importorskip("timm")
    path = write_recipe(tmp_path, TINY)
    assert cadence_main(["train", path, "--set", "model.arch=timm/resnet_nope", "--out", str(tmp_path / "r")]) == 2
    assert "timm has no model 'resnet_nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name, key", [("lamb", "betas"), ("lars", "momentum"), ("lion", "betas")])
def test_large_batch_optimizers_follow_the_plans_momentum(name, key):
    timm = pytest.importorskip("timm")
    setup = parts.build_setup(recipe_from_dict({**TINY, "optimizer": {**TINY["optimizer"], "name": name}}))
    built = parts.build_parts(setup)
    cls = {"lamb": timm.optim.Lamb, "lars": timm.optim.Lars, "lion": timm.optim.Lion}[name]
    assert type(built.optimizer) is cls and key in built.optimizer.param_groups[0]
    t = setup.timeline
    for s in range(4):  # one_cycle cycles momentum: beta1 (LAMB, Lion) or momentum (LARS) follows it
        assert get_momentum(built.optimizer) == t.momentum[s]
        assert built.optimizer.param_groups[0]["lr"] == pytest.approx(t.lr[s])
        built.optimizer.step()
        built.scheduler.step()


@pytest.mark.slow
def test_a_timm_model_with_lamb_trains_and_resumes_bit_for_bit(tmp_path):
    pytest.importorskip("timm")
    raw = copy.deepcopy(TINY)
    raw["model"] = {"arch": "timm/resnet10t"}
    raw["optimizer"]["name"] = "lamb"
    raw["optimizer"]["lr"] = 0.01
    whole, final = run(raw, str(tmp_path / "whole"))
    assert final is not None and torch.isfinite(torch.tensor(final["val_loss"]))
    assert type(whole.parts.model).__module__.startswith("timm.")
    run(raw, str(tmp_path / "part"), stop_at=5)
    resumed, _ = run(raw, str(tmp_path / "part"), resume=True)
    assert_same_state(whole, resumed)
