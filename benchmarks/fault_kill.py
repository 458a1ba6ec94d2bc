"""SIGKILL a training run at random moments, resume it after every kill, and check that it ends with
weights (and metrics rows) bitwise equal to a run never interrupted.

    .venv/bin/python benchmarks/fault_kill.py --kills 30 --seed 1          # about 4 s per kill on 2 cores
    .venv/bin/python benchmarks/fault_kill.py --kills 10 --images          # JPEG folder, loader workers

Kills come in four kinds, drawn with a seeded RNG:
  early  as soon as the run directory has its recipe.yaml (usually before the first checkpoint);
  step   after 1-4 more metrics rows, plus 0-0.3 s (anywhere in a step, a log write or a checkpoint);
  write  inside a checkpoint write: the child's os.fsync of a checkpoint's temporary file is made to
         pause (a test hook in this script's child command, not in cadence), and the kill lands there;
  term   SIGTERM to the child's whole process group (what scancel, systemd and timeout send), after
         1-4 more rows: the run must exit 143 with a checkpoint of its last step (with --images, its
         DataLoader workers get the signal too).
Every kill but ``term`` is a SIGKILL.
After every kill the last checkpoint, if any, must load with weights_only=True. tests/test_faults.py
runs a short version of this.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time

import torch
import yaml

RECIPE = {
    "name": "kill",
    "seed": 5,
    "data": {"source": "synthetic", "samples": 96, "val_samples": 32, "image_size": 16, "num_classes": 4},
    "model": {"arch": "fastnet", "width": 8},
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"kind": "one_cycle", "progress": "samples", "pct_start": 0.3, "momentum": [0.95, 0.85]},
    "stages": [{"epochs": 2, "resolution": 12, "batch_size": 16, "data_fraction": 0.5},  # 3 steps/epoch
               {"epochs": 2, "resolution": 16, "batch_size": 32}],  # 3 steps/epoch
    "train": {"device": "cpu", "eval_every": "epoch", "checkpoint_every": 1},
}

# The child's command line: cadence's CLI, with os.fsync of a checkpoint's temporary file slowed down
# when FAULT_KILL_MARKS names a folder (a marker file there says "inside a checkpoint write now").
CHILD = """
import os, sys, time
marks = os.environ.get("FAULT_KILL_MARKS")
if marks:
    real_fsync = os.fsync
    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(name).startswith(".tmp-") and name.endswith(".pt"):
            open(os.path.join(marks, str(time.time_ns())), "w").close()
            time.sleep(0.5)
        real_fsync(fd)
    os.fsync = fsync
