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

from cadence.data.keys import mix, uniforms, uniforms_of
from cadence.regularization import DEFAULTS, Regularization

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


FLIP_STREAM = 0xF11B  # with the seed and an image's index: its flip under flip: alternate


def forced_flips(mode: str, seed: int, epoch: int, indices) -> np.ndarray | None:
    """Each image's flip when ``regularization.flip`` decides it rather than the image's key:
    ``alternate`` flips an image at the first epoch by a fair coin of (seed, image), then the other
    way round every epoch after (airbench's alternating flips: a global epoch's parity); ``none``
    never flips. ``random``: None (the key's coin)."""
    if mode == "random":
        return None
    if mode == "none":
        return np.zeros(len(indices), dtype=bool)
    coin = (mix(seed, FLIP_STREAM, np.asarray(indices, dtype=np.uint64)) >> np.uint64(17)) & np.uint64(1)
    return coin.astype(bool) ^ bool(epoch % 2)


def augment_batch(images: torch.Tensor, keys: np.ndarray, *, native: int, flip: bool, resolution: int,
                  pad: int | None = None, flips: np.ndarray | None = None,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """Pad-crop (reflect, ``pad`` px: default native/8), optional horizontal flip and resize of a
    uint8 batch (N, C, native, native) -- or of images ``index`` of a set, gathered in the same step --
    as one gather (each output pixel's source) and one interpolation. Image ``i``'s crop and flip come
    from ``keys[i]`` alone (or its flip from ``flips[i]``), so an image is augmented the same way
    whichever batch or rank it lands in. Returns uint8 (the normaliser makes it float on the device: a
    quarter of the bytes to move): channels-last when resized (torch's uint8 resize works in that
    layout), else contiguous.

    Images held channels-last (a decoded image folder is) are gathered a pixel (all its channels) at
    a time straight from the set: no copy of the batch, no change of layout before the resize."""
    n, c = len(keys), images.shape[1]
    pad = max(native // 8, 1) if pad is None else pad
    dy, dx, fl = crop_flip_draws(keys, max(pad, 1))
    if pad == 0:
        dy, dx = torch.zeros_like(dy), torch.zeros_like(dx)
    if flips is not None:
        fl = torch.from_numpy(flips)
    ar = torch.arange(native)
    rows = _reflect(dy[:, None] + ar - pad, native)  # (n, native): source row of each output row
    cols = _reflect(dx[:, None] + ar - pad, native)
    if flip:
        cols = torch.where(fl[:, None], cols.flip(1), cols)
    source = (rows[:, :, None] * native + cols[:, None, :]).view(n, native * native)  # flat source pixel
    pixels = images.permute(0, 2, 3, 1)
    if pixels.is_contiguous():  # channels-last: one row (a pixel's channels) per output pixel
        first = torch.arange(n) if index is None else index
        source += first[:, None] * (native * native)
        out = pixels.reshape(-1, c).index_select(0, source.view(-1)).view(n, native, native, c).permute(0, 3, 1, 2)
    else:
        x = images if index is None else images[index]
        out = x.reshape(n, c, native * native).gather(2, source[:, None, :].expand(n, c, native * native))
        out = out.view(n, c, native, native)
    if out.shape[-1] == resolution:
        return nchw(out)
    return resize_batch(out, resolution, torch.uint8)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """A CPU tensor in contiguous (N, C, H, W) layout. numpy's strided copy: for a channels-last uint8
    batch about 3x faster than torch's ``contiguous()`` here (0.4 against 1.4 ms, 512 x 3 x 24 x 24),
    and on the calling thread only."""
    return x if x.is_contiguous() else torch.from_numpy(np.ascontiguousarray(x.numpy()))


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index into ``size`` pixels with reflect padding (edge not repeated, as ``mode="reflect"``)."""
    i = i.abs()
    return torch.where(i >= size, 2 * (size - 1) - i, i)


def resize_batch(x: torch.Tensor, resolution: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bilinear, antialiased resize of a batch, returned as ``dtype``. uint8 input is resized as uint8
    in channels-last layout (torch's vectorised path, faster than float: benchmarks/)."""
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        if x.dtype == torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                      align_corners=False)
    return x.to(dtype)


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
               scale=DEFAULTS.crop_scale, ratio=DEFAULTS.crop_ratio, mirror: bool | None = None) -> Image.Image:
    """RandomResizedCrop (``scale``, ``ratio``) + flip of one file to ``resolution`` px, as an RGB PIL
    image (``mirror``: flipped or not regardless of the key's coin). The box is drawn from the header's size; a JPEG is then decoded with DCT-domain scaling
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
    flipped = flipped if mirror is None else mirror
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip and flipped else out


def decode_crop(path: str, key: int, resolution: int, *, flip: bool = True, draft: bool = True,
                scale=DEFAULTS.crop_scale, ratio=DEFAULTS.crop_ratio, mirror: bool | None = None) -> torch.Tensor:
    """``crop_image`` as uint8 HWC."""
    return torch.from_numpy(np.array(crop_image(path, key, resolution, flip=flip, draft=draft, scale=scale,
                                                ratio=ratio, mirror=mirror)))


# ---------------------------------------------------------------------------------------------
# Per-image policies: torchvision's own operations, every draw made from the image's key


def key_uniforms(keys, stream: int, n: int) -> np.ndarray:
    """``(len(keys), n)`` uniforms in [0, 1): row ``i`` is ``uniforms(mix(keys[i], stream), n)``."""
    return uniforms_of(mix(np.asarray(keys, dtype=np.uint64), stream), n)


_GEOMETRIC = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})  # nearest-neighbour resampling
_COLOUR = frozenset({"Brightness", "Color", "Contrast", "Sharpness"})  # blends: a factor per image in one call
_JITTER_OPS = ("Brightness", "Contrast", "Color")  # ColorJitter's fn_idx 0, 1, 2 (3, hue, is never set here)
_JITTER, _OPS, _ERASE = 0x717, 0x0B5, 0xE7A  # the three draw streams of an image's key


def _groups(ops: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Which kind of operation each image drew in one slot: the kinds (every geometric operation is
    "geometric") and each image's index into them (-1: Identity)."""
    drawn, which = np.unique(ops, return_inverse=True)
    names = sorted({"geometric" if n in _GEOMETRIC else n for n in drawn.tolist() if n != "Identity"})
    code = np.array([-1 if n == "Identity" else names.index("geometric" if n in _GEOMETRIC else n)
                     for n in drawn.tolist()])
    return names, code[which.reshape(-1)]


