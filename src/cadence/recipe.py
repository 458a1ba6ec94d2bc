"""Recipes: YAML -> typed, validated dataclasses. Pure (reads files, no torch).

Every key is declared here; an unknown key, a wrong type or an impossible value raises
:class:`~cadence.errors.FieldError` naming the file, the dotted field path and the value.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, Union

import yaml

from cadence import schedules
from cadence.errors import FieldError
from cadence import regularization
from cadence.plan import MAX_RESOLUTION, LrScaling, Progress, Scope, Stage, Timeline, ema_decays, make_timeline
from cadence.regularization import Regularization
from cadence.schedules import Duration, Piece, ScheduleSpec

DIGITS_TOTAL = 1797  # images in scikit-learn's digits
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check(cond: bool, name: str, value: object, message: str) -> None:
    if not cond:
        raise FieldError(name, value, message)


@dataclass(kw_only=True)
class DataConfig:
    """Where images come from. ``train_samples`` lets ``cadence plan`` work with no data on disk."""

    source: Literal["digits", "synthetic", "cifar10", "imagefolder"] = "digits"
    root: str | None = None  # cifar10: download/cache dir or ImageFolder of JPEGs; imagefolder: train/ + val/
    train_samples: int | None = None  # images in the training set, if known without reading it
    val_split: str | None = None  # folder of held-out images (default: val/ for imagefolder, test/ for cifar10)
    val_fraction: float = 0.2  # digits: share of the 1,797 images held out
    samples: int = 2048  # synthetic: training images
    val_samples: int = 512  # synthetic: held-out images
    image_size: int = 32  # synthetic: native size in px
    num_classes: int = 10  # synthetic: classes
    download: bool = False  # cifar10: let torchvision download into root
    drop_last: bool = True  # drop each epoch's last partial batch
    num_workers: int | Literal["auto"] = "auto"  # file decoding processes per rank (auto: from the CPU count)
    cache: bool = True  # cifar10 JPEGs: keep the decoded uint8 tensor in cache_dir, keyed by file contents
    cache_dir: str | None = None  # default: $CADENCE_CACHE_DIR, else ~/.cache/cadence
    prepared: str | None = None  # imagefolder: train/ read from this copy made by `cadence prepare`
    on_bad_image: Literal["skip", "error"] = "skip"  # unreadable files: skip and list them, or stop

    def __post_init__(self):
        for name in ("root", "cache_dir", "prepared"):
            if getattr(self, name) is not None:
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        _check(self.train_samples is None or self.train_samples > 0, "train_samples", self.train_samples,
               "must be positive")
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "must be in (0, 1)")
        for name in ("samples", "val_samples", "image_size", "num_classes"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        _check(self.num_classes >= 2, "num_classes", self.num_classes, "needs at least 2 classes")
        _check(self.num_workers == "auto" or self.num_workers >= 0, "num_workers", self.num_workers,
               "must be >= 0 (or auto)")
        if self.source == "imagefolder":
            _check(self.root is not None, "root", self.root, "imagefolder needs data.root")
        _check(self.prepared is None or self.source == "imagefolder", "prepared", self.prepared,
               "a prepared copy is for source: imagefolder")

    def workers(self) -> int:
        """Decoding processes per rank: as set, or (auto) one per CPU core this process may use,
        less one for the training loop, at most 8."""
        if self.num_workers != "auto":
            return self.num_workers
        return max(1, min(8, usable_cores() - 1))

    def train_size(self) -> int:
        """Images in the training set: stated, known for the source, or counted on disk."""
        if self.train_samples is not None:
            return self.train_samples
        if self.source == "digits":
            return DIGITS_TOTAL - int(DIGITS_TOTAL * self.val_fraction)
        if self.source == "synthetic":
            return self.samples
        if self.source == "cifar10":
            return 50_000
        train = os.path.join(self.root, "train")  # (a prepared copy holds the same files, less unreadable ones)
        if not os.path.isdir(train):
            raise FieldError("data.root", self.root, "has no train/ folder (or set data.train_samples)")
        return sum(f.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(train) for f in files)


ARCHS = ("fastnet", "cifar_resnet18", "resnet18", "resnet34", "resnet50", "resnet101")  # cadence's own models
TIMM = "timm/"  # model.arch: timm/<name> is timm.create_model(name)


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "fastnet"  # one of ARCHS, or timm/<name>
    num_classes: int | None = None  # default: what the data has
    zero_init_residual: bool = True  # last BN of each residual block starts at 0 (Goyal et al.)
    width: int = 64  # fastnet: channels of the first block
    widths: list[int] | None = None  # fastnet: channels of its three blocks (default: width x [1, 2, 4])
    whiten: bool = False  # fastnet: a frozen 2x2 patch-whitening stem set from training images (airbench)
    dirac: bool = False  # fastnet: each 3x3 conv's first min(in, out) filters start as the identity (airbench)
    pool_ceil: bool = True  # fastnet: max pools round odd sizes up (false: down, as airbench's)
    logit_scale: float = 1.0  # the logits are multiplied by this (airbench: 1/9)
    bn_momentum: float | None = None  # every BatchNorm's momentum, torch's convention (airbench: 0.4); default torch's 0.1
    bn_eps: float | None = None  # every BatchNorm's eps (airbench: 1e-12); default torch's 1e-5

    def __post_init__(self):
        _check(self.arch in ARCHS or self.arch.startswith(TIMM) and len(self.arch) > len(TIMM), "arch", self.arch,
               "no such model (have: " + ", ".join(ARCHS) + ", or timm/<name>)")
        _check(not self.whiten or self.arch == "fastnet", "whiten", True,
               f"patch whitening is a fastnet stem, not {self.arch}'s")
        for key, off in (("width", 64), ("widths", None), ("dirac", False), ("pool_ceil", True)):
            _check(getattr(self, key) == off or self.arch == "fastnet", key, getattr(self, key),
                   f"is a setting of fastnet's, not {self.arch}'s")
        _check(self.num_classes is None or self.num_classes >= 2, "num_classes", self.num_classes,
               "needs at least 2 classes")
        _check(self.width > 0, "width", self.width, "must be positive")
        _check(self.widths is None or len(self.widths) == 3 and all(isinstance(w, int) and w > 0 for w in self.widths),
               "widths", self.widths, "must be three positive channel counts")
        _check(0 < self.logit_scale < float("inf"), "logit_scale", self.logit_scale, "must be positive and finite")
        _check(self.bn_momentum is None or 0 < self.bn_momentum <= 1, "bn_momentum", self.bn_momentum,
               "must be in (0, 1] (torch's convention: the weight of the new batch's statistics)")
        _check(self.bn_eps is None or 0 < self.bn_eps < 1, "bn_eps", self.bn_eps, "must be in (0, 1)")


@dataclass(kw_only=True)
class RangeTestConfig:
    """The LR range test ``optimizer.lr: auto`` runs before training, and the range ``cadence
    find-lr`` sweeps unless told otherwise: ``steps`` batches, the LR rising exponentially from
    ``start`` to ``end``."""

    steps: int = 200
    start: float = 1.0e-6
    end: float = 10.0

    def __post_init__(self):
        _check(self.steps >= 5, "steps", self.steps, "must be >= 5")
        _check(self.start > 0, "start", self.start, "must be positive")
        _check(self.start < self.end < float("inf"), "end", self.end,
               f"must be finite and above start ({self.start:g})")


@dataclass(kw_only=True)
class GroupConfig:
    """One kind of parameter's own optimizer settings (``optimizer.groups.<kind>``)."""

    lr: float = 1.0  # multiplier of the scheduled LR (airbench's BatchNorm biases: 64)
    weight_decay: float | None = None  # this group's weight decay (default: the optimizer's, or 0 for
    # norms and biases unless decay_norm_and_bias)
    frozen: bool = False  # never trained: stays at its initial value (airbench's BatchNorm weights)
    epochs: int | None = None  # trained for the first N (global) epochs, then held (airbench's whitening bias: 3)

    def __post_init__(self):
        _check(0 <= self.lr < float("inf"), "lr", self.lr, "is a multiplier of the scheduled LR: must be >= 0")
        _check(self.weight_decay is None or 0 <= self.weight_decay < float("inf"), "weight_decay",
               self.weight_decay, "must be >= 0 and finite")
        _check(self.epochs is None or self.epochs >= 1, "epochs", self.epochs, "must be >= 1 (or frozen: true)")
        _check(not (self.frozen and self.epochs), "frozen", self.frozen, "set frozen or epochs, not both")