from cadence.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _wait(cond, child: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Poll ``cond`` until true (True), or until the child exits or time runs out (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def command(recipe: str, run_dir: str) -> list[str]:
    """``cadence train`` for ``run_dir``: a new run, or ``--resume`` once its recipe.yaml exists."""
    if os.path.exists(os.path.join(run_dir, "recipe.yaml")):
        return ["train", "--resume", run_dir, "--quiet"]
    return ["train", recipe, "--out", run_dir, "--quiet"]


def kill_and_resume(recipe: str, run_dir: str, kinds: list[str], seed: int = 0, say=print) -> list[dict]:
    """Start or resume the run once per entry of ``kinds`` and SIGKILL it there; then resume it to the
    end. Returns one record per kill: kind, checkpoint step after it, leftover temporary files."""
    rng = random.Random(seed)
    marks = os.path.join(os.path.dirname(os.path.abspath(run_dir)), "fault-marks")
    os.makedirs(marks, exist_ok=True)
    records = []
    for i, kind in enumerate(kinds):
        env = dict(os.environ, **({"FAULT_KILL_MARKS": marks} if kind == "write" else {}))
        metrics = os.path.join(run_dir, "metrics.jsonl")
        rows, n_marks = _count_lines(metrics), len(os.listdir(marks))
        more, pause = rng.randint(1, 4), rng.uniform(0.0, 0.3)
        child = subprocess.Popen([sys.executable, "-c", CHILD, *command(recipe, run_dir)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        if kind == "early":
            hit = _wait(lambda: os.path.exists(os.path.join(run_dir, "recipe.yaml")), child)
        elif kind in ("step", "term"):
            hit = _wait(lambda: _count_lines(metrics) >= rows + more, child)
            time.sleep(pause)
        else:
            hit = _wait(lambda: len(os.listdir(marks)) > n_marks, child)
        if kind == "term":
            try:
                os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:  # it had ended
                pass
        else:
            child.kill()
        _, err = child.communicate()
        expected = (143, 0) if kind == "term" else (-9, 0)
        if child.returncode not in expected:
            raise RuntimeError(f"kill {i} ({kind}): exit {child.returncode}, expected one of {expected}: {err}")
        folder = os.path.join(run_dir, "checkpoints")
        tmp = sorted(f for f in os.listdir(folder) if f.startswith(".tmp-")) if os.path.isdir(folder) else []
        last = os.path.join(folder, "last.pt")
        step = torch.load(last, weights_only=True)["step"] if os.path.exists(last) else None
        records.append({"kind": kind, "hit": hit, "checkpoint_step": step, "tmp_files": tmp})
        say(f"kill {i + 1}/{len(kinds)} ({kind}{'' if hit else ', child ended first'}): "
            f"checkpoint at step {step}, {len(tmp)} temporary file(s) left")
    final = subprocess.run([sys.executable, "-m", "cadence", *command(recipe, run_dir)], capture_output=True,
                           text=True)
    if final.returncode != 0:
        raise RuntimeError(f"the final resume failed (exit {final.returncode}): {final.stderr}")
    return records


def kinds_for(kills: int, seed: int) -> list[str]:
    """``early`` first, then step, write and term kills in a seeded order (write and term kills at
    least a quarter each)."""
    rng = random.Random(seed)
    quarter = max(1, (kills - 1) // 4)
    rest = ["write"] * quarter + ["term"] * quarter + ["step"] * max(0, kills - 1 - 2 * quarter)
    rng.shuffle(rest)
    return (["early"] + rest)[:kills]


def image_folder(root: str, classes: int = 4, per_class: int = 24, size: int = 24) -> None:
    """A small JPEG folder (train/ and val/) of class-coloured noise, for runs with loader workers."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(n):
                base = np.full((size, size, 3), 40 + 50 * c, dtype=np.int16)
                pixels = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, f"c{c}", f"{i}.jpg"), quality=90)


def different_tensors(a: str, b: str) -> list[str]:
    """Names of the model tensors that differ between two runs' last checkpoints."""
    sa = torch.load(os.path.join(a, "checkpoints", "last.pt"), weights_only=True)
    sb = torch.load(os.path.join(b, "checkpoints", "last.pt"), weights_only=True)
    return [k for k in sa["model"] if not torch.equal(sa["model"][k], sb["model"][k])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage of the tiny recipe")
    parser.add_argument("--out", default="/tmp/cadence-fault-kill")
    parser.add_argument("--images", action="store_true", help="train from a JPEG folder with a DataLoader worker")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    raw = dict(RECIPE, stages=[dict(s, epochs=args.epochs) for s in RECIPE["stages"]])
    if args.images:
        image_folder(os.path.join(args.out, "images"))
        raw["data"] = {"source": "imagefolder", "root": os.path.join(args.out, "images"), "num_workers": 1}
    recipe = os.path.join(args.out, "recipe.yaml")
    with open(recipe, "w") as f:
        yaml.safe_dump(raw, f)
    reference = os.path.join(args.out, "reference")
    subprocess.run([sys.executable, "-m", "cadence", "train", recipe, "--out", reference, "--quiet"], check=True,
                   capture_output=True)
    killed = os.path.join(args.out, "killed")
    records = kill_and_resume(recipe, killed, kinds_for(args.kills, args.seed), args.seed)
    diff = different_tensors(reference, killed)
    writes = sum(1 for r in records if r["tmp_files"])
    print(f"{len(records)} kills ({writes} inside a checkpoint write): "
          + ("final weights bitwise equal to the uninterrupted run" if not diff else f"DIFFERENT: {diff}"))
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
