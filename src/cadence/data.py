"""Data sources and per-stage loaders.

Every training sample is drawn reproducibly: an epoch's order (and its ``data_fraction`` subset)
comes from ``(seed, epoch)`` alone, and each image's augmentation from ``(seed, epoch, position)``,
so a run resumed mid-epoch sees exactly the batches an uninterrupted run would have.
Images travel as uint8 tensors at the stage's resolution; normalisation happens on the device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tarfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm import tqdm

from cadence.errors import FieldError
from cadence.plan import Stage
from cadence.recipe import IMAGE_EXTENSIONS, DataConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Source:
    """A training set and a held-out set, plus how to look at them."""

    train: Dataset  # items: (uint8 CHW tensor or PIL image, int label)
    val: Dataset
    num_classes: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    native_size: int | None  # in-memory small images (pad-crop + resize); None: ImageNet-style
    flip: bool = True
    bad: list = field(default_factory=list)  # (path, reason) of files skipped as unreadable
    copies: list = field(default_factory=list)  # prepared copies [(shorter side, train root)], first = items'


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


# ---------------------------------------------------------------------------------------------
# Sources


def _digits(cfg: DataConfig, seed: int) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))  # fixed split
    n_val = int(len(labels) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return Source(TensorImages(images[train], labels[train]), TensorImages(images[val], labels[val]),
                  num_classes=10, channels=1, mean=(0.5,), std=(0.5,), native_size=8, flip=False)


def synthetic_images(n: int, size: int, num_classes: int, seed: int, templates_seed: int = 0):
    """Deterministic class-conditional images: each class is a smooth random colour pattern; each
    image is its class pattern, shifted, contrast-jittered and noised. Learnable, not trivial."""
    g = torch.Generator().manual_seed(templates_seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
    noise = 0.25 * torch.randn(n, 3, size, size, generator=g)
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        images[i] = torch.roll(templates[labels[i]], shifts=tuple(shifts[i].tolist()), dims=(1, 2))
    images = ((images - 0.5) * contrast + 0.5 + noise).clamp(0, 1)
    return (images * 255).round().to(torch.uint8), labels


def _synthetic(cfg: DataConfig, seed: int) -> Source:
    train = synthetic_images(cfg.samples, cfg.image_size, cfg.num_classes, seed=1)
    val = synthetic_images(cfg.val_samples, cfg.image_size, cfg.num_classes, seed=2)
    return Source(TensorImages(*train), TensorImages(*val), num_classes=cfg.num_classes, channels=3,
                  mean=(0.5,) * 3, std=(0.25,) * 3, native_size=cfg.image_size)


# what PIL raises for unreadable files (a decompression bomb is a file we will not read either)
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _image_folder_paths(root: str, field: str, on_bad: str = "skip",
                        bad: list | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class index)`` of every image under ``root/<class>/``. An empty class folder keeps
    its index; it is listed in ``bad`` (skip) or raises FieldError (error)."""
    if not os.path.isdir(root):
        raise FieldError(field, root, "no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FieldError(field, root, "has no class folders (expected <root>/<class>/<image>)")
    items = []
    for k, c in enumerate(classes):
        found = [(os.path.join(d, f), k) for d, _, files in sorted(os.walk(os.path.join(root, c)))
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            if on_bad == "error":
                raise FieldError(field, os.path.join(root, c), "class folder holds no images "
                                 "(data.on_bad_image: skip trains without it)")
            if bad is not None:
                bad.append((os.path.join(root, c), "empty class folder"))
        items += found
    if not items:
        raise FieldError(field, root, "holds no images")
    return items, classes


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _bad_reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def _decode_all(items: list[tuple[str, int]], on_bad: str, bad: list, field: str):
    """Decode small images into one uint8 array (N, H, W, 3); unreadable ones are skipped and
    listed in ``bad`` (or raise FieldError naming the file)."""
    images, labels, shape = [], [], None
    for path, k in tqdm(items, desc="decoding", unit="img", mininterval=1, disable=len(items) < 5000,
                        file=sys.stderr):
        try:
            a = _read_rgb(path)
            if shape is not None and a.shape != shape:
                raise ValueError(f"is {a.shape[1]}x{a.shape[0]}, the others {shape[1]}x{shape[0]}")
        except BAD_IMAGE_ERRORS as e:
            if on_bad == "error":
                raise FieldError(field, path, f"unreadable image ({_bad_reason(e)}); "
                                 "data.on_bad_image: skip would skip it") from None
            bad.append((path, _bad_reason(e)))
            continue
        shape = a.shape
        images.append(a)
        labels.append(k)
    if not images:
        raise FieldError(field, os.path.dirname(os.path.dirname(items[0][0])), "holds no readable image")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def cache_root(cfg: DataConfig) -> str:
    return cfg.cache_dir or os.environ.get("CADENCE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "cadence")


def content_key(items: list[tuple[str, int]], root: str, *extra: object) -> str:
    """A digest of the files' relative paths, labels and bytes (and ``extra``): data edited in
    any way gets a new key, so a cache built from it is never reused."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((CACHE_FORMAT, *extra)).encode())
    for path, k in items:
        h.update(f"{os.path.relpath(path, root)}\0{k}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


CACHE_FORMAT = 1


def decoded_folder(cfg: DataConfig, root: str, field: str, bad: list) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder of small images as ``(uint8 NHWC, labels, classes)``: decoded once, then
    memory-mapped from ``<cache_dir>/decoded/<content key>/`` on every later run."""
    items, classes = _image_folder_paths(root, field, cfg.on_bad_image, bad)
    if not cfg.cache:
        images, labels = _decode_all(items, cfg.on_bad_image, bad, field)
        return images, labels, classes
    folder = os.path.join(cache_root(cfg), "decoded", content_key(items, root, classes))
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.exists(meta_path):
        images, labels = _decode_all(items, cfg.on_bad_image, bad, field)
        tmp = f"{folder}.tmp-{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, "images.npy"), images)
        np.save(os.path.join(tmp, "labels.npy"), labels)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"root": os.path.abspath(root), "classes": classes, "images": len(labels),
                       "bad": [list(b) for b in bad]}, f)
        try:
            os.replace(tmp, folder)  # a cache appears whole or not at all
        except OSError:  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    with open(meta_path) as f:
        meta = json.load(f)
    if cfg.on_bad_image == "error" and meta["bad"]:
        path, reason = meta["bad"][0]
        raise FieldError(field, path, f"unreadable image ({reason}); data.on_bad_image: skip would skip it")
    bad[:] = [tuple(b) for b in meta["bad"]]
    images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
    return images, np.load(os.path.join(folder, "labels.npy")), classes


def _cifar10(cfg: DataConfig, seed: int) -> Source:
    root = cfg.root or os.path.join(os.path.expanduser("~"), ".cache", "cadence", "cifar10")
    val_split = cfg.val_split or "test"
    bad: list = []
    if os.path.isdir(os.path.join(root, "train")):  # an ImageFolder of the JPEGs
        tr_images, tr_labels, classes = decoded_folder(cfg, os.path.join(root, "train"), "data.root", bad)
        val_bad: list = []
        va_images, va_labels, val_classes = decoded_folder(cfg, os.path.join(root, val_split), "data.val_split",
                                                           val_bad)
        if val_classes != classes:
            raise FieldError("data.val_split", val_split, f"has classes {val_classes}, train/ has {classes}")
        bad += val_bad
        train, val = (_nchw(tr_images), torch.from_numpy(tr_labels)), (_nchw(va_images), torch.from_numpy(va_labels))
    else:
        from torchvision.datasets import CIFAR10

        try:
            tr = CIFAR10(root, train=True, download=cfg.download)
            te = CIFAR10(root, train=False, download=cfg.download)
        except RuntimeError:
            raise FieldError("data.root", root, "holds neither CIFAR-10 batches nor an ImageFolder "
                             "(train/, test/); set data.download: true to fetch it") from None
        train = _nchw(tr.data), torch.tensor(tr.targets)
        val = _nchw(te.data), torch.tensor(te.targets)
    return Source(TensorImages(*train), TensorImages(*val), num_classes=10, channels=3,
                  mean=CIFAR_MEAN, std=CIFAR_STD, native_size=32, bad=bad)


def _nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (possibly memory-mapped, read-only) -> an NCHW view, no copy."""
    with warnings.catch_warnings():  # torch warns that a read-only array is not writable; we never write
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(images).permute(0, 3, 1, 2)


class FileImages(Dataset):
    """Images decoded from files on access (ImageNet layout): ``(PIL image, label)``."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label


def _first_readable(items: list[tuple[str, int]], field: str, root: str) -> None:
    """Fail before training if not one image of a split can be decoded."""
    first = None
    for path, _ in items:
        try:
            with Image.open(path) as im:
                im.load()
            return
        except BAD_IMAGE_ERRORS as e:
            first = first or f"{path}: {_bad_reason(e)}"
    raise FieldError(field, root, f"holds no readable image (first failure {first})")


def _imagefolder(cfg: DataConfig, seed: int) -> Source:
    val_split = cfg.val_split or "val"
    bad: list = []
    copies: list[tuple[int, str]] = []
    if cfg.prepared is not None:
        copies = prepared_copies(cfg.prepared)
        if not copies:
            raise FieldError("data.prepared", cfg.prepared, "holds no complete prepared copy; run `cadence "
                             "prepare` on this recipe (it resumes where it stopped)")
        train_root, field = copies[0][1], "data.prepared"
    else:
        train_root, field = os.path.join(cfg.root, "train"), "data.root"
    train_items, classes = _image_folder_paths(train_root, field, cfg.on_bad_image, bad)
    val_items, val_classes = _image_folder_paths(os.path.join(cfg.root, val_split), "data.val_split",
                                                 cfg.on_bad_image, bad)
    if val_classes != classes:
        raise FieldError("data.val_split", val_split, f"has {len(val_classes)} classes, train/ has {len(classes)}")
    _first_readable(train_items, field, train_root)
    _first_readable(val_items, "data.val_split", os.path.join(cfg.root, val_split))
    return Source(FileImages(train_items), FileImages(val_items), num_classes=len(classes), channels=3,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=None, bad=bad, copies=copies)


SOURCES = {"digits": _digits, "synthetic": _synthetic, "cifar10": _cifar10, "imagefolder": _imagefolder}


PREPARED_MANIFEST = "prepared.json"  # written last by `cadence prepare`: the copy is complete
SHORT_SIDE_PER_PX = 256 / 224  # a copy for R px training keeps shorter sides up to R x 256/224


def prepared_copies(folder: str) -> list[tuple[int, str]]:
    """The complete copies in a ``cadence prepare`` folder: ``[(shorter side, train root)]``,
    largest first (``<folder>/<N>px/train``, each with its manifest)."""
    if not os.path.isdir(folder):
        return []
    found = [(int(e.name[:-2]), os.path.join(folder, e.name, "train")) for e in os.scandir(folder)
             if e.name.endswith("px") and e.name[:-2].isdigit()
             and os.path.exists(os.path.join(folder, e.name, PREPARED_MANIFEST))]
    return sorted(found, reverse=True)


def pick_copy(copies: list[tuple[int, str]], resolution: int) -> int:
    """The copy a stage reads: the smallest whose shorter side is at least ``resolution`` x
    256/224 (rounded), else the largest. Index into ``copies``; 0 without copies."""
    need = round(resolution * SHORT_SIDE_PER_PX)
    fits = [i for i, (side, _) in enumerate(copies) if side >= need]
    return fits[-1] if fits else 0


def load_source(cfg: DataConfig, seed: int = 0) -> Source:
    """The data a recipe names; a bad path raises FieldError naming ``data.root``."""
    source = SOURCES[cfg.source](cfg, seed)
    if cfg.train_samples is not None and cfg.train_samples != len(source.train):
        raise FieldError("data.train_samples", cfg.train_samples,
                         f"but the training set has {len(source.train)} images")
    return source


def extract_tar(archive: str, dest: str) -> str:
    """Unpack a ``.tar.gz`` of an ImageFolder once (a marker file says it is complete)."""
    marker = os.path.join(dest, ".complete")
    if not os.path.exists(marker):
        os.makedirs(dest, exist_ok=True)
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
        open(marker, "w").close()
    return dest


# ---------------------------------------------------------------------------------------------
# Keys: every random choice is a function of (seed, epoch, position), never of process history

_M64 = (1 << 64) - 1


def mix(*xs) -> np.ndarray:
    """splitmix64 steps over integers or integer arrays (broadcast): 63-bit, stable across
    processes, runs and machines, and vectorised (no per-sample Python)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for x in xs:
            x = np.uint64(x & _M64) if isinstance(x, int) else np.asarray(x).astype(np.uint64)
            h = (h ^ x) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
        return h & np.uint64(0x7FFFFFFFFFFFFFFF)


def _mix(*xs: int) -> int:
    return int(mix(*xs))


class EpochSampler(Sampler):
    """One epoch of ``(index, key)`` items for one rank, like ``DistributedSampler``.

    The permutation of the whole training set comes from ``(seed, epoch)``; the epoch uses its first
    ``n`` images (the stage's data fraction); ranks take every ``world``-th item (padding with
    repeats unless ``drop_last``); ``start`` skips items already trained on (resume)."""

    def __init__(self, total: int, n: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True, start: int = 0):
        self.total, self.n, self.seed, self.epoch = total, n, seed, epoch
        self.rank, self.world, self.drop_last, self.start = rank, world, drop_last, start

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.total, generator=g)[: self.n]
        if self.drop_last:
            return order[: len(order) - len(order) % self.world]
        return torch.cat([order, order[: (-len(order)) % self.world]])

    def keyed(self) -> tuple[torch.Tensor, np.ndarray]:
        """This rank's remaining ``(indices, keys)`` as arrays."""
        order = self.order()
        pos = np.arange(self.rank + self.start * self.world, len(order), self.world)
        return order[torch.from_numpy(pos)], mix(self.seed, self.epoch, pos)

    def __iter__(self):
        indices, keys = self.keyed()
        return zip(indices.tolist(), keys.tolist())

    def __len__(self) -> int:
        return max(len(self.order()) // self.world - self.start, 0)


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
    channels-last layout (torch's vectorised path, ~3x faster than float), then converted."""
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        if x.dtype == torch.uint8:
            x = x.contiguous(memory_format=torch.channels_last)
        x = nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True,
                                      align_corners=False)
    return x.float()


class MemoryLoader:
    """Batches of an in-memory source for one rank, augmented a batch at a time (vectorised), each
    image by its own key, so resuming mid-epoch or changing the world size changes nothing."""

    def __init__(self, source: Source, resolution: int, sampler: EpochSampler, local_batch: int, drop_last: bool):
        self.source, self.resolution, self.sampler = source, resolution, sampler
        self.local, self.drop_last = local_batch, drop_last

    def __iter__(self):
        data_ = self.source.train
        indices, keys = self.sampler.keyed()
        for b in range(0, len(indices), self.local):
            idx = indices[b: b + self.local]
            if len(idx) < self.local and self.drop_last:
                return
            x = augment_batch(data_.images[idx], keys[b: b + self.local], native=self.source.native_size,
                              flip=self.source.flip, resolution=self.resolution)
            yield x, data_.labels[idx]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.local if self.drop_last else -(-n // self.local)


# ---------------------------------------------------------------------------------------------
# Image files: the crop is drawn before decoding, and the JPEG decoded only as large as it needs


def uniforms(key: int, n: int) -> list[float]:
    """``n`` uniform floats in [0, 1) from ``key`` (splitmix64 in plain integers: a few
    microseconds, where seeding a torch or numpy generator per image costs a hundred)."""
    out, h = [], key & _M64
    for _ in range(n):
        h = (h + 0x9E3779B97F4A7C15) & _M64
        z = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        out.append(((z ^ (z >> 31)) >> 11) / 2.0**53)
    return out


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


class CropDecode(Dataset):
    """``dataset[(index, key, resolution, copy)]`` -> ``(HWC uint8 or None, label, bad)``. The
    resolution (and which prepared copy to read) travels with each item, so one set of persistent
    workers serves every stage. ``roots[copy]`` replaces ``roots[0]`` at the start of each path."""

    def __init__(self, items: list[tuple[str, int]], flip: bool = True, roots: list[str] | None = None):
        self.items, self.flip, self.roots = items, flip, roots or [""]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item):
        index, key, resolution, copy = item
        path, label = self.items[index]
        if copy:
            path = self.roots[copy] + path[len(self.roots[0]):]
        try:
            return decode_crop(path, key, resolution, flip=self.flip), label, None
        except BAD_IMAGE_ERRORS as e:
            return None, label, (path, _bad_reason(e))


def collate_good(batch):
    """Stack the readable images (NCHW uint8); report the unreadable ones."""
    good = [(x, y) for x, y, bad in batch if bad is None]
    bad = [b for _, _, b in batch if b is not None]
    if not good:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([x for x, _ in good]).permute(0, 3, 1, 2), torch.tensor([y for _, y in good]), bad


class _Batches(Sampler):
    """The batch sampler of the persistent DataLoader, re-pointed at each epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FileLoader:
    """The training batches of a folder of image files, one DataLoader for the whole run: worker
    processes persist across epochs and stages (a stage change only changes the size each item
    asks for). Unreadable files are skipped and handed to ``on_bad``."""

    def __init__(self, source: Source, *, num_workers: int, pin_memory: bool = False, on_bad=None):
        self.batches, self.on_bad = _Batches(), on_bad
        roots = [root for _, root in source.copies]
        self.loader = DataLoader(CropDecode(source.train.items, source.flip, roots), batch_sampler=self.batches,
                                 num_workers=num_workers, collate_fn=collate_good, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)

    def epoch(self, sampler: EpochSampler, resolution: int, local_batch: int, drop_last: bool, copy: int = 0):
        indices, keys = sampler.keyed()
        items = [(i, k, resolution, copy) for i, k in zip(indices.tolist(), keys.tolist())]
        self.batches.batches = [items[b: b + local_batch] for b in range(0, len(items), local_batch)
                                if not drop_last or b + local_batch <= len(items)]
        return _Epoch(self)


class _Epoch:
    def __init__(self, owner: FileLoader):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner.batches)

    def __iter__(self):
        for x, y, bad in self.owner.loader:
            if bad and self.owner.on_bad is not None:
                self.owner.on_bad(bad)
            yield x, y


class TrainData:
    """Every epoch's batches for one rank, built once per run: in-memory sources are augmented in
    batches, file sources go through one persistent DataLoader."""

    def __init__(self, source: Source, cfg: DataConfig, *, seed: int, rank: int = 0, world: int = 1,
                 pin_memory: bool = False, on_bad=None):
        self.source, self.cfg, self.seed, self.rank, self.world = source, cfg, seed, rank, world
        self.pin_memory, self.on_bad = pin_memory, on_bad
        self._files: FileLoader | None = None

    def epoch(self, stage: Stage, epoch: int, epoch_samples: int, skip_batches: int = 0):
        """The batches of global ``epoch`` (at ``stage``) for this rank, after ``skip_batches``."""
        local = stage.batch_size // self.world
        sampler = EpochSampler(len(self.source.train), epoch_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                               world=self.world, drop_last=self.cfg.drop_last, start=skip_batches * local)
        if self.source.native_size is not None:
            return MemoryLoader(self.source, stage.resolution, sampler, local, self.cfg.drop_last)
        if self._files is None:
            self._files = FileLoader(self.source, num_workers=self.cfg.workers(), pin_memory=self.pin_memory,
                                     on_bad=self._bad)
        return self._files.epoch(sampler, stage.resolution, local, self.cfg.drop_last,
                                 pick_copy(self.source.copies, stage.resolution))

    def _bad(self, bad: list) -> None:
        if self.cfg.on_bad_image == "error":
            path, reason = bad[0]
            raise FieldError("data.root", path, f"unreadable image ({reason}); "
                             "data.on_bad_image: skip would skip it")
        if self.on_bad is not None:
            self.on_bad(bad)


# ---------------------------------------------------------------------------------------------
# Evaluation


def eval_transform(source: Source, resolution: int):
    """Resize to resolution/0.875 and centre-crop (the torchvision reference's 224/256)."""
    return v2.Compose([v2.Resize(round(resolution / 0.875), antialias=True), v2.CenterCrop(resolution),
                       v2.PILToTensor()])


class EvalDecode(Dataset):
    """``dataset[i]`` -> ``(CHW uint8 or None, label, bad)``: full decode, resize, centre crop."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                return self.transform(im.convert("RGB")).permute(1, 2, 0), label, None
        except BAD_IMAGE_ERRORS as e:
            return None, label, (path, _bad_reason(e))


def eval_loader(source: Source, resolution: int, batch_size: int, num_workers: int = 0,
                rank: int = 0, world: int = 1):
    """This rank's share of the held-out set, resized (in memory) or resized + centre-cropped
    (unreadable files skipped: they were listed when training met them, or at load)."""
    indices = list(range(rank, len(source.val), world))
    if source.native_size is not None:
        images, labels = source.val.images, source.val.labels
        return [(resize_batch(images[indices[b: b + batch_size]], resolution), labels[indices[b: b + batch_size]])
                for b in range(0, len(indices), batch_size)]
    ds = EvalDecode([source.val.items[i] for i in indices], eval_transform(source, resolution))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_good)
    return ((x, y) for x, y, _ in loader if len(y))


def normalizer(source: Source, device: torch.device, channels_last: bool = False):
    """uint8 batch -> float, normalised, on ``device``."""
    mean = torch.tensor(source.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(source.std, device=device).view(1, -1, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).float()
        return ((x - mean) / std).contiguous(memory_format=fmt)

    return prep
