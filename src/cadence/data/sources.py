"""Data sources: a recipe's ``data`` section -> a :class:`Source` (train and held-out sets).

In-memory sets (digits, synthetic, CIFAR-10) are uint8 tensors; an ImageNet-layout folder stays files,
read through prepared copies when ``cadence prepare`` made them. Folders of small images are decoded once
into a cache keyed by their content; unreadable files are skipped (and listed) or raise FieldError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from cadence.errors import FieldError
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


def _digits(cfg: DataConfig) -> Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))  # fixed split
    n_val = int(len(labels) * cfg.val_fraction)
    val, train = order[:n_val], order[n_val:]
    return Source(TensorImages(images[train], labels[train]), TensorImages(images[val], labels[val]),
                  num_classes=10, channels=1, mean=(0.5,), std=(0.5,), native_size=8,
                  flip=False)  # (recipes that flip them are refused: regularization.NEVER_FLIPPED)


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


def _synthetic(cfg: DataConfig) -> Source:
    train = synthetic_images(cfg.samples, cfg.image_size, cfg.num_classes, seed=1)
    val = synthetic_images(cfg.val_samples, cfg.image_size, cfg.num_classes, seed=2)
    return Source(TensorImages(*train), TensorImages(*val), num_classes=cfg.num_classes, channels=3,
                  mean=(0.5,) * 3, std=(0.25,) * 3, native_size=cfg.image_size)


# what PIL raises for unreadable files (a decompression bomb is a file we will not read either)
BAD_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _image_files(folder: str, bad: list | None) -> list[str]:
    """The image files under ``folder`` in ``sorted(os.walk(folder))`` order (links to folders are not
    followed). Only regular files: a FIFO, socket or device named like an image would hang or fail on
    open, so it is listed in ``bad`` instead. Uses the directory entries' types, no extra stat."""
    per_folder: dict[str, list[str]] = {}
    todo = [folder]
    while todo:
        here = todo.pop()
        names = per_folder.setdefault(here, [])
        with os.scandir(here) as entries:
            for e in entries:
                if e.is_dir():
                    if not e.is_symlink():
                        todo.append(e.path)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                    if e.is_file():
                        names.append(e.name)
                    elif bad is not None:
                        bad.append((e.path, "not a regular file"))
    return [os.path.join(d, f) for d in sorted(per_folder) for f in sorted(per_folder[d])]


def held_out_labels(val_classes: list[str], classes: list[str], val_split: str) -> np.ndarray:
    """The train/ index of each of a held-out split's class folders, by name, so that its labels mean
    what training's do. Its classes may be a subset of train/'s; a class train/ lacks raises FieldError."""
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise FieldError("data.val_split", val_split, f"has classes train/ lacks: {', '.join(extra[:8])}"
                         f"{' ...' if len(extra) > 8 else ''} (its classes must be train/ class folders, by name)")
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[c] for c in val_classes], dtype=np.int64)


def not_held_out(val_root: str, classes: list[str], labels) -> list[tuple[str, str]]:
    """``(folder, reason)`` for each train/ class with no held-out image (``labels``: the train/
    indices the held-out split has), listed as unreadable files are, not an error."""
    present = set(int(k) for k in labels)
    return [(os.path.join(val_root, c), "train/ class with no held-out images (not evaluated)")
            for k, c in enumerate(classes) if k not in present]


def image_folder_paths(root: str, field: str, on_bad: str = "skip", bad: list | None = None, *,
                       held_out: bool = False) -> tuple[list[tuple[str, int]], list[str]]:
    """``(path, class index)`` of every image under ``root/<class>/``. An empty class folder keeps
    its index; it is listed in ``bad`` (skip) or raises FieldError (error); in a ``held_out`` split
    it is neither (the caller lists train/ classes without held-out images: ``not_held_out``)."""
    if not os.path.isdir(root):
        raise FieldError(field, root, "no such directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FieldError(field, root, "has no class folders (expected <root>/<class>/<image>)")
    items = []
    for k, c in enumerate(classes):
        found = [(path, k) for path in _image_files(os.path.join(root, c), bad)]
        if not found and not held_out:
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


def bad_reason(e: BaseException) -> str:
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
                raise FieldError(field, path, f"unreadable image ({bad_reason(e)}); "
                                 "data.on_bad_image: skip would skip it") from None
            bad.append((path, bad_reason(e)))
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


def decoded_folder(cfg: DataConfig, root: str, field: str, bad: list,
                   held_out: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An ImageFolder of small images as ``(uint8 NHWC, labels, classes)``: decoded once, then
    memory-mapped from ``<cache_dir>/decoded/<content key>/`` on every later run. Labels index
    ``classes`` (this folder's own; see ``image_folder_paths`` for ``held_out``)."""
    items, classes = image_folder_paths(root, field, cfg.on_bad_image, bad, held_out=held_out)
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


def _cifar10(cfg: DataConfig) -> Source:
    root = cfg.root or os.path.join(os.path.expanduser("~"), ".cache", "cadence", "cifar10")
    val_split = cfg.val_split or "test"
    bad: list = []
    if os.path.isdir(os.path.join(root, "train")):  # an ImageFolder of the JPEGs
        tr_images, tr_labels, classes = decoded_folder(cfg, os.path.join(root, "train"), "data.root", bad)
        val_bad: list = []
        va_images, va_labels, val_classes = decoded_folder(cfg, os.path.join(root, val_split), "data.val_split",
                                                           val_bad, held_out=True)
        va_labels = held_out_labels(val_classes, classes, val_split)[va_labels]  # (the cache keeps its own)
        bad += val_bad + not_held_out(os.path.join(root, val_split), classes, va_labels)
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
            first = first or f"{path}: {bad_reason(e)}"
    raise FieldError(field, root, f"holds no readable image (first failure {first})")


def _imagefolder(cfg: DataConfig) -> Source:
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
    train_items, classes = image_folder_paths(train_root, field, cfg.on_bad_image, bad)
    val_root = os.path.join(cfg.root, val_split)
    val_items, val_classes = image_folder_paths(val_root, "data.val_split", cfg.on_bad_image, bad, held_out=True)
    to_train = held_out_labels(val_classes, classes, val_split)
    val_items = [(path, int(to_train[k])) for path, k in val_items]
    bad += not_held_out(val_root, classes, [k for _, k in val_items])
    _first_readable(train_items, field, train_root)
    _first_readable(val_items, "data.val_split", val_root)
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


def load_source(cfg: DataConfig) -> Source:
    """The data a recipe names; a bad path raises FieldError naming ``data.root``."""
    source = SOURCES[cfg.source](cfg)
    if cfg.train_samples is not None and cfg.train_samples != len(source.train):
        raise FieldError("data.train_samples", cfg.train_samples,
                         f"but the training set has {len(source.train)} images")
    return source
