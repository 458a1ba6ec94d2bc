"""The training loop: stages in order, one ``train_step``, per-batch schedule, exact resume.

What the loop trains with comes from :mod:`cadence.parts`, where it writes from :mod:`cadence.rundir`,
evaluation from :mod:`cadence.evaluate`, the non-finite policy from :mod:`cadence.guard`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from cadence import checkpoint, data, distributed, files, loggers
from cadence.errors import FieldError, Interrupted
from cadence.evaluate import evaluate_recipe
from cadence.guard import NonFiniteGuard
from cadence.mixing import BatchMixer, Targets
from cadence.parts import Parts, Setup, build_parts
from cadence.plan import epoch_samples
from cadence.recipe import dump_recipe
from cadence.rundir import BadImages, MetricsLog, NullLog, RunDir
from cadence.scheduler import get_momentum


class Signals:
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


class Trainer:
    """Trains a recipe into ``run_dir``. Use ``Trainer.create`` (new run) or ``Trainer.resume``.
    ``parts``: already built for this setup (``lr: auto`` builds them once for its range test)."""

    def __init__(self, setup: Setup, run_dir: str, parts: Parts | None = None, train_data: data.TrainData | None = None):
        self.setup, self.recipe, self.run = setup, setup.recipe, RunDir(run_dir)
        self.timeline, self.source, self.device = setup.timeline, setup.source, setup.device
        self.parts = parts or build_parts(setup)
        self.rank, self.world, self.main = setup.dist.rank, setup.dist.world, setup.dist.main
        r = self.recipe
        self.data = train_data or data.TrainData(self.source, r.data, seed=r.seed, rank=self.rank, world=self.world,
                                                 device=self.device)
        self.bad = BadImages(self.run)  # unreadable files met while training (this process)
        self.data.on_bad = self.bad.note
        self.guard = NonFiniteGuard(r.train.on_nonfinite, self.device, self.timeline, r.train.precision)
        scaler = self.parts.scaler
        self.guard.scale = lambda: scaler.get_scale() if scaler.is_enabled() else None
        self.mixers = [BatchMixer(reg, r.seed) for reg in self.timeline.regularization]  # per stage
        self.grad_norm: torch.Tensor | None = None  # of the last step, when asked for
        self.signals = Signals()
        self.step = 0
        self.saved_step: int | None = None  # step of the last checkpoint written or loaded
        self.log_from: int | None = None  # resumed: metrics.jsonl keeps the rows before this (saved) step
        self.elapsed = 0.0  # training wall time over all sessions (s)
        self.cpu = 0.0  # the process's CPU time (all threads) over the same spans (s)
        self._wall_start, self._wall_before = time.perf_counter(), 0.0  # everything, evaluation included
        self.evals: list[dict] = []

    def wall(self) -> float:
        """Seconds since this run's trainer was built, over all its sessions: training, evaluation,
        checkpoints (``elapsed`` counts training steps only)."""
        return self._wall_before + time.perf_counter() - self._wall_start

    # -- life cycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, setup: Setup, run_dir: str, parts: Parts | None = None) -> Trainer:
        trainer = cls(setup, run_dir, parts)
        if setup.dist.main:
            write_run_start(setup, trainer.run)
            trainer.bad.note(setup.source.bad, count=False)  # found while loading (unreadable files, empty classes)
        return trainer

    @classmethod
    def resume(cls, setup: Setup, run_dir: str, state: dict | None = None, at: int | None = None) -> Trainer:
        """Continue from ``checkpoints/last.pt`` (or ``state``); ``at``: see ``load_state``."""
        trainer = cls(setup, run_dir)
        trainer.load_state(state or checkpoint.load(trainer.run.last), at)
        if setup.dist.main:
            trainer.run.remove_partial()
        return trainer

    def state(self) -> dict:
        t, p = self.timeline, self.parts
        at = min(self.step, len(t) - 1)
        return {
            "model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
            "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
            "step": self.step, "stage": t.stage[at], "epoch": t.epoch[at],
            "batch_in_epoch": self.step - t.epoch_starts[t.epoch[at]] if self.step < len(t) else 0,
            "rng": checkpoint.rng_state(), "recipe": self.recipe.raw, "elapsed": self.elapsed, "cpu": self.cpu, "wall": self.wall(),
            "evals": self.evals, "skipped": self.guard.skipped,
            "ema": p.ema.state_dict() if p.ema is not None else None,
            "lookahead": p.lookahead.state_dict() if p.lookahead is not None else None,
        }

    def load_state(self, state: dict, at: int | None = None) -> None:
        """Restore a checkpoint. ``at``: the recipe changed since it was written; continue at step ``at``
        of this trainer's timeline, with the saved weights, optimizer state and RNG but the new recipe's
        optimizer hyperparameters (weight decay, betas, ...) and the new timeline's LR and momentum."""
        p = self.parts
        if at is None and state["step"] > len(self.timeline):
            raise FieldError("(checkpoint)", self.run.last, f"says step {state['step']:,}, past the end of the run's "
                             f"plan ({len(self.timeline):,} steps)")
        recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in p.optimizer.param_groups]
        p.load_weights(state)
        p.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty when saved without fp16
            p.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.step, self.elapsed, self.evals = state["step"], state["elapsed"], state["evals"]
        self.cpu = state.get("cpu", 0.0)
        self._wall_before, self._wall_start = state.get("wall", state["elapsed"]), time.perf_counter()
        self.guard.skipped = state.get("skipped", 0)
        self._saved(self.step)
        self.log_from = self.step
        if at is None:
            p.scheduler.load_state_dict(state["scheduler"])
        else:
            for group, settings in zip(p.optimizer.param_groups, recipe_groups):
                group.update(settings)
            p.scheduler.jump(at)
            self.step = at

    def save(self, *also: str) -> None:
        """Write ``checkpoints/last.pt`` (and the same state to each path in ``also``) on rank 0;
        never a diverged state (raises Diverged instead)."""
        self.guard.check_deferred()
        self.guard.check_weights(self.parts.model, self.step - 1)
        if self.main:  # every rank holds the same weights and optimizer state
            state = self.state()
            for path in (self.run.last, *also):
                checkpoint.save_atomic(state, path)
            self.run.note_checkpoint(self.step)
        self._saved(self.step)

    def _keep_best(self) -> None:
        """``train.keep_best``: after an evaluation, keep its weights if they are among the k best by
        held-out top-1 (ties: the earlier), and drop a kept one that no longer is."""
        k = self.recipe.train.keep_best
        if not k or not self.main:
            return
        ranked = sorted(self.evals, key=lambda r: (-r["val_top1"], r["step"]))[:k]
        steps = {r["step"] for r in ranked}
        if self.evals[-1]["step"] in steps and self.evals[-1]["step"] not in self.run.best_steps():
            self.guard.check_weights(self.parts.model, self.step - 1)
            checkpoint.save_atomic(self.state(), self.run.best(self.evals[-1]["step"]))
        for step in self.run.best_steps():
            if step not in steps:
                os.remove(self.run.best(step))

    def _saved(self, step: int) -> None:
        self.saved_step = step
        self.guard.kept = f"the last checkpoint in {self.run} (step {step}) is from before it"

    # -- the work ----------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor | Targets, guard: bool = False,
                   norm: bool = False) -> torch.Tensor:
        """One optimizer step on a normalised (and mixed) batch at the LR/momentum the scheduler has set;
        then the scheduler moves on. With ``guard``, a non-finite loss follows ``train.on_nonfinite``
        (:mod:`cadence.guard`): a skipped step also puts the BatchNorm statistics back. ``grad_norm``
        holds the step's gradient norm (a tensor) if clipping or ``norm`` asked for it, else None."""
        p = self.parts
        skip = guard and self.guard.policy == "skip"
        buffers = [b.detach().clone() for b in p.model.buffers()] if skip else []  # BatchNorm statistics
        loss = p.forward_backward(x, y)
        self.grad_norm = None
        if guard and self.guard.should_skip(loss, self.step):
            for b, before in zip(p.model.buffers(), buffers):
                b.copy_(before)
        else:
            self.grad_norm = p.update(norm=norm)
        p.scheduler.step()
        return loss

    def _empty(self, y: torch.Tensor) -> bool:
        """True if this step has no images to train on. Under DDP the ranks decide together (a rank
        that skipped the backward would leave the others waiting in the gradient all-reduce), so a
        batch whose images were all unreadable on one rank is skipped on every rank."""
        if self.world == 1 or self.source.native_size is not None or self.recipe.data.on_bad_image != "skip":
            return not len(y)
        return not distributed.all_reduce_min(torch.tensor([len(y)], device=self.device)).item()

    def loader(self, stage: int, epoch: int, skip_batches: int = 0):
        """This rank's batches of global ``epoch`` at stage ``stage``, after ``skip_batches``."""
        st = self.recipe.stages[stage]
        return self.data.epoch(st, epoch, epoch_samples(len(self.source.train), st.data_fraction), skip_batches,
                               self.timeline.regularization[stage])

    def evaluate(self, resolution: int | None = None) -> dict:
        """Held-out loss, top-1 and top-5 at ``resolution`` px (default: the recipe's)."""
        return evaluate_recipe(self.parts, self.setup, resolution)

    def fit(self, stop_at: int | None = None, progress: bool = True) -> dict | None:
        """Train to the end of the timeline (or stop after global step ``stop_at``, resumable).
        Returns the final evaluation, or None if stopped early."""
        t = self.timeline
        first = self.step if self.log_from is None else self.log_from  # metrics rows before it are kept
        if self.main:
            trackers = loggers.start(self.recipe.train.loggers, self.run, os.path.basename(os.path.abspath(self.run.path)),
                                     self.recipe.raw)
            log = MetricsLog(self.run, first, trackers)
        else:
            log = NullLog()
        self.log_from = None
        end = len(t) if stop_at is None else min(stop_at, len(t))
        bar = tqdm(total=len(t), initial=self.step, disable=not (progress and self.main), file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5, unit="step")
        try:
            with Signals() as self.signals:  # a signal now: finish the step (or the final evaluation), save
                while self.step < end and self.signals.received is None:
                    self._run_epoch(log, bar, end)
                bar.close()
                final = None
                if self.step == len(t) and self.signals.received is None:
                    final = self.evals[-1] if self.evals and self.evals[-1]["step"] == self.step else self._eval(log)
                self.save()
            if self.signals.received is not None:
                raise Interrupted(self.signals.received, self.step, f"cadence train --resume {self.run}")
            return final
        finally:
            bar.close()
            log.close()

    def _run_epoch(self, log: MetricsLog, bar, end: int) -> None:
        r, t, p = self.recipe, self.timeline, self.parts
        e, k = t.epoch[self.step], t.stage[self.step]
        stage = r.stages[k]
        first, last = t.epoch_starts[e], t.epoch_starts[e + 1]
        bar.set_description(f"stage {k} epoch {e} {stage.resolution}px")
        tick, images = self._tick(), 0
        for x, y in self.loader(k, e, skip_batches=self.step - first):
            s = self.step
            lr, momentum = p.optimizer.param_groups[0]["lr"], get_momentum(p.optimizer)
            if self._empty(y):  # every image of the batch was unreadable: the plan moves on regardless
                p.scheduler.step()
                self.step += 1
                bar.update(1)
                continue
            x, y = self.mixers[k](p.normalize(x), y.to(self.device, non_blocking=True), s)
            logged = s % r.train.log_every == 0 or s + 1 == last
            loss = self.train_step(x, y, guard=True, norm=logged)
            self.step += 1
            images += len(y)
            if logged:
                now = self._tick()
                self._count(tick, now)
                self.guard.check_deferred()
                loss_value = distributed.mean_over_ranks(loss).item()
                log.write({"step": s, "stage": k, "epoch": e, "lr": lr, "momentum": momentum,
                           "loss": loss_value, "samples_seen": t.samples_seen[s], "time": round(self.elapsed, 3),
                           "cpu": round(self.cpu, 3), "resolution": stage.resolution, **self._skip_count(),
                           **({"grad_norm": self.grad_norm.item()} if self.grad_norm is not None else {}),
                           **({"bad_images": self.bad.count} if self.bad.count else {})})
                bar.set_postfix(lr=f"{lr:.3g}", loss=f"{loss_value:.3f}",
                                img_s=f"{images / max(now[0] - tick[0], 1e-9):.0f}", refresh=False)
                tick, images = now, 0
            bar.update(1)
            if isinstance(r.train.eval_every, int) and self.step % r.train.eval_every == 0:
                self._count(tick, self._tick())  # evaluation is not training time
                self._eval(log)
                tick, images = self._tick(), 0
            if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0 and self.step < last:
                self.save()
            if (self.step >= end or self.signals.received is not None) and self.step < last:
                return
        if self.step != last:
            raise RuntimeError(f"epoch {e} yielded {self.step - first} batches; the plan has {last - first}")
        stage_end = self.step == t.stage_starts[k + 1]
        if r.train.eval_every == "epoch" or (r.train.eval_every == "stage" and stage_end):
            self._eval(log)
        every = r.train.keep_every
        self.save(*([self.run.epoch_checkpoint(e + 1)] if every and (e + 1) % every == 0 else []))

    @staticmethod
    def _tick() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def _count(self, since: tuple[float, float], now: tuple[float, float]) -> None:
        """Add the wall and CPU time between two ticks to the training time."""
        self.elapsed += now[0] - since[0]
        self.cpu += now[1] - since[1]

    def _eval(self, log: MetricsLog) -> dict:
        t, at = self.timeline, self.step - 1
        result = {"step": self.step, "stage": t.stage[at], "epoch": t.epoch[at], "wall": round(self.wall(), 3),
                  "samples_seen": t.samples_seen[at], "time": round(self.elapsed, 3), "cpu": round(self.cpu, 3),
                  **self.evaluate(),
                  **self._skip_count()}
        log.write(result)
        self.evals.append(result)
        self._keep_best()
        return result

    def _skip_count(self) -> dict:
        """``{"skipped": n}`` for metrics rows under ``train.on_nonfinite: skip`` (steps skipped so far)."""
        return {"skipped": self.guard.skipped} if self.guard.policy == "skip" else {}


