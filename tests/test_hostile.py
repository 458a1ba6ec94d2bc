"""Hostile input and cluster faults (issue: nothing lost, nothing cryptic): each class of failure is
built here and its outcome asserted -- one line and exit 2 for bad input, a refusal for a second
writer, a checkpoint and 143 for SIGTERM to the whole process group."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from cadence import cli, rundir
from helpers import TINY, image_folder, signal_mid_run, write_recipe


def _one_line(capsys, *words: str) -> str:
    """The one ``cadence:`` line on stderr (a run's header line may precede it), holding ``words``."""
    text = capsys.readouterr().err
    err = [line for line in text.strip().splitlines() if line.startswith("cadence:")]
    assert len(err) == 1 and "Traceback" not in text, text
    for w in words:
        assert w in err[0], err[0]
    return err[0]


@pytest.fixture
def stopped(tmp_path):
    """TINY stopped after step 5 (checkpoints at 2, 3 (epoch end), 4): (recipe file, run folder)."""
    recipe, run = write_recipe(tmp_path, TINY), tmp_path / "run"
    assert cli.main(["train", recipe, "--out", str(run), "--quiet", "--max-steps", "5"]) == 0
    return recipe, run


# -- data loss or silent corruption ---------------------------------------------------------------


@pytest.mark.slow  # trains TINY first
def test_a_checkpoint_with_one_flipped_byte_is_refused_by_resume_eval_and_export(stopped, capsys):
    _, run = stopped
    last = run / "checkpoints" / "last.pt"
    weights = torch.load(last, weights_only=True)["model"]["features.0.weight"]
    raw = bytearray(last.read_bytes())
    at = raw.find(weights.numpy().tobytes())
    assert at > 0
    raw[at + 5] ^= 0x10  # one bit of one weight
    last.write_bytes(bytes(raw))
    capsys.readouterr()
    for args in (["train", "--resume", str(run), "--quiet"], ["eval", str(run)], ["export", str(run)]):
        assert cli.main(args) == 2
        _one_line(capsys, str(last), "damaged", "checksum")
    assert not (run / "model.safetensors").exists()


@pytest.mark.slow  # trains TINY first
def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holders_lock_is_gone(stopped, capsys):
    recipe, run = stopped
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cadence.rundir import RunDir; "
                               f"RunDir({str(run)!r}).lock(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    before = (run / "metrics.jsonl").read_bytes()
    for args in (["train", "--resume", str(run), "--quiet"], ["train", recipe, "--out", str(run), "--quiet"]):
        assert cli.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[0]
    assert f"pid {holder.pid} on host" in line and "one process at a time" in line
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing written by the refused process
    holder.kill()  # SIGKILL: no clean-up ran, the kernel dropped the lock
    holder.wait()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0


@pytest.mark.slow  # trains TINY first
@pytest.mark.parametrize("how", ["deleted", "dangling link"])
def test_a_run_that_lost_its_checkpoint_is_refused_not_restarted(stopped, capsys, how):
    recipe, run = stopped
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    if how == "dangling link":
        last.symlink_to(run / "nowhere.pt")
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "recipe.yaml")}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 2
    _one_line(capsys, str(run))
    assert cli.main(["train", recipe, "--out", str(run), "--quiet"]) == 2
    _one_line(capsys, str(run))
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.slow  # trains TINY first
def test_a_run_killed_before_its_first_checkpoint_still_starts_again(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(TINY))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "stopped before its first checkpoint" in capsys.readouterr().err


@pytest.mark.slow  # trains TINY first
@pytest.mark.parametrize("kind", ["symlink", "fifo", "folder"])
def test_export_writes_only_regular_files(stopped, tmp_path, capsys, kind):
    _, run = stopped
    target, out = tmp_path / "precious.txt", tmp_path / "out.safetensors"
    target.write_text("keep me")
    {"symlink": lambda: out.symlink_to(target), "fifo": lambda: os.mkfifo(out), "folder": out.mkdir}[kind]()
    capsys.readouterr()
    assert cli.main(["export", str(run), "--out", str(out)]) == 2
    _one_line(capsys, "--out", "regular file")
    assert target.read_text() == "keep me" and (out.is_symlink() or out.is_dir() or out.is_fifo())


