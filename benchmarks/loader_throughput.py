"""CIFAR-10 loader alone: images/s of cadence's in-memory pipeline (pad-crop, flip, resize, all
batched tensor ops) at 16, 24 and 32 px, and the decoded-image cache's first build against reuse.

    python benchmarks/loader_throughput.py --root /path/to/cifar10   # ImageFolder of the JPEGs
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from cadence import data
from cadence.plan import Stage
from cadence.recipe import DataConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="CIFAR-10 as an ImageFolder (train/, test/)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[16, 24, 32])
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        cfg = DataConfig(source="cifar10", root=a.root, cache_dir=cache)
        t0 = time.perf_counter()
        data.load_source(cfg)
        t1 = time.perf_counter()
        source = data.load_source(cfg)
        t2 = time.perf_counter()
        nocache = DataConfig(source="cifar10", root=a.root, cache=False)
        data.load_source(nocache)
        t3 = time.perf_counter()
    print(f"load {len(source.train):,} + {len(source.val):,} images: first (decode + write cache) "
          f"{t1 - t0:.1f} s, from cache {t2 - t1:.1f} s (hashing the files included), no cache {t3 - t2:.1f} s")
    source = data.load_source(DataConfig(source="cifar10", root=a.root, cache=False))  # in RAM: no disk noise
    td = data.TrainData(source, cfg, seed=0)
    for threads in a.threads:
        torch.set_num_threads(threads)
        for res in a.resolutions:
            rates = []
            for r in range(a.rounds):
                loader = td.epoch(Stage(epochs=1, resolution=res, batch_size=a.batch_size), r, 50_000)
                n, start = 0, time.perf_counter()
                for x, y in loader:
                    n += len(y)
                rates.append(n / (time.perf_counter() - start))
            print(f"{res}px, {threads} thread(s): {statistics.median(rates):,.0f} img/s "
                  f"(median of {a.rounds} epochs of 50,000, batch {a.batch_size})", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    main()