def write_run_start(setup: Setup, run: RunDir) -> None:
    """A new run's first files: ``recipe.yaml`` (headed by what ``lr: auto`` chose), the range test's
    curve when there was one, and ``plan.png``."""
    from cadence import report

    run.make()
    header = ""
    if setup.lr_find is not None:
        res, rt = setup.lr_find, setup.recipe.optimizer.lr_find
        header = (f"optimizer.lr was auto: the LR range test on stage 0 ({res.resolution}px, batch "
                  f"{res.batch_size}, {rt.steps} steps from {rt.start:g} to {rt.end:g}) recommended a peak "
                  f"of {res.suggestions.recommended:.4g}, a tenth of where the loss climbed away "
                  f"({res.suggestions.edge:.4g}); curve in lr_find.csv and lr_find.png")
        report.write_range_csv([res], run.file("lr_find.csv"))
        report.plot_range_test([res], run.file("lr_find.png"), title=f"{setup.recipe.name}: LR range test")
    files.write_text_atomic(dump_recipe(setup.recipe, header), run.recipe)
    report.plot_plan(setup.timeline, run.file("plan.png"), title=setup.recipe.name)


def find_auto_lr(setup: Setup, recipe_file: str | None = None, progress: bool = True,
                 parts: Parts | None = None) -> tuple[Setup, Parts]:
    """``optimizer.lr: auto``: run the LR range test (``optimizer.lr_find``) on stage 0 from the
    recipe's initial weights; returns the setup with the recommended peak (converted back to
    ``reference_batch_size``) and the parts to train it with (the same model, rebuilt optimizer)."""
    from cadence import lr_finder
    from cadence.plan import lr_scale
    from cadence.recipe import with_lr

    parts = parts or build_parts(setup)
    rt = setup.recipe.optimizer.lr_find
    res = lr_finder.range_test_stage(setup, parts, 0, start=rt.start, end=rt.end, steps=rt.steps, progress=progress)
    if res.suggestions is None:
        raise FieldError("optimizer.lr_find", dataclasses.asdict(rt),
                         f"the range test of optimizer.lr: auto found no LR: {res.error}", file=recipe_file)
    first, o = setup.recipe.stages[0], setup.recipe.optimizer
    scale = lr_scale(first.batch_size, o.reference_batch_size or first.batch_size, o.lr_scaling)
    setup = setup.with_recipe(with_lr(setup.recipe, res.suggestions.recommended / scale), lr_find=res)
    return setup, parts.with_lr(setup.recipe, setup.timeline)