def test_prepare_refuses_an_output_inside_the_data_it_reads(tmp_path, capsys):
    image_folder(tmp_path / "d" / "train", classes=2, per_class=2)
    image_folder(tmp_path / "d" / "val", classes=2, per_class=1)
    recipe = write_recipe(tmp_path, {**TINY, "data": {"source": "imagefolder", "root": str(tmp_path / "d")}})
    assert cli.main(["prepare", recipe, "--out", str(tmp_path / "d" / "train" / "copy"), "--quiet"]) == 2
    _one_line(capsys, "--out", "inside the data set")
    assert not (tmp_path / "d" / "train" / "copy").exists()
    assert cli.main(["prepare", recipe, "--out", str(tmp_path / "copy"), "--workers", "-3", "--quiet"]) == 2
    _one_line(capsys, "--workers")


# -- faults on real clusters ----------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_exits_143(tmp_path):
    """What scancel, systemd and timeout do: SIGTERM to every process of the job, DataLoader workers
    included. The workers leave the signal to the main process, which finishes its step and saves."""
    image_folder(tmp_path / "d" / "train", classes=2, per_class=24, size=(40, 32))
    image_folder(tmp_path / "d" / "val", classes=2, per_class=2, size=(40, 32))
    raw = {**TINY, "data": {"source": "imagefolder", "root": str(tmp_path / "d"), "num_workers": 1},
           "stages": [{"epochs": 20, "resolution": 16, "batch_size": 4}], "train": {"device": "cpu"}}
    recipe, run = write_recipe(tmp_path, raw), tmp_path / "run"
    code, err = signal_mid_run(["train", recipe, "--out", str(run), "--quiet"], run / "metrics.jsonl", signal.SIGTERM,
                               rows=3, group=True)
    assert code == 143, err
    assert "SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert saved >= 3 and max(r["step"] for r in rundir.read_metrics(run)) == saved - 1


