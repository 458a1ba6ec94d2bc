"""cadence's training pipeline against torchvision's standard one on ImageNet-sized JPEGs, one
process and one thread each (what one DataLoader worker does), images/s in steady state.

    python benchmarks/jpeg_pipeline.py --root DIR      # any folder of JPEGs, searched recursively

torchvision: ``default_loader`` (PIL open + convert RGB, as ``ImageFolder``) then
``RandomResizedCrop(res)`` + ``RandomHorizontalFlip()`` + ``PILToTensor()`` (uint8, like ours).
cadence: the same crop distribution drawn from the header's size, read from the prepared copy that
covers the resolution (``cadence prepare``: one copy per resolution R, shorter side <= R x 256/224,
made once here from the originals; its time is printed apart) with DCT-domain scaling where the
crop allows, then one resize; ``--no-prepare`` reads the originals instead. Rounds alternate between the two
pipelines so the machine's noise hits both; the median round is reported.

``--policy trivialaugment --random-erasing 0.1`` adds the per-image policy to both: torchvision's
reference order (``TrivialAugmentWide`` on the PIL crop, ``PILToTensor``, ``RandomErasing``) against
cadence's ``ImagePolicy`` (the same transforms.v2 ops on the PIL crop, their draws made from the image's key).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torchvision import transforms
from torchvision.datasets.folder import default_loader

from cadence import data
from cadence.prepare import prepare_copy
from cadence.recipe import recipe_from_dict
from cadence.regularization import DEFAULTS, Regularization


def jpegs(root: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if f.lower().endswith((".jpg", ".jpeg")))


def rate(fn, files: list[str]) -> float:
    start = time.perf_counter()
    for i, path in enumerate(files):
        fn(path, i)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder of JPEGs (searched recursively)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 160, 224])
    p.add_argument("--prepared", help="where to keep the prepared copies (default: a temporary folder)")
    p.add_argument("--no-prepare", action="store_true", help="cadence reads the original JPEGs")
    p.add_argument("--images", type=int, default=400, help="images per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--policy", choices=["none", "trivialaugment", "randaugment", "autoaugment"], default="none")
    p.add_argument("--random-erasing", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)

    files = jpegs(a.root)
    if not files:
        raise SystemExit(f"no JPEGs under {a.root}")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")  # prepare reads an ImageFolder: link the files in as one class
        os.makedirs(os.path.join(src, "train", "all"))
        for i, f in enumerate(files):
            os.symlink(os.path.abspath(f), os.path.join(src, "train", "all", f"{i:07d}.jpg"))
        out = a.prepared or os.path.join(tmp, "prepared")
        recipe = recipe_from_dict({"name": "bench", "data": {"source": "imagefolder", "root": src},
                                   "schedule": {"kind": "constant"},
                                   "stages": [{"epochs": 1, "resolution": r, "batch_size": 1} for r in a.resolutions]})
        print(f"{len(files)} JPEGs, mean {np.mean([os.path.getsize(f) for f in files]) / 1024:.0f} KB")
        if not a.no_prepare:
            start = time.perf_counter()
            manifests = prepare_copy(recipe, out, workers=1, progress=False)
            prep_s = time.perf_counter() - start
            print(f"prepared copies (shorter side <= {', '.join(str(m['short_side']) for m in manifests)} px): "
                  f"{prep_s:.1f} s once on 1 process ({len(files) / prep_s:.0f} originals/s)")
        copies = data.prepared_copies(out)
        n = min(a.images, len(files))
        keys = data.mix(0, np.arange(n)).tolist()
        for res in a.resolutions:
            prepared = jpegs(copies[data.pick_copy(copies, res)][1]) if copies else files
            policy = {"none": [], "trivialaugment": [transforms.TrivialAugmentWide()],
                      "randaugment": [transforms.RandAugment()], "autoaugment": [transforms.AutoAugment()]}[a.policy]
            erase = [transforms.RandomErasing(a.random_erasing)] if a.random_erasing else []
            tv = transforms.Compose([transforms.RandomResizedCrop(res), transforms.RandomHorizontalFlip(), *policy,
                                     transforms.PILToTensor(), *erase])
            reg = Regularization(policy=a.policy, random_erasing=a.random_erasing).over(DEFAULTS)
            image_policy = data.ImagePolicy(reg, (0.485, 0.456, 0.406))
            if image_policy:  # as the image-folder loader does: the policy on the PIL crop, erasing on the tensor
                ours = lambda path, i: image_policy(data.crop_image(path, keys[i], res), keys[i])  # noqa: E731
            else:
                ours = lambda path, i: data.decode_crop(path, keys[i], res)  # noqa: E731
            theirs = lambda path, i: tv(default_loader(path))  # noqa: E731
            rate(ours, prepared[:50]), rate(theirs, files[:50])  # warm caches
            r_ours, r_theirs = [], []
            for k in range(a.rounds):
                r_ours.append(rate(ours, prepared[:n]))
                r_theirs.append(rate(theirs, files[:n]))
            c, t = statistics.median(r_ours), statistics.median(r_theirs)
            print(f"{res}: cadence {c:.0f} img/s, torchvision {t:.0f} img/s, ratio {c / t:.2f}", flush=True)


if __name__ == "__main__":
    main()
