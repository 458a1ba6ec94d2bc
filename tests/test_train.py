"""Training end to end: metrics match the plan, exact resume, eval, CIFAR-10 JPEGs, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from cadence import cli, data, parts, rundir, train
from cadence.errors import FieldError
from cadence.models import build_model
from cadence.recipe import recipe_from_dict
from cadence.report import read_plan_csv
from helpers import (LONG_TINY, ROOT, TINY, assert_same_run, assert_same_state, made_once, run, signal_mid_run,
                     train_rows, write_recipe)

# The shared CIFAR-10 JPEGs: $CADENCE_CIFAR10_TAR, or ../shared/data beside the checkout (never in it).
CIFAR_TAR = os.environ.get("CADENCE_CIFAR10_TAR") or next(
    (p for p in (os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz"),
                 "/work/shared/data/cifar10-jpg.tar.gz") if os.path.exists(p)),
    os.path.join(ROOT, "..", "shared", "data", "cifar10-jpg.tar.gz"))

ADAMW = {**TINY, "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.05},
         "schedule": {"kind": "cosine_restarts", "period": "2 epochs", "floor": 0.01,
                      "warmup": {"duration": "2 steps"}}}


@pytest.mark.slow
@pytest.mark.parametrize("raw", [TINY, ADAMW], ids=["sgd-onecycle", "adamw-sgdr"])
@pytest.mark.parametrize("stop_at", [4, 6, 7], ids=["mid-epoch", "stage-boundary", "mid-stage"])
def test_resume_is_bitwise_exact(tmp_path, raw, stop_at):
    full, final_full = run(raw, str(tmp_path / "full"))
    assert full.step == 12
    part, final_part = run(raw, str(tmp_path / "part"), stop_at=stop_at)
    assert final_part is None and part.step == stop_at
    resumed, final_resumed = run(raw, str(tmp_path / "part"), resume=True)
    assert resumed.step == 12
    assert_same_state(full, resumed)
    assert final_resumed["val_top1"] == final_full["val_top1"]
    assert train_rows(str(tmp_path / "part")) == train_rows(str(tmp_path / "full"))


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [5, 7])
def test_evaluation_every_n_steps_is_logged_and_resumes_exactly(tmp_path, stop_at):
    raw = TINY | {"train": TINY["train"] | {"eval_every": 5}}
    full, final = run(raw, str(tmp_path / "full"))
    assert [e["step"] for e in full.evals] == [5, 10, 12]  # every 5 steps, and the end of training
    assert final == full.evals[-1]
    evals = [r for r in rundir.read_metrics(str(tmp_path / "full")) if "val_top1" in r]
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert [r["time"] for r in evals] == sorted(r["time"] for r in evals)
    run(raw, str(tmp_path / "part"), stop_at=stop_at)
    resumed, _ = run(raw, str(tmp_path / "part"), resume=True)
    assert_same_state(full, resumed)
    assert train_rows(str(tmp_path / "part")) == train_rows(str(tmp_path / "full"))


@pytest.mark.slow
def test_resume_through_the_cli(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert cli.main(["train", recipe, "--out", str(tmp_path / "b"), "--quiet", "--max-steps", "5"]) == 0
    assert "stopped after step 5" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    assert_same_run(tmp_path / "a", tmp_path / "b", steps=12)


@pytest.mark.slow
def test_resume_refuses_a_different_recipe(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet", "--max-steps", "2"]) == 0
    capsys.readouterr()
    code = cli.main(["train", recipe, "--resume", str(tmp_path / "r"), "--set", "optimizer.lr=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--on-recipe-change" in err[0] and err[1:] == ["  optimizer.lr: 0.05 -> 0.5   [schedule]"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    def make(folder):
        assert cli.main(["train", os.path.join(ROOT, "recipes", "demo.yaml"), "--out", str(folder / "run"),
                         "--quiet"]) == 0
    return made_once(tmp_path_factory, "demo", make) / "run"


@pytest.mark.slow
@pytest.mark.pictures  # (the run is made before any test's fixtures: its pictures are rendered anyway)
def test_demo_reaches_its_stated_accuracy(demo_run):
    evals = [r for r in rundir.read_metrics(str(demo_run)) if "val_top1" in r]
    assert evals[-1]["val_top1"] >= 0.95
    assert evals[-1]["resolution"] == 32
    for name in ("recipe.yaml", "metrics.jsonl", "checkpoints/last.pt", "plan.png", "curves.png", "report.html"):
        assert os.path.getsize(demo_run / name) > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(demo_run / "tensorboard"))
    page = (demo_run / "report.html").read_text()
    assert "held-out top-1" in page and "data:image/png;base64" in page and "one_cycle" in page


@pytest.mark.slow
def test_logged_lr_and_momentum_equal_the_plan(demo_run, tmp_path):
    csv_path = str(tmp_path / "plan.csv")
    assert cli.main(["plan", os.path.join(ROOT, "recipes", "demo.yaml"), "--csv", csv_path]) == 0
    plan = read_plan_csv(csv_path)
    rows = [r for r in rundir.read_metrics(str(demo_run)) if "val_top1" not in r]
    assert [r["step"] for r in rows] == plan["step"]
    assert [r["lr"] for r in rows] == plan["lr"]
    assert [r["momentum"] for r in rows] == plan["momentum"]
    assert [r["samples_seen"] for r in rows] == plan["samples_seen"]
    assert [r["stage"] for r in rows] == plan["stage"]


@pytest.mark.slow
def test_eval_at_another_resolution(demo_run, capsys):
    final = [r for r in rundir.read_metrics(str(demo_run)) if "val_top1" in r][-1]
    assert cli.main(["eval", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert f"top-1 {100 * final['val_top1']:.2f}%" in out and "at 32px" in out
    assert cli.main(["eval", str(demo_run), "--resolution", "24"]) == 0
    assert "at 24px" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_sweeps_resolutions_and_names_the_best(tmp_path, capsys):
    """``cadence eval RUN --resolution 8 16``: one line per resolution, then the best of them; each
    line is what evaluating at that resolution alone prints (the same checkpoint, the same crop rule)."""
    import re

    recipe = write_recipe(tmp_path, TINY | {"train": TINY["train"] | {"eval_crop_pct": 0.75}})
    assert cli.main(["train", recipe, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--resolution", "8", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    found = [re.search(r"top-1 ([\d.]+)% at (\d+)px", line).groups() for line in lines[:2]]
    top1 = {int(r): float(t) for t, r in found}
    assert list(top1) == [8, 16]
    best = max(top1, key=lambda r: (top1[r], -r))
    assert lines[2] == f"best: {best}px, held-out top-1 {top1[best]:.2f}% (checkpoint at step 12)"
    for r, line in zip((8, 16), lines):
        assert cli.main(["eval", str(tmp_path / "run"), "--resolution", str(r)]) == 0
        assert capsys.readouterr().out == line + " (checkpoint at step 12)\n"


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    """40 training and 10 test JPEGs per class from the shared CIFAR-10 archive, as an ImageFolder."""
    if not os.path.exists(CIFAR_TAR):
        pytest.skip("../shared/data/cifar10-jpg.tar.gz is not here")
    keep = {"train": 40, "test": 10}

    def extract(root):
        counts: dict[tuple[str, str], int] = {}
        with tarfile.open(CIFAR_TAR) as tf:
            members = []
            for m in tf:
                parts = m.name.strip("./").split("/")
                if m.isfile() and len(parts) >= 3 and parts[-3] in keep:
                    key = (parts[-3], parts[-2])
                    if counts.get(key, 0) < keep[parts[-3]]:
                        counts[key] = counts.get(key, 0) + 1
                        m.name = "/".join(parts[-3:])
                        members.append(m)
            tf.extractall(root, members=members, filter="data")
    return made_once(tmp_path_factory, "cifar10", extract)


@pytest.mark.slow
def test_cifar10_jpeg_folder_end_to_end(tmp_path, cifar_subset):
    raw = {**TINY, "name": "cifar-short",
           "data": {"source": "cifar10", "root": str(cifar_subset)},
           "stages": [{"epochs": 1, "resolution": 24, "batch_size": 50, "data_fraction": 0.5},
                      {"epochs": 1, "resolution": 32, "batch_size": 100}],
           "train": {"device": "cpu", "eval_every": "stage"}}
    setup = parts.build_setup(recipe_from_dict(raw))
    assert setup.source.num_classes == 10 and len(setup.source.train) == 400 and len(setup.source.val) == 100
    assert setup.source.train.images.shape == (400, 3, 32, 32)
    trainer, final = train.train(setup, str(tmp_path / "run"), progress=False)
    assert trainer.step == len(setup.timeline) == 4 + 4
    evals = [r for r in rundir.read_metrics(str(tmp_path / "run")) if "val_top1" in r]
    assert [r["stage"] for r in evals] == [0, 1] and final == evals[-1]  # the logged end-of-training row
    # over the 100 test images (10 classes, so top-5 too): hundredths, top-5 at least top-1
    assert (final["step"], final["resolution"]) == (8, 32)
    hundredths = [k / 100 for k in range(101)]
    assert final["val_top1"] in hundredths and final["val_top5"] in hundredths
    assert final["val_top5"] >= final["val_top1"]


def _cadence(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cadence.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
@pytest.mark.parametrize("override, field", [
    ("data.source=imagefolder", "data.root"),
    ("model.arch=resnet9000", "model.arch"),
    ("model.num_classes=7", "model.num_classes"),
    ("data.train_samples=999", "data.train_samples"),
    ("train.eval_every=0", "train.eval_every"),
])
def test_bad_training_input_exits_2_and_leaves_nothing(tmp_path, override, field):
    recipe = write_recipe(tmp_path, TINY | {"data": {"source": "digits"}})
    extra = ["--set", "data.root=/nonexistent/imagenet"] if "imagefolder" in override else []
    p = _cadence("train", recipe, "--set", override, *extra, "--out", str(tmp_path / "run"), cwd=str(tmp_path))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and field in lines[0] and recipe in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_launching_again_into_a_run_folder_continues_the_same_recipe_and_refuses_another(tmp_path, capsys):
    """``train RECIPE --out DIR`` is idempotent (a requeued job runs the same line again): the same
    recipe continues the run exactly; a different one is refused as ``--resume`` refuses it."""
    recipe = write_recipe(tmp_path, TINY)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "whole"), "--quiet"]) == 0
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet", "--max-steps", "5"]) == 0
    before = (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet", "--set", "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--on-recipe-change" in err[0] and err[1:] == ["  optimizer.lr: 0.05 -> 0.5   [schedule]"]
    assert (tmp_path / "r" / "checkpoints" / "last.pt").read_bytes() == before
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    assert "holds a run of this recipe, at step 5: continuing it" in capsys.readouterr().err
    assert_same_run(tmp_path / "whole", tmp_path / "r", steps=12)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet"]) == 0  # finished: says so again
    assert "held-out top-1" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.filterwarnings("error:Detected call of:UserWarning")  # fp16 skips a step; the plan moves on quietly
def test_mixed_precision_and_channels_last_train(tmp_path, precision):
    raw = {**TINY, "stages": [{"epochs": 1, "resolution": 16, "batch_size": 16}],
           "train": {"device": "cpu", "precision": precision, "channels_last": True, "eval_every": "end"}}
    trainer, final = run(raw, str(tmp_path / "run"))
    assert trainer.parts.scaler.is_enabled() == (precision == "fp16")
    losses = [r["loss"] for r in rundir.read_metrics(str(tmp_path / "run")) if "val_top1" not in r]
    assert len(losses) == 6 and all(0 < v < 10 for v in losses)
    # top-1 over TINY's 32 held-out images (4 classes: no top-5), and what the final weights evaluate to
    assert final["step"] == 6 and final["val_top1"] in [k / 32 for k in range(33)] and "val_top5" not in final
    assert trainer.evaluate() == {k: final[k] for k in ("val_loss", "val_top1", "resolution")}


@pytest.mark.slow
def test_imagefolder_source_trains_and_resumes_exactly(tmp_path, cifar_subset):
    """ImageNet layout (train/, val/) read file by file: RandomResizedCrop + flip per stage, and the
    per-image augmentation keyed to its place in training, so a resumed run is bitwise the same."""
    root = tmp_path / "imagenet-like"
    root.mkdir()
    os.symlink(cifar_subset / "train", root / "train")
    os.symlink(cifar_subset / "test", root / "val")
    raw = {**TINY, "name": "folder",
           "data": {"source": "imagefolder", "root": str(root), "num_workers": 0},
           "model": {"arch": "resnet18"},
           "schedule": {"kind": "cosine", "warmup": {"duration": "1 steps"}},
           "stages": [{"epochs": 1, "resolution": 24, "batch_size": 100, "data_fraction": 0.5},
                      {"epochs": 1, "resolution": 32, "batch_size": 100}],
           "train": {"device": "cpu", "eval_every": "end", "eval_resolution": 32}}
    full, final = run(raw, str(tmp_path / "full"))
    assert full.step == 2 + 4 and full.source.num_classes == 10
    part, _ = run(raw, str(tmp_path / "part"), stop_at=3)
    resumed, final2 = run(raw, str(tmp_path / "part"), resume=True)
    assert_same_state(full, resumed)
    assert final2["val_top1"] == final["val_top1"]


def test_no_weight_decay_on_norm_and_bias():
    from cadence.models import build_model, build_optimizer
    from cadence.recipe import ModelConfig, OptimizerConfig

    model = build_model(ModelConfig(arch="resnet18"), num_classes=10)
    groups = build_optimizer(model, OptimizerConfig(weight_decay=5e-5)).param_groups
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-5 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1), name  # conv/linear weights decay; BN and biases don't
    everything = build_optimizer(model, OptimizerConfig(weight_decay=5e-5, decay_norm_and_bias=True))
    assert len(everything.param_groups) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path, sig):
    raw = LONG_TINY
    recipe = write_recipe(tmp_path, raw)
    run_dir = tmp_path / "run"
    code, err = signal_mid_run(["train", recipe, "--out", str(run_dir), "--quiet"], run_dir / "metrics.jsonl", sig)
    assert code == 128 + sig, err
    assert "--resume" in err and "Traceback" not in err
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    steps_logged = [r["step"] for r in rundir.read_metrics(str(run_dir)) if "val_top1" not in r]
    assert 3 <= saved["step"] < 36 and steps_logged[-1] == saved["step"] - 1
    assert cli.main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    full, _ = run(raw, str(tmp_path / "full"))
    resumed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    for name, x in full.parts.model.state_dict().items():
        assert torch.equal(x, resumed["model"][name]), name


@pytest.mark.slow
def test_checkpoints_load_weights_only_and_a_malicious_pickle_is_refused(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet", "--max-steps", "2"]) == 0
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)  # plain data only
    assert state["step"] == 2 and state["recipe"]["name"] == "tiny"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"model": Evil()}, tmp_path / "r" / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0] and "last.pt" in err[0]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_divergence_stops_with_one_clear_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    code = cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet", "--set", "optimizer.lr=1e12"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    # a finite loss can still blow the weights up: then the next checkpoint finds them first
    assert any(f"{what} step" in err[-1] for what in ("loss is nan at", "loss is inf at", "weights are not finite after"))
    assert "lower optimizer.lr" in err[-1]
    assert (tmp_path / "r" / "recipe.yaml").exists()  # the run directory is kept


@pytest.mark.slow
def test_weight_ema_follows_its_recurrence_is_evaluated_and_resumes_exactly(tmp_path):
    raw = {**TINY, "train": {**TINY["train"], "ema": 0.8}}
    trainer = train.Trainer(parts.build_setup(recipe_from_dict(raw)), run_dir="")
    ema = None
    for x, y in trainer.loader(0, 0):
        trainer.train_step(trainer.parts.normalize(x), y)
        params = [p.detach().clone() for p in trainer.parts.model.parameters()]
        ema = params if ema is None else [0.8 * e + 0.2 * p for e, p in zip(ema, params)]
    for e, p in zip(ema, trainer.parts.ema.module.parameters()):
        assert torch.allclose(e, p, atol=1e-6)
    for b, m in zip(trainer.parts.ema.module.buffers(), trainer.parts.model.buffers()):  # BatchNorm statistics averaged too
        assert b.dtype != torch.float32 or not torch.equal(b, m)
    result = trainer.evaluate()
    raw_result = {k[4:]: v for k, v in result.items() if k.startswith("raw_")}
    trainer.parts.model.load_state_dict(trainer.parts.ema.module.state_dict())
    ema, trainer.parts.ema = trainer.parts.ema, None
    assert trainer.evaluate() == {k: v for k, v in result.items() if not k.startswith("raw_")}  # the average's
    assert set(raw_result) == {"val_loss", "val_top1"} and raw_result["val_loss"] != result["val_loss"]

    full, final = run(raw, str(tmp_path / "full"))
    run(raw, str(tmp_path / "part"), stop_at=5)
    resumed, final2 = run(raw, str(tmp_path / "part"), resume=True)
    for (name, x), (_, y) in zip(full.parts.ema.state_dict().items(), resumed.parts.ema.state_dict().items()):
        assert torch.equal(x, y), name
    assert {k: v for k, v in final2.items() if k not in ("time", "cpu", "wall")} == \
        {k: v for k, v in final.items() if k not in ("time", "cpu", "wall")}


@pytest.mark.slow
def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    raw = {**TINY, "train": {**TINY["train"], "tta": "flip"}}
    trainer = train.Trainer(parts.build_setup(recipe_from_dict(raw)), run_dir="")
    for x, y in trainer.loader(0, 0):
        trainer.train_step(trainer.parts.normalize(x), y)
    result = trainer.evaluate()
    trainer.parts.model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in data.eval_loader(trainer.source, 16, 1000):
            x = trainer.parts.normalize(x)
            logits.append((trainer.parts.model(x) + trainer.parts.model(x.flip(3))) / 2)
            labels.append(y)
    logits, labels = torch.cat(logits), torch.cat(labels)
    assert result["val_top1"] == (logits.argmax(1) == labels).float().mean().item()
    assert result["val_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    digits = {**raw, "data": {"source": "digits"}}
    with pytest.raises(FieldError, match="never flipped in training"):
        parts.build_setup(recipe_from_dict(digits))


@pytest.mark.slow
def test_patch_whitening_stem_decorrelates_patches_and_stays_frozen():
    raw = {**TINY, "model": {"arch": "fastnet", "width": 8, "whiten": True}}
    trainer = train.Trainer(parts.build_setup(recipe_from_dict(raw)), run_dir="")
    stem = trainer.parts.model.whiten
    sample = parts.whitening_sample(trainer.setup)
    out = torch.nn.functional.conv2d(sample, stem.weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = out.T @ out / len(out)
    values = torch.linalg.eigvalsh((lambda p: p.T @ p / len(p))(
        sample.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()))
    expected = values / (values + 5e-4)  # 1 where a direction's variance is >> eps
    assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-4)  # decorrelated
    assert torch.allclose(torch.diagonal(cov).sort().values, expected.sort().values, atol=1e-4)
    before = stem.weight.clone()
    for x, y in trainer.loader(0, 0):
        trainer.train_step(trainer.parts.normalize(x), y)
    assert torch.equal(stem.weight, before) and not stem.weight.requires_grad
    with pytest.raises(FieldError, match="patch whitening is a fastnet stem"):
        parts.build_setup(recipe_from_dict({**raw, "model": {"arch": "resnet18", "whiten": True}}))


def test_fastnet_block_widths():
    model = build_model(recipe_from_dict({**TINY, "model": {"arch": "fastnet", "widths": [8, 24, 40]}}).model, 4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 8, 24, 24, 40, 40]  # stem: half the first block
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    assert [c.out_channels for c in build_model(recipe_from_dict(TINY).model, 4).modules()
            if isinstance(c, torch.nn.Conv2d)][-1] == 32  # default: width x 4
    with pytest.raises(FieldError, match="is a setting of fastnet's, not resnet18's"):
        build_model(recipe_from_dict({**TINY, "model": {"arch": "resnet18", "widths": [8, 16, 32]}}).model, 4)


@pytest.mark.parametrize("resume_step", [0, 3])
def test_tensorboard_drops_the_steps_a_resume_redoes(tmp_path, resume_step):
    """A run restarted at ``resume_step`` (0: killed before its first checkpoint) logs those steps
    again; TensorBoard must show each step once, from the new session."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = rundir.MetricsLog(str(tmp_path), 0)
    for s in range(6):
        log.write({"step": s, "loss": 1.0})
        if s == 2:  # an evaluation after step 2 is logged at 3, the step a checkpoint there resumes at
            log.write({"step": 3, "val_top1": 0.5})
    log.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    log = rundir.MetricsLog(str(tmp_path), resume_step)
    for s in range(resume_step, 5):
        log.write({"step": s, "loss": 2.0})
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(s, 1.0) for s in range(resume_step)] + [(s, 2.0) for s in range(resume_step, 5)]
    evals = [(e.step, e.value) for e in acc.Scalars("val_top1")] if "val_top1" in acc.Tags()["scalars"] else []
    assert evals == ([(3, 0.5)] if resume_step == 3 else [])  # kept with the checkpoint; at 0 all starts over


