"""``cadence prepare``: a training copy of an image folder, re-encoded once at a bounded size.

Decoding a 500x375 JPEG to train on a 128 px crop pays for pixels that are thrown away, and DCT
scaling only helps at 1/4 and 1/8. Like FFCV's ``max_resolution`` and fast.ai's 320 px Imagenette,
each copy caps every training image's shorter side -- by default one copy per stage resolution R at
R x 256/224 (the ratio of torchvision's evaluation resize), and each stage reads the smallest copy
that covers it -- so every later epoch decodes several times fewer pixels.
Only ``train/`` is copied: evaluation still reads the originals. The copy is written file by file
(``cadence.files.write_atomic``: temporary name, then rename; not fsynced one by one), so an
interrupted run resumes where it stopped; once every file is written the whole file system is
synced, and ``prepared.json`` is written last (durably) and marks the copy complete.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from multiprocessing import get_context

from tqdm import tqdm

from cadence import files
from cadence.data import BAD_IMAGE_ERRORS, PREPARED_MANIFEST, SHORT_SIDE_PER_PX, bad_reason, image_folder_paths
from cadence.errors import FieldError
from cadence.recipe import Recipe, usable_cores

PARAMS = ".prepare-params.json"  # what an unfinished copy is being made with


def default_short_sides(recipe: Recipe) -> list[int]:
    """One copy per stage resolution R, shorter side R x 256/224 (146, 183, 256 for 128, 160, 224)."""
    return sorted({round(s.resolution * SHORT_SIDE_PER_PX) for s in recipe.stages}, reverse=True)


def _copy_one(job: tuple[str, list[tuple[str, int]], int]) -> tuple[str, str, str | None]:
    """Decode one original once and write it at each shorter side; ``(status, path, reason)``."""
    from PIL import Image

    src, targets, quality = job
    todo = [(dst, side) for dst, side in targets if not os.path.exists(dst)]
    if not todo:
        return "kept", src, None
    try:
        with Image.open(src) as im:
            w, h = im.size
            largest = max(side for _, side in todo)
            if largest < min(w, h):  # DCT scaling where it still leaves enough pixels
                im.draft("RGB", (math.ceil(w * largest / min(w, h)), math.ceil(h * largest / min(w, h))))
            im = im.convert("RGB")
            for dst, side in todo:
                scale = side / min(w, h)
                out = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS) \
                    if scale < 1 else im
                files.write_atomic(dst, lambda f: out.save(f, format="JPEG", quality=quality), durable=False,
                                   suffix=".part")
        return "done", src, None
    except BAD_IMAGE_ERRORS as e:
        return "bad", src, bad_reason(e)


def _check_params(folder: str, params: dict) -> dict | None:
    """The finished manifest of ``folder`` if it was made with ``params``; FieldError if it (or an
    unfinished copy there) was made with others."""
    for name in (PREPARED_MANIFEST, PARAMS):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            found = {k: saved.get(k) for k in params}
            if found != params:
                raise FieldError("--out", folder, f"holds a copy made with {found}, not {params}; "
                                 "choose another folder")
            if name == PREPARED_MANIFEST:
                return saved
    return None


def prepare_copy(recipe: Recipe, out: str, *, short_sides: list[int] | None = None, workers: int | None = None,
                 quality: int = 90, progress: bool = True) -> list[dict]:
    """Write (or finish) the prepared copies of ``data.root/train`` into ``out/<side>px/``, every
    original decoded once for all of them; returns their manifests."""
    cfg = recipe.data
    if cfg.source != "imagefolder":
        raise FieldError("data.source", cfg.source, "cadence prepare copies an imagefolder (ImageNet layout)")
    sides = sorted(set(short_sides or default_short_sides(recipe)), reverse=True)
    if min(sides) < 8:
        raise FieldError("--short-side", min(sides), "must be at least 8 px")
    if not 1 <= quality <= 100:
        raise FieldError("--quality", quality, "must be in 1..100")
    if workers is not None and workers < 1:
        raise FieldError("--workers", workers, "must be >= 1")
    src_root = os.path.join(cfg.root, "train")
    for split in (src_root, os.path.join(cfg.root, cfg.val_split or "val")):
        inside = os.path.realpath(out) + os.sep
        if inside.startswith(os.path.realpath(split) + os.sep):
            raise FieldError("--out", out, f"is inside the data set's {split}: its copies would be read as more "
                             "images of their classes; write the copy elsewhere")
    folders = {side: os.path.join(out, f"{side}px") for side in sides}
    params = {side: {"short_side": side, "quality": quality, "source": os.path.abspath(src_root)} for side in sides}
    done = {side: _check_params(folders[side], params[side]) for side in sides}
    todo = [side for side in sides if done[side] is None]
    if not todo:
        return [{**done[side], "already": True} for side in sides]
    bad: list = []
    items, classes = image_folder_paths(src_root, "data.root", cfg.on_bad_image, bad)
    for side in todo:
        for c in classes:  # empty classes keep their folder, so class indices match the originals
            os.makedirs(os.path.join(folders[side], "train", c), exist_ok=True)
        files.write_text_atomic(json.dumps(params[side]), os.path.join(folders[side], PARAMS))
    jobs = [(p, [(os.path.join(folders[side], "train", os.path.relpath(p, src_root)), side) for side in todo],
             quality) for p, _ in items]
    n = workers or usable_cores()
    counts = {"done": 0, "kept": 0, "bad": 0}
    start = time.perf_counter()
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(n) as pool, \
            tqdm(total=len(jobs), desc=f"prepare {'/'.join(f'{s}px' for s in todo)}", unit="img",
                 disable=not progress, file=sys.stderr, mininterval=0.5, dynamic_ncols=True) as bar:
        for status, src, reason in pool.imap_unordered(_copy_one, jobs, chunksize=16):
            counts[status] += 1
            bar.update(1)
            if status == "bad":
                if cfg.on_bad_image == "error":
                    raise FieldError("data.root", src, f"unreadable image ({reason}); "
                                     "data.on_bad_image: skip would skip it")
                bad.append((src, reason))
    seconds = round(time.perf_counter() - start, 3)
    os.sync()  # every image of the copies on disk before a manifest says one is complete
    for side in todo:
        manifest = {**params[side], "classes": len(classes), "images": counts["done"] + counts["kept"],
                    "written": counts["done"], "kept": counts["kept"], "bad": [list(b) for b in bad],
                    "seconds": seconds, "workers": n}
        files.write_text_atomic(json.dumps(manifest, indent=1), os.path.join(folders[side], PREPARED_MANIFEST))
        os.unlink(os.path.join(folders[side], PARAMS))
        done[side] = manifest
    return [done[side] if side in todo else {**done[side], "already": True} for side in sides]


def _mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def describe(manifests: list[dict], out: str) -> str:
    lines = []
    for m in manifests:
        folder = os.path.join(out, f"{m['short_side']}px")
        if m.get("already"):
            lines.append(f"{folder}: already complete ({m['images']:,} images)")
            continue
        bad = f", {len(m['bad'])} unreadable (listed in its {PREPARED_MANIFEST})" if m["bad"] else ""
        lines.append(f"{folder}: {m['images']:,} images ({m['written']:,} written, {m['kept']:,} kept from before"
                     f"{bad}), shorter side <= {m['short_side']} px, {_mb(os.path.join(folder, 'train')):.0f} MB")
    fresh = [m for m in manifests if not m.get("already")]
    if fresh:
        lines.append(f"prepared in {fresh[0]['seconds']:.1f} s with {fresh[0]['workers']} processes (once)")
    return "\n".join(lines)