def _grouped(out: torch.Tensor, row: np.ndarray, kinds: np.ndarray, apply) -> torch.Tensor:
    """``out`` with its images reordered so that those of each kind are one slice (one gather; ``row``,
    where each image is in ``out``, is updated in place) and ``apply(slice, kind, images)`` run on
    each slice; images of kind -1 are left as they are. ``out`` itself when every image is -1."""
    if (kinds < 0).all():
        return out
    order = np.argsort(kinds, kind="stable")
    out = out.index_select(0, torch.from_numpy(row[order]))
    row[order] = np.arange(len(row))
    cuts = (np.flatnonzero(np.diff(kinds[order])) + 1).tolist()
    for a, b in zip([0] + cuts, cuts + [len(row)]):
        kind = kinds[order[a]]
        if kind >= 0:
            out[a:b] = apply(out[a:b], kind, order[a:b])
    return out


def colour_batch(x: torch.Tensor, name: str, factors) -> torch.Tensor:
    """torchvision.transforms.v2.functional's ``adjust_brightness`` / ``adjust_saturation`` ("Color") /
    ``adjust_contrast`` / ``adjust_sharpness`` of uint8 images (n, C, H, W), image ``i`` with
    ``factors[i]``, in one call instead of one per factor, bit for bit.

    These kernels are per-element float32 arithmetic once the factor is a Python float: ``x * f`` and
    ``base.add_(other, alpha=1 - f)``, which torch's CPU kernels compute as a fused multiply-add (one
    rounding of base + other * alpha; the float64 product of two float32 is exact, so float64
    arithmetic rounded once to float32 is that), then a clamp and the cast to uint8 (truncation). The
    greyscale and mean do not depend on the factor and are torchvision's own functions, batched; the
    blur is its convolution's rounded result, computed exactly (see below).
    The tests hold every image to torchvision's call on it with its factor (widths with and without a
    vector tail, grey pixels included)."""
    return _colour(x.float(), name, factors).to(torch.uint8)


