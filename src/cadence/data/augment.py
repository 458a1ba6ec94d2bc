"""Augmentation and resizing: the per-batch ops of in-memory images, the per-file crop of image
files, the evaluation transform and the on-device normalisation. Every draw comes from a key
(:mod:`cadence.data.keys`), so an image is augmented the same way whichever batch or rank it lands in."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from cadence.data.keys import mix, uniforms
from cadence.regularization import DEFAULTS, Regularization

if TYPE_CHECKING:
    from cadence.data.sources import Source

POLICY_STREAM = 0x5EED  # mixed with an image's key: the seed of its policy draws (the crop uses the key itself)


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


def crop_image(path: str, key: int, resolution: int, *, flip: bool = True, draft: bool = True,
               scale=DEFAULTS.crop_scale, ratio=DEFAULTS.crop_ratio) -> Image.Image:
    """RandomResizedCrop (``scale``, ``ratio``) + flip of one file to ``resolution`` px, as an RGB PIL
    image. The box is drawn from the header's size; a JPEG is then decoded with DCT-domain scaling
    (1/2, 1/4, 1/8) to the smallest size whose crop still covers ``resolution``, and only then resized."""
    with Image.open(path) as im:
        width, height = im.size
        top, left, h, w, flipped = draw_box(key, width, height, scale, ratio)
        if draft and im.format == "JPEG":
            im.draft("RGB", (math.ceil(width * resolution / w), math.ceil(height * resolution / h)))
        sx, sy = im.size[0] / width, im.size[1] / height
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        out = im.resize((resolution, resolution), Image.Resampling.BILINEAR,
                        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if out.mode != "RGB":
        out = out.convert("RGB")
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip and flipped else out


def decode_crop(path: str, key: int, resolution: int, *, flip: bool = True, draft: bool = True,
                scale=DEFAULTS.crop_scale, ratio=DEFAULTS.crop_ratio) -> torch.Tensor:
    """``crop_image`` as uint8 HWC."""
    return torch.from_numpy(np.array(crop_image(path, key, resolution, flip=flip, draft=draft, scale=scale,
                                                ratio=ratio)))


# ---------------------------------------------------------------------------------------------
# Per-image policies: torchvision's own transforms, their draws seeded from the image's key


class ImagePolicy:
    """Colour jitter, then the policy (TrivialAugmentWide, RandAugment or AutoAugment's ImageNet
    policy), then random erasing of one uint8 image (C, H, W) after its crop and flip, as
    ``torchvision.transforms.v2`` does them (the torchvision reference's order; erasing fills with
    the data set's mean colour, which is what its erasing of the normalised image with 0 gives).

    torchvision draws from torch's default generator; it is seeded from the image's key for the
    call and put back after it, so an image is augmented the same way in any batch, worker, rank or
    resumed run, and the process's own random state is untouched."""

    def __init__(self, reg: Regularization, mean: tuple[float, ...]):
        ops = []
        if reg.color_jitter:
            ops.append(v2.ColorJitter(brightness=reg.color_jitter, contrast=reg.color_jitter,
                                      saturation=reg.color_jitter))
        if reg.policy == "trivialaugment":
            ops.append(v2.TrivialAugmentWide())
        elif reg.policy == "randaugment":
            ops.append(v2.RandAugment(num_ops=reg.num_ops, magnitude=reg.magnitude))
        elif reg.policy == "autoaugment":
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
        if reg.random_erasing:
            ops.append(v2.RandomErasing(reg.random_erasing, scale=reg.erasing_scale,
                                        value=[round(255 * m) for m in mean]))
        self.transform = v2.Compose(ops) if ops else None
        self._recording = None  # built at the first batch (a copy whose steps log instead of acting)

    def __bool__(self) -> bool:
        return self.transform is not None

    @contextlib.contextmanager
    def _seeded(self, key: int):
        g = torch.default_generator
        state = g.get_state()
        try:
            g.manual_seed(int(mix(key, POLICY_STREAM)))
            yield
        finally:
            g.set_state(state)

    def __call__(self, image: torch.Tensor | Image.Image, key: int) -> torch.Tensor:
        """One image (uint8 (C, H, W), or a PIL image) -> uint8 (C, H, W). A PIL image (the image-folder
        path) goes through colour jitter and the policy as PIL, as torchvision's reference pipeline
        does (PIL's operations are about 3x faster than the tensor ones at 224 px), and is a tensor
        for erasing; the draws are the same either way."""
        if self.transform is None:
            return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image)).permute(2, 0, 1)
        with self._seeded(key):
            for t in self.transform.transforms:
                if isinstance(image, Image.Image) and isinstance(t, v2.RandomErasing):
                    image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
                image = t(image)
        return image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image)).permute(2, 0, 1)

    def batch(self, x: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        """Each image of a uint8 batch (N, C, H, W) by its own key: what ``self(image, key)`` gives, bit
        for bit (the tests hold it), in less time. torchvision makes its draws image by image with its
        operations recorded rather than run (a policy's draws depend on the image's size, never on its
        pixels); then each policy operation runs once on all the images that drew it (a batch's
        TrivialAugmentWide or RandAugment draws repeat a few dozen operations); colour jitter and
        erasing, whose parameters are continuous, run image by image."""
        if self.transform is None:
            return x
        if not any(isinstance(t, _POLICIES) for t in self.transform.transforms):  # nothing to group
            return torch.stack([self(img, int(k)) for img, k in zip(x, keys)])
        record, log = self._recorder()
        plans = []
        for img, k in zip(x, keys.tolist()):
            log.clear()
            with self._seeded(k):
                record(img)
            plans.append(list(log))
        out = x.clone()
        ops = self.transform.transforms
        for slot in range(max(map(len, plans), default=0)):
            groups: dict = {}
            for i, plan in enumerate(plans):
                if slot < len(plan):
                    which, args = plan[slot]
                    groups.setdefault((which, args) if isinstance(args, tuple) else (which, i), []).append(i)
            for (which, _), images in groups.items():
                t, args = ops[which], plans[images[0]][slot][1]
                if isinstance(args, tuple):  # a policy's (operation, magnitude)
                    if args[0] != "Identity":
                        at = torch.tensor(images)
                        out[at] = type(t)._apply_image_or_video_transform(
                            t, out[at], *args, interpolation=t.interpolation, fill=t._fill)
                else:  # colour jitter's or erasing's parameters
                    out[images[0]] = type(t).transform(t, out[images[0]], args)
        return out

    def _recorder(self):
        """A copy of the transform whose steps log ``(index, what they would do)`` instead of doing it."""
        if self._recording is None:
            log: list = []
            steps = []
            for which, t in enumerate(self.transform.transforms):
                t = copy.copy(t)
                if isinstance(t, _POLICIES):
                    t._apply_image_or_video_transform = functools.partial(_log_policy, log, which)
                else:
                    t.transform = functools.partial(_log_params, log, which)
                steps.append(t)
            self._recording = (v2.Compose(steps), log)
        return self._recording


_POLICIES = (v2.TrivialAugmentWide, v2.RandAugment, v2.AutoAugment)


def _log_policy(log: list, which: int, image, transform_id: str, magnitude: float, interpolation, fill):
    log.append((which, (transform_id, magnitude)))
    return image


def _log_params(log: list, which: int, inpt, params: dict):
    log.append((which, params))
    return inpt


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