def train(setup: Setup, run_dir: str, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, state: dict | None = None, at: int | None = None,
          parts: Parts | None = None) -> tuple[Trainer, dict | None]:
    """Train (or resume) into ``run_dir``; writes curves and the report at the end. A new run's
    directory is removed again if anything fails before the first step (it did not exist before).
    Resuming a run stopped before its first checkpoint starts it again from step 0. ``at``: continue
    the checkpoint at this step of ``setup``'s timeline (the recipe changed; see ``Trainer.load_state``)."""
    run = RunDir(run_dir)
    fresh = not resume and not os.path.exists(run.path)
    if setup.dist.main:
        run.lock()  # one writer per run folder (before anything is written; a refusal removes nothing)
    trainer = None
    try:
        run.refuse_if_lost("--resume" if resume else "--out")
        if resume and state is None and not run.has_checkpoint():
            resume = False
        try:
            trainer = (Trainer.resume(setup, run.path, state, at) if resume
                       else Trainer.create(setup, run.path, parts))
            if at is not None:  # the new position, before anything else: a plain --resume continues from it
                trainer.save()
        except BaseException:
            if fresh:
                run.unlock()
                shutil.rmtree(run.path, ignore_errors=True)
            raise
        try:
            final = trainer.fit(stop_at=stop_at, progress=progress)
        except OSError as e:  # disk full, no permission: say how to go on once there is room
            if run.has_checkpoint():
                e.resume = f"cadence train --resume {run}"
            raise
        if setup.dist.main:
            from cadence import report

            with Signals():  # training is over and saved: a Ctrl-C now must not leave a half-written report
                report.write_run_report(run.path)
        return trainer, final
    finally:
        if trainer is not None:
            trainer.data.close()
        run.unlock()


