"""Photo-like stand-ins for ImageNet JPEGs (never committed): crops of the real photos that ship
with scikit-image, resized to about 500x375 (or 375x500), flipped, re-encoded at quality 90, in
ImageFolder layout ``OUT/train/<class>/`` and ``OUT/val/<class>/``.

    python benchmarks/make_jpegs.py --out /tmp/jpegs --train 1000 --val 100
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image
from skimage import data

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "cat", "colorwheel", "camera", "grass", "gravel", "brick"]


def photos() -> list[Image.Image]:
    out = []
    for name in PHOTOS:
        a = getattr(data, name)()
        a = a[0] if isinstance(a, tuple) else a
        out.append(Image.fromarray(a).convert("RGB"))
    return out


def make(out: str, n: int, classes: int, rng: np.random.Generator, sources: list[Image.Image]) -> None:
    for i in range(n):
        src = sources[rng.integers(len(sources))]
        w, h = src.size
        portrait = rng.random() < 0.25
        size = (375, 500) if portrait else (500, 375)
        aspect = size[0] / size[1]
        area = rng.uniform(0.4, 1.0) * w * h
        cw = min(w, round((area * aspect) ** 0.5))
        ch = min(h, round(cw / aspect))
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        im = src.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = Image.eval(im, lambda v, g=rng.uniform(0.8, 1.2): min(255, int(v * g)))
        folder = os.path.join(out, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        im.save(os.path.join(folder, f"img{i:06d}.JPEG"), quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng, sources = np.random.default_rng(a.seed), photos()
    make(os.path.join(a.out, "train"), a.train, a.classes, rng, sources)
    make(os.path.join(a.out, "val"), a.val, a.classes, rng, sources)
    print(f"wrote {a.train} + {a.val} JPEGs to {a.out}")


if __name__ == "__main__":
    main()
