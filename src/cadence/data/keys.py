"""The keys every random draw comes from.

Exact resume: every random choice is a function of ``(seed, epoch, position)``, never of process
history (no generator state carried across batches, workers, ranks or restarts). So a run resumed
mid-epoch, and a run on any world size, sees the same order, crops and flips as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

_M64 = (1 << 64) - 1


def mix(*xs) -> np.ndarray:
    """A 63-bit hash of integers or integer arrays (broadcast): each input is xor-ed in, then mixed
    by a multiply and an xorshift (splitmix64's constants, not its generator). Stable across
    processes, runs and machines, and vectorised (no per-sample Python)."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for x in xs:
            x = np.uint64(x & _M64) if isinstance(x, int) else np.asarray(x).astype(np.uint64)
            h = (h ^ x) * np.uint64(0xBF58476D1CE4E5B9)
            h = h ^ (h >> np.uint64(31))
        return h & np.uint64(0x7FFFFFFFFFFFFFFF)


def key(*xs: int) -> int:
    """``mix`` of plain integers, as a Python int."""
    return int(mix(*xs))


def uniforms(key: int, n: int) -> list[float]:
    """``n`` uniform floats in [0, 1) from ``key``: the splitmix64 generator seeded with ``key``, in
    plain integers (a few microseconds, where seeding a torch or numpy generator per image costs a hundred)."""
    out, h = [], key & _M64
    for _ in range(n):
        h = (h + 0x9E3779B97F4A7C15) & _M64
        z = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        out.append(((z ^ (z >> 31)) >> 11) / 2.0**53)
    return out


def uniforms_of(keys, n: int) -> np.ndarray:
    """``uniforms`` of each key, vectorised: row ``i`` of the ``(len(keys), n)`` result is
    ``uniforms(keys[i], n)`` exactly (the tests hold it)."""
    with np.errstate(over="ignore"):
        h = np.asarray(keys, dtype=np.uint64)[:, None] + np.uint64(0x9E3779B97F4A7C15) * np.arange(
            1, n + 1, dtype=np.uint64)
        z = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return ((z ^ (z >> np.uint64(31))) >> np.uint64(11)).astype(np.float64) / 2.0**53


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
        g = torch.Generator().manual_seed(key(self.seed, self.epoch))
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
