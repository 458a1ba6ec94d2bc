"""Models: torchvision's ResNets, a CIFAR ResNet-18 and a small fast net; parameter groups."""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn
import torchvision

from cadence.errors import FieldError
from cadence.recipe import ARCHS, TIMM, GroupConfig, GroupsConfig, ModelConfig, OptimizerConfig


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class FastNet(nn.Module):
    """A small airbench-style net (conv-BN-GELU, three pooled blocks, global max pool) that trains
    in minutes on a CPU and works at any input resolution. With ``whiten``, the stem is airbench's
    frozen 2x2 patch-whitening convolution (see ``init_whitening``) followed by GELU."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, whiten: bool = False,
                 widths: list[int] | None = None, dirac: bool = False, pool_ceil: bool = True):
        super().__init__()
        w = list(widths) if widths else [width, 2 * width, 4 * width]
        self.whiten = None
        if whiten:
            cin = 2 * in_channels * 4
            self.whiten = nn.Conv2d(in_channels, cin, kernel_size=2, padding=0, bias=True)
            self.whiten.weight.requires_grad_(False)  # set from the data, never trained
            layers = [nn.GELU()]
        else:
            layers = _conv_bn(in_channels, w[0] // 2)
            cin = w[0] // 2
        for c in w:
            layers += _conv_bn(cin, c)[:1] + [nn.MaxPool2d(2, ceil_mode=pool_ceil)] + _conv_bn(c, c)[1:] \
                + _conv_bn(c, c)
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes, bias=False)
        if dirac:
            self.dirac_()

    @torch.no_grad()
    def dirac_(self) -> None:
        """airbench's initialisation: the first min(in, out) filters of each 3x3 convolution pass their
        input channel through (``torch.nn.init.dirac_``); the other filters keep their random start."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                nn.init.dirac_(m.weight[: min(m.in_channels, m.out_channels)])

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem's filters from normalised training images (N, C, H, W): the eigenvectors of
        the 2x2 patches' covariance, scaled by 1/sqrt(eigenvalue + eps), and their negatives, so
        the first layer decorrelates pixels the way airbench does."""
        c = images.shape[1]
        patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4).double()
        cov = patches.T @ patches / len(patches)
        values, vectors = torch.linalg.eigh(cov)
        filters = (vectors.T / torch.sqrt(values + eps)[:, None]).reshape(-1, c, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).float())
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whiten is not None:
            x = self.whiten(x)
        x = self.features(x)
        return self.head(torch.amax(x, dim=(2, 3)))


def _resnet(name: str):
    def build(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
        m = getattr(torchvision.models, name)(weights=None, num_classes=num_classes,
                                              zero_init_residual=cfg.zero_init_residual)
        if in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return m
    return build


def _cifar_resnet18(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """ResNet-18 with a 3x3 stride-1 stem and no max pool, the usual choice for 32 px images."""
    m = torchvision.models.resnet18(weights=None, num_classes=num_classes,
                                    zero_init_residual=cfg.zero_init_residual)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


BUILDERS = {  # recipe.ARCHS, each name's builder
    "fastnet": lambda cfg, n, c: FastNet(n, c, cfg.width, cfg.whiten, cfg.widths, cfg.dirac, cfg.pool_ceil),
    "cifar_resnet18": _cifar_resnet18,
    **{name: _resnet(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
}
assert tuple(BUILDERS) == ARCHS
TIMM_OPTIMIZERS = {"lamb": "Lamb", "lars": "Lars", "lion": "Lion"}  # optimizer.name -> timm.optim class


def _timm(field: str, value: object):
    """timm, or one line saying how to install it (an optional extra)."""
    try:
        import timm
        import timm.optim
    except ImportError:
        raise FieldError(field, value, "needs timm, an optional extra: pip install 'cadence[timm]'") from None
    return timm


def timm_missing(model: ModelConfig, optimizer: OptimizerConfig) -> bool:
    """Whether the recipe needs timm (a ``timm/`` model, a large-batch optimizer) and it is not installed."""
    needed = model.arch.startswith(TIMM) or optimizer.name in TIMM_OPTIMIZERS
    return needed and importlib.util.find_spec("timm") is None


def check_arch(cfg: ModelConfig) -> None:
    """A timm model exists (timm installed); the recipe checked the rest of ``model`` when it was read."""
    if cfg.arch.startswith(TIMM):
        if not _timm("model.arch", cfg.arch).is_model(cfg.arch[len(TIMM):]):
            raise FieldError("model.arch", cfg.arch, f"timm has no model {cfg.arch[len(TIMM):]!r} "
                             "(timm.list_models('*pattern*') lists them)")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The recipe's model; ``model.num_classes``, if given, must match the data."""
    check_arch(cfg)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise FieldError("model.num_classes", cfg.num_classes, f"but the data has {num_classes} classes")
    if cfg.arch.startswith(TIMM):
        model = _timm("model.arch", cfg.arch).create_model(cfg.arch[len(TIMM):], pretrained=False,
                                                           num_classes=num_classes, in_chans=in_channels)
    else:
        model = BUILDERS[cfg.arch](cfg, num_classes, in_channels)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = m.momentum if cfg.bn_momentum is None else cfg.bn_momentum
            m.eps = m.eps if cfg.bn_eps is None else cfg.bn_eps
    if cfg.logit_scale != 1.0:
        model.register_forward_hook(functools.partial(_scale_output, cfg.logit_scale))
    return model


