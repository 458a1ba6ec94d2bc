"""Optional extras: timm's models and large-batch optimizers (``pip install 'cadence[timm]'``). Without
the extra installed, asking for them is one line and exit 2; with it, they train, follow the plan's
momentum and resume exactly."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from cadence import parts, rundir
from cadence.cli import main as cadence_main
from cadence.recipe import recipe_from_dict
from cadence.scheduler import get_momentum
from helpers import TINY, assert_same_state, run, write_recipe


TIMM_READY = {**TINY, "model": {}}  # (TINY's fastnet width is refused on another model)


@pytest.mark.parametrize("where, value", [("model.arch", "timm/resnet10t"), ("optimizer.name", "lamb")])
def test_without_timm_a_timm_model_or_optimizer_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, where, value):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if it were not installed
    path = write_recipe(tmp_path, TIMM_READY)
    assert cadence_main(["train", path, "--set", f"{where}={value}", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"cadence: error: {path}: {where}: {value!r}: needs timm, an optional extra: "
                                "pip install 'cadence[timm]'"]
    assert not (tmp_path / "r").exists()


def test_an_unknown_timm_model_exits_2(tmp_path, capsys):
    pytest.importorskip("timm")
    path = write_recipe(tmp_path, TIMM_READY)
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


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_without_the_tracker_installed_a_logger_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)
    path = write_recipe(tmp_path, TINY)
    assert cadence_main(["train", path, "--set", f"train.loggers=[{name}]", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"cadence: error: {path}: train.loggers: {name!r}: needs {name}, an optional extra: "
        f"pip install 'cadence[{name}]'"]
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_mlflow_gets_every_metrics_row_and_a_resumed_run_logs_into_the_same_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = {**TINY, "train": {**TINY["train"], "loggers": ["mlflow"]}}
    run(raw, str(tmp_path / "r"), stop_at=5)
    run_id = (tmp_path / "r" / ".mlflow-id").read_text().strip()
    run(raw, str(tmp_path / "r"), resume=True)
    assert (tmp_path / "r" / ".mlflow-id").read_text().strip() == run_id
    client = mlflow.tracking.MlflowClient(tracking_uri="file:" + str(tmp_path / "r" / "mlruns"))
    losses = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    rows = {r["step"]: r["loss"] for r in rundir.read_metrics(str(tmp_path / "r")) if "val_top1" not in r}
    assert losses == pytest.approx(rows) and len(rows) == 12
    top1 = client.get_metric_history(run_id, "val_top1")
    assert [m.step for m in top1][-1] == 12
    assert client.get_run(run_id).data.params["optimizer.lr"] == "0.05"


@pytest.mark.slow
def test_wandb_offline_logs_the_run_and_resumes_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = {**TINY, "train": {**TINY["train"], "loggers": ["wandb"]}}
    run(raw, str(tmp_path / "r"), stop_at=5)
    run_id = (tmp_path / "r" / ".wandb-id").read_text().strip()
    run(raw, str(tmp_path / "r"), resume=True)
    assert (tmp_path / "r" / ".wandb-id").read_text().strip() == run_id
    assert list((tmp_path / "r" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