@dataclass(kw_only=True)
class GroupsConfig:
    """Parameters by kind: BatchNorm/LayerNorm/GroupNorm weights and biases, other biases (every
    other 1-d parameter), and fastnet's whitening-stem bias. Everything else is the optimizer's own
    group, at the scheduled LR and ``optimizer.weight_decay``."""

    norm_weight: GroupConfig | None = None
    norm_bias: GroupConfig | None = None
    bias: GroupConfig | None = None
    whiten_bias: GroupConfig | None = None

    def set(self) -> dict[str, GroupConfig]:
        return {k: getattr(self, k) for k in ("norm_weight", "norm_bias", "bias", "whiten_bias")
                if getattr(self, k) is not None}


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["sgd", "adamw", "lamb", "lars", "lion"] = "sgd"  # lamb, lars, lion: timm's (optional extra)
    lr: float | Literal["auto"] = 0.1  # PEAK LR at reference_batch_size ("auto": LR range test first)
    reference_batch_size: int | None = None  # default: the first stage's batch size
    lr_scaling: LrScaling = "none"  # lr x f(stage global batch / reference_batch_size)
    momentum: float = 0.9  # SGD/LARS momentum or AdamW/LAMB/Lion beta1, where the schedule does not cycle it
    beta2: float = 0.999  # AdamW, LAMB, Lion
    nesterov: bool = False
    weight_decay: float = 5.0e-5
    decay_norm_and_bias: bool = False  # weight decay on BN/bias parameters too
    groups: GroupsConfig = field(default_factory=GroupsConfig)  # per kind of parameter: LR multiplier, decay, frozen
    lr_find: RangeTestConfig = field(default_factory=RangeTestConfig)  # the range test of lr: auto

    def __post_init__(self):
        _check(self.lr == "auto" or 0 < self.lr < float("inf"), "lr", self.lr, "must be positive and finite (or auto)")
        _check(self.reference_batch_size is None or self.reference_batch_size > 0,
               "reference_batch_size", self.reference_batch_size, "must be positive")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "beta2", self.beta2, "must be in [0, 1)")
        _check(0 <= self.weight_decay < float("inf"), "weight_decay", self.weight_decay, "must be >= 0 and finite")


