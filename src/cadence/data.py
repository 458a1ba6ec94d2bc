"""Data sources and per-stage loaders.

Every training sample is drawn reproducibly: an epoch's order (and its ``data_fraction`` subset)
comes from ``(seed, epoch)`` alone, and each image's augmentation from ``(seed, epoch, position)``,
so a run resumed mid-epoch sees exactly the batches an uninterrupted run would have.
Images travel as uint8 tensors at the stage's resolution; normalisation happens on the device.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

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


def _image_folder_paths(root: str, field: str) -> tuple[list[tuple[str, int]], list[str]]:
    if not os.path.isdir(root):
        raise FieldError(field, root, "no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FieldError(field, root, "has no class folders (expected <root>/<class>/<image>)")
    items = []
    for k, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            items += [(os.path.join(dirpath, f), k) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise FieldError(field, root, "holds no images")
    return items, classes


def _decode_all(items: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode small images into one uint8 tensor (N, 3, H, W)."""
    from PIL import Image

    def read(path: str) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    images = np.stack([read(p) for p, _ in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor([k for _, k in items])


def _cifar10(cfg: DataConfig, seed: int) -> Source:
    root = cfg.root or os.path.join(os.path.expanduser("~"), ".cache", "cadence", "cifar10")
    val_split = cfg.val_split or "test"
    if os.path.isdir(os.path.join(root, "train")):  # an ImageFolder of the JPEGs
        train_items, classes = _image_folder_paths(os.path.join(root, "train"), "data.root")
        val_items, val_classes = _image_folder_paths(os.path.join(root, val_split), "data.val_split")
        if val_classes != classes:
            raise FieldError("data.val_split", val_split, f"has classes {val_classes}, train/ has {classes}")
        train, val = _decode_all(train_items), _decode_all(val_items)
    else:
        from torchvision.datasets import CIFAR10

        try:
            tr = CIFAR10(root, train=True, download=cfg.download)
            te = CIFAR10(root, train=False, download=cfg.download)
        except RuntimeError:
            raise FieldError("data.root", root, "holds neither CIFAR-10 batches nor an ImageFolder "
                             "(train/, test/); set data.download: true to fetch it") from None
        to_t = lambda ds: (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),  # noqa: E731
                           torch.tensor(ds.targets))
        train, val = to_t(tr), to_t(te)
    return Source(TensorImages(*train), TensorImages(*val), num_classes=10, channels=3,
                  mean=CIFAR_MEAN, std=CIFAR_STD, native_size=32)


class FileImages(Dataset):
    """Images decoded from files on access (ImageNet layout)."""

    def __init__(self, items: list[tuple[str, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            return im.convert("RGB"), label


def _imagefolder(cfg: DataConfig, seed: int) -> Source:
    train_items, classes = _image_folder_paths(os.path.join(cfg.root, "train"), "data.root")
    val_split = cfg.val_split or "val"
    val_items, val_classes = _image_folder_paths(os.path.join(cfg.root, val_split), "data.val_split")
    if val_classes != classes:
        raise FieldError("data.val_split", val_split, f"has {len(val_classes)} classes, train/ has {len(classes)}")
    return Source(FileImages(train_items), FileImages(val_items), num_classes=len(classes), channels=3,
                  mean=IMAGENET_MEAN, std=IMAGENET_STD, native_size=None)


SOURCES = {"digits": _digits, "synthetic": _synthetic, "cifar10": _cifar10, "imagefolder": _imagefolder}


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
# Transforms


def train_transform(source: Source, resolution: int):
    """ImageNet-style: RandomResizedCrop + flip (in-memory sources use ``augment_batch``)."""
    return v2.Compose([v2.RandomResizedCrop(resolution, antialias=True), v2.RandomHorizontalFlip(),
                       v2.PILToTensor()])


def eval_transform(source: Source, resolution: int):
    """Resize to resolution/0.875 and centre-crop (the torchvision reference's 224/256)."""
    return v2.Compose([v2.Resize(round(resolution / 0.875), antialias=True), v2.CenterCrop(resolution),
                       v2.PILToTensor()])


class Keyed(Dataset):
    """``dataset[(index, key)]``: the image transformed under RNG seed ``key``, so augmentation is a
    function of the sample's place in training, not of how many images came before in this process."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, key = item
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            image = self.transform(image)
        return torch.as_tensor(image), label


class Transformed(Dataset):
    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return torch.as_tensor(self.transform(image)), label


# ---------------------------------------------------------------------------------------------
# Sampling


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), stable across processes and runs."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """One epoch of ``(index, key)`` items for one rank, like ``DistributedSampler``.

    The permutation of the whole training set comes from ``(seed, epoch)``; the epoch uses its first
    ``n`` images (the stage's data fraction); ranks take every ``world``-th item (padding with
    repeats unless ``drop_last``); ``start`` skips items already trained on (resume)."""

    def __init__(self, total: int, n: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True, start: int = 0):
        self.total, self.n, self.seed, self.epoch = total, n, seed, epoch
        self.rank, self.world, self.drop_last, self.start = rank, world, drop_last, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        order = torch.randperm(self.total, generator=g)[: self.n].tolist()
        if self.drop_last:
            order = order[: len(order) - len(order) % self.world]
        else:
            order += order[: (-len(order)) % self.world]
        return order

    def __iter__(self):
        order = self.indices()
        for pos in range(self.rank + self.start * self.world, len(order), self.world):
            yield order[pos], _mix(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return max(len(self.indices()) // self.world - self.start, 0)


def augment_batch(x: torch.Tensor, keys: list[int], *, native: int, flip: bool,
                  resolution: int) -> torch.Tensor:
    """Vectorised pad-crop (reflect, native/8 px), optional horizontal flip and resize of a uint8
    batch (N, C, native, native). Image ``i``'s crop and flip come from RNG seed ``keys[i]`` alone,
    so an image is augmented the same way whichever batch or rank it lands in. Returns float32 in
    [0, 255]."""
    n, pad = len(x), max(native // 8, 1)
    draws = torch.stack([torch.randint(0, 2 * pad + 1, (3,), generator=torch.Generator().manual_seed(k))
                         for k in keys])
    oy, ox, fl = draws[:, 0], draws[:, 1], draws[:, 2]
    x = nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    ar = torch.arange(native)
    rows, cols = (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]
    x = x.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    if flip:
        x = torch.where((fl % 2 == 1)[:, None, None, None], x.flip(3), x)
    return resize_batch(x, resolution)


def resize_batch(x: torch.Tensor, resolution: int) -> torch.Tensor:
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x.float()
    return nn.functional.interpolate(x.float(), size=(resolution, resolution), mode="bilinear",
                                     antialias=True, align_corners=False)


class MemoryLoader:
    """Batches of an in-memory source for one rank, augmented a batch at a time (vectorised), each
    image by its own key, so resuming mid-epoch or changing the world size changes nothing."""

    def __init__(self, source: Source, stage: Stage, sampler: EpochSampler, local_batch: int, drop_last: bool):
        self.source, self.stage, self.sampler = source, stage, sampler
        self.local, self.drop_last = local_batch, drop_last

    def __iter__(self):
        data_ = self.source.train
        items = list(self.sampler)
        for b in range(0, len(items), self.local):
            chunk = items[b: b + self.local]
            if len(chunk) < self.local and self.drop_last:
                return
            idx = torch.tensor([i for i, _ in chunk])
            x = augment_batch(data_.images[idx], [k for _, k in chunk], native=self.source.native_size,
                              flip=self.source.flip, resolution=self.stage.resolution)
            yield x, data_.labels[idx]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.local if self.drop_last else -(-n // self.local)


def stage_loader(source: Source, stage: Stage, *, epoch: int, seed: int, epoch_samples: int,
                 drop_last: bool, num_workers: int = 0, rank: int = 0, world: int = 1,
                 skip_batches: int = 0, pin_memory: bool = False):
    """The batches of one epoch of ``stage`` for this rank, starting after ``skip_batches``."""
    local = stage.batch_size // world
    sampler = EpochSampler(len(source.train), epoch_samples, seed=seed, epoch=epoch, rank=rank,
                           world=world, drop_last=drop_last, start=skip_batches * local)
    if source.native_size is not None:
        return MemoryLoader(source, stage, sampler, local, drop_last)
    return DataLoader(Keyed(source.train, train_transform(source, stage.resolution)), batch_size=local,
                      sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False)


def eval_loader(source: Source, resolution: int, batch_size: int, num_workers: int = 0,
                rank: int = 0, world: int = 1):
    """This rank's share of the held-out set, resized (in memory) or resized + centre-cropped."""
    indices = list(range(rank, len(source.val), world))
    if source.native_size is not None:
        images, labels = source.val.images, source.val.labels
        return [(resize_batch(images[indices[b: b + batch_size]], resolution), labels[indices[b: b + batch_size]])
                for b in range(0, len(indices), batch_size)]
    ds = Transformed(source.val, eval_transform(source, resolution))
    return DataLoader(torch.utils.data.Subset(ds, indices), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers)


def normalizer(source: Source, device: torch.device, channels_last: bool = False):
    """uint8 batch -> float, normalised, on ``device``."""
    mean = torch.tensor(source.mean, device=device).view(1, -1, 1, 1) * 255
    std = torch.tensor(source.std, device=device).view(1, -1, 1, 1) * 255
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True).float()
        return ((x - mean) / std).contiguous(memory_format=fmt)

    return prep
