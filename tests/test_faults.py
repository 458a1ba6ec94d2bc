"""Faults and bad input: kills at any moment, a full disk, divergence, a recipe changed between
restarts, export. Nothing lost, nothing cryptic."""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest
import torch
import yaml

from cadence import cli, errors, files, parts, plan, rundir, train
from cadence.recipe import recipe_from_dict
from helpers import ROOT, TINY, assert_same_state, benchmark, run, train_rows, write_recipe


def last_checkpoint(run_dir) -> dict:
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), weights_only=True)


def leftovers(run_dir) -> list[str]:
    return [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if f.startswith(".tmp-")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """TINY trained without interruption: (run directory, trainer, final evaluation)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer, final = run(TINY, str(out))
    return out, trainer, final


# -- kills -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_at_random_moments_and_resumed_ends_bitwise_equal(tmp_path, reference):
    """SIGKILL before the first checkpoint, inside a checkpoint write and mid-step; resume each time.
    (benchmarks/fault_kill.py --kills N is the long version.)"""
    fk = benchmark("fault_kill")
    raw = TINY | {"train": TINY["train"] | {"checkpoint_every": 1}}  # how often it saves changes no number
    recipe, killed = write_recipe(tmp_path, raw), str(tmp_path / "killed")
    records = fk.kill_and_resume(recipe, killed, ["early", "write", "step"], seed=8, say=lambda *a: None)
    assert [r["hit"] for r in records] == [True, True, True]
    assert len(records[1]["tmp_files"]) == 1  # killed between writing the new checkpoint and renaming it
    assert leftovers(killed) == []  # the resume removed it
    assert fk.different_tensors(str(reference[0]), killed) == []
    assert last_checkpoint(killed)["step"] == 12
    assert train_rows(killed) == train_rows(str(reference[0]))


# -- the disk -------------------------------------------------------------------------------------


def _fail_checkpoint_writes(monkeypatch, after: int, where: str, code: int) -> None:
    """From the ``after``-th checkpoint write on, fail its fsync or its mkstemp with ``code``."""
    seen = {"n": 0}
    real_fsync, real_mkstemp = os.fsync, files.tempfile.mkstemp
    failure = OSError(code, os.strerror(code))

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pt"):
            seen["n"] += 1
            if where == "fsync" and seen["n"] > after:
                raise failure
        real_fsync(fd)

    def mkstemp(*args, suffix="", **kwargs):
        if where == "mkstemp" and suffix == ".pt" and seen["n"] >= after:
            raise failure
        return real_mkstemp(*args, suffix=suffix, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)


@pytest.mark.slow
@pytest.mark.parametrize("where, code", [("fsync", errno.ENOSPC), ("mkstemp", errno.EACCES)],
                         ids=["disk-full", "no-permission"])
def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last(tmp_path, capsys, monkeypatch, reference,
                                                                  where, code):
    recipe, run_dir = write_recipe(tmp_path, TINY), tmp_path / "r"
    _fail_checkpoint_writes(monkeypatch, after=2, where=where, code=code)  # saves at steps 2, 3; 4 fails
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in err[1]  # the header line, then the error
    assert os.strerror(code) in err[1] and "last.pt" in err[1] and f"--resume {run_dir}" in err[1]
    assert last_checkpoint(run_dir)["step"] == 3 and leftovers(run_dir) == []
    if where == "fsync":  # nothing lost: once there is room again the run ends as if never stopped
        monkeypatch.undo()
        assert cli.main(["train", "--resume", str(run_dir), "--quiet"]) == 0
        assert_same_state(reference[1], train.Trainer.resume(parts.build_setup(recipe_from_dict(TINY)), str(run_dir)))


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB file system (tmpfs), for a disk that fills and a folder that is read-only even to
    root; skipped where mounting is not allowed (not root, or a container without the capability)."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


def _fill(folder) -> str:
    """Fill the file system of ``folder`` to the last byte; returns the filler's path."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return path


@pytest.mark.slow
def test_a_really_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes_exactly(small_disk, capsys, reference):
    """Not an injected error: the run's own file system fills up while it trains. Whatever write
    meets the full disk first (a metrics row, the checkpoint), it is one line naming the file and "No
    space left on device", exit 1; last.pt is the last whole one; with room again, --resume ends the
    run bitwise as if nothing had happened."""
    recipe, run_dir = write_recipe(small_disk.parent, TINY), small_disk / "r"
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet", "--max-steps", "2"]) == 0
    filler = _fill(small_disk)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "".join(err) and "No space left on device" in err[-1] and str(run_dir) in err[-1], err
    assert last_checkpoint(run_dir)["step"] == 2 and leftovers(run_dir) == []
    os.remove(filler)
    assert cli.main(["train", "--resume", str(run_dir), "--quiet"]) == 0
    assert_same_state(reference[1], train.Trainer.resume(parts.build_setup(recipe_from_dict(TINY)), str(run_dir)))
    assert train_rows(str(run_dir)) == train_rows(str(reference[0]))


@pytest.mark.slow
def test_a_read_only_file_system_is_one_line_for_resume_and_report_even_as_root(small_disk, capsys):
    """A folder read-only by its file system (EROFS), which root cannot write either: --resume and
    report each say so in one line (exit 1) and change nothing."""
    import subprocess

    recipe, run_dir = write_recipe(small_disk.parent, TINY), small_disk / "r"
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet", "--max-steps", "2"]) == 0
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for command in (["train", "--resume", str(run_dir), "--quiet"], ["report", str(run_dir)]):
        capsys.readouterr()
        assert cli.main(command) == 1, command
        err = capsys.readouterr().err.strip().splitlines()
        assert "Read-only file system" in err[-1] and "Traceback" not in "".join(err), (command, err)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_run_directory_is_one_line(tmp_path, capsys):
    recipe, run_dir = write_recipe(tmp_path, TINY), tmp_path / "r"
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet", "--max-steps", "2"]) == 0
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    os.chmod(run_dir / "checkpoints", stat.S_IRUSR | stat.S_IXUSR)
    try:
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(run_dir), "--quiet"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert "Permission denied" in err[-1] and "Traceback" not in "".join(err)
    finally:
        os.chmod(run_dir / "checkpoints", stat.S_IRWXU)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_a_new_run_directory_that_cannot_be_made_is_bad_input(tmp_path, capsys):
    recipe, blocker = write_recipe(tmp_path, TINY), tmp_path / "a-file"
    blocker.write_text("not a folder")  # works as root too, unlike a read-only folder
    assert cli.main(["train", recipe, "--out", str(blocker / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and str(blocker / "r") in err[0] and "cannot create it" in err[0]
    assert blocker.read_text() == "not a folder"


# -- divergence -----------------------------------------------------------------------------------


def poison(monkeypatch, steps: set[int], checks: list | None = None) -> None:
    """NaN images at these global steps (so the loss is NaN); ``checks`` collects, for each poisoned
    step, whether model and optimizer state came out of it unchanged."""
    real = train.Trainer.train_step

    def train_step(self, x, y, guard=False, **kw):
        if not (guard and self.step in steps):
            return real(self, x, y, guard, **kw)
        before = ({k: v.clone() for k, v in self.parts.model.state_dict().items()},
                  {k: {n: t.clone() for n, t in s.items()} for k, s in self.parts.optimizer.state_dict()["state"].items()})
        loss = real(self, x * float("nan"), y, guard, **kw)
        if checks is not None:
            model, opt = before
            checks.append(all(torch.equal(v, self.parts.model.state_dict()[k]) for k, v in model.items())
                          and all(torch.equal(t, self.parts.optimizer.state_dict()["state"][k][n])
                                  for k, s in opt.items() for n, t in s.items()))
        return loss

    monkeypatch.setattr(train.Trainer, "train_step", train_step)


@pytest.mark.slow
def test_a_nonfinite_loss_stops_at_once_naming_step_stage_and_lr(tmp_path, capsys, monkeypatch):
    recipe, run_dir = write_recipe(tmp_path, TINY), tmp_path / "r"
    poison(monkeypatch, {7})
    assert cli.main(["train", recipe, "--out", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    lr = recipe_from_dict(TINY).timeline().lr[7]
    assert err[-1].startswith(f"cadence: error: loss is nan at step 7 (stage 1, lr {lr:.4g}); lower optimizer.lr")
    assert "train.on_nonfinite: skip" in err[-1] and f"last checkpoint in {run_dir} (step 6)" in err[-1]
    assert last_checkpoint(run_dir)["step"] == 6  # saved before the divergence, not after
    assert max(r["step"] for r in rundir.read_metrics(str(run_dir))) == 6


@pytest.mark.slow
def test_skip_mode_skips_the_update_counts_it_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    raw = TINY | {"train": TINY["train"] | {"on_nonfinite": "skip"}}
    checks: list[bool] = []
    poison(monkeypatch, {4, 7}, checks)
    recipe, straight = write_recipe(tmp_path, raw), tmp_path / "straight"
    assert cli.main(["train", recipe, "--out", str(straight), "--quiet"]) == 0
    assert "2 step(s) skipped for a non-finite loss" in capsys.readouterr().out
    assert checks == [True, True]  # weights, BatchNorm statistics and optimizer state untouched
    rows = [r for r in rundir.read_metrics(str(straight)) if "val_top1" not in r]
    timeline = recipe_from_dict(raw).timeline()
    assert [r["lr"] for r in rows] == timeline.lr  # the schedule kept going: every step at its planned LR
    assert [r["skipped"] for r in rows] == [0] * 4 + [1] * 3 + [2] * 5
    assert [r["step"] for r in rows if r["loss"] != r["loss"]] == [4, 7]
    assert last_checkpoint(straight)["evals"][-1]["skipped"] == 2
    run(raw, str(tmp_path / "part"), stop_at=5)
    resumed, _ = run(raw, str(tmp_path / "part"), resume=True)
    assert resumed.guard.skipped == 2
    assert_same_state(train.Trainer.resume(parts.build_setup(recipe_from_dict(raw)), str(straight)), resumed)


@pytest.mark.slow
def test_the_deferred_check_never_saves_a_diverged_state(tmp_path, monkeypatch):
    """On CUDA the loss is checked on the device and read at log steps and checkpoints (forced here)."""
    raw = TINY | {"train": TINY["train"] | {"log_every": 100}}
    poison(monkeypatch, {3})
    trainer = train.Trainer.create(parts.build_setup(recipe_from_dict(raw)), str(tmp_path / "r"))
    trainer.guard.deferred = True
    with pytest.raises(errors.Diverged, match=r"loss is not finite at step 3 \(stage 0, lr "):
        trainer.fit(progress=False)
    assert last_checkpoint(tmp_path / "r")["step"] == 3  # the save at step 4 found it first


# -- a recipe changed between restarts ------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """TINY stopped after step 5 (80 images seen); tests resume copies of it."""
    folder = tmp_path_factory.mktemp("stopped")
    recipe = write_recipe(folder, TINY)
    assert cli.main(["train", recipe, "--out", str(folder / "run"), "--quiet", "--max-steps", "5"]) == 0
    return recipe, folder / "run"


def _copy(stopped, tmp_path):
    recipe, run_dir = stopped
    shutil.copytree(run_dir, tmp_path / "run")
    return recipe, tmp_path / "run"


def test_continue_at_keeps_images_seen_or_the_fraction_of_training():
    old = recipe_from_dict(TINY).timeline()  # 12 steps; images seen after each: 16, 32, ... 96, 128, ... 288
    smaller_batches = recipe_from_dict(TINY | {"stages": [TINY["stages"][0] | {"batch_size": 8}, TINY["stages"][1]]})
    longer = recipe_from_dict(TINY | {"stages": [TINY["stages"][0], TINY["stages"][1] | {"epochs": 4}]})
    assert plan.continue_at(old, 5, smaller_batches.timeline(), "keep-position") == 10  # 80 images: 10 x 8
    assert plan.continue_at(old, 5, longer.timeline(), "keep-position") == 5
    assert plan.continue_at(old, 5, longer.timeline(), "stretch") == 7  # 80/288 of 480 = 133 images: 6 x 16 + 32
    assert plan.continue_at(old, 12, longer.timeline(), "stretch") == 18  # the end stays the end
    assert plan.continue_at(old, 0, longer.timeline(), "stretch") == 0


@pytest.mark.slow
@pytest.mark.pictures
def test_a_changed_schedule_is_refused_listing_every_difference(tmp_path, capsys, stopped):
    recipe, run_dir = _copy(stopped, tmp_path)
    before = {f: (run_dir / f).read_bytes() for f in ("recipe.yaml", "checkpoints/last.pt")}
    code = cli.main(["train", recipe, "--resume", str(run_dir), "--quiet", "--set", "optimizer.lr=0.1",
                     "--set", "stages.1.epochs=3", "--set", "train.log_every=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--on-recipe-change keep-position" in err[0] and "recipe_change.png" in err[0]
    assert err[1:] == ["  optimizer.lr: 0.05 -> 0.1   [schedule]", "  stages.1.epochs: 2 -> 3   [schedule]",
                       "  train.log_every: 1 -> 2   [free]"]
    assert os.path.getsize(run_dir / "recipe_change.png") > 0
    assert {f: (run_dir / f).read_bytes() for f in before} == before
    code = cli.main(["train", recipe, "--resume", str(run_dir), "--quiet", "--on-recipe-change", "stretch",
                     "--set", "model.width=16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "start a new run" in err[0] and err[1:] == ["  model.width: 8 -> 16   [model]"]


@pytest.mark.slow
@pytest.mark.parametrize("policy, change, at", [
    ("keep-position", ["stages.0.batch_size=8"], 10),
    ("stretch", ["stages.1.epochs=4"], 7),
])
@pytest.mark.pictures
def test_a_policy_continues_on_the_new_timeline(tmp_path, capsys, stopped, policy, change, at):
    recipe, run_dir = _copy(stopped, tmp_path)
    sets = [a for c in change for a in ("--set", c)]
    assert cli.main(["train", recipe, "--resume", str(run_dir), "--quiet", "--on-recipe-change", policy, *sets]) == 0
    new_raw = yaml.safe_load(open(run_dir / "recipe.yaml"))
    new = recipe_from_dict(new_raw).timeline()
    assert yaml.safe_load(open(run_dir / "recipe.prev-1.yaml")) == yaml.safe_load(open(recipe))
    assert new_raw != yaml.safe_load(open(recipe)) and last_checkpoint(run_dir)["recipe"] == new_raw
    rows = [r for r in rundir.read_metrics(str(run_dir)) if "val_top1" not in r]
    assert [r["step"] for r in rows] == list(range(5)) + list(range(at, len(new)))
    after = rows[5:]
    assert [r["lr"] for r in after] == new.lr[at:]  # the LR follows the new curve from the resume step
    assert [(r["epoch"], r["samples_seen"]) for r in after] == list(zip(new.epoch, new.samples_seen))[at:]
    assert last_checkpoint(run_dir)["step"] == len(new)
    assert os.path.getsize(run_dir / "recipe_change.png") > 0


@pytest.mark.slow
def test_changes_that_move_nothing_are_accepted_and_recorded(tmp_path, stopped, reference):
    recipe, run_dir = _copy(stopped, tmp_path)
    (run_dir / ".tmp-recipe.yaml").write_text("name: half")  # as a kill while writing recipe.yaml leaves it
    assert cli.main(["train", recipe, "--resume", str(run_dir), "--quiet", "--set", "train.log_every=2",
                     "--set", "train.checkpoint_every=3", "--set", "data.num_workers=0"]) == 0
    assert yaml.safe_load(open(run_dir / "recipe.yaml"))["train"]["log_every"] == 2
    assert (run_dir / "recipe.prev-1.yaml").exists() and not (run_dir / "recipe_change.png").exists()
    assert not (run_dir / ".tmp-recipe.yaml").exists()
    assert_same_state(reference[1], train.Trainer.resume(parts.build_setup(recipe_from_dict(TINY)), str(run_dir)))


# -- export ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_writes_the_weights_as_safetensors(tmp_path, capsys, reference):
    from safetensors import safe_open
    from safetensors.torch import load_file

    run_dir, _, final = reference
    out = tmp_path / "tiny.safetensors"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    weights, saved = load_file(out), last_checkpoint(run_dir)["model"]
    assert weights.keys() == saved.keys() and all(torch.equal(weights[k], saved[k]) for k in saved)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert (meta["name"], meta["arch"], meta["step"]) == ("tiny", "fastnet", "12")
    assert float(meta["val_top1"]) == final["val_top1"] and yaml.safe_load(meta["recipe"]) == TINY
    assert cli.main(["export", str(run_dir)]) == 0 and (run_dir / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_export_of_a_folder_without_a_run_is_one_line(tmp_path, capsys, where):
    folder = tmp_path / "nothing"
    if where == "empty":
        folder.mkdir()
    assert cli.main(["export", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0]


@pytest.mark.slow
def test_ctrl_c_at_any_moment_of_start_up_is_one_line_exit_130_and_no_folder(tmp_path):
    """SIGINT while the command is still importing (torch, the data, the model) or building the run,
    from the moment ``main`` runs: ``import cadence.cli`` loads only the standard library (the
    package's names are imported lazily; ~30 ms here), so that moment comes before any of cadence's
    imports, and every moment after it gives the same one line and exit 130 (143 for SIGTERM). A
    signal inside an import is honoured when the import is done: interrupted, a library (numpy under
    scipy) was left half-imported and the run died of a RecursionError or ignored the Ctrl-C. (Before
    ``main`` is Python's own start-up, whose Ctrl-C is Python's traceback.) ``main`` is running once
    the process catches SIGTERM, which it starts to do just before its handlers: the test waits."""
    import signal
    import subprocess
    import sys
    import time

    def main_running(pid: int) -> bool:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        return bool(caught >> (signal.SIGTERM - 1) & 1)

    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the signal mask from /proc")
    out = tmp_path / "run"
    for delay, sig in [(d, signal.SIGINT) for d in (0.0, 0.1, 0.3, 0.6, 1.0)] + [(0.5, signal.SIGTERM)]:
        p = subprocess.Popen([sys.executable, "-m", "cadence", "train", os.path.join(ROOT, "recipes", "demo.yaml"),
                              "--out", str(out), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not main_running(p.pid):
            time.sleep(0.002)
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        said = [line for line in err.strip().splitlines() if not line.startswith("demo: ")]  # the run's header
        assert p.returncode == 128 + sig and len(said) == 1 and "Traceback" not in err, (delay, err)
        assert not out.exists(), delay
