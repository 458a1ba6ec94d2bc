"""Peak memory (max RSS) of a CIFAR-10 training run through ``cadence train``, measured by the OS
for the whole process (model, optimizer, the decoded data set, loader, evaluation).

    python benchmarks/peak_memory.py --root /path/to/cifar10 [--full]

Without ``--full`` every stage of recipes/cifar10-progressive.yaml keeps its resolution and batch
size but sees 4% of the data per epoch (a few minutes); ``--full`` trains the whole recipe.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "cifar10-progressive.yaml")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--recipe", default=RECIPE)
    p.add_argument("--full", action="store_true")
    a = p.parse_args()
    sets = [f"data.root={a.root}"]
    if not a.full:
        sets += [f"stages.{k}.data_fraction=0.04" for k in range(3)]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cadence", "train", a.recipe, "--out", os.path.join(out, "run"), "--quiet"]
        for s in sets:
            cmd += ["--set", s]
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"peak RSS {peak:.2f} GiB ({'full run' if a.full else 'every stage at 4% of the data'}, {took:.0f} s)")


if __name__ == "__main__":
    main()
