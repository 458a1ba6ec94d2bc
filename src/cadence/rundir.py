"""The run folder: the one place that knows its layout, and the metrics log written into it.

::

    RUN/recipe.yaml            the resolved recipe (with overrides); recipe.prev-N.yaml after a change
    RUN/metrics.jsonl          one JSON object per logged step or evaluation
    RUN/checkpoints/last.pt    written atomically (cadence.files)
    RUN/plan.png, curves.png, report.html, recipe_change.png, lr_find.csv, lr_find.png
    RUN/bad_images.txt         unreadable files met, one per line (path, tab, reason)
    RUN/tensorboard/           TensorBoard events

Torch-free (TensorBoard's writer is imported when a log is opened).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time

from cadence import files
from cadence.errors import FieldError

_HELD: dict[str, int] = {}  # run folder (real path) -> the fd of its lock, for the folders this process holds


class RunDir:
    """Paths into one run folder, and the few things done to it as a whole."""

    def __init__(self, path: str):
        self.path = str(path)

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def recipe(self) -> str:
        return self.file("recipe.yaml")

    @property
    def metrics(self) -> str:
        return self.file("metrics.jsonl")

    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    @property
    def last(self) -> str:
        return os.path.join(self.checkpoints, "last.pt")

    def best(self, step: int) -> str:
        """One of the ``train.keep_best`` checkpoints: the weights evaluated after ``step`` steps."""
        return os.path.join(self.checkpoints, f"best-step{step:09d}.pt")

    def best_steps(self) -> list[int]:
        """The steps of the best checkpoints kept in the folder."""
        if not os.path.isdir(self.checkpoints):
            return []
        return sorted(int(m.group(1)) for n in os.listdir(self.checkpoints)
                      if (m := re.fullmatch(r"best-step(\d{9})\.pt", n)))

    def kept(self, name: str) -> str:
        """A checkpoint by name: ``last``, ``best`` (the kept best with the highest held-out top-1 in
        ``metrics.jsonl``) or a file name in ``checkpoints/``. FieldError if there is none."""
        if name == "last":
            return self.last
        if name == "best":
            steps = set(self.best_steps())
            scored = [(r["val_top1"], -r["step"]) for r in read_metrics(self) if "val_top1" in r and r["step"] in steps]
            if not scored:
                raise FieldError("--checkpoint", name, f"{self.checkpoints} holds no best-step*.pt (train.keep_best)")
            return self.best(-max(scored)[1])
        path = os.path.join(self.checkpoints, name)
        if os.path.basename(name) != name or not os.path.lexists(path):
            raise FieldError("--checkpoint", name, f"no such checkpoint in {self.checkpoints}")
        return path

    def epoch_checkpoint(self, epoch: int) -> str:
        """The checkpoint kept at the end of ``epoch`` epochs (``train.keep_every``)."""
        return os.path.join(self.checkpoints, f"epoch{epoch:04d}.pt")

    @property
    def tensorboard(self) -> str:
        return self.file("tensorboard")

    def has_checkpoint(self) -> bool:
        """``checkpoints/last.pt`` is there (a dangling link or a FIFO counts: loading it refuses it)."""
        return os.path.lexists(self.last)

    def had_checkpoint(self) -> bool:
        """A checkpoint was written into this folder once (``.checkpointed``, written with the first)."""
        return os.path.exists(self.file(".checkpointed"))

    def note_checkpoint(self, step: int) -> None:
        """Record that this run has written a checkpoint, so losing it later is told apart from a run
        killed before its first one (which starts again from step 0)."""
        if not self.had_checkpoint():
            files.write_text_atomic(f"first checkpoint at step {step}\n", self.file(".checkpointed"))

    def refuse_if_lost(self, field: str) -> None:
        """FieldError if this folder had a checkpoint and ``last.pt`` is gone: never restart it from 0."""
        if self.had_checkpoint() and not self.has_checkpoint():
            raise FieldError(field, self.path, "had a checkpoint and checkpoints/last.pt is gone; it is not "
                             "restarted from step 0 (restore last.pt, or train into another folder)")

    def lock(self) -> None:
        """Take this folder's writer lock (``.lock``; made if missing): one process writes a run. A
        kernel lock (flock), released however the process ends, so a kill leaves no stale lock.
        Taking it again in the same process does nothing. Held by another process: FieldError
        naming its pid and host."""
        os.makedirs(self.path, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _HELD:
            return
        fd = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FieldError("RUN_DIR", self.path, f"is being written by {holder}: one process at a time "
                             "(wait for it to end, or stop it)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        _HELD[key] = fd

    def unlock(self) -> None:
        fd = _HELD.pop(os.path.realpath(self.path), None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def has_recipe(self) -> bool:
        return os.path.exists(self.recipe)

    def make(self) -> None:
        os.makedirs(self.checkpoints, exist_ok=True)

    def cannot_create(self) -> str | None:
        """Why this folder could not be made (its nearest existing ancestor is not a writable
        folder), or None; nothing is created."""
        parent = os.path.abspath(self.path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{parent} is not writable"
        return None

    def remove_partial(self) -> None:
        """What a kill during a write left behind (``.tmp-*`` files, never complete ones)."""
        files.remove_partial(self.checkpoints)
        files.remove_partial(self.path)

    def next_prev_recipe(self) -> str:
        """``recipe.prev-N.yaml`` for the first N not yet taken (where a changed recipe's old one goes)."""
        n = 1
        while os.path.exists(self.file(f"recipe.prev-{n}.yaml")):
            n += 1
        return self.file(f"recipe.prev-{n}.yaml")


    @staticmethod
    def default(name: str, root: str = "runs") -> RunDir:
        """``runs/<name>-<time>`` (``-2``, ``-3``... if taken)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = os.path.join(root, f"{name}-{stamp}")
        n = 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(root, f"{name}-{stamp}-{n}")
        return RunDir(path)


class BadImages:
    """Unreadable files met while training: counted (``count``), and each listed once in the run's
    ``bad_images.txt`` (tab-separated path and reason)."""

    def __init__(self, run: RunDir):
        self.run, self.count, self.listed = run, 0, set()

    def note(self, bad: list[tuple[str, str]], count: bool = True) -> None:
        self.count += len(bad) if count else 0
        new = [(p, why) for p, why in dict(bad).items() if p not in self.listed]
        self.listed.update(p for p, _ in new)
        if new and os.path.isdir(self.run.path):
            with open(self.run.file("bad_images.txt"), "a") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in new)


def read_metrics(run_dir: str | RunDir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (a last line cut short by a kill is left out). A damaged
    line elsewhere, or a row without an integer ``step``, raises FieldError naming file and line."""
    path = RunDir(run_dir).metrics
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise FieldError("(metrics)", path, f"line {n} is not a JSON object (damaged): repair or remove it") \
                from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise FieldError("(metrics)", path, f"line {n} is not a metrics row (no integer 'step')")
        rows.append(row)
    return rows


def finished(run_dir: str | RunDir, steps: int) -> bool:
    """True if the run evaluated after its last step ``steps`` (it trained to the end)."""
    return any("val_top1" in r and r["step"] == steps for r in read_metrics(run_dir))


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per row), TensorBoard scalars, and each of ``trackers``
    (``cadence.loggers``: objects with ``log(row)`` and ``close()``). Resuming at ``resume_step``
    drops the rows past that checkpoint (all of them at step 0)."""

    def __init__(self, run_dir: str | RunDir, resume_step: int = 0, trackers: list = ()):
        run = RunDir(run_dir)
        self.trackers = list(trackers)
        self.path = run.metrics
        keep = []
        if os.path.exists(self.path):
            keep = [r for r in read_metrics(run)
                    if r["step"] < resume_step or ("val_top1" in r and r["step"] <= resume_step)]
            files.write_text_atomic("".join(json.dumps(r) + "\n" for r in keep), self.path)
        # line-buffered: tail -f works, a kill loses nothing; at step 0 nothing before counts (a run
        # killed before its first checkpoint starts over)
        self.file = open(self.path, "a" if resume_step else "w", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard's own mechanism: readers drop the earlier files' events from resume_step on (all, at 0)
        self.tb = SummaryWriter(run.tensorboard, purge_step=resume_step)
        for row in keep:  # the purge hides the evaluation the checkpoint ended on: log it again
            if row["step"] == resume_step:
                self._scalars(row)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self._scalars(row)
        for tracker in self.trackers:
            tracker.log(row)

    def _scalars(self, row: dict) -> None:
        for key in ("loss", "lr", "momentum", "grad_norm", "val_top1", "val_top5", "val_loss", "raw_val_top1",
                    "raw_val_top5", "raw_val_loss"):
            if key in row:
                self.tb.add_scalar(key if "val" in key else f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()
        for tracker in self.trackers:
            tracker.close()


class NullLog:
    """What ranks other than 0 log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass
