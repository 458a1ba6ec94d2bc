"""Models: torchvision's ResNets, a CIFAR ResNet-18 and a small fast net; parameter groups."""

from __future__ import annotations

import torch
from torch import nn
import torchvision

from cadence.errors import FieldError
from cadence.recipe import ModelConfig, OptimizerConfig


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class FastNet(nn.Module):
    """A small airbench-style net (conv-BN-GELU, three pooled blocks, global max pool) that trains
    in minutes on a CPU and works at any input resolution. With ``whiten``, the stem is airbench's
    frozen 2x2 patch-whitening convolution (see ``init_whitening``) followed by GELU."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64, whiten: bool = False,
                 widths: list[int] | None = None):
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
            layers += _conv_bn(cin, c)[:1] + [nn.MaxPool2d(2, ceil_mode=True)] + _conv_bn(c, c)[1:] \
                + _conv_bn(c, c)
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes, bias=False)

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


ARCHS = {
    "fastnet": lambda cfg, n, c: FastNet(n, c, cfg.width, cfg.whiten, cfg.widths),
    "cifar_resnet18": _cifar_resnet18,
    **{name: _resnet(name) for name in ("resnet18", "resnet34", "resnet50", "resnet101")},
}


TIMM = "timm/"  # model.arch: timm/<name> is timm.create_model(name)
TIMM_OPTIMIZERS = {"lamb": "Lamb", "lars": "Lars", "lion": "Lion"}  # optimizer.name -> timm.optim class


def _timm(field: str, value: object):
    """timm, or one line saying how to install it (an optional extra)."""
    try:
        import timm
        import timm.optim
    except ImportError:
        raise FieldError(field, value, "needs timm, an optional extra: pip install 'cadence[timm]'") from None
    return timm


def check_arch(cfg: ModelConfig) -> None:
    if cfg.arch.startswith(TIMM):
        if not _timm("model.arch", cfg.arch).is_model(cfg.arch[len(TIMM):]):
            raise FieldError("model.arch", cfg.arch, f"timm has no model {cfg.arch[len(TIMM):]!r} "
                             "(timm.list_models('*pattern*') lists them)")
    elif cfg.arch not in ARCHS:
        raise FieldError("model.arch", cfg.arch, "no such model (have: " + ", ".join(ARCHS) + ", or timm/<name>)")
    if cfg.whiten and cfg.arch != "fastnet":
        raise FieldError("model.whiten", True, f"patch whitening is a fastnet stem, not {cfg.arch}'s")
    if cfg.widths is not None and cfg.arch != "fastnet":
        raise FieldError("model.widths", cfg.widths, f"per-block widths are fastnet's, not {cfg.arch}'s")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The recipe's model; ``model.num_classes``, if given, must match the data."""
    check_arch(cfg)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise FieldError("model.num_classes", cfg.num_classes, f"but the data has {num_classes} classes")
    if cfg.arch.startswith(TIMM):
        return _timm("model.arch", cfg.arch).create_model(cfg.arch[len(TIMM):], pretrained=False,
                                                          num_classes=num_classes, in_chans=in_channels)
    return ARCHS[cfg.arch](cfg, num_classes, in_channels)


def check_optimizer(cfg: OptimizerConfig) -> None:
    """A large-batch optimizer needs timm: say so before anything is written."""
    if cfg.name in TIMM_OPTIMIZERS:
        _timm("optimizer.name", cfg.name)


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Weight decay on weights only: norm scales/shifts and biases (1-d parameters) get none."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias)
    lr = 1.0 if cfg.lr == "auto" else cfg.lr  # "auto": a stand-in until the range test has run
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))
    cls = getattr(_timm("optimizer.name", cfg.name).optim, TIMM_OPTIMIZERS[cfg.name])
    if cfg.name == "lars":  # momentum is SGD's; LARS's trust ratio scales each layer's step
        return cls(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return cls(groups, lr=lr, betas=(cfg.momentum, cfg.beta2))  # LAMB, Lion: beta1 is the scheduled momentum
