"""The training loop: stages in order, one ``train_step``, per-batch schedule, exact resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from cadence import checkpoint, data, distributed, models
from cadence.errors import FieldError
from cadence.plan import Timeline, epoch_samples
from cadence.recipe import Recipe, dump_recipe
from cadence.scheduler import StepScheduler, get_momentum

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FieldError("train.device", name, "no CUDA device is available here")
    return torch.device(name)


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """On glibc, serve large blocks from the heap and keep freed memory mapped (mallopt: no mmap, trim
    only above 1 GiB). A CPU training step allocates and frees activations of tens of MB; glibc maps
    each fresh from the kernel (above 32 MB it always does) and unmaps it when freed, so every step
    page-faults its activations in again: ~50,000 faults per step for the fast CIFAR-10 recipe at 24
    and 32 px, 4-5% of its step rate and a third of each evaluation (benchmarks/allocator.py). The
    price: resident memory stays at its peak (up to +13% there). Where the heap cannot grow, glibc
    still falls back to mmap. False where it does not apply (not glibc)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


@dataclass
class Setup:
    """Everything built from a recipe before a single file is written (so bad input leaves nothing)."""

    recipe: Recipe
    source: data.Source
    timeline: Timeline
    device: torch.device
    lr_find: object | None = None  # the range test's RangeResult, when optimizer.lr was auto
    dist: distributed.Dist = distributed.Dist()


