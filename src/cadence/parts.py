"""What any training loop needs, built from a recipe: the trainer, the LR range test and the
benchmarks all start here.

``build_setup(recipe)`` checks the recipe against the data and the machine (bad input raises
FieldError before a single file is written); ``build_parts(setup)`` builds model, EMA, optimizer,
scheduler, grad scaler, autocast, loss and input normalisation. ``Parts.forward_backward`` and
``Parts.update`` are one optimizer step, split where the trainer's non-finite guard looks at the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cadence import data, distributed, loggers, mixing, models
from cadence.errors import FieldError
from cadence.plan import Timeline
from cadence.recipe import GroupsConfig, Recipe
from cadence.scheduler import StepScheduler

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
    page-faults its activations in again (benchmarks/allocator.py measures the cost). The price:
    resident memory stays at its peak. Where the heap cannot grow, glibc still falls back to mmap.
    False where it does not apply (not glibc)."""
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

    def with_recipe(self, recipe: Recipe, **changes) -> Setup:
        """This setup for ``recipe`` (e.g. with the LR a range test chose): its timeline rebuilt."""
        timeline = recipe.timeline(train_samples=len(self.source.train), world_size=self.dist.world)
        return dataclasses.replace(self, recipe=recipe, timeline=timeline, **changes)


def build_setup(recipe: Recipe, recipe_file: str | None = None) -> Setup:
    """Check the recipe against the data and the machine; raises FieldError (file named)."""
    try:
        models.check_arch(recipe.model)
        models.check_optimizer(recipe.optimizer)
        loggers.check(recipe.train.loggers)
        device = pick_device(recipe.train.device)
        source = data.load_source(recipe.data)
        if recipe.model.num_classes is not None and recipe.model.num_classes != source.num_classes:
            raise FieldError("model.num_classes", recipe.model.num_classes,
                             f"but the data has {source.num_classes} classes")
        check_groups(recipe, source.num_classes, source.channels)
        world = distributed.from_env().world
        timeline = recipe.timeline(train_samples=len(source.train), world_size=world)
    except FieldError as e:
        raise e.within(file=recipe_file) from None
    place, device = distributed.init(device)
    if device.type == "cpu":
        keep_freed_memory()
    return Setup(recipe, source, timeline, device, dist=place)


def check_groups(recipe: Recipe, num_classes: int, channels: int) -> None:
    """Each parameter group the recipe sets names a kind of parameter its model has (a group of none
    would change nothing, silently: fastnet has no plain biases, only a whitening stem has a
    whiten_bias), and frozen normalisation scales do not start at 0 (zero-initialised residual blocks
    would stay dead). The model is built once, on the meta device (no memory, no initialisation) unless
    the scales' initial values are needed, and then aside from the run's random numbers. Needs no data
    (any class and channel count does): ``cadence plan`` runs it too."""
    own = recipe.optimizer.groups.set()
    if not own:
        return
    frozen_scales = own.get("norm_weight") is not None and own["norm_weight"].frozen
    with torch.random.fork_rng(devices=[]), torch.device("cpu" if frozen_scales else "meta"):
        model = models.build_model(recipe.model, num_classes, channels)
    have = {kind for kind, _ in models.parameter_kinds(model)}
    for kind in own:
        if kind not in have:
            hint = " (a whitening stem's: model.whiten: true, fastnet)" if kind == "whiten_bias" else ""
            groups = ", ".join(sorted(have & {f.name for f in dataclasses.fields(GroupsConfig)}))  # the kinds a group can name
            raise FieldError(f"optimizer.groups.{kind}", "set", f"but {recipe.model.arch} has no {kind} "
                             f"parameters{hint}; groups it has: {groups}")
    if frozen_scales:
        zero = sum(1 for kind, p in models.parameter_kinds(model) if kind == "norm_weight" and not p.detach().any())
        if zero:  # a residual block's last scale, started at 0 and frozen there: the block never learns
            raise FieldError("optimizer.groups.norm_weight.frozen", True, f"but {zero} of {recipe.model.arch}'s "
                             "normalisation scales start at 0 (the last of each residual block: "
                             "model.zero_init_residual), and frozen there their blocks never learn; "
                             "set model.zero_init_residual: false")


