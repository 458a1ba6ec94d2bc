"""``cadence prepare``: a training copy of an image folder, re-encoded once at a bounded size.

Decoding a 500x375 JPEG to train on a 128 px crop pays for pixels that are thrown away, and DCT
scaling only helps at 1/4 and 1/8. Like FFCV's ``max_resolution`` and fast.ai's 320 px Imagenette,
the copy caps each training image's shorter side (default: the largest stage resolution x 256/224,
the ratio of torchvision's evaluation resize) so every later epoch decodes a few times fewer pixels.
Only ``train/`` is copied: evaluation still reads the originals. The copy is written file by file
(temporary name, then rename), so an interrupted run resumes where it stopped; ``prepared.json``
is written last and marks it complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from multiprocessing import get_context

from tqdm import tqdm

from cadence.data import BAD_IMAGE_ERRORS, PREPARED_MANIFEST, _bad_reason, _image_folder_paths
from cadence.errors import FieldError
from cadence.recipe import Recipe

PARAMS = ".prepare-params.json"  # what an unfinished copy is being made with


def default_short_side(recipe: Recipe) -> int:
    return round(max(s.resolution for s in recipe.stages) * 256 / 224)


def _copy_one(job: tuple[str, str, int, int]) -> tuple[str, str, str | None]:
    """Re-encode one image (shorter side at most ``short``); ``(status, path, reason)``."""
    from PIL import Image

    src, dst, short, quality = job
    if os.path.exists(dst):
        return "kept", src, None
    try:
        with Image.open(src) as im:
            w, h = im.size
            scale = short / min(w, h)
            if scale < 1:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                im.draft("RGB", size)  # DCT scaling where it still leaves >= size pixels
                out = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
            else:
                out = im.convert("RGB")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = f"{dst}.tmp-{os.getpid()}"
        out.save(tmp, format="JPEG", quality=quality)
        os.replace(tmp, dst)
        return "done", src, None
    except BAD_IMAGE_ERRORS as e:
        return "bad", src, _bad_reason(e)


def prepare_copy(recipe: Recipe, out: str, *, short_side: int | None = None, workers: int | None = None,
                 quality: int = 90, progress: bool = True) -> dict:
    """Write (or finish) the prepared copy of ``data.root/train`` into ``out``; returns its manifest."""
    cfg = recipe.data
    if cfg.source != "imagefolder":
        raise FieldError("data.source", cfg.source, "cadence prepare copies an imagefolder (ImageNet layout)")
    short = short_side or default_short_side(recipe)
    if short < 8:
        raise FieldError("--short-side", short, "must be at least 8 px")
    if not 1 <= quality <= 100:
        raise FieldError("--quality", quality, "must be in 1..100")
    params = {"short_side": short, "quality": quality, "source": os.path.abspath(os.path.join(cfg.root, "train"))}
    manifest_path = os.path.join(out, PREPARED_MANIFEST)
    for path in (manifest_path, os.path.join(out, PARAMS)):
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            found = {k: saved.get(k) for k in params}
            if found != params:
                raise FieldError("--out", out, f"holds a copy made with {found}, not {params}; choose another folder")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            return {**json.load(f), "already": True}
    bad: list = []
    src_root = os.path.join(cfg.root, "train")
    items, classes = _image_folder_paths(src_root, "data.root", cfg.on_bad_image, bad)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, PARAMS), "w") as f:
        json.dump(params, f)
    jobs = [(p, os.path.join(out, "train", os.path.relpath(p, src_root)), short, quality) for p, _ in items]
    for c in classes:  # empty classes keep their folder, so class indices match the originals
        os.makedirs(os.path.join(out, "train", c), exist_ok=True)
    n = workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    counts = {"done": 0, "kept": 0, "bad": 0}
    start = time.perf_counter()
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(n) as pool, \
            tqdm(total=len(jobs), desc="prepare", unit="img", disable=not progress, file=sys.stderr,
                 mininterval=0.5, dynamic_ncols=True) as bar:
        for status, src, reason in pool.imap_unordered(_copy_one, jobs, chunksize=16):
            counts[status] += 1
            bar.update(1)
            if status == "bad":
                if cfg.on_bad_image == "error":
                    raise FieldError("data.root", src, f"unreadable image ({reason}); "
                                     "data.on_bad_image: skip would skip it")
                bad.append((src, reason))
    manifest = {**params, "classes": len(classes), "images": counts["done"] + counts["kept"],
                "written": counts["done"], "kept": counts["kept"], "bad": [list(b) for b in bad],
                "seconds": round(time.perf_counter() - start, 3), "workers": n}
    tmp = manifest_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, manifest_path)
    os.unlink(os.path.join(out, PARAMS))
    return manifest


def _mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def describe(manifest: dict, out: str) -> str:
    if manifest.get("already"):
        return f"{out} is already complete ({manifest['images']:,} images, shorter side <= {manifest['short_side']} px)"
    bad = f", {len(manifest['bad'])} unreadable (listed in {PREPARED_MANIFEST})" if manifest["bad"] else ""
    return (f"prepared {manifest['images']:,} images ({manifest['written']:,} written, {manifest['kept']:,} kept "
            f"from before{bad}) at shorter side <= {manifest['short_side']} px in {manifest['seconds']:.1f} s "
            f"with {manifest['workers']} processes: {_mb(os.path.join(out, 'train')):.0f} MB in {out}")