def _colour(x: torch.Tensor, name: str, factors) -> torch.Tensor:
    """:func:`colour_batch` of float32 images holding uint8 values, to float32 holding uint8 values
    (truncated in float: a chain of blends converts once)."""
    f = np.asarray(factors, dtype=np.float64)
    h, w = x.shape[-2:]
    if (name == "Color" and x.shape[-3] == 1) or (name == "Sharpness" and (x.numel() == 0 or h <= 2 or w <= 2)):
        return x
    ratio = torch.from_numpy(f.astype(np.float32)).view(-1, 1, 1, 1)  # a Python float as a float32 kernel sees it
    alpha = torch.from_numpy((1.0 - f).astype(np.float32)).double().view(-1, 1, 1, 1)

    def fused(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:  # base.add_(other, alpha=1 - f)
        return torch.addcmul(base.double(), other.double(), alpha).float()

    if name == "Brightness":
        out = x * ratio
    elif name in ("Color", "Contrast"):
        # torchvision's greyscale of uint8 RGB: its luma (the same float ops on these values), floored
        grey = v2.functional.rgb_to_grayscale(x).floor_() if x.shape[-3] == 3 else x
        if name == "Contrast":
            grey = grey.mean(dim=(-3, -2, -1), keepdim=True)  # sums of integers: exact in any order
        out = fused(x * ratio, grey)
    elif name == "Sharpness":
        # torchvision's blur: a 3x3 convolution (weights 1/13, the centre 5/13), rounded. Of integers it
        # is k/13 for an integer k (the window's sum + 4 x the centre), never within 1/26 of a half, so
        # float32's error (~1e-4) never moves the rounding: the exact k/13 rounds to the same values, and
        # costs sums of slices, not a convolution (a new shape for oneDNN at each call: ~1 ms)
        out = x.clone()
        inner = out[..., 1:-1, 1:-1]
        rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
        blurred = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13).round_()
        inner.copy_(fused(inner, blurred.sub_(inner)))
    else:
        raise ValueError(f"not a colour blend: {name}")
    return out.clamp_(0, 255).floor_()  # trunc: the same on [0, 255], and 5-10x faster here (AVX2)


