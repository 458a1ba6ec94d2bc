"""Does the fast CIFAR-10 path change accuracy? The same recipe, trained by cadence's trainer with
(a) its batched tensor augmentation and (b) the reference: torchvision v2 per-image transforms
(``RandomCrop(32, padding=4, padding_mode="reflect")``, ``RandomHorizontalFlip()``,
``Resize(res, antialias=True)``) over the same epoch order, one image at a time. Same seeds,
same model, same schedule: the accuracy gap should be within the seed-to-seed spread.

    python benchmarks/fast_vs_reference.py --root /path/to/cifar10 --seeds 0 1 --fraction 0.1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import torch
from torchvision.transforms import v2

from cadence import data, parts, train
from cadence.recipe import load_recipe


class ReferenceLoader:
    """One epoch through torchvision's per-image transforms, in the sampler's order."""

    def __init__(self, source: data.Source, resolution: int, sampler: data.EpochSampler, local: int):
        self.source, self.sampler, self.local = source, sampler, local
        self.tf = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                              v2.Resize(resolution, antialias=True)])

    def __len__(self) -> int:
        return len(self.sampler) // self.local

    def __iter__(self):
        indices, keys = self.sampler.keyed()
        images, labels = self.source.train.images, self.source.train.labels
        for b in range(0, len(indices) - self.local + 1, self.local):
            out = []
            for i, k in zip(indices[b: b + self.local].tolist(), keys[b: b + self.local].tolist()):
                torch.manual_seed(k)
                out.append(self.tf(images[i]))
            yield torch.stack(out).float(), labels[indices[b: b + self.local]]


def reference_epoch(td: data.TrainData):
    def epoch(stage, epoch, epoch_samples, skip_batches=0):
        local = stage.batch_size // td.world
        sampler = data.EpochSampler(len(td.source.train), epoch_samples, seed=td.seed, epoch=epoch,
                                    start=skip_batches * local)
        return ReferenceLoader(td.source, stage.resolution, sampler, local)
    return epoch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--recipe", default="recipes/cifar10-progressive.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fraction", type=float, default=0.1, help="data fraction of every stage")
    a = p.parse_args()
    results: dict[str, list[float]] = {"fast": [], "reference": []}
    for seed in a.seeds:
        for path in ("fast", "reference"):
            stages = [f"stages.{k}.data_fraction={a.fraction}" for k in range(3)]
            recipe = load_recipe(a.recipe, [f"data.root={a.root}", f"seed={seed}", *stages])
            setup = parts.build_setup(recipe)
            with tempfile.TemporaryDirectory() as out:
                trainer = train.Trainer.create(setup, out)
                if path == "reference":
                    trainer.data.epoch = reference_epoch(trainer.data)
                final = trainer.fit(progress=False)
            results[path].append(final["val_top1"])
            print(f"seed {seed} {path}: top-1 {100 * final['val_top1']:.2f}% in {trainer.elapsed:.0f} s", flush=True)
    for path, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"{path}: {100 * statistics.mean(accs):.2f} +- {100 * sd:.2f}% over seeds {a.seeds}")
    diffs = [f - r for f, r in zip(results["fast"], results["reference"])]
    print(f"fast - reference per seed: {', '.join(f'{100 * d:+.2f}' for d in diffs)} points")


if __name__ == "__main__":
    main()