def _not_glibc_default_faulting() -> str | None:
    """Why a 64 MB block would not fault in 16,384 pages of 4 KiB here with glibc's default malloc
    settings, or None: another allocator preloaded (jemalloc, tcmalloc), malloc tuned through the
    environment, pages that are not 4 KiB, or transparent huge pages (2 MB at a time) for every
    mapping, or for torch's."""
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD may replace glibc's malloc"
    tuned = [k for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")
             if k in os.environ]
    if tuned or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return f"malloc is tuned through the environment ({', '.join(tuned) or 'GLIBC_TUNABLES'})"
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        return f"pages of {os.sysconf('SC_PAGE_SIZE')} bytes"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read()
    except OSError:
        thp = ""
    if "[always]" in thp or ("[madvise]" in thp and os.environ.get("THP_MEM_ALLOC_ENABLE")):
        return "transparent huge pages fault large blocks in 2 MB at a time"
    return None


_NO_GLIBC_DEFAULT = _not_glibc_default_faulting()


@pytest.mark.slow
@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc malloc setting")
@pytest.mark.parametrize("tuned", [
    pytest.param(False, marks=pytest.mark.skipif(_NO_GLIBC_DEFAULT is not None,
                                                 reason=f"glibc's default faulting does not apply: {_NO_GLIBC_DEFAULT}")),
    True,
])
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in(tuned):
    """A 64 MB activation freed and allocated again comes back from the heap, not page by page from
    the kernel (16,384 faults of 4 KiB each, every step, under glibc's default: the untuned case, which
    shows the count measures what it should, where that default holds). In a fresh process: a heap
    that other tests grew past the trim threshold would hand memory back."""
    code = f"""
import resource, torch
from cadence import parts
assert parts.keep_freed_memory() if {tuned} else True
for _ in range(3):  # allocated, touched and freed: the heap grows to hold it
    torch.ones(16 * 2**20)
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    faults = min(int(line) for line in out.split())  # the steady state, as in a training loop
    assert faults < 1000 if tuned else faults >= 16 * 2**20 * 4 // 4096


@pytest.mark.slow
def test_kept_checkpoints_best_k_by_top1_and_every_n_epochs(tmp_path, capsys):
    from cadence import checkpoint

    raw = {**TINY, "train": {**TINY["train"], "keep_best": 2, "keep_every": 2}}
    recipe = write_recipe(tmp_path, raw)
    run_dir = tmp_path / "r"
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet"]) == 0
    evals = [r for r in rundir.read_metrics(str(run_dir)) if "val_top1" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    best = sorted(evals, key=lambda r: (-r["val_top1"], r["step"]))[:2]
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == sorted(["last.pt", "epoch0002.pt", "epoch0004.pt"] + [f"best-step{r['step']:09d}.pt" for r in best])
    for r in best:
        state = checkpoint.load(str(run_dir / "checkpoints" / f"best-step{r['step']:09d}.pt"))
        assert state["step"] == r["step"] and state["evals"][-1]["val_top1"] == r["val_top1"]
    assert checkpoint.load(str(run_dir / "checkpoints" / "epoch0002.pt"))["step"] == 6
    last, final = checkpoint.load(str(run_dir / "checkpoints" / "last.pt")), checkpoint.load(
        str(run_dir / "checkpoints" / "epoch0004.pt"))
    assert all(torch.equal(x, final["model"][k]) for k, x in last["model"].items())
    capsys.readouterr()
    assert cli.main(["eval", str(run_dir), "--checkpoint", "best"]) == 0
    out = capsys.readouterr().out
    assert f"at step {best[0]['step']}" in out and f"{100 * best[0]['val_top1']:.2f}%" in out
    assert cli.main(["eval", str(run_dir), "--checkpoint", "nope.pt"]) == 2


@pytest.mark.slow
def test_ema_half_life_in_images_follows_each_stages_batch_with_warmup_and_resumes_exactly(tmp_path):
    """``train.ema: "40 samples"``: the decay of a step of b images is 0.5 ** (b / 40) -- stage 0's
    batches of 16 and stage 1's of 32 average over the same images -- capped by the warmup's
    (1 + s) / (10 + s); the EMA follows that recurrence and resumes bit for bit."""
    raw = {**TINY, "train": {**TINY["train"], "ema": "40 samples", "ema_warmup": True}}
    setup = parts.build_setup(recipe_from_dict(raw))
    t = setup.timeline
    expect = [min(0.5 ** (b / 40), (1 + s) / (10 + s)) for s, b in enumerate(t.samples)]
    assert t.ema_decay == expect and t.samples[0] == 16 and t.samples[-1] == 32
    trainer = train.Trainer(setup, run_dir="")
    ema, s = None, 0
    for e in range(t.epoch[-1] + 1):  # every epoch of both stages, as the plan lays them out
        for x, y in trainer.loader(t.stage[t.epoch_starts[e]], e):
            assert len(y) == t.samples[s]
            trainer.train_step(trainer.parts.normalize(x), y)
            params = [p.detach().clone() for p in trainer.parts.model.parameters()]
            ema = params if ema is None else [expect[s] * e + (1 - expect[s]) * p for e, p in zip(ema, params)]
            s += 1
    for e, p in zip(ema, trainer.parts.ema.module.parameters()):
        torch.testing.assert_close(e, p, rtol=1e-5, atol=1e-6)
    full, final = run(raw, str(tmp_path / "full"))
    run(raw, str(tmp_path / "part"), stop_at=7)
    resumed, _ = run(raw, str(tmp_path / "part"), resume=True)
    for (name, x), (_, y) in zip(full.parts.ema.state_dict().items(), resumed.parts.ema.state_dict().items()):
        assert torch.equal(x, y), name
    assert "raw_val_top1" in final and "val_top1" in final

