"""The in-memory policy path alone: a batch of uint8 images through ``ImagePolicy.batch`` against the
same images one by one through ``ImagePolicy.__call__`` (torchvision's own operations per image, with
the same keyed draws), on one thread, in process CPU time. The two results are checked equal bit for
bit before anything is timed.

Alternating rounds, each on a fresh batch of keys (index maps and tables warm after the first); the
median of each. The images are uniform noise (the operations' cost does not depend on the content).

    python benchmarks/policy_batch.py                         # TrivialAugmentWide + erasing 0.1
    python benchmarks/policy_batch.py --set color_jitter=0.4 --set policy=randaugment --size 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import yaml

from cadence import data
from cadence.regularization import DEFAULTS, Regularization


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="sets", action="append", default=[], help="a regularization key, e.g. policy=randaugment")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    keys = {"policy": "trivialaugment", "random_erasing": 0.1}
    keys.update({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.sets)})
    torch.set_num_threads(1)
    policy = data.ImagePolicy(Regularization(**keys).over(DEFAULTS), (0.49, 0.48, 0.45))
    x = torch.randint(0, 256, (a.batch, 3, a.size, a.size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"batch": [], "one by one": []}
    for r in range(a.rounds + 1):
        ks = data.mix(1000 + r, np.arange(a.batch))
        start = time.process_time()
        out = policy.batch(x, ks)
        mid = time.process_time()
        ref = torch.stack([policy(img, int(k)) for img, k in zip(x, ks)])
        end = time.process_time()
        assert torch.equal(out, ref), "the batch differs from the images one by one"
        if r:  # the first round fills the caches
            times["batch"].append(mid - start)
            times["one by one"].append(end - mid)
    b, o = (statistics.median(times[k]) * 1000 for k in ("batch", "one by one"))
    print(f"{keys}, {a.batch} x {a.size} px, one thread: batch {b:.1f} ms ({b / a.batch * 1000:.0f} us an image), "
          f"one by one {o:.1f} ms: {o / b:.1f}x")


if __name__ == "__main__":
    main()