class ImagePolicy:
    """Colour jitter, then the policy (TrivialAugmentWide, RandAugment or AutoAugment's ImageNet
    policy), then random erasing of one image after its crop and flip, in the torchvision
    reference's order, with torchvision.transforms.v2's own operations (erasing fills with the data
    set's mean colour, which is what its erasing of the normalised image with 0 gives).

    The random choices torchvision would make from its global generator (which operation, which
    magnitude bin, its sign, AutoAugment's sub-policy and probabilities, jitter's order and factors,
    erasing's box) are made instead from the image's key, by torchvision's rules and tables, and
    vectorised over a batch (:meth:`draw`). So an image is augmented the same way in any batch, worker,
    rank or resumed run, the process's random state is never touched, and the distribution is
    torchvision's (the tests compare them)."""

    def __init__(self, reg: Regularization, mean: tuple[float, ...]):
        c = reg.color_jitter
        self.jitter = v2.ColorJitter(brightness=c, contrast=c, saturation=c) if c else None
        self.policy = None
        if reg.policy == "trivialaugment":
            self.policy = v2.TrivialAugmentWide()
        elif reg.policy == "randaugment":
            self.policy = v2.RandAugment(num_ops=reg.num_ops, magnitude=reg.magnitude)
        elif reg.policy == "autoaugment":
            self.policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
        self.erasing = (v2.RandomErasing(reg.random_erasing, scale=reg.erasing_scale,
                                         value=[round(255 * m) for m in mean]) if reg.random_erasing else None)
        self._cache: dict = {}  # index maps by (op, magnitude, h, w); policy tables by ("tables", h, w)

    def __bool__(self) -> bool:
        return bool(self.jitter or self.policy or self.erasing)

    # -- the draws ------------------------------------------------------------------------------

    def draw(self, keys, height: int, width: int) -> dict:
        """Every random choice for images of ``height`` x ``width`` with these keys, as arrays:
        ``ops``/``magnitudes`` (N, slots) (an operation not applied is "Identity"), ``jitter`` (``order``
        (N, 4): ColorJitter's ``fn_idx``; ``factors`` (3, N): brightness, contrast, saturation), ``erase``
        (an erasing params dict per image, or None)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = {}
        if self.jitter is not None:
            u = key_uniforms(keys, _JITTER, 7)
            lo_hi = [self.jitter.brightness, self.jitter.contrast, self.jitter.saturation]
            out["jitter"] = dict(order=np.argsort(u[:, :4], axis=1),  # a uniform permutation, as torch.randperm(4)
                                 factors=np.stack([lo + (hi - lo) * u[:, 4 + j] for j, (lo, hi) in enumerate(lo_hi)]))
        if self.policy is not None:
            out["ops"], out["magnitudes"] = self._draw_policy(keys, height, width)
        if self.erasing is not None:
            out["erase"] = self._draw_erasing(keys, height, width)
        return out

    def _draw_policy(self, keys: np.ndarray, height: int, width: int):
        """TrivialAugmentWide: an operation, a magnitude bin, a sign. RandAugment: ``num_ops`` times an
        operation and a sign at the set magnitude. AutoAugment: a sub-policy, then each of its two steps
        with its probability and sign. Three uniforms per slot: (operation or probability, bin, sign)."""
        t = self.policy
        names, values, signed, sub = self._tables(height, width)
        auto = isinstance(t, v2.AutoAugment)
        slots = 2 if auto else t.num_ops if isinstance(t, v2.RandAugment) else 1
        u = key_uniforms(keys, _OPS, 1 + 3 * slots)
        if auto:
            chosen = (u[:, 0] * len(t._policies)).astype(int)  # the sub-policy of each image
        ops, mags = np.empty((len(keys), slots), dtype=np.int64), np.empty((len(keys), slots))
        for s in range(slots):
            pick, bin_u, sign_u = u[:, 1 + 3 * s], u[:, 2 + 3 * s], u[:, 3 + 3 * s]
            if auto:
                op, p, b = sub[0][chosen, s], sub[1][chosen, s], sub[2][chosen, s]
            else:
                op = (pick * len(names)).astype(int)
                b = (np.full(len(keys), t.magnitude) if isinstance(t, v2.RandAugment)
                     else (bin_u * values.shape[1]).astype(int))
            m = values[op, b]
            mags[:, s] = np.where(signed[op] & (sign_u <= 0.5), -m, m)
            ops[:, s] = op
            if auto:  # a step not taken is the identity
                ops[:, s] = np.where(pick <= p, op, len(names))
                mags[:, s] = np.where(pick <= p, mags[:, s], 0.0)
        return np.array(names + ["Identity"], dtype=object)[ops], mags

    def _tables(self, height: int, width: int):
        """The policy's operations (torchvision's order), their magnitude of each bin at this size
        (0 where an operation has none), whether each is signed, and AutoAugment's sub-policies as
        (operation, probability, bin) arrays (25, 2)."""
        k = ("tables", height, width)
        if k not in self._cache:
            t = self.policy
            auto = isinstance(t, v2.AutoAugment)
            bins = 10 if auto else t.num_magnitude_bins
            names = list(t._AUGMENTATION_SPACE)
            values = np.zeros((len(names), bins))
            for r, (fn, _) in enumerate(t._AUGMENTATION_SPACE.values()):
                v = fn(bins, height, width)
                if v is not None:
                    values[r] = v.tolist()
            signed = np.array([sg for _, sg in t._AUGMENTATION_SPACE.values()])
            sub = None
            if auto:
                sub = tuple(np.array([[f(step) for step in policy] for policy in t._policies])
                            for f in (lambda st: names.index(st[0]), lambda st: st[1], lambda st: st[2] or 0))
            self._cache[k] = names, values, signed, sub
        return self._cache[k]

    def _draw_erasing(self, keys: np.ndarray, height: int, width: int) -> list:
        """RandomErasing's rule: with probability p, up to 10 tries of (area fraction uniform in scale,
        log aspect uniform in log ratio) until the box fits strictly inside, then a uniform position."""
        t = self.erasing
        u = key_uniforms(keys, _ERASE, 1 + 2 * 10 + 2)
        lo, hi = t.scale
        area = height * width * (lo + (hi - lo) * u[:, 1:21:2])
        log_lo, log_hi = (math.log(r) for r in t.ratio)
        aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, 2:21:2])
        hs, ws = np.round(np.sqrt(area * aspect)).astype(int), np.round(np.sqrt(area / aspect)).astype(int)
        fits = (hs < height) & (ws < width)
        first = np.argmax(fits, axis=1)  # the first try that fits
        rows = np.arange(len(keys))
        h, w = hs[rows, first], ws[rows, first]
        top, left = (u[:, 21] * (height - h + 1)).astype(int), (u[:, 22] * (width - w + 1)).astype(int)
        value = torch.tensor(t.value)[:, None, None]
        boxes: list = [None] * len(keys)
        for i in np.flatnonzero((u[:, 0] < t.p) & fits.any(axis=1)).tolist():
            boxes[i] = dict(i=int(top[i]), j=int(left[i]), h=int(h[i]), w=int(w[i]), v=value)
        return boxes

    # -- applying them ------------------------------------------------------------------------

    def __call__(self, image: torch.Tensor | Image.Image, key: int) -> torch.Tensor:
        """One image (uint8 (C, H, W), or a PIL image: the image-folder path, where jitter and the
        policy run on PIL as torchvision's reference does, about 3x faster than on a tensor at 224 px)
        -> uint8 (C, H, W)."""
        h, w = (image.height, image.width) if isinstance(image, Image.Image) else image.shape[-2:]
        d = self.draw([key], h, w)
        if self.jitter is not None:
            image = type(self.jitter).transform(self.jitter, image, self.jitter_params(d, 0))
        for name, mag in zip(d.get("ops", [[]])[0], d.get("magnitudes", [[]])[0]):
            image = self._op(image, name, float(mag))
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        if self.erasing is not None and d["erase"][0] is not None:
            image = v2.functional.erase(image, **d["erase"][0])
        return image

    @staticmethod
    def jitter_params(d: dict, i: int) -> dict:
        """Image ``i``'s jitter draws as the params dict of ColorJitter's ``transform``."""
        b, c, s = d["jitter"]["factors"][:, i].tolist()
        return dict(fn_idx=d["jitter"]["order"][i].tolist(), brightness_factor=b, contrast_factor=c,
                    saturation_factor=s, hue_factor=None)

    def _op(self, image, name: str, magnitude: float):
        t = self.policy
        return type(t)._apply_image_or_video_transform(t, image, name, magnitude, interpolation=t.interpolation,
                                                       fill=t._fill)

    def batch(self, x: torch.Tensor, keys: np.ndarray) -> torch.Tensor:
        """Each image of a uint8 batch (N, C, H, W) by its own key: what ``self(image, key)`` gives, bit
        for bit (the tests hold it), in a fraction of the time. The draws are vectorised. For each
        jitter round and operation slot the images are reordered so that those that drew the same kind
        of operation are one slice (:func:`_grouped`; one gather back at the end), and each kind runs
        once on its slice: the geometric operations (shears, translations, rotations: nearest-neighbour
        resampling) as one gather through each drawn operation's map of source pixels (made once by
        torchvision's own operation on an image of pixel indices); the colour blends (the policy's
        Brightness, Color, Contrast, Sharpness and the jitter's steps), Posterize and Solarize with a
        factor, mask or threshold per image; any other operation once per magnitude. Then erasing,
        box by box."""
        if not self:
            return x
        d = self.draw(keys, *x.shape[-2:])
        if self.jitter is not None or self.policy is not None:
            x = nchw(x)  # the regrouping gathers copy whole images: fast in this layout, slow channels-last
        out, row = x, np.arange(len(x))  # row[i]: where image i is in ``out``
        if self.jitter is not None:  # four rounds; in each, every image's k-th jitter step
            order, factors = d["jitter"]["order"], d["jitter"]["factors"]
            out = x.float()
            for k in range(4):
                steps = np.where(order[:, k] < len(_JITTER_OPS), order[:, k], -1)  # 3, hue: never set here
                out = _grouped(out, row, steps, lambda part, fn, images: _colour(part, _JITTER_OPS[fn],
                                                                                  factors[fn, images]))
            out = out.to(torch.uint8)
        for ops, mags in zip(d.get("ops", np.empty((len(x), 0))).T, d.get("magnitudes", np.empty((len(x), 0))).T):
            names, kinds = _groups(ops)
            out = _grouped(out, row, kinds, lambda part, kind, images: self._apply(part, names[kind], ops[images],
                                                                                    mags[images]))
        if out is x and any(box is not None for box in d.get("erase", ())):
            out = x.clone()
        if not (row == np.arange(len(x))).all():
            out = out.index_select(0, torch.from_numpy(row))  # back in the batch's order
        for i, box in enumerate(d.get("erase", ())):
            if box is not None:  # what torchvision's erase does, in place
                out[i, :, box["i"]: box["i"] + box["h"], box["j"]: box["j"] + box["w"]] = box["v"]
        return out

    def _apply(self, x: torch.Tensor, name: str, ops: np.ndarray, mags: np.ndarray) -> torch.Tensor:
        """Images (n, C, H, W) that drew operation ``name`` (or any geometric one: ``ops``), image ``i``
        at magnitude ``mags[i]``, as torchvision's operation would give each."""
        if name == "geometric":
            return self._resample(x, list(zip(ops, mags.tolist())))
        if name in _COLOUR:
            return colour_batch(x, name, 1.0 + mags)  # torchvision's 1 + magnitude
        if name == "Posterize":  # torchvision: image & mask of the top ``bits``, unchanged at 8 bits
            bits = mags.astype(int)
            mask = np.where(bits >= 8, 255, ((1 << bits) - 1) << (8 - bits)).astype(np.uint8)
            return x & torch.from_numpy(mask).view(-1, 1, 1, 1)
        if name == "Solarize":  # torchvision: 255 x magnitude, which a uint8 comparison sees as float32
            threshold = torch.from_numpy(255 * mags).float().view(-1, 1, 1, 1)
            return torch.where(x >= threshold, x.bitwise_not(), x)
        for m in np.unique(mags).tolist():  # the rest: once per magnitude
            at = torch.from_numpy(np.flatnonzero(mags == m))
            x[at] = self._op(x[at], name, m)
        return x

    def _resample(self, x: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
        """Images (n, C, H, W) each through its own geometric operation, as one gather."""
        n, c, h, w = x.shape
        maps = torch.stack([self._index_map(name, mag, h, w) for name, mag in ops])  # (n, H*W)
        padded = torch.cat([x.reshape(n, c, h * w), x.new_zeros(n, c, 1)], dim=2)  # pixel H*W: torchvision's fill
        return padded.gather(2, maps[:, None, :].expand(n, c, h * w)).reshape(n, c, h, w)

    def _index_map(self, name: str, magnitude: float, h: int, w: int) -> torch.Tensor:
        """Which source pixel (flat index, or H*W outside the image) each output pixel of ``name`` at
        ``magnitude`` takes: torchvision's operation run once on a float image of 1-based pixel indices
        (nearest-neighbour resampling copies values; outside the image it fills 0)."""
        k = (name, magnitude, h, w)
        if k not in self._cache:
            assert v2.InterpolationMode(self.policy.interpolation) == v2.InterpolationMode.NEAREST
            assert self.policy.fill is None
            index = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w)
            source = self._op(index, name, magnitude).reshape(-1).round().long() - 1
            self._cache[k] = source.masked_fill_(source < 0, h * w)
        return self._cache[k]


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
        x = x.to(device, non_blocking=True).to(torch.float32, memory_format=fmt, copy=True)  # ours: in place after
        return x.sub_(mean).div_(std)

    return prep