def _scale_output(scale: float, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output * scale


def check_optimizer(cfg: OptimizerConfig) -> None:
    """A large-batch optimizer needs timm: say so before anything is written."""
    if cfg.name in TIMM_OPTIMIZERS:
        _timm("optimizer.name", cfg.name)


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def parameter_kinds(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Each trainable-or-frozen parameter once, with its kind: ``norm_weight``/``norm_bias`` (a
    BatchNorm's, LayerNorm's or GroupNorm's), ``whiten_bias`` (fastnet's stem), ``bias`` (every other
    1-d parameter) or ``weight``."""
    out, seen = [], set()
    whiten = getattr(model, "whiten", None)
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, _NORMS):
                kind = "norm_weight" if name == "weight" else "norm_bias"
            elif m is whiten and name == "bias":
                kind = "whiten_bias"
            else:
                kind = "bias" if p.ndim <= 1 else "weight"
            out.append((kind, p))
    return out


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False,
                 groups: GroupsConfig | None = None, lr: float = 1.0) -> list[dict]:
    """Weight decay on weights only: norm scales/shifts and biases (1-d parameters) get none
    (``decay_norm_and_bias``: they do too). ``groups`` gives kinds of parameters (see
    ``parameter_kinds``) their own LR multiplier (``lr_mult``; the scheduler keeps it), weight decay,
    a number of epochs to train (``epochs``; the scheduler holds them after) or freezes them
    (``requires_grad`` off). The optimizer's own group comes first."""
    own = groups.set() if groups is not None else {}
    if not own:
        if decay_norm_and_bias:
            return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    by_kind: dict[str, list] = {}
    for kind, p in parameter_kinds(model):
        if kind in own and own[kind].frozen:
            p.requires_grad_(False)
        if p.requires_grad:
            by_kind.setdefault(kind, []).append(p)
    out = [{"params": by_kind.pop("weight", []), "weight_decay": weight_decay}]
    plain = weight_decay if decay_norm_and_bias else 0.0
    for kind, params in by_kind.items():
        g = own.get(kind) or GroupConfig()
        out.append({"params": params, "kind": kind, "lr": lr * g.lr, "lr_mult": g.lr, "epochs": g.epochs,
                    "weight_decay": plain if g.weight_decay is None else g.weight_decay})
    return out


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    lr = 1.0 if cfg.lr == "auto" else cfg.lr  # "auto": a stand-in until the range test has run
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias, cfg.groups, lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))
    cls = getattr(_timm("optimizer.name", cfg.name).optim, TIMM_OPTIMIZERS[cfg.name])
    if cfg.name == "lars":  # momentum is SGD's; LARS's trust ratio scales each layer's step
        return cls(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return cls(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))  # LAMB, Lion: beta1 is the scheduled momentum