@dataclass(kw_only=True)
class ScheduleConfig:
    """``scope``/``progress`` plus the schedule itself (``kind`` and its keys, in the same mapping)."""

    spec: ScheduleSpec
    scope: Scope = "global"
    progress: Progress = "steps"


@dataclass(kw_only=True)
class LookaheadConfig:
    """Every ``every`` optimizer steps, an average of the weights (and BatchNorm statistics) moves
    toward the trained ones, ``avg = d avg + (1 - d) weights`` with ``d = decay x progress ** power``,
    and the weights are set to it; after the last step the weights are the average (airbench's
    "lookahead": every 5 steps, 0.95 ** 5, power 3)."""

    every: int = 5
    decay: float = 0.7737809375  # 0.95 ** 5
    power: float = 3.0

    def __post_init__(self):
        _check(self.every >= 1, "every", self.every, "must be >= 1 optimizer step")
        _check(0 <= self.decay < 1, "decay", self.decay, "must be in [0, 1)")
        _check(0 <= self.power < float("inf"), "power", self.power, "must be >= 0 and finite")


@dataclass(kw_only=True)
class TrainConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch
    label_smoothing: float = 0.0  # the recipe-wide default of regularization.label_smoothing (older spelling)
    loss: Literal["ce", "bce"] = "ce"  # cross-entropy | binary cross-entropy per class (timm's, "ResNet strikes back")
    bce_target_threshold: float | None = None  # bce: targets above it become 1, the rest 0 (timm's)
    eval_resolution: int | None = None  # default: the last stage's resolution
    eval_crop_pct: float | None = None  # centre crop's share of the resized shorter side (default: files 0.875)
    eval_resize: int | None = None  # or: shorter side resized to at eval_resolution (232 for 224), scaled with it
    eval_every: int | Literal["epoch", "stage", "end"] = "epoch"  # N: every N optimizer steps (and at the end)
    eval_batch_size: int = 256
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: only at epoch ends)
    keep_best: int = 0  # also keep the k checkpoints with the best held-out top-1 (checkpoints/best-step*.pt)
    keep_every: int = 0  # also keep the checkpoint of every N-th epoch (checkpoints/epoch*.pt)
    log_every: int = 1  # optimizer steps between metrics.jsonl rows
    loggers: list[Literal["wandb", "mlflow"]] = field(default_factory=list)  # trackers besides TensorBoard (extras)
    micro_batch_size: int | None = None  # per process: split each batch into chunks of this many (accumulation)
    clip_grad_norm: float | None = None  # clip the gradients' global L2 norm to this before each update
    clip_mode: Literal["norm", "agc"] = "norm"  # agc: adaptive, per unit; clip_grad_norm is then its factor
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss: stop (exit 1) | skip that update
    ema: float | Duration | None = None  # weight EMA: decay per step (0.999), or a half-life ("2 epochs", "500k samples")
    ema_warmup: bool = False  # the EMA's decay is at most (1 + step) / (10 + step) (timm's warmup)
    lookahead: LookaheadConfig | None = None  # weights pulled back to their running average (airbench's)
    tta: Literal["none", "flip", "flip-translate"] = "none"  # evaluation: average the logits of the image and its
    # mirror; flip-translate: and of both shifted by 1 px diagonally each way (reflect padded), airbench's 6 views

    def __post_init__(self):
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.eval_resolution is None or 8 <= self.eval_resolution <= MAX_RESOLUTION, "eval_resolution",
               self.eval_resolution, f"must be 8 .. {MAX_RESOLUTION} px")
        _check(self.eval_resize is None or self.eval_resize <= MAX_RESOLUTION, "eval_resize", self.eval_resize,
               f"must be at most {MAX_RESOLUTION} px")
        _check(self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, "eval_crop_pct", self.eval_crop_pct,
               "must be in (0, 1]")
        _check(self.eval_resize is None or self.eval_crop_pct is None, "eval_resize", self.eval_resize,
               "set eval_resize or eval_crop_pct, not both")
        _check(self.eval_batch_size > 0, "eval_batch_size", self.eval_batch_size, "must be positive")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0")
        _check(self.keep_best >= 0, "keep_best", self.keep_best, "must be >= 0 (0: keep only last.pt)")
        _check(self.keep_every >= 0, "keep_every", self.keep_every, "must be >= 0 epochs (0: none)")
        _check(self.log_every >= 1, "log_every", self.log_every, "must be >= 1")
        _check(not isinstance(self.eval_every, int) or self.eval_every >= 1, "eval_every", self.eval_every,
               "must be a number of steps >= 1, or epoch, stage or end")
        _check(self.ema is None or (0 < self.ema < 1 if isinstance(self.ema, float) else self.ema.unit != "fraction"),
               "ema", self.ema, "must be a decay per step in (0, 1), or a half-life: 'N epochs|steps|samples'")
        _check(not self.ema_warmup or self.ema is not None, "ema_warmup", self.ema_warmup, "needs train.ema")
        _check(self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size",
               self.micro_batch_size, "must be >= 1 (or unset: the whole per-process batch at once)")
        _check(self.clip_grad_norm is None or 0 < self.clip_grad_norm < float("inf"), "clip_grad_norm",
               self.clip_grad_norm, "must be positive and finite (or unset: no clipping)")
        _check(self.clip_mode == "norm" or self.clip_grad_norm is not None, "clip_mode", self.clip_mode,
               "needs train.clip_grad_norm (agc's factor, e.g. 0.01)")
        _check(self.bce_target_threshold is None or (self.loss == "bce" and 0 <= self.bce_target_threshold < 1),
               "bce_target_threshold", self.bce_target_threshold, "must be in [0, 1), with loss: bce")


