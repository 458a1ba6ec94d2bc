"""Augmentation and resizing: the per-batch ops of in-memory images, the per-file crop of image
files, the evaluation transform and the on-device normalisation. Every draw comes from a key
(:mod:`cadence.data.keys`), so an image is augmented the same way whichever batch or rank it lands in."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from cadence.data.keys import mix, uniforms

if TYPE_CHECKING:
    from cadence.data.sources import Source


# ---------------------------------------------------------------------------------------------
# In-memory small images: whole batches augmented as tensor operations


def crop_flip_draws(keys: np.ndarray, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(dy, dx, flip)`` from keys: offsets uniform in ``[0, 2 pad]``, flip with p=1/2,
    the distribution of torchvision's ``RandomCrop(padding=pad)`` + ``RandomHorizontalFlip``."""
    d = mix(np.asarray(keys, dtype=np.uint64)[:, None], np.arange(3, dtype=np.uint64))
    off = torch.from_numpy((d[:, :2] % np.uint64(2 * pad + 1)).astype(np.int64))
    return off[:, 0], off[:, 1], torch.from_numpy((d[:, 2] & np.uint64(1)).astype(bool))


def augment_batch(x: torch.Tensor, keys: np.ndarray, *, native: int, flip: bool,
                  resolution: int) -> torch.Tensor:
    """Pad-crop (reflect, native/8 px), optional horizontal flip and resize of a uint8 batch
    (N, C, native, native), as one gather and one interpolation. Image ``i``'s crop and flip
    come from ``keys[i]`` alone, so an image is augmented the same way whichever batch or rank it
    lands in. Returns float32 in [0, 255]."""
    n, pad = len(x), max(native // 8, 1)
    dy, dx, fl = crop_flip_draws(keys, pad)
    ar = torch.arange(native)
    rows = _reflect(dy[:, None] + ar - pad, native)  # (n, native): source row of each output row
    cols = _reflect(dx[:, None] + ar - pad, native)
    if flip:
        cols = torch.where(fl[:, None], cols.flip(1), cols)
    nhwc = x.permute(0, 2, 3, 1)
    out = nhwc[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, H, W, C) uint8
    return resize_batch(out.permute(0, 3, 1, 2), resolution)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index into ``size`` pixels with reflect padding (edge not repeated, as ``mode="reflect"``)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def resize_batch(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a batch to float32. uint8 input is resized as uint8 in
    channels-last layout (torch's vectorised path, faster than float: benchmarks/), then converted."""
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        if x.dtype == torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                      align_corners=False)
    return x.float()


# ---------------------------------------------------------------------------------------------
# Image files: the crop is drawn before decoding, and the JPEG decoded only as large as it needs


def draw_box(key: int, width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``(top, left, h, w, flip)`` for one image from ``key``: the algorithm of torchvision's
    ``RandomResizedCrop.get_params`` (area fraction uniform in ``scale``, log aspect ratio uniform
    in ``log(ratio)``, up to 10 tries, then a centre crop) and a fair-coin flip. The tests check
    the distribution against torchvision's own draws."""
    u = uniforms(key, 41)
    area, lo, hi = width * height, math.log(ratio[0]), math.log(ratio[1])
    flip = u[40] < 0.5
    for t in range(10):
        a, r, y, x = u[4 * t: 4 * t + 4]
        target = area * (scale[0] + (scale[1] - scale[0]) * a)
        aspect = math.exp(lo + (hi - lo) * r)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(y * (height - h + 1)), int(x * (width - w + 1)), h, w, flip
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


def decode_crop(path: str, key: int, resolution: int, *, flip: bool = True, draft: bool = True) -> torch.Tensor:
    """RandomResizedCrop + flip of one file to ``resolution`` px, as uint8 HWC. The box is drawn
    from the header's size; a JPEG is then decoded with DCT-domain scaling (1/2, 1/4, 1/8) to the
    smallest size whose crop still covers ``resolution``, and only then resized."""
    with Image.open(path) as im:
        width, height = im.size
        top, left, h, w, flipped = draw_box(key, width, height)
        if draft and im.format == "JPEG":
            im.draft("RGB", (math.ceil(width * resolution / w), math.ceil(height * resolution / h)))
        sx, sy = im.size[0] / width, im.size[1] / height
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        out = im.resize((resolution, resolution), Image.Resampling.BILINEAR,
                        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if out.mode != "RGB":
        out = out.convert("RGB")
    return torch.from_numpy(np.asarray(out)[:, ::-1].copy() if flip and flipped else np.array(out))


# ---------------------------------------------------------------------------------------------
# Evaluation and normalisation


DEFAULT_CROP_PCT = 0.875  # image files: the centre crop's share of the resized shorter side (torchvision's 224/256)


def eval_transform(source: Source, resolution: int, *, crop_pct: float = DEFAULT_CROP_PCT):
    """Resize the shorter side to round(resolution / crop_pct) and centre-crop ``resolution`` px."""
    return v2.Compose([v2.Resize(round(resolution / crop_pct), antialias=True), v2.CenterCrop(resolution),
                       v2.PILToTensor()])


def eval_batch(x: torch.Tensor, resolution: int, crop_pct: float | None = None) -> torch.Tensor:
    """In-memory held-out images (uint8 NCHW) at ``resolution``: the whole image resized, or with
    ``crop_pct``, its centre round(native x crop_pct) px resized."""
    if crop_pct is not None:
        side = max(1, round(x.shape[-1] * crop_pct))
        x = v2.functional.center_crop(x, [side, side])
    return resize_batch(x, resolution)


def normalizer(source: Source, device: torch.device, channels_last: bool = False):
    """uint8 batch -> float, normalised, on ``device``."""
    mean = torch.tensor(source.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(source.std, device=device).view(1, -1, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).float()
        return ((x - mean) / std).contiguous(memory_format=fmt)

    return prep
