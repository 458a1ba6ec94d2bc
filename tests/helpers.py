"""What more than one test module uses: the repository root, the tiny recipes, and helpers that write,
train, read and compare runs or make image folders. Test modules import from here, never from each
other. (tests/ is on sys.path as the other test modules are: pytest puts the folder of its rootdir
conftest there; conftest.py has pytest rewrite the asserts in this module too.)"""

from __future__ import annotations

import os
import pathlib
import shutil

import filelock  # torch's own dependency
import torch
import yaml
from PIL import Image

from cadence import parts, rundir, train
from cadence.recipe import recipe_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"source": "synthetic", "samples": 96, "val_samples": 32, "image_size": 16, "num_classes": 4},
    "model": {"arch": "fastnet", "width": 8},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4,
                  "reference_batch_size": 16, "lr_scaling": "linear"},
    "schedule": {"kind": "one_cycle", "scope": "global", "progress": "samples", "pct_start": 0.3,
                 "momentum": [0.95, 0.85]},
    "stages": [{"epochs": 2, "resolution": 12, "batch_size": 16, "data_fraction": 0.5},  # 3 steps/epoch
               {"epochs": 2, "resolution": 16, "batch_size": 32}],  # 3 steps/epoch
    "train": {"device": "cpu", "eval_every": "epoch", "checkpoint_every": 2},
}

# A valid recipe that is only planned, never trained (recipe errors and the recipe fuzzer start from it).
GOOD = {
    "name": "errors",
    "data": {"source": "synthetic", "train_samples": 1000},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "schedule": {"kind": "one_cycle", "scope": "global", "progress": "samples", "pct_start": 0.3,
                 "momentum": [0.95, 0.85]},
    "stages": [{"epochs": 2, "resolution": 32, "batch_size": 10},
               {"epochs": 2, "resolution": 48, "batch_size": 20, "data_fraction": 0.5}],
}


# -- runs ------------------------------------------------------------------------------------------


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
    """A folder ``make(folder)`` fills, made once per test session. Under pytest-xdist the workers
    share it (in the session's temporary folder, the parent of each worker's): the first worker to need
    it makes it holding a lock, the others wait and use it. (A fixture alone, whatever its scope, is set
    up once per worker, or more: a module fixture is torn down when a worker runs another module.)"""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent
    folder, done = shared / name, shared / f"{name}.made"
    with filelock.FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed to make it left this
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


def benchmark(name: str):
    """A script of benchmarks/ (``vs_airbench``, ``fault_kill``) imported as a module, to test its parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_recipe(tmp_path, raw: dict, name: str = "recipe.yaml") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def run(raw: dict, run_dir: str, stop_at: int | None = None, resume: bool = False):
    setup = parts.build_setup(recipe_from_dict(raw))
    trainer, final = train.train(setup, run_dir, resume=resume, stop_at=stop_at, progress=False)
    return trainer, final


def train_rows(run_dir: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "cpu", "wall")} for r in rundir.read_metrics(run_dir)]


def assert_same_state(a: train.Trainer, b: train.Trainer) -> None:
    for (name, x), (_, y) in zip(a.parts.model.state_dict().items(), b.parts.model.state_dict().items()):
        assert torch.equal(x, y), name
    sa, sb = a.parts.optimizer.state_dict(), b.parts.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name, x in sa["state"][k].items():
            assert torch.equal(x, sb["state"][k][name]), (k, name)


def assert_same_run(a, b, steps: int) -> None:
    """Two run folders ended at ``steps`` with the same weights, bit for bit, and the same metrics."""
    ca = torch.load(os.path.join(a, "checkpoints", "last.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "checkpoints", "last.pt"), weights_only=False)
    assert ca["step"] == cb["step"] == steps
    for name, x in ca["model"].items():
        assert torch.equal(x, cb["model"][name]), name
    assert train_rows(str(a)) == train_rows(str(b))


def assert_plan_refuses(tmp_path, capsys, where: str, value, says: str) -> None:
    """``cadence plan GOOD --set where=value`` exits 2 with one line naming the file, the field and
    ``says``."""
    from cadence.cli import main as cadence_main

    path = write_recipe(tmp_path, GOOD)
    assert cadence_main(["plan", path, "--set", f"{where}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and path in err and where in err and says in err, err


# -- image files -----------------------------------------------------------------------------------


def photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth, photo-like RGB image (JPEG-friendly, not noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 5, 5, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    x = (x.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(x)


def image_folder(root, classes: int = 3, per_class: int = 6, size=(48, 36), fmt="JPEG"):
    seed = sum(map(ord, str(root.name)))  # train/ and val/ hold different images
    for c in range(classes):
        os.makedirs(root / f"c{c}", exist_ok=True)
        for i in range(per_class):
            photo(10_000 * seed + 100 * c + i, *size).save(root / f"c{c}" / f"{i}.jpg", format=fmt, quality=90)
    return root


# -- signals ---------------------------------------------------------------------------------------

# TINY for 36 steps: long enough to be signalled mid-run
LONG_TINY = {**TINY, "stages": [{"epochs": 6, "resolution": 12, "batch_size": 16, "data_fraction": 0.5},
                                {"epochs": 6, "resolution": 16, "batch_size": 32}]}


def signal_mid_run(args: list[str], metrics, sig: int, rows: int = 5, group: bool = False):
    """Start ``cadence ARGS`` in a subprocess, send ``sig`` once ``metrics`` has ``rows`` lines (to its
    whole process group with ``group``, as scancel does); returns ``(exit code, stderr)``."""
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "cadence", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        time.sleep(0.05)
    if group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err