@dataclass(kw_only=True)
class Recipe:
    name: str
    stages: list[Stage]
    schedule: ScheduleConfig
    seed: int = 0  # any value torch.manual_seed takes: -2**63 .. 2**64 - 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularization: Regularization = field(default_factory=Regularization)  # each stage may override any key
    momentum_schedule: ScheduleSpec | None = None  # momentum's own curve: optimizer.momentum x its multiplier
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # as written, after --set

    def __post_init__(self):
        _check(len(self.stages) > 0, "stages", self.stages, "needs at least one stage")
        _check(bool(self.name) and not set(self.name) & {"/", "\\", "\0"} and self.name not in (".", ".."),
               "name", self.name, "is a name, not a path: no '/', '\\' or NUL, not '.' or '..' (run folders are "
               "runs/<name>-<time>)")
        _check(self.train.eval_resize is None or self.train.eval_resize >= self.eval_resolution, "train.eval_resize",
               self.train.eval_resize, f"must be >= the evaluation resolution ({self.eval_resolution} px)")
        _check(-2**63 <= self.seed < 2**64, "seed", self.seed, "must be in -2**63 .. 2**64 - 1 (what torch takes)")
        _check(self.regularization.label_smoothing is None or not self.train.label_smoothing,
               "train.label_smoothing", self.train.label_smoothing, "is also set as regularization.label_smoothing; "
               "keep one")
        self.stage_regularization()  # a key the source cannot apply is an error now, not at training
        _check(self.train.tta == "none" or self.data.source not in regularization.NEVER_FLIPPED, "train.tta",
               self.train.tta, f"but {self.data.source} images are never flipped in training (mirrored digits are "
               "not digits)")
        _check(not self.model.whiten or self.data.source in regularization.IN_MEMORY_SOURCES, "model.whiten", True,
               f"is set from in-memory images ({', '.join(regularization.IN_MEMORY_SOURCES)}), not from "
               f"{self.data.source} files")

    def stage_regularization(self) -> list[Regularization]:
        """What each stage trains with: its own keys over the recipe's over the defaults."""
        return regularization.resolve(self.regularization, [s.regularization for s in self.stages],
                                      source=self.data.source, label_smoothing=self.train.label_smoothing)

    def timeline(self, train_samples: int | None = None, world_size: int = 1) -> Timeline:
        """Every optimizer step with its LR and momentum, and each stage's regularization (raises
        FieldError if the schedule can't fit)."""
        o = self.optimizer
        t = make_timeline(
            self.stages, self.data.train_size() if train_samples is None else train_samples,
            self.schedule.spec, lr=1.0 if o.lr == "auto" else o.lr, momentum=o.momentum, scope=self.schedule.scope,
            progress=self.schedule.progress, reference_batch_size=o.reference_batch_size,
            lr_scaling=o.lr_scaling, world_size=world_size, drop_last=self.data.drop_last,
            momentum_schedule=self.momentum_schedule)
        t.regularization = self.stage_regularization()
        ema = self.train.ema
        if ema is not None:
            n = self.data.train_size() if train_samples is None else train_samples
            t.ema_decay = ema_decays(t, decay=ema if isinstance(ema, float) else None,
                                     half_life=None if isinstance(ema, float) else ema, train_samples=n,
                                     warmup=self.train.ema_warmup)
            if not isinstance(ema, float):
                t.ema_half_life = ema.value * (n if ema.unit == "epochs" else 1) if ema.unit != "steps" else None
                short = ema.value < 1 if ema.unit == "steps" else t.ema_half_life < max(t.samples)
                _check(not short, "train.ema", f"{ema.value:g} {ema.unit}", "is a half-life shorter than one "
                       f"optimizer step ({max(t.samples):,} images)")
        micro = self.train.micro_batch_size
        for k, st in enumerate(self.stages):
            local = st.batch_size // world_size
            _check(micro is None or local % micro == 0, "train.micro_batch_size", micro,
                   f"does not divide stage {k}'s per-process batch of {local} images ({st.batch_size} over "
                   f"{world_size} process(es))")
        return t

    @property
    def eval_resolution(self) -> int:
        return self.train.eval_resolution or self.stages[-1].resolution

    def eval_crop_pct_at(self, resolution: int) -> float | None:
        """The centre crop's share of the resized shorter side when evaluating at ``resolution`` px:
        ``train.eval_crop_pct``, or from ``train.eval_resize`` scaled to ``resolution`` (the resize is
        round(resolution x eval_resize / eval_resolution)); None if neither is set (the source's default)."""
        t = self.train
        if t.eval_resize is None:
            return t.eval_crop_pct
        return resolution / round(resolution * t.eval_resize / self.eval_resolution)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from YAML, with field paths in every error


