"""Data sources and per-stage loaders.

Every training sample is drawn reproducibly: an epoch's order (and its ``data_fraction`` subset)
comes from ``(seed, epoch)`` alone, and each image's augmentation from ``(seed, epoch, position)``,
so a run resumed mid-epoch sees exactly the batches an uninterrupted run would have.
Images travel as uint8 tensors at the stage's resolution; normalisation happens on the device.

- ``keys``: the keys every random draw comes from (``mix``, ``key``, ``uniforms``, ``uniforms_of``) and ``EpochSampler``.
- ``sources``: a recipe's data -> a ``Source``: the four sources, unreadable files, the decoded-image
  cache and prepared copies.
- ``augment``: crops, flips and resizes of a batch or a file, per-image policies (torchvision's, keyed),
  the evaluation transform, normalisation.
- ``loaders``: each epoch's training batches for one rank (``TrainData``) and the held-out ones.
"""

from __future__ import annotations

from cadence.data.augment import (ImagePolicy, augment_batch, colour_batch, crop_flip_draws, crop_image, decode_crop,
                                  draw_box, eval_transform, normalizer, resize_batch)
from cadence.data.keys import EpochSampler, key, mix, uniforms, uniforms_of
from cadence.data.loaders import CropDecode, FileLoader, MemoryLoader, TrainData, collate_good, eval_loader
from cadence.data.sources import (BAD_IMAGE_ERRORS, PREPARED_MANIFEST, SHORT_SIDE_PER_PX, FileImages, Source,
                                  TensorImages, bad_reason, image_folder_paths, load_source, pick_copy,
                                  prepared_copies, synthetic_images)

__all__ = [
    "EpochSampler", "key", "mix", "uniforms", "uniforms_of",
    "BAD_IMAGE_ERRORS", "PREPARED_MANIFEST", "SHORT_SIDE_PER_PX", "FileImages", "Source", "TensorImages",
    "bad_reason", "image_folder_paths", "load_source", "pick_copy", "prepared_copies", "synthetic_images",
    "ImagePolicy", "augment_batch", "colour_batch", "crop_flip_draws", "crop_image", "decode_crop", "draw_box", "eval_transform",
    "normalizer", "resize_batch",
    "CropDecode", "FileLoader", "MemoryLoader", "TrainData", "collate_good", "eval_loader",
]
