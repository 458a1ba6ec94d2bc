"""What ``parts.keep_freed_memory`` is worth on CPU: the training-step rate, minor page faults per
step and peak resident memory of a recipe's model at each stage's resolution, with glibc's default
malloc settings against cadence's (no mmap for large blocks, freed memory kept). A process-wide
setting, so each measurement is a fresh process; the two settings alternate, round by round.

    python benchmarks/allocator.py recipes/cifar10-fast-bf16.yaml --set data.root=/path/to/cifar10
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

from step_speed import fixed_batch_rate, stage_batch  # the same timed fixed-batch steps


def measure(recipe_file: str, sets: list[str], stage: int, steps: int, default_malloc: bool) -> dict:
    from cadence import parts, train
    from cadence.recipe import load_recipe

    if default_malloc:
        parts.keep_freed_memory = lambda: False  # build_setup() calls it through the module
    trainer = train.Trainer(parts.build_setup(load_recipe(recipe_file, sets), recipe_file), run_dir="")
    x, y = stage_batch(trainer, stage)
    batch = trainer.parts.normalize(x), y
    fixed_batch_rate(trainer, stage, batch, 2)  # first steps: oneDNN primitives, the allocator's first growth
    before = resource.getrusage(resource.RUSAGE_SELF)
    img_s = fixed_batch_rate(trainer, stage, batch, steps)
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), steps * len(y) / img_s
    return {"img_s": img_s, "faults": (after.ru_minflt - before.ru_minflt) / steps,
            "sys": (after.ru_stime - before.ru_stime) / seconds, "rss_gb": after.ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("STAGE", "DEFAULT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.recipe, a.sets, int(a.child[0]), a.steps, a.child[1] == "1")))
        return
    from cadence.recipe import load_recipe

    recipe = load_recipe(a.recipe, a.sets)
    sets = [arg for s in a.sets for arg in ("--set", s)]
    for k, stage in enumerate(recipe.stages):
        got: dict[str, list[dict]] = {"glibc default": [], "cadence": []}
        for _ in range(a.rounds):
            for label, flag in (("glibc default", "1"), ("cadence", "0")):
                out = subprocess.run([sys.executable, __file__, a.recipe, *sets, "--steps", str(a.steps),
                                      "--child", str(k), flag], check=True, capture_output=True, text=True)
                got[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        base = statistics.median(r["img_s"] for r in got["glibc default"])
        for label, rows in got.items():
            rate = statistics.median(r["img_s"] for r in rows)
            print(f"stage {k} {stage.resolution}px batch {stage.batch_size} {label}: {rate:.0f} img/s "
                  f"({rate / base:.2f}x), {statistics.median(r['faults'] for r in rows):,.0f} page faults/step, "
                  f"{statistics.median(r['sys'] for r in rows):.2f} CPU-s/s in the kernel, "
                  f"peak RSS {max(r['rss_gb'] for r in rows):.2f} GB", flush=True)


if __name__ == "__main__":
    main()