def _join(path: str, name: object) -> str:
    if not (isinstance(name, int) or isinstance(name, str) and name.strip() and name.isprintable()):
        name = repr(name)  # an empty, blank or multi-line key, None, a float: visible, on one line
    return f"{path}.{name}" if path else str(name)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Duration: "a duration ('2 epochs', '500 steps', '1M samples')"}.get(tp, str(tp))


def _convert(tp: Any, raw: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, raw, path)
            except FieldError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise FieldError(path, raw, "must be " + " or ".join(_describe(o) for o in options))
    if origin is Literal:
        if raw in args and not (isinstance(raw, bool) and bool not in map(type, args)):
            return raw
        raise FieldError(path, raw, "must be " + _describe(tp))
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(raw)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(raw, str):
            return raw
    elif origin is list:
        if not isinstance(raw, list):
            raise FieldError(path, raw, "must be a list")
        return [_convert(args[0], v, _join(path, i)) for i, v in enumerate(raw)]
    elif origin is tuple:
        if not isinstance(raw, (list, tuple)) or len(raw) != len(args):
            raise FieldError(path, raw, f"must be a list of {len(args)}")
        return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, raw)))
    elif tp is Duration:
        try:
            return Duration.parse(raw)
        except ValueError as e:
            raise FieldError(path, raw, str(e)) from None
    elif tp is ScheduleSpec:
        return parse_schedule(raw, path)
    elif tp is ScheduleConfig:
        return _parse_schedule_config(raw, path)
    elif tp is Piece:
        if not isinstance(raw, dict):
            raise FieldError(path, raw, "must be a mapping")
        rest = {k: v for k, v in raw.items() if k != "duration"}
        duration = _convert(Duration, raw["duration"], _join(path, "duration")) if "duration" in raw else None
        return Piece(schedule=parse_schedule(rest, path), duration=duration)
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, raw, path)
    else:  # pragma: no cover - a type this builder does not know is a bug here, not bad input
        raise TypeError(f"cannot build {tp}")
    raise FieldError(path, raw, "must be " + _describe(tp))


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """``cls(**raw)`` with every field converted and checked; unknown keys are errors."""
    if not isinstance(raw, dict):
        raise FieldError(path or "(top level)", raw, "must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "raw"}
    for key in raw:
        if key not in known:
            raise FieldError(_join(path, key), raw[key], f"unknown key (known: {', '.join(known)})")
    kwargs = {}
    for name, f in known.items():
        if name in raw:
            kwargs[name] = _convert(hints[name], raw[name], _join(path, name))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise FieldError(_join(path, name), None, "is required")
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise e.within(path) from None


def parse_schedule(raw: Any, path: str = "schedule") -> ScheduleSpec:
    if not isinstance(raw, dict):
        raise FieldError(path, raw, "must be a mapping with a 'kind'")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in schedules.KINDS:
        raise FieldError(_join(path, "kind"), kind, "must be one of " + ", ".join(schedules.KINDS))
    return from_dict(schedules.KINDS[kind], {k: v for k, v in raw.items() if k != "kind"}, path)


def _parse_schedule_config(raw: Any, path: str = "schedule") -> ScheduleConfig:
    if not isinstance(raw, dict):
        raise FieldError(path, raw, "must be a mapping with a 'kind'")
    outer = ("scope", "progress")
    return ScheduleConfig(
        spec=parse_schedule({k: v for k, v in raw.items() if k not in outer}, path),
        scope=_convert(Scope, raw.get("scope", "global"), _join(path, "scope")),
        progress=_convert(Progress, raw.get("progress", "steps"), _join(path, "progress")))


# ---------------------------------------------------------------------------------------------
# Files and overrides


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """``["optimizer.lr=0.4", "stages.0.batch_size=256"]`` applied to a copy; values are YAML."""
    out = copy.deepcopy(raw)
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise FieldError("--set", item, "must be key=value, e.g. optimizer.lr=0.4")
        parts = key.split(".")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise FieldError(where, item, f"no such list index (the list has {len(node)} items)")
                part = int(part)
            elif not isinstance(node, dict):
                raise FieldError(where, item, "cannot set a key inside a non-mapping value")
            if last:
                try:
                    node[part] = yaml.safe_load(text)
                except yaml.YAMLError:
                    raise FieldError(key, text, "is not a valid YAML value") from None
            else:
                if isinstance(node, dict) and part not in node:
                    node[part] = {}
                node = node[part]
    return out


def recipe_from_dict(raw: dict, file: str | None = None) -> Recipe:
    """Validated ``Recipe``; errors name ``file`` and the field."""
    try:
        recipe = from_dict(Recipe, raw, "")
    except FieldError as e:
        raise e.within(file=file) from None
    recipe.raw = copy.deepcopy(raw)
    return recipe


class _Loader(yaml.SafeLoader):
    """YAML as ``yaml.safe_load`` reads it, but a key given twice in one mapping is an error (naming
    the key and both lines), not silently the last one."""


def _unique_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: the constructor below says what is wrong with it
            continue
        if first != key_node.start_mark.line + 1:
            raise FieldError(str(key), "(given twice)", f"appears on line {first} and again on line "
                             f"{key_node.start_mark.line + 1} of one mapping; keep one")
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_recipe(path: str, sets: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except FieldError as e:
        raise e.within(file=path) from None
    except RecursionError:
        raise FieldError("(file)", path, "is nested too deeply to be a recipe", file=path) from None
    except OSError as e:
        raise FieldError("(file)", path, f"cannot read: {e.strerror}", file=path) from None
    except UnicodeDecodeError as e:
        raise FieldError("(file)", path, f"is not UTF-8 text (byte {e.start}: {e.reason})", file=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, always
        raise FieldError(where, path, f"is not valid YAML: {problem}", file=path) from None
    try:
        raw = apply_overrides(raw if raw is not None else {}, list(sets))
    except FieldError as e:
        raise e.within(file=path) from None
    return recipe_from_dict(raw, path)


def dump_recipe(recipe: Recipe, header: str = "") -> str:
    """The recipe as YAML, after a ``# header`` comment if given."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(recipe.raw, sort_keys=False)


def with_lr(recipe: Recipe, lr: float) -> Recipe:
    """A copy of ``recipe`` with ``optimizer.lr`` set (in the dataclass and the written form)."""
    raw = copy.deepcopy(recipe.raw)
    raw.setdefault("optimizer", {})["lr"] = lr
    return recipe_from_dict(raw)


def as_recorded(recipe: Recipe, run_recipe: Recipe) -> Recipe:
    """``recipe``, with the LR the run's range test chose if ``recipe`` says ``optimizer.lr: auto``."""
    return with_lr(recipe, run_recipe.optimizer.lr) if recipe.optimizer.lr == "auto" else recipe