def launch(recipe, recipe_file: str | None, run_dir: str, *, resume: bool = False, on_recipe_change: str | None = None,
           stop_at: int | None = None, progress: bool = True, say=lambda line: None) -> tuple[Trainer, dict | None]:
    """What ``cadence train`` does after reading the recipe: check it against data and machine; for
    ``resume`` -- or a new run into a folder that already holds a run (a requeued job: launching is
    idempotent) -- take the folder's lock, read and vet the checkpoint and reconcile a changed recipe
    (``on_recipe_change``) as ``--resume`` does; resolve ``optimizer.lr: auto``; then train. ``say``
    gets the lines a user reads on stderr (rank 0 only)."""
    from cadence import changes
    from cadence.lr_finder import auto_lr_line
    from cadence.parts import build_setup
    from cadence.recipe import as_recorded, load_recipe

    run = RunDir(run_dir)
    again = not resume and run.has_checkpoint()  # the same launch, run again: continue the run in the folder
    if again:
        if not run.has_recipe():
            raise FieldError("--out", run.path, "holds checkpoints/last.pt but no recipe.yaml: not a cadence run")
        recipe, resume = as_recorded(recipe, load_recipe(run.recipe)), True
    setup = build_setup(recipe, recipe_file)
    say = say if setup.dist.main else (lambda line: None)
    run.refuse_if_lost("--resume" if resume else "--out")  # (train() checks again; here: before any range test)
    if not resume and (why := run.cannot_create()):
        raise FieldError("--out", run.path, f"cannot create it: {why}")
    state, at, built = None, None, None
    if resume and setup.dist.main:
        run.lock()  # before the recipe check below writes anything into the run
    try:
        if resume and run.has_checkpoint():  # read (and vet) the checkpoint before saying or doing anything
            state = checkpoint.load(run.last)
            at = changes.reconcile(state, setup.recipe, setup.timeline, run.path, on_recipe_change,
                                   recipe_file=recipe_file, train_samples=len(setup.source.train),
                                   world_size=setup.dist.world, write=setup.dist.main)
            if again:
                say(f"cadence: {run} holds a run of this recipe, at step {state['step']:,}: continuing it "
                    "(as --resume would)")
        elif resume:
            say(f"cadence: {run} was stopped before its first checkpoint: training it from step 0")
        if recipe.optimizer.lr == "auto":
            setup, built = find_auto_lr(setup, recipe_file, progress=progress and setup.dist.main)
            say(auto_lr_line(setup.recipe))
    except BaseException:  # refused or stopped before training: the folder is free again (train() unlocks after)
        run.unlock()
        raise
    ranks = f" x {setup.dist.world} ranks" if setup.dist.active else ""
    say(f"{recipe.name}: {len(setup.timeline):,} steps over {len(recipe.stages)} stage(s) on "
        f"{setup.device}{ranks}; run directory {run}")
    return train(setup, run.path, resume=resume, stop_at=stop_at, progress=progress, state=state, at=at, parts=built)
