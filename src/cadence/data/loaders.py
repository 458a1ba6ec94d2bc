"""Loaders: each epoch's training batches for one rank (in-memory sources augmented a batch at a time,
image files through one persistent DataLoader) and the held-out batches."""

from __future__ import annotations

import atexit
import queue
import signal
import threading
import weakref

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from cadence.data.augment import (DEFAULT_CROP_PCT, ImagePolicy, augment_batch, crop_image, decode_crop, eval_batch,
                                  eval_transform, forced_flips)
from cadence.data.keys import EpochSampler
from cadence.data.sources import BAD_IMAGE_ERRORS, Source, bad_reason, pick_copy
from cadence.errors import FieldError
from cadence.plan import Stage
from cadence.recipe import DataConfig
from cadence.regularization import DEFAULTS, Regularization


# ---------------------------------------------------------------------------------------------
# In-memory small images: whole batches augmented as tensor operations


class MemoryLoader:
    """Batches of an in-memory source for one rank, augmented a batch at a time (vectorised), each
    image by its own key, so resuming mid-epoch or changing the world size changes nothing.

    ``made_ahead``: a background thread makes the next batch during the step (:func:`ahead`) -- for
    a model on an accelerator, whose step leaves the CPU idle. A model on the CPU already has every
    core (torch's threads): a thread beside it takes a core from one of them in the middle of its
    parallel work, which then waits for it at the next barrier, so each batch is made in the step
    instead (benchmarks/loop_vs_model.py, 2 cores: 1-9 points of throughput better, 5-9 in most rounds)."""

    def __init__(self, source: Source, resolution: int, sampler: EpochSampler, local_batch: int, drop_last: bool,
                 regularization: Regularization = DEFAULTS, made_ahead: bool = False):
        self.source, self.resolution, self.sampler = source, resolution, sampler
        self.local, self.drop_last, self.made_ahead = local_batch, drop_last, made_ahead
        self.policy = ImagePolicy(regularization, source.mean)
        self.translate, self.flip = regularization.translate, regularization.flip

    def __iter__(self):
        return ahead(self._batches()) if self.made_ahead else self._batches()

    def _batches(self):
        data_ = self.source.train
        indices, keys = self.sampler.keyed()
        flips = forced_flips(self.flip, self.sampler.seed, self.sampler.epoch, indices.numpy())
        for b in range(0, len(indices), self.local):
            idx = indices[b: b + self.local]
            if len(idx) < self.local and self.drop_last:
                return
            x = augment_batch(data_.images, keys[b: b + self.local], index=idx, native=self.source.native_size,
                              flip=self.source.flip, resolution=self.resolution, pad=self.translate,
                              flips=None if flips is None else flips[b: b + self.local])
            if self.policy:
                x = self.policy.batch(x, keys[b: b + self.local])
            yield x, data_.labels[idx]

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.local if self.drop_last else -(-n // self.local)


def ahead(batches, depth: int = 1):
    """Yield ``batches`` while a background thread makes the next ``depth`` of them: augmentation of
    the next batch overlaps the training step (torch's operations release the GIL; on a GPU the CPU is
    otherwise idle during the step). The order and contents are those of ``batches``; an exception in
    the thread is raised here; closing the generator early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for b in batches:
                if not put(("batch", b)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=work, name="cadence-augment", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------
# Image files: the crop is drawn before decoding, and the JPEG decoded only as large as it needs


class CropDecode(Dataset):
    """``dataset[(index, key, resolution, copy, regularization, mirror)]`` -> ``(HWC uint8 or None,
    label, bad)``. The resolution, the prepared copy to read, the stage's regularization and the
    flip when it is not the key's (``mirror``, else None) travel with each item, so one set of
    persistent workers serves every stage. ``roots[copy]`` replaces
    ``roots[0]`` at the start of each path; ``mean`` is the erasing fill."""

    def __init__(self, items: list[tuple[str, int]], flip: bool = True, roots: list[str] | None = None,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5)):
        self.items, self.flip, self.roots, self.mean = items, flip, roots or [""], mean
        self.policies: dict[Regularization, ImagePolicy] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item):
        index, key, resolution, copy, reg, mirror = item
        path, label = self.items[index]
        if copy:
            path = self.roots[copy] + path[len(self.roots[0]):]
        if reg not in self.policies:
            self.policies[reg] = ImagePolicy(reg, self.mean)
        policy = self.policies[reg]
        try:
            if not policy:
                return decode_crop(path, key, resolution, flip=self.flip, scale=reg.crop_scale,
                                   ratio=reg.crop_ratio, mirror=mirror), label, None
            image = crop_image(path, key, resolution, flip=self.flip, scale=reg.crop_scale, ratio=reg.crop_ratio,
                               mirror=mirror)
        except BAD_IMAGE_ERRORS as e:
            return None, label, (path, bad_reason(e))
        return policy(image, key).permute(1, 2, 0), label, None


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


_OPEN: weakref.WeakSet = weakref.WeakSet()  # FileLoaders whose workers may still run


@atexit.register  # registered after torch's multiprocessing import, so it runs before its exit hook
def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and their first SIGTERM. A signal to the whole process group
    (Ctrl-C in a terminal, ``scancel``, systemd, ``timeout``) reaches them too, and a worker that died
    of it would end the epoch with "DataLoader worker killed by signal" before the main process could
    finish its step and write a checkpoint. A second SIGTERM -- the main process stopping a worker
    that did not stop when asked -- ends the worker; if the main process is killed outright, torch's
    watchdog in each worker sees its parent gone and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _next_sigterm_ends_the_worker)


def _next_sigterm_ends_the_worker(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class FileLoader:
    """The training batches of a folder of image files, one DataLoader for the whole run: worker
    processes persist across epochs and stages (a stage change only changes the size each item
    asks for). Unreadable files are skipped and handed to ``on_bad``."""

    def __init__(self, source: Source, *, num_workers: int, pin_memory: bool = False, on_bad=None):
        self.batches, self.on_bad = _Batches(), on_bad
        roots = [root for _, root in source.copies]
        dataset = CropDecode(source.train.items, source.flip, roots, source.mean)
        self.loader = DataLoader(dataset, batch_sampler=self.batches,
                                 num_workers=num_workers, collate_fn=collate_good, pin_memory=pin_memory,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                                 worker_init_fn=leave_signals_to_the_main_process)
        _OPEN.add(self)

    def close(self) -> None:
        """Stop the worker processes now (torch's orderly shutdown). Called when training ends, and at
        interpreter exit for loaders still open -- before multiprocessing's own exit hook, which would
        only send them the SIGTERM they ignore once."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        _OPEN.discard(self)

    def epoch(self, sampler: EpochSampler, resolution: int, local_batch: int, drop_last: bool, copy: int = 0,
              regularization: Regularization = DEFAULTS):
        indices, keys = sampler.keyed()
        flips = forced_flips(regularization.flip, sampler.seed, sampler.epoch, indices.numpy())
        mirror = [None] * len(indices) if flips is None else flips.tolist()
        items = [(i, k, resolution, copy, regularization, m)
                 for i, k, m in zip(indices.tolist(), keys.tolist(), mirror)]
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
    batches, file sources go through one persistent DataLoader. ``device`` is where the model
    trains: on the CPU in-memory batches are made in the step, on any other device ahead, by a
    thread (:class:`MemoryLoader`); batches for CUDA come from pinned memory."""

    def __init__(self, source: Source, cfg: DataConfig, *, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", on_bad=None):
        self.source, self.cfg, self.seed, self.rank, self.world = source, cfg, seed, rank, world
        device = torch.device(device)
        self.pin_memory = device.type == "cuda"  # batches copied to the GPU from pinned memory
        self.made_ahead = device.type != "cpu"  # in memory: the next batch made during the step (MemoryLoader)
        self.on_bad = on_bad
        self._files: FileLoader | None = None

    def epoch(self, stage: Stage, epoch: int, epoch_samples: int, skip_batches: int = 0,
              regularization: Regularization = DEFAULTS):
        """The batches of global ``epoch`` (at ``stage``, with its resolved ``regularization``) for
        this rank, after ``skip_batches``."""
        local = stage.batch_size // self.world
        sampler = EpochSampler(len(self.source.train), epoch_samples, seed=self.seed, epoch=epoch, rank=self.rank,
                               world=self.world, drop_last=self.cfg.drop_last, start=skip_batches * local)
        if self.source.native_size is not None:
            return MemoryLoader(self.source, stage.resolution, sampler, local, self.cfg.drop_last, regularization,
                                self.made_ahead)
        if self._files is None:
            self._files = FileLoader(self.source, num_workers=self.cfg.workers(), pin_memory=self.pin_memory,
                                     on_bad=self._bad)
        return self._files.epoch(sampler, stage.resolution, local, self.cfg.drop_last,
                                 pick_copy(self.source.copies, stage.resolution), regularization)

    def close(self) -> None:
        """Stop the file loader's workers, if any (training is over)."""
        if self._files is not None:
            self._files.close()
            self._files = None

    def _bad(self, bad: list) -> None:
        if self.cfg.on_bad_image == "error":
            path, reason = bad[0]
            raise FieldError("data.root", path, f"unreadable image ({reason}); "
                             "data.on_bad_image: skip would skip it")
        if self.on_bad is not None:
            self.on_bad(bad)


# ---------------------------------------------------------------------------------------------
# Evaluation


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
            return None, label, (path, bad_reason(e))


def eval_loader(source: Source, resolution: int, batch_size: int, num_workers: int = 0,
                rank: int = 0, world: int = 1, *, crop_pct: float | None = None):
    """This rank's share of the held-out set, resized (in memory) or resized + centre-cropped
    (unreadable files skipped: they were listed when training met them, or at load). ``crop_pct``:
    the centre crop's share of the shorter side (None: the whole image in memory, 0.875 for files)."""
    indices = list(range(rank, len(source.val), world))
    if source.native_size is not None:
        images, labels = source.val.images, source.val.labels
        return [(eval_batch(images[indices[b: b + batch_size]], resolution, crop_pct),
                 labels[indices[b: b + batch_size]]) for b in range(0, len(indices), batch_size)]
    transform = eval_transform(source, resolution, crop_pct=DEFAULT_CROP_PCT if crop_pct is None else crop_pct)
    ds = EvalDecode([source.val.items[i] for i in indices], transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_good,
                        worker_init_fn=leave_signals_to_the_main_process)
    return ((x, y) for x, y, _ in loader if len(y))
