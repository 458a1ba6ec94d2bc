"""Held-out evaluation as a function of parts and a source: used by the trainer, ``cadence eval``
and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from cadence import data, distributed
from cadence.parts import Parts, Setup


@torch.no_grad()
def evaluate(parts: Parts, source: data.Source, resolution: int, *, batch_size: int = 256, tta: str = "none",
             workers: int = 0, rank: int = 0, world: int = 1, crop_pct: float | None = None,
             raw: bool = False) -> dict:
    """Held-out loss, top-1 and (with more than 5 classes) top-5 of ``parts.eval_model`` (``raw``: of
    the trained weights, not their EMA) at ``resolution`` px, over every rank's share (summed across
    ranks). ``tta``: see ``views``. ``crop_pct``: see ``data.eval_loader``."""
    model = parts.model if raw else parts.eval_model
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    k = min(5, source.num_classes)
    for x, y in data.eval_loader(source, resolution, batch_size, workers, rank=rank, world=world, crop_pct=crop_pct):
        y = y.to(parts.device)
        with parts.autocast:
            logits = views(model, parts.normalize(x), tta)
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum").item()
        top = logits.topk(k, dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += len(y)
    sums = distributed.all_reduce_sum(torch.tensor([loss_sum, correct1, correct5, total], dtype=torch.float64,
                                                   device=parts.device))
    loss_sum, correct1, correct5, total = sums.tolist()
    out = {"val_loss": loss_sum / total, "val_top1": correct1 / total, "resolution": resolution}
    if source.num_classes > 5:
        out["val_top5"] = correct5 / total
    return out


def views(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits of a normalised batch, with test-time augmentation: ``flip`` averages those of each image
    and its mirror; ``flip-translate`` (airbench's six views) gives that pair weight 1/2 and the same
    pair shifted 1 px diagonally each way (reflect padding) 1/4 each."""
    if tta == "none":
        return model(x)
    pair = (model(x).float() + model(x.flip(3)).float()) / 2
    if tta == "flip":
        return pair
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    h, w = x.shape[-2:]
    up, down = padded[..., :h, :w], padded[..., 2:, 2:]
    shifted = [(model(v).float() + model(v.flip(3)).float()) / 2 for v in (up, down)]
    return pair / 2 + (shifted[0] + shifted[1]) / 4


def evaluate_recipe(parts: Parts, setup: Setup, resolution: int | None = None) -> dict:
    """``evaluate`` as the recipe says: its evaluation resolution (unless ``resolution``), crop rule
    (``train.eval_crop_pct``/``eval_resize``) at that resolution, batch size, TTA and workers, on this
    process's share of the held-out set. With a weight EMA, the EMA's results, and the trained
    weights' as ``raw_val_loss``, ``raw_val_top1`` (, ``raw_val_top5``)."""
    r = setup.recipe
    resolution = resolution or r.eval_resolution
    kw = dict(batch_size=r.train.eval_batch_size, tta=r.train.tta, workers=r.data.workers(), rank=setup.dist.rank,
              world=setup.dist.world, crop_pct=r.eval_crop_pct_at(resolution))
    out = evaluate(parts, setup.source, resolution, **kw)
    if parts.ema is not None:
        out.update({f"raw_{k}": v for k, v in evaluate(parts, setup.source, resolution, raw=True, **kw).items()
                    if k.startswith("val_")})
    return out


def sweep(parts: Parts, setup: Setup, resolutions: list[int | None]) -> list[dict]:
    """``evaluate_recipe`` of the same weights at each resolution (None: the recipe's), the recipe's crop
    rule applied at each (FixRes: a net trained at low resolution often tests best a little higher)."""
    return [evaluate_recipe(parts, setup, r) for r in resolutions]


def best(results: list[dict]) -> dict:
    """The result with the highest top-1; of equals, the lowest resolution (the cheaper one)."""
    return max(results, key=lambda r: (r["val_top1"], -r["resolution"]))