def prepare(recipe: Recipe, recipe_file: str | None = None) -> Setup:
    """Check the recipe against the data and the machine; raises FieldError (file named)."""
    try:
        models.check_arch(recipe.model)
        device = pick_device(recipe.train.device)
        source = data.load_source(recipe.data, recipe.seed)
        if recipe.model.num_classes is not None and recipe.model.num_classes != source.num_classes:
            raise FieldError("model.num_classes", recipe.model.num_classes,
                             f"but the data has {source.num_classes} classes")
        if recipe.model.whiten and source.native_size is None:
            raise FieldError("model.whiten", True, "is set from in-memory images (cifar10, synthetic, digits), "
                             f"not from {recipe.data.source} files")
        if recipe.train.tta == "flip" and not source.flip:
            raise FieldError("train.tta", "flip", f"but {recipe.data.source} images are never flipped in "
                             "training (mirrored digits are not digits)")
        world = distributed.from_env().world
        timeline = recipe.timeline(train_samples=len(source.train), world_size=world)
    except FieldError as e:
        raise e.within(file=recipe_file) from None
    place, device = distributed.init(device)
    if device.type == "cpu":
        keep_freed_memory()
    return Setup(recipe, source, timeline, device, dist=place)


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per row) and TensorBoard scalars."""

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        keep = []
        if os.path.exists(self.path):  # drop rows past the checkpoint we resume from (all, at step 0)
            rows = read_metrics(run_dir)
            keep = [r for r in rows if r["step"] < resume_step or ("val_top1" in r and r["step"] <= resume_step)]
            checkpoint.write_text_atomic("".join(json.dumps(r) + "\n" for r in keep), self.path)
        # line-buffered: tail -f works, a kill loses nothing; at step 0 nothing before counts (a run
        # killed before its first checkpoint starts over)
        self.file = open(self.path, "a" if resume_step else "w", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard's own mechanism: readers drop the earlier files' events from resume_step on (all, at 0)
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step)
        for row in keep:  # the purge hides the evaluation the checkpoint ended on: log it again
            if row["step"] == resume_step:
                self._scalars(row)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self._scalars(row)

    def _scalars(self, row: dict) -> None:
        for key in ("loss", "lr", "momentum", "val_top1", "val_top5", "val_loss"):
            if key in row:
                self.tb.add_scalar(key if key.startswith("val") else f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        self.file.close()
        self.tb.close()


class Diverged(FloatingPointError):
    """A non-finite loss (``train.on_nonfinite: stop``) or non-finite weights; nothing diverged was saved."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class _Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NullLog:
    """What ranks other than 0 log: nothing."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str) -> list[dict]:
    from cadence.report import read_metrics as read

    return read(run_dir)


class Trainer:
    """Trains a recipe into ``run_dir``. Use ``Trainer.create`` (new run) or ``Trainer.resume``."""

    def __init__(self, setup: Setup, run_dir: str):
        self.setup, self.recipe, self.run_dir = setup, setup.recipe, run_dir
        r, dev = self.recipe, setup.device
        self.timeline, self.source, self.device = setup.timeline, setup.source, dev
        torch.manual_seed(r.seed)  # the same initial weights on every rank
        model = models.build_model(r.model, self.source.num_classes, self.source.channels)
        if r.train.sync_bn and setup.dist.active:
            model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if dev.type == "cuda"
                     else distributed.convert_sync_batchnorm(model))
        if r.model.whiten:
            model.init_whitening(self._whitening_sample())
        self.memory_format = torch.channels_last if r.train.channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=self.memory_format)
        self.optimizer = models.build_optimizer(self.model, r.optimizer)
        self.ema = None  # weight EMA (parameters and BatchNorm statistics), what evaluation uses
        if r.train.ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(r.train.ema), use_buffers=True)
        self.scheduler = StepScheduler(self.optimizer, self.timeline)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=r.train.precision == "fp16")
        self.autocast = torch.autocast(dev.type, dtype=DTYPES[r.train.precision],
                                       enabled=r.train.precision != "fp32")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=r.train.label_smoothing)
        wrapped = self.model
        if setup.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(self.model, device_ids=[dev] if dev.type == "cuda" else None)
        self.forward = torch.compile(wrapped) if r.train.compile else wrapped
        self.prep = data.normalizer(self.source, dev, r.train.channels_last)
        self.rank, self.world, self.main = setup.dist.rank, setup.dist.world, setup.dist.main
        self.signals = _Signals()
        self.data = data.TrainData(self.source, r.data, seed=r.seed, rank=self.rank, world=self.world,
                                   pin_memory=dev.type == "cuda", on_bad=self._note_bad)
        self.bad_images = 0  # unreadable files met while training (this process)
        self._bad_listed: set[str] = set()
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or loaded
        self.log_from: int | None = None  # resumed: metrics.jsonl keeps the rows before this (saved) step
        self.skipped = 0  # steps whose update was skipped for a non-finite loss (train.on_nonfinite: skip)
        # One host sync per step to look at the loss is free on the CPU; on CUDA, under 'stop', the check
        # is kept on the device and read at log steps and before every checkpoint instead.
        self.defer_check = dev.type == "cuda" and r.train.on_nonfinite == "stop"
        self._first_bad: torch.Tensor | None = None  # deferred: first step with a non-finite loss (inf: none)
        self.elapsed = 0.0  # training wall time over all sessions (s)
        self._wall_start, self._wall_before = time.perf_counter(), 0.0  # everything, evaluation included
        self.evals: list[dict] = []

    def _whitening_sample(self, n: int = 5000) -> torch.Tensor:
        """Up to ``n`` training images (drawn from the seed), at stage 0's resolution, normalised."""
        train_set = self.source.train
        pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(self.recipe.seed))[:n]
        images = data.resize_batch(train_set.images[pick], self.recipe.stages[0].resolution)
        return data.normalizer(self.source, torch.device("cpu"))(images)

    def wall(self) -> float:
        """Seconds since this run's trainer was built, over all its sessions: training, evaluation,
        checkpoints (``elapsed`` counts training steps only)."""
        return self._wall_before + time.perf_counter() - self._wall_start

    # -- life cycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, setup: Setup, run_dir: str) -> Trainer:
        trainer = cls(setup, run_dir)
        if not setup.dist.main:
            return trainer
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        from cadence import lr_finder, report

        header = ""
        if setup.lr_find is not None:
            res = setup.lr_find
            rt = setup.recipe.optimizer.lr_find
            header = (f"optimizer.lr was auto: the LR range test on stage 0 ({res.resolution}px, batch "
                      f"{res.batch_size}, {rt.steps} steps from {rt.start:g} to {rt.end:g}) recommended a peak "
                      f"of {res.suggestions.recommended:.4g}, a tenth of where the loss climbed away "
                      f"({res.suggestions.edge:.4g}); curve in lr_find.csv and lr_find.png")
            lr_finder.write_csv([res], os.path.join(run_dir, "lr_find.csv"))
            lr_finder.plot([res], os.path.join(run_dir, "lr_find.png"), title=f"{setup.recipe.name}: LR range test")
        checkpoint.write_text_atomic(dump_recipe(setup.recipe, header), os.path.join(run_dir, "recipe.yaml"))
        trainer._note_bad(setup.source.bad, count=False)  # found while loading (unreadable files, empty classes)

        report.plot_plan(setup.timeline, os.path.join(run_dir, "plan.png"), title=setup.recipe.name)
        return trainer

    @classmethod
    def resume(cls, setup: Setup, run_dir: str, state: dict | None = None, at: int | None = None) -> Trainer:
        """Continue from ``checkpoints/last.pt`` (or ``state``); ``at``: see ``load_state``."""
        trainer = cls(setup, run_dir)
        folder = os.path.join(run_dir, "checkpoints")
        trainer.load_state(state or checkpoint.load(os.path.join(folder, "last.pt")), at)
        if setup.dist.main:  # what a kill during a write left behind
            checkpoint.remove_partial(folder)
            checkpoint.remove_partial(run_dir)
        return trainer

    def state(self) -> dict:
        t = self.timeline
        at = min(self.step, len(t) - 1)
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "step": self.step, "stage": t.stage[at], "epoch": t.epoch[at],
            "batch_in_epoch": self.step - t.epoch_starts[t.epoch[at]] if self.step < len(t) else 0,
            "rng": checkpoint.rng_state(), "recipe": self.recipe.raw, "elapsed": self.elapsed, "wall": self.wall(),
            "evals": self.evals, "skipped": self.skipped,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state(self, state: dict, at: int | None = None) -> None:
        """Restore a checkpoint. ``at``: the recipe changed since it was written; continue at step ``at``
        of this trainer's timeline, with the saved weights, optimizer state and RNG but the new recipe's
        optimizer hyperparameters (weight decay, betas, ...) and the new timeline's LR and momentum."""
        recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:  # EMA switched on at a resume: start averaging from the weights as they are
                self.ema.module.load_state_dict(state["model"])
                self.ema.n_averaged.zero_()
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.elapsed, self.evals = state["step"], state["elapsed"], state["evals"]
        self._wall_before, self._wall_start = state.get("wall", state["elapsed"]), time.perf_counter()
        self.skipped = state.get("skipped", 0)
        self.saved_step = self.log_from = self.step
        if at is None:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            for group, settings in zip(self.optimizer.param_groups, recipe_groups):
                group.update(settings)
            self.scheduler.jump(at)
            self.step = at

    def save(self) -> None:
        """Write ``checkpoints/last.pt`` (rank 0); never a diverged state (raises Diverged instead)."""
        self.check_deferred()
        if not all(torch.isfinite(v).all() for v in self.model.state_dict().values() if v.is_floating_point()):
            raise self.diverged(f"the weights are not finite after step {self.step - 1}", self.step - 1)
        if self.main:  # every rank holds the same weights and optimizer state
            checkpoint.save_atomic(self.state(), os.path.join(self.run_dir, "checkpoints", "last.pt"))
        self.saved_step = self.step

    def diverged(self, what: str, s: int) -> Diverged:
        """The error for a divergence first seen at step ``s``: where, at what LR, and what to change."""
        t, r = self.timeline, self.recipe
        scale = f", loss scale {self.scaler.get_scale():.4g}" if self.scaler.is_enabled() else ""
        fixes = "lower optimizer.lr or lengthen the warmup"
        if r.train.precision == "fp16":
            fixes += ", train in bf16 or fp32"
        if r.train.on_nonfinite == "stop":
            fixes += ", or set train.on_nonfinite: skip to skip such batches"
        kept = ("no checkpoint was written yet" if self.saved_step is None else
                f"the last checkpoint in {self.run_dir} (step {self.saved_step}) is from before it")
        return Diverged(f"{what} (stage {t.stage[s]}, lr {t.lr[s]:.4g}{scale}); {fixes}; {kept}")

    # -- the work ----------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, guard: bool = False) -> torch.Tensor:
        """One optimizer step at the LR/momentum the scheduler has set; then the scheduler moves on.

        With ``guard``, a non-finite loss follows ``train.on_nonfinite``: ``stop`` raises Diverged
        before the update; ``skip`` leaves weights, BatchNorm statistics and optimizer state as they
        were, counts the step in ``skipped`` and still moves the scheduler on, so every later step
        keeps its planned LR. (The LR range test steps unguarded: it watches the loss itself.)"""
        self.model.train()
        skip = guard and self.recipe.train.on_nonfinite == "skip"
        buffers = [b.detach().clone() for b in self.model.buffers()] if skip else []  # BatchNorm statistics
        with self.autocast:
            loss = self.criterion(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if guard and self._nonfinite(loss.detach()):
            self.skipped += 1
            for b, before in zip(self.model.buffers(), buffers):
                b.copy_(before)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
        self.scheduler.step()
        return loss.detach()

    def _empty(self, y: torch.Tensor) -> bool:
        """True if this step has no images to train on. Under DDP the ranks decide together (a rank
        that skipped the backward would leave the others waiting in the gradient all-reduce), so a
        batch whose images were all unreadable on one rank is skipped on every rank."""
        if self.world == 1 or self.source.native_size is not None or self.recipe.data.on_bad_image != "skip":
            return not len(y)
        return not distributed.all_reduce_min(torch.tensor([len(y)], device=self.device)).item()

    def _nonfinite(self, loss: torch.Tensor) -> bool:
        """True if step ``self.step``'s loss is non-finite on some rank and the update is to be skipped;
        raises Diverged under 'stop' (or notes the step on the device, when the check is deferred)."""
        bad = torch.logical_not(torch.isfinite(loss)).float()
        if self.defer_check:
            at = torch.where(bad > 0, float(self.step), math.inf)
            self._first_bad = at if self._first_bad is None else torch.minimum(self._first_bad, at)
            return False
        if not distributed.all_reduce_sum(bad).item():
            return False
        if self.recipe.train.on_nonfinite == "stop":
            value = self.reduce_mean(loss).item()
            raise self.diverged(f"loss is {value} at step {self.step}", self.step)
        return True

    def check_deferred(self) -> None:
        """Raise Diverged if a deferred check saw a non-finite loss (one host sync)."""
        if self._first_bad is not None:
            first = distributed.all_reduce_min(self._first_bad).item()
            if math.isfinite(first):
                raise self.diverged(f"loss is not finite at step {int(first)}", int(first))

    def loader(self, stage: int, epoch: int, skip_batches: int = 0):
        """This rank's batches of global ``epoch`` at stage ``stage``, after ``skip_batches``."""
        st = self.recipe.stages[stage]
        return self.data.epoch(st, epoch, epoch_samples(len(self.source.train), st.data_fraction), skip_batches)

    def _note_bad(self, bad: list, count: bool = True) -> None:
        """Count skipped images and list each unreadable file once in ``bad_images.txt``
        (tab-separated path and reason)."""
        self.bad_images += len(bad) if count else 0
        new = [(p, why) for p, why in dict(bad).items() if p not in self._bad_listed]
        self._bad_listed.update(p for p, _ in new)
        if new and self.run_dir and os.path.isdir(self.run_dir):
            with open(os.path.join(self.run_dir, "bad_images.txt"), "a") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in new)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over ranks (the value itself on one process)."""
        return distributed.mean_over_ranks(value)

    @torch.no_grad()
    def evaluate(self, resolution: int | None = None) -> dict:
        """Held-out loss, top-1 and (with more than 5 classes) top-5, at ``resolution`` px."""
        r = self.recipe
        res = resolution or r.eval_resolution
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
        k = min(5, self.source.num_classes)
        for x, y in data.eval_loader(self.source, res, r.train.eval_batch_size, r.data.workers(),
                                     rank=self.rank, world=self.world):
            y = y.to(self.device)
            with self.autocast:
                x = self.prep(x)
                logits = model(x)
                if r.train.tta == "flip":
                    logits = (logits.float() + model(x.flip(3)).float()) / 2
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            correct1 += (top[:, 0] == y).sum().item()
            correct5 += (top == y[:, None]).any(dim=1).sum().item()
            total += len(y)
        sums = distributed.all_reduce_sum(torch.tensor([loss_sum, correct1, correct5, total], dtype=torch.float64,
                                                       device=self.device))
        loss_sum, correct1, correct5, total = sums.tolist()
        out = {"val_loss": loss_sum / total, "val_top1": correct1 / total, "resolution": res}
        if self.source.num_classes > 5:
            out["val_top5"] = correct5 / total
        return out

    def fit(self, stop_at: int | None = None, progress: bool = True) -> dict | None:
        """Train to the end of the timeline (or stop after global step ``stop_at``, resumable).
        Returns the final evaluation, or None if stopped early."""
        t = self.timeline
        first = self.step if self.log_from is None else self.log_from  # metrics rows before it are kept
        log = MetricsLog(self.run_dir, first) if self.main else NullLog()
        self.log_from = None
        end = len(t) if stop_at is None else min(stop_at, len(t))
        bar = tqdm(total=len(t), initial=self.step, disable=not (progress and self.main), file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5, unit="step")
        try:
            with _Signals() as self.signals:
                while self.step < end and self.signals.received is None:
                    self._run_epoch(log, bar, end)
            bar.close()
            if self.signals.received is not None:
                self.save()
                raise Interrupted(self.signals.received, self.step)
            if self.step < len(t):
                self.save()
                return None
            final = self.evals[-1] if self.evals and self.evals[-1]["step"] == self.step else self._eval(log)
            self.save()
            return final
        finally:
            bar.close()
            log.close()

    def _run_epoch(self, log: MetricsLog, bar, end: int) -> None:
        r, t = self.recipe, self.timeline
        e = t.epoch[self.step]
        k = t.stage[self.step]
        stage = r.stages[k]
        first, last = t.epoch_starts[e], t.epoch_starts[e + 1]
        loader = self.loader(k, e, skip_batches=self.step - first)
        bar.set_description(f"stage {k} epoch {e} {stage.resolution}px")
        tick, images = time.perf_counter(), 0
        for x, y in loader:
            s = self.step
            lr, momentum = self.optimizer.param_groups[0]["lr"], get_momentum(self.optimizer)
            if self._empty(y):  # every image of the batch was unreadable: the plan moves on regardless
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                continue
            loss = self.train_step(self.prep(x), y.to(self.device, non_blocking=True), guard=True)
            self.step += 1
            images += len(y)
            if s % r.train.log_every == 0 or self.step == last:
                now = time.perf_counter()
                self.elapsed += now - tick
                self.check_deferred()
                loss_value = self.reduce_mean(loss).item()
                log.write({"step": s, "stage": k, "epoch": e, "lr": lr, "momentum": momentum,
                           "loss": loss_value, "samples_seen": t.samples_seen[s], "time": round(self.elapsed, 3),
                           "resolution": stage.resolution, **self._skip_count(),
                           **({"bad_images": self.bad_images} if self.bad_images else {})})
                bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss_value:.3f}",
                                img_s=f"{images / max(now - tick, 1e-9):.0f}", refresh=False)
                tick, images = now, 0
            bar.update(1)
            if isinstance(r.train.eval_every, int) and self.step % r.train.eval_every == 0:
                self.elapsed += time.perf_counter() - tick  # evaluation is not training time
                self._eval(log)
                tick, images = time.perf_counter(), 0
            if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0 and self.step < last:
                self.save()
            if (self.step >= end or self.signals.received is not None) and self.step < last:
                return
        if self.step != last:
            raise RuntimeError(f"epoch {e} yielded {self.step - first} batches; the plan has {last - first}")
        stage_end = self.step == t.stage_starts[k + 1]
        if r.train.eval_every == "epoch" or (r.train.eval_every == "stage" and stage_end):
            self._eval(log)
        self.save()

    def _eval(self, log: MetricsLog) -> dict:
        t = self.timeline
        at = self.step - 1
        result = {"step": self.step, "stage": t.stage[at], "epoch": t.epoch[at], "wall": round(self.wall(), 3),
                  "samples_seen": t.samples_seen[at], "time": round(self.elapsed, 3), **self.evaluate(),
                  **self._skip_count()}
        log.write(result)
        self.evals.append(result)
        return result

    def _skip_count(self) -> dict:
        """``{"skipped": n}`` for metrics rows under ``train.on_nonfinite: skip`` (steps skipped so far)."""
        return {"skipped": self.skipped} if self.recipe.train.on_nonfinite == "skip" else {}


def find_auto_lr(setup: Setup, recipe_file: str | None = None, progress: bool = True) -> Setup:
    """``optimizer.lr: auto``: run the LR range test (``optimizer.lr_find``) on stage 0 from the
    recipe's initial weights and return the setup with the recommended peak (converted back to
    ``reference_batch_size``)."""
    from cadence import lr_finder
    from cadence.plan import lr_scale
    from cadence.recipe import with_lr

    rt = setup.recipe.optimizer.lr_find
    res = lr_finder.range_test(Trainer(setup, run_dir=""), 0, start=rt.start, end=rt.end, steps=rt.steps,
                               progress=progress)
    if res.suggestions is None:
        raise FieldError("optimizer.lr_find", dataclasses.asdict(rt),
                         f"the range test of optimizer.lr: auto found no LR: {res.error}", file=recipe_file)
    first, o = setup.recipe.stages[0], setup.recipe.optimizer
    scale = lr_scale(first.batch_size, o.reference_batch_size or first.batch_size, o.lr_scaling)
    recipe = with_lr(setup.recipe, res.suggestions.recommended / scale)
    timeline = recipe.timeline(train_samples=len(setup.source.train), world_size=setup.dist.world)
    return dataclasses.replace(setup, recipe=recipe, timeline=timeline, lr_find=res)


def default_run_dir(recipe: Recipe, root: str = "runs") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(root, f"{recipe.name}-{stamp}")
    n = 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(root, f"{recipe.name}-{stamp}-{n}")
    return path


def train(setup: Setup, run_dir: str, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, state: dict | None = None, at: int | None = None) -> tuple[Trainer, dict | None]:
    """Train (or resume) into ``run_dir``; writes curves and the report at the end. A new run's
    directory is removed again if building the model fails before the first step. Resuming a run
    stopped before its first checkpoint starts it again from step 0. ``at``: continue the checkpoint
    at this step of ``setup``'s timeline (the recipe changed; see ``Trainer.load_state``)."""
    fresh = not resume and not os.path.exists(run_dir)
    if resume and state is None and not os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
        resume = False
    try:
        trainer = Trainer.resume(setup, run_dir, state, at) if resume else Trainer.create(setup, run_dir)
        if at is not None:  # the new position, before anything else: a plain --resume continues from it
            trainer.save()
    except BaseException:
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    final = trainer.fit(stop_at=stop_at, progress=progress)
    if setup.dist.main:
        from cadence import report

        with _Signals():  # training is over and saved: a Ctrl-C now must not leave a half-written report
            report.write_run_report(run_dir)
    return trainer, final