@pytest.mark.slow  # trains TINY first
def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file(stopped, capsys, monkeypatch):
    """The state is serialised in memory, so a full disk fails in a plain write (ENOSPC), not in
    torch's zip writer; the previous checkpoint stays whole."""
    import errno

    from cadence import files

    _, run = stopped
    before = (run / "checkpoints" / "last.pt").read_bytes()
    real = files.write_atomic

    def full(path, write, **kw):
        if str(path).endswith(".pt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, write, **kw)

    monkeypatch.setattr(files, "write_atomic", full)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 1
    _one_line(capsys, "last.pt", "No space left on device", "the last checkpoint is intact")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


# -- bad input: one line, exit 2 ------------------------------------------------------------------


@pytest.mark.parametrize("content", [{}, [1, 2], torch.ones(3), {"model": {}, "step": 3},
                                     "absurd step", "nan weights"])
@pytest.mark.slow  # trains TINY first
def test_files_that_load_but_are_not_cadence_checkpoints_are_one_line(stopped, capsys, content):
    _, run = stopped
    last = run / "checkpoints" / "last.pt"
    if isinstance(content, str):
        state = torch.load(last, weights_only=True)
        state.pop("checksum")
        if content == "absurd step":
            state["step"] = 10**12
        else:
            state["model"]["features.0.weight"][0] = float("nan")
        content = state
    torch.save(content, last)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 2
    _one_line(capsys, "last.pt")


@pytest.mark.slow  # trains TINY first
def test_a_malicious_pickle_names_the_blocked_global_and_never_suggests_turning_the_check_off(stopped,
                                                                                             capsys):
    _, run = stopped

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": Evil()}, run / "checkpoints" / "last.pt")
    capsys.readouterr()
    assert cli.main(["eval", str(run)]) == 2
    line = _one_line(capsys, "system", "code, not data")
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


@pytest.mark.slow  # trains TINY first
def test_a_damaged_metrics_line_is_one_line_naming_file_and_line(stopped, capsys):
    _, run = stopped
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][: len(lines[1]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    for args in (["train", "--resume", str(run), "--quiet"], ["report", str(run)]):
        assert cli.main(args) == 2
        _one_line(capsys, "metrics.jsonl", "line 2")


@pytest.mark.slow  # trains TINY first
def test_a_fifo_as_the_checkpoint_is_refused_without_hanging(stopped, capsys):
    _, run = stopped
    last = run / "checkpoints" / "last.pt"
    last.unlink()
    os.mkfifo(last)
    assert cli.main(["eval", str(run)]) == 2
    _one_line(capsys, "not a regular file")


def test_an_alias_bomb_is_reported_unexpanded_and_duplicate_keys_name_both_lines(tmp_path, capsys):
    bomb = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(  # 9**9 leaves once expanded
        f"&{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "seed"}) + f"seed: {bomb}\n")
    assert cli.main(["plan", str(path)]) == 2
    assert len(_one_line(capsys, "seed")) < 600
    path.write_text("name: a\nseed: 1\nname: b\n")
    assert cli.main(["plan", str(path)]) == 2
    _one_line(capsys, "name", "line 1", "line 3")
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert cli.main(["plan", str(path)]) == 2
    _one_line(capsys, "nested too deeply")


@pytest.mark.parametrize("field, value", [("name", "../escape"), ("name", "/abs/run"), ("seed", 2**64)])
def test_names_are_names_and_seeds_fit_torch(tmp_path, capsys, field, value):
    recipe = write_recipe(tmp_path, {**TINY, field: value})
    assert cli.main(["train", recipe, "--quiet", "--max-steps", "1"]) == 2
    _one_line(capsys, field)
    # where runs/../escape-<time> and /abs/run-<time> would have landed
    assert not glob.glob(os.path.join(os.getcwd(), "escape-*")) and not os.path.exists("/abs")


def test_plan_outputs_to_bad_paths_are_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    (tmp_path / "a-folder.png").mkdir()
    for flag, path in (("--csv", tmp_path / "missing" / "p.csv"), ("--plot", tmp_path / "a-folder.png")):
        capsys.readouterr()
        assert cli.main(["plan", recipe, flag, str(path)]) == 2
        _one_line(capsys, flag, "cannot write")


@pytest.mark.slow  # trains TINY first
def test_compare_counts_a_run_once_and_refuses_an_unfinished_one(stopped, capsys):
    recipe, run = stopped
    assert cli.main(["compare", str(run), str(run), "--out", str(run.parent / "c")]) == 2
    _one_line(capsys, "given twice")
    assert cli.main(["compare", recipe, recipe, "--out", str(run.parent / "c")]) == 2
    _one_line(capsys, "given twice")
    assert not (run.parent / "c").exists()
    assert cli.main(["compare", str(run), "--out", str(run.parent / "c")]) == 2
    _one_line(capsys, "not finished", "--resume")


def test_val_classes_that_train_lacks_are_named(tmp_path, capsys):
    image_folder(tmp_path / "d" / "train", classes=2, per_class=2)
    image_folder(tmp_path / "d" / "val", classes=3, per_class=1)
    recipe = write_recipe(tmp_path, {**TINY, "data": {"source": "imagefolder", "root": str(tmp_path / "d")}})
    assert cli.main(["train", recipe, "--quiet", "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, "data.val_split", "c2")
    assert not (tmp_path / "r").exists()


def test_planning_a_model_too_large_to_build_says_how_much_memory_it_wanted(tmp_path, capsys):
    """Frozen scales are checked on the model built for real (their initial values): one of 3 x 10^5
    channels a layer does not fit, and plan says so in one line, as training would."""
    raw = {**TINY, "model": {"arch": "fastnet", "widths": [300_000] * 3},
           "optimizer": {**TINY["optimizer"], "groups": {"norm_weight": {"frozen": True}}}}
    assert cli.main(["plan", write_recipe(tmp_path, raw)]) == 1
    _one_line(capsys, "out of memory", "GiB at once", "smaller model")


@pytest.mark.slow  # trains TINY first
def test_an_absurd_resolution_says_how_much_memory_it_wanted(tmp_path, capsys):
    raw = {**TINY, "stages": [{"epochs": 1, "resolution": 65_536, "batch_size": 16}]}  # the largest allowed: 768 GiB
    recipe = write_recipe(tmp_path, raw)
    assert cli.main(["train", recipe, "--out", str(tmp_path / "r"), "--quiet"]) == 1
    _one_line(capsys, "out of memory", "GiB at once")
