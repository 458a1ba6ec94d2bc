"""What a plan costs on this machine: ``cadence plan RECIPE --measure``.

A few timed optimizer steps (the recipe's model, optimizer, precision, memory format, loss and
micro-batching, on random images) at every distinct (resolution, per-process batch) of the plan,
each in a fresh process, so each size's peak memory is its own: on CUDA the allocator's peak, on the
CPU the growth of the process's peak resident memory from before the model was built. Data loading
and evaluation are not in it: the estimate is the model's step rate, which a run whose input keeps up
(benchmarks/loop_vs_model.py) trains at.
"""

from __future__ import annotations

import copy
import multiprocessing
import re
import time

from cadence.errors import FieldError
from cadence.recipe import Recipe

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30, "t": 2**40,
          "tb": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"40GB"``, ``"512 MiB"``, ``"2e9"`` -> bytes (GB = GiB = 2**30: what tools report as GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise FieldError("--memory-limit", text, "must be a size such as 40GB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _calibrate(raw: dict, resolution: int, batch: int, micro: int | None, steps: int) -> dict:
    """In a fresh process: ``steps`` timed optimizer steps (after 2 untimed) on random images."""
    import torch

    from cadence import data, parts
    from cadence.recipe import recipe_from_dict

    raw = copy.deepcopy(raw)
    raw.setdefault("train", {})["micro_batch_size"] = micro
    recipe = recipe_from_dict(raw)
    classes, channels = _classes_channels(recipe)
    images, labels = _images(recipe, max(batch, 64), resolution, classes, channels)
    base_rss = _rss_before()
    source = data.Source(data.TensorImages(images, labels), data.TensorImages(images[:8], labels[:8]), classes,
                         channels, (0.5,) * channels, (0.25,) * channels, native_size=resolution)
    stage = {"epochs": 1, "resolution": resolution, "batch_size": batch}
    raw["optimizer"] = {**raw.get("optimizer", {}), "lr": 0.01}  # the LR does not change a step's cost
    raw.pop("momentum_schedule", None)
    if recipe.train.ema is not None:
        raw["train"]["ema"] = 0.999
    recipe = recipe_from_dict({**raw, "stages": [stage], "schedule": {"kind": "constant"},
                               "data": {"source": "synthetic", "train_samples": batch}})
    device = parts.pick_device(recipe.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        parts.keep_freed_memory()  # as training does (else every step faults its activations in again)
    setup = parts.Setup(recipe, source, recipe.timeline(train_samples=len(images)), device)
    built = parts.build_parts(setup)
    x, y = images[:batch], labels[:batch]

    def step():
        built.forward_backward(built.normalize(x), y.to(device))
        built.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else max(_peak_rss() - base_rss, 0))
    return {"step_s": seconds, "img_s": batch / seconds, "peak": peak, "device": str(device),
            "threads": torch.get_num_threads()}


def _images(recipe: Recipe, n: int, resolution: int, classes: int, channels: int):
    """``n`` images at ``resolution`` px and their labels: for an in-memory source, a batch of the
    recipe's own training pipeline (CPU step rates depend on the pixels: the demo's fastnet steps 1.4x
    faster on its augmented digits than on uniform noise), else smooth synthetic images (photo-like)."""
    from cadence import data
    from cadence.plan import Stage

    if recipe.data.source != "imagefolder":
        try:
            source = data.load_source(recipe.data)
            if len(source.train) >= n:
                td = data.TrainData(source, recipe.data, seed=recipe.seed)
                x, y = next(iter(td.epoch(Stage(epochs=1, resolution=resolution, batch_size=n), 0, n)))
                return x, y
        except (FieldError, OSError):
            pass  # no data here: measure on synthetic images
    images, labels = data.synthetic_images(n, resolution, classes, seed=0)
    return (images[:, :channels] if channels < 3 else images), labels


def _rss_before() -> int:
    """This process's resident memory now, with the kernel's peak reset to it where Linux allows
    (``/proc/self/clear_refs``), so the peak measured after is the calibration's own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss() -> int:
    try:
        return _status("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _classes_channels(recipe: Recipe) -> tuple[int, int]:
    """Classes and image channels, from the recipe alone (no data needed to measure)."""
    d = recipe.data
    classes = recipe.model.num_classes or {"digits": 10, "cifar10": 10, "synthetic": d.num_classes}.get(d.source, 1000)
    return classes, 1 if d.source == "digits" else 3


def _child(*args) -> dict:
    try:
        return _calibrate(*args)
    except Exception as e:  # (cadence's exceptions do not unpickle: send the line, not the object)
        return {"error": f"{type(e).__name__}: {e}"}


def calibrate(recipe: Recipe, resolution: int, batch: int, micro: int | None, steps: int) -> dict:
    """``_calibrate`` in a spawned process (its own memory peak; no state shared with this one)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_child, (recipe.raw, resolution, batch, micro, steps))
    if "error" in result:
        raise RuntimeError(f"measuring {resolution}px at {batch} images per process failed: {result['error']}")
    return result


def measure(recipe: Recipe, timeline, *, world_size: int = 1, steps: int = 5, memory_limit: int | None = None,
            progress=lambda line: None) -> dict:
    """Per stage: the calibration of its (resolution, per-process batch, micro-batch), its estimated
    time; the run's total; and with ``memory_limit``, per stage the largest micro-batch (dividing the
    per-process batch) whose peak fits, measured."""
    micro = recipe.train.micro_batch_size
    cache: dict = {}

    def at(res: int, local: int, m: int | None) -> dict:
        k = (res, local, m)
        if k not in cache:
            progress(f"measuring {res}px, {local} images per process" + (f" in chunks of {m}" if m else ""))
            cache[k] = calibrate(recipe, res, local, m, steps)
        return cache[k]

    rows = []
    for k, st in enumerate(recipe.stages):
        local = st.batch_size // world_size
        result = at(st.resolution, local, micro)
        n = timeline.stage_starts[k + 1] - timeline.stage_starts[k]
        row = {"stage": k, "resolution": st.resolution, "batch": st.batch_size, "local": local, "micro": micro,
               "steps": n, "seconds": n * result["step_s"], **result}
        if memory_limit is not None:
            row["fits"] = result["peak"] <= memory_limit
            if not row["fits"]:
                row["proposal"] = None
                for m in sorted((d for d in range(1, (micro or local)) if local % d == 0), reverse=True):
                    if at(st.resolution, local, m)["peak"] <= memory_limit:
                        row["proposal"] = m
                        break
        rows.append(row)
    return {"stages": rows, "seconds": sum(r["seconds"] for r in rows)}


def _duration(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def table(result: dict, memory_limit: int | None = None) -> str:
    """``cadence plan --measure``'s lines."""
    rows = result["stages"]
    first = rows[0]
    head = ("stage", "res", "batch", "micro", "img/s", "step", "time", "peak memory")
    lines = [head] + [(str(r["stage"]), f"{r['resolution']}px", f"{r['batch']}", str(r["micro"] or "-"),
                       f"{r['img_s']:,.0f}", f"{r['step_s']:.3f} s", _duration(r["seconds"]), _size(r["peak"]))
                      for r in rows]
    lines.append(("total", "", "", "", "", "", _duration(result["seconds"]), _size(max(r["peak"] for r in rows))))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [f"measured on {first['device']} ({first['threads']} threads), per process; model steps only "
           "(no data loading, no evaluation):"]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    if memory_limit is not None:
        over = [r for r in rows if not r["fits"]]
        if not over:
            out.append(f"every stage fits in {_size(memory_limit)}")
        for r in over:
            out.append(f"stage {r['stage']} needs {_size(r['peak'])} > {_size(memory_limit)}: " +
                       (f"train.micro_batch_size {r['proposal']} fits (measured)" if r["proposal"]
                        else "no micro-batch fits"))
        proposals = [r["proposal"] for r in over]
        if over and all(proposals):
            m = min(proposals)
            if all(r["local"] % m == 0 for r in rows):
                out.append(f"so: --set train.micro_batch_size={m} (one value for the recipe: it must divide every "
                           "stage's per-process batch)")
    return "\n".join(out)


__all__ = ["parse_bytes", "calibrate", "measure", "table"]