@dataclass
class Parts:
    """A model and everything that trains it, for one process. ``forward`` is what a training step
    calls (the model, wrapped in DDP and/or compiled); ``model`` is the bare module (state dicts)."""

    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    ema: nn.Module | None  # torch's AveragedModel (parameters and BatchNorm statistics); evaluation uses it
    optimizer: torch.optim.Optimizer
    scheduler: StepScheduler
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    criterion: nn.Module  # logits, labels or mixing.Targets -> loss
    normalize: Callable[[torch.Tensor], torch.Tensor]  # uint8 batch -> normalised float on the device
    device: torch.device
    micro_batch: int | None = None  # split each batch's forward/backward into chunks of this many images
    clip_grad_norm: float | None = None  # clip the gradients' global norm to this before each update
    clip_mode: str = "norm"  # norm: global L2 norm; agc: adaptive, unit by unit (clip_grad_norm is the factor)
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper, if any (its no_sync)
    ema_decay: list[float] | None = None  # the EMA's decay at each step, when it changes (a half-life, warmup)
    lookahead: Lookahead | None = None  # weights pulled back to their running average every few steps

    @property
    def eval_model(self) -> nn.Module:
        """The weights evaluation uses: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def load_weights(self, state: dict) -> None:
        """Model (and EMA, lookahead) weights from a checkpoint's state. A checkpoint without an EMA or
        lookahead average (switched on at a resume) starts the average from the weights as they are."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.module.load_state_dict(state["model"])
                self.ema.n_averaged.zero_()
        if self.lookahead is not None:  # switched on at a resume: the average starts from the weights
            self.lookahead.load_state_dict(state.get("lookahead") or self.model.state_dict())

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor | mixing.Targets) -> torch.Tensor:
        """Loss of a normalised batch against labels or ``Targets``, gradients (scaled under fp16) in
        ``.grad``; returns the loss (the batch's mean).

        With ``micro_batch``, the batch goes through in chunks of that many images, each chunk's loss
        weighted by its share of the batch, so the gradients sum to the whole batch's (exactly so for
        a model without BatchNorm in training mode: BatchNorm normalises each chunk by its own
        statistics, and its running averages take one update per chunk). Under DDP the chunks
        before the last skip the gradient all-reduce (``no_sync``)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(x)
        if not self.micro_batch or self.micro_batch >= n:
            with self.autocast:
                loss = self.criterion(self.forward(x), y)
            self.scaler.scale(loss).backward()
            return loss.detach()
        total = 0.0
        starts = range(0, n, self.micro_batch)
        for i, a in enumerate(starts):
            chunk = slice(a, a + self.micro_batch)
            quiet = self.ddp.no_sync() if self.ddp is not None and i < len(starts) - 1 else contextlib.nullcontext()
            with quiet:
                with self.autocast:
                    loss = self.criterion(self.forward(x[chunk]), y[chunk]) * (len(x[chunk]) / n)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
        return total

    def update(self, ema: bool = True, norm: bool = False) -> torch.Tensor | None:
        """The optimizer step on the gradients (through the grad scaler; clipped to ``clip_grad_norm``
        if set), then the EMA's. Returns the gradients' global L2 norm before clipping (unscaled under
        fp16) if clipping or ``norm``, else None -- as a tensor: reading it waits for the device."""
        total = None
        if self.clip_grad_norm or norm:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.clip_grad_norm and self.clip_mode == "norm":
                total = torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
            else:
                total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float())
                                                              for p in params if p.grad is not None]))
                if self.clip_grad_norm:
                    adaptive_clip_(params, self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.lookahead is not None:  # the scheduler's clock has not moved yet: this is step last_epoch + 1
            self.lookahead.step(self.model, self.scheduler.last_epoch + 1)
        if ema and self.ema is not None:
            if self.ema_decay is not None:  # this step's decay (the scheduler's clock: it has not moved yet)
                from torch.optim.swa_utils import get_ema_multi_avg_fn

                decay = self.ema_decay[min(max(self.scheduler.last_epoch, 0), len(self.ema_decay) - 1)]
                self.ema.multi_avg_fn = get_ema_multi_avg_fn(decay)
            self.ema.update_parameters(self.model)
        return total

    def with_lr(self, recipe: Recipe, timeline: Timeline) -> Parts:
        """These parts with the optimizer and scheduler of ``recipe``/``timeline`` (e.g. once
        ``optimizer.lr: auto`` has been resolved); model, EMA and wrappers are kept as they are."""
        optimizer = models.build_optimizer(self.model, recipe.optimizer)
        return dataclasses.replace(self, optimizer=optimizer, scheduler=StepScheduler(optimizer, timeline))


class Lookahead:
    """airbench's "lookahead": a running average of the model's floating-point state (weights and
    BatchNorm statistics). After optimizer step ``t`` (1-based) of ``total``, when ``t`` is a multiple
    of ``every``: ``avg = d avg + (1 - d) state`` with ``d = decay x (t / total) ** power``, and the model
    is set to ``avg``; after the last step the model is set to ``avg`` (so with ``total`` not a multiple
    of ``every``, the steps after the last pull-back are dropped, as airbench's are)."""

    def __init__(self, model: nn.Module, every: int, decay: float, power: float, total: int):
        self.every, self.decay, self.power, self.total = every, decay, power, total
        self.average = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, model: nn.Module, t: int) -> None:
        if t % self.every and t < self.total:
            return
        state = model.state_dict()
        if t % self.every == 0:
            d = self.decay * (min(t, self.total) / self.total) ** self.power
            for k, avg in self.average.items():
                avg.lerp_(state[k], 1 - d)
        for k, avg in self.average.items():
            state[k].copy_(avg)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.average.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.average.items():
            v.copy_(state[k])


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output unit (over every dimension but the first); of the whole tensor if 1-d."""
    return x.norm(2) if x.ndim <= 1 else x.norm(2, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_clip_(params, factor: float, eps: float = 1e-3) -> None:
    """Adaptive gradient clipping (Brock et al. 2021, NFNets; timm's ``adaptive_clip_grad``): each
    unit's gradient is scaled down to at most ``factor`` x that unit's weight norm (at least ``eps``)."""
    for p in params:
        if p.grad is None:
            continue
        limit = _unitwise_norm(p).clamp_(min=eps) * factor
        g_norm = _unitwise_norm(p.grad)
        p.grad.copy_(torch.where(g_norm < limit, p.grad, p.grad * (limit / g_norm.clamp(min=1e-6))))


def build_parts(setup: Setup) -> Parts:
    """Seed with the recipe's seed (the same initial weights on every rank), then build everything."""
    r, dev = setup.recipe, setup.device
    torch.manual_seed(r.seed)
    model = models.build_model(r.model, setup.source.num_classes, setup.source.channels)
    if r.train.sync_bn and setup.dist.active:
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if dev.type == "cuda"
                 else distributed.convert_sync_batchnorm(model))
    if r.model.whiten:
        model.init_whitening(whitening_sample(setup))
    model = model.to(dev, memory_format=torch.channels_last if r.train.channels_last else torch.contiguous_format)
    optimizer = models.build_optimizer(model, r.optimizer)
    ema = None
    if r.train.ema is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        decays = setup.timeline.ema_decay
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decays[0]), use_buffers=True)
    scheduler = StepScheduler(optimizer, setup.timeline)
    scaler = torch.amp.GradScaler(dev.type, enabled=r.train.precision == "fp16")
    autocast = torch.autocast(dev.type, dtype=DTYPES[r.train.precision], enabled=r.train.precision != "fp32")
    criterion = mixing.Loss(r.train.loss, r.stage_regularization()[0].label_smoothing, r.train.bce_target_threshold)
    wrapped = model
    if setup.dist.active:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
    forward = torch.compile(wrapped) if r.train.compile else wrapped
    normalize = data.normalizer(setup.source, dev, r.train.channels_last)
    la = r.train.lookahead
    lookahead = Lookahead(model, la.every, la.decay, la.power, len(setup.timeline)) if la is not None else None
    return Parts(model, forward, ema, optimizer, scheduler, scaler, autocast, criterion, normalize, dev,
                 micro_batch=r.train.micro_batch_size, clip_grad_norm=r.train.clip_grad_norm,
                 clip_mode=r.train.clip_mode,
                 ddp=wrapped if setup.dist.active else None,
                 ema_decay=setup.timeline.ema_decay if ema is not None and len(set(decays)) > 1 else None,
                 lookahead=lookahead)


def whitening_sample(setup: Setup, n: int = 5000) -> torch.Tensor:
    """Up to ``n`` training images (drawn from the seed), at stage 0's resolution, normalised."""
    train_set = setup.source.train
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(setup.recipe.seed))[:n]
    images = data.resize_batch(train_set.images[pick], setup.recipe.stages[0].resolution)
    return data.normalizer(setup.source, torch.device("cpu"))(images)
