"""The input pipeline: the fast paths draw what the reference transforms draw, the decoded-image
cache is reused only for unchanged data, the prepared copy, and every kind of unreadable file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from cadence import cli, data, parts, rundir, train
from cadence.errors import FieldError
from cadence.plan import Stage
from cadence.prepare import prepare_copy
from cadence.recipe import DataConfig, recipe_from_dict
from helpers import GOOD, image_folder, photo


# -- keys and in-memory augmentation ------------------------------------------------------------


def test_vectorised_keys_match_the_scalar_hash_and_split_over_ranks():
    pos = np.arange(1000)
    assert [data.key(7, 3, int(p)) for p in pos[:50]] == data.mix(7, 3, pos[:50]).tolist()
    assert data.key(-1, 2) == int(data.mix(-1, 2))  # negative seeds wrap like the scalar version
    one = data.EpochSampler(100, 80, seed=5, epoch=2)
    ranks = [data.EpochSampler(100, 80, seed=5, epoch=2, rank=r, world=4) for r in range(4)]
    assert sorted(item for s in ranks for item in s) == sorted(one)  # same images, same keys


def test_batch_crop_flip_equals_torchvision_pad_crop_flip():
    """Each output image is exactly torchvision's reflect-pad, crop at the drawn offset, and flip."""
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    keys = data.mix(11, np.arange(64))
    out = data.augment_batch(x, keys, native=32, flip=True, resolution=32)
    dy, dx, fl = data.crop_flip_draws(keys, 4)
    for i in range(64):
        ref = F.crop(F.pad(x[i], [4, 4, 4, 4], padding_mode="reflect"), int(dy[i]), int(dx[i]), 32, 32)
        ref = F.horizontal_flip(ref) if fl[i] else ref
        assert torch.equal(out[i], ref), i
    small = data.augment_batch(x, keys, native=32, flip=True, resolution=20)
    ref = F.resize(out, [20, 20], antialias=True)
    assert small.dtype == torch.uint8 and small.shape == (64, 3, 20, 20)
    assert (small.float() - ref.float()).abs().max() <= 1.0  # torch's uint8 and float kernels: rounding
    # from a set, by index: the channels-last gather (a decoded folder's layout) and the other give the same
    pick = torch.tensor([5, 0, 63, 5, 17] * 12 + [1, 2, 3, 4])
    for images in (x, x.contiguous(memory_format=torch.channels_last)):
        for res, whole in ((32, out), (20, small)):
            got = data.augment_batch(images, keys, native=32, flip=True, resolution=res, index=pick)
            assert torch.equal(got, data.augment_batch(x[pick], keys, native=32, flip=True, resolution=res))
            assert got.is_contiguous(memory_format=torch.contiguous_format if res == 32 else torch.channels_last)
        assert torch.equal(data.augment_batch(images, keys, native=32, flip=True, resolution=20), whole)


def test_normalizer_is_the_closed_form_in_the_layout_asked_and_leaves_its_input_alone():
    source = data.Source(None, None, num_classes=2, channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                         native_size=8)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    mean, std = torch.tensor(source.mean).view(1, 3, 1, 1) * 255, torch.tensor(source.std).view(1, 3, 1, 1) * 255
    for images in (x, x.contiguous(memory_format=torch.channels_last)):
        for cl in (False, True):
            out = data.normalizer(source, torch.device("cpu"), cl)(images)
            assert out.dtype == torch.float32 and torch.equal(out, (x.float() - mean) / std)
            assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    f = x.float()
    data.normalizer(source, torch.device("cpu"))(f)
    assert torch.equal(f, x.float())  # a float batch is not normalised in place


def test_batch_draws_have_randomcrop_and_flip_statistics():
    """Offsets uniform over 0..2*pad (chi-square), flips a fair coin: torchvision's distribution."""
    dy, dx, fl = data.crop_flip_draws(data.mix(3, np.arange(40_000)), 4)
    for off in (dy, dx):
        counts = torch.bincount(off, minlength=9).numpy()
        assert len(counts) == 9 and stats.chisquare(counts).pvalue > 1e-3
    assert abs(fl.float().mean().item() - 0.5) < 0.01
    assert stats.pearsonr(dy.numpy(), dx.numpy()).statistic ** 2 < 1e-3  # independent


# -- image files: crop box first, then a reduced decode -----------------------------------------


def test_crop_boxes_follow_torchvision_randomresizedcrop():
    """Scale, aspect ratio and position of the boxes drawn from the header's size have the
    distribution of ``RandomResizedCrop`` applied to the decoded image (two-sample KS)."""
    w, h, n = 500, 375, 4000

    def features(boxes):
        b = np.array(boxes, dtype=float)  # top, left, h, w
        return [b[:, 2] * b[:, 3] / (w * h), np.log(b[:, 3] / b[:, 2]), b[:, 1] + b[:, 3] / 2, b[:, 0] + b[:, 2] / 2]

    ours = [data.draw_box(int(k), w, h)[:4] for k in data.mix(1, np.arange(n))]
    torch.manual_seed(0)
    image = torch.zeros(3, h, w)
    theirs = [RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    for a, b in zip(features(ours), features(theirs)):
        assert stats.ks_2samp(a, b).pvalue > 1e-3
    flips = [data.draw_box(int(k), w, h)[4] for k in data.mix(2, np.arange(2000))]
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_reduced_decode_matches_full_decode_crop(tmp_path):
    """The DCT-scaled decode gives the image torchvision's RandomResizedCrop + flip would, up to
    the small difference of decoding at a lower scale; a PNG (no DCT scaling) is the same."""
    img = photo(1, 500, 375)
    img.save(tmp_path / "a.jpg", quality=90)
    img.save(tmp_path / "a.png")
    diffs = []
    for key in data.mix(9, np.arange(40)).tolist():
        top, left, h, w, flip = data.draw_box(key, 500, 375)
        for name in ("a.jpg", "a.png"):
            with Image.open(tmp_path / name) as im:
                ref = F.pil_to_tensor(F.resized_crop(im.convert("RGB"), top, left, h, w, [64, 64], antialias=True))
            ref = F.horizontal_flip(ref) if flip else ref
            ours = data.decode_crop(str(tmp_path / name), key, 64).permute(2, 0, 1)
            diff = (ours.float() - ref.float()).abs()
            if name == "a.png":
                # same box, same filter: rounding only, except that the filter may read the pixels
                # just outside the box (crop-then-resize cannot), which touches the border rows
                assert diff[:, 1:-1, 1:-1].max() <= 1 and diff.mean() < 0.25, key
            else:
                diffs.append(diff.mean().item())
    assert np.mean(diffs) < 2.0 and max(diffs) < 4.0  # of 255: invisible


@pytest.mark.slow
def test_file_loader_keeps_its_workers_across_stages(tmp_path):
    """One DataLoader for the run: its worker processes survive an epoch and a resolution change."""
    root = image_folder(tmp_path / "train")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), num_workers=1)
    items, _ = data.image_folder_paths(str(root), "data.root")
    source = data.Source(data.FileImages(items), data.FileImages(items), 3, 3, (0.5,) * 3, (0.5,) * 3, None)
    td = data.TrainData(source, cfg, seed=0)
    shapes, pids = [], []
    for epoch, res in enumerate((16, 16, 24)):
        for x, y in td.epoch(Stage(epochs=1, resolution=res, batch_size=6), epoch, 18):
            shapes.append(tuple(x.shape))
        pids.append([w.pid for w in td._files.loader._iterator._workers])
    assert shapes == [(6, 3, 16, 16)] * 6 + [(6, 3, 24, 24)] * 3
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 1


# -- evaluation: resize and centre crop -----------------------------------------------------------


def test_eval_resize_and_crop_pct_equal_torchvision_resize_centercrop(tmp_path):
    """``train.eval_resize: 232`` at 224 px is torchvision's v2 ``Resize(232)`` + ``CenterCrop(224)``;
    at another resolution the resize scales with it; without either key files keep 224/256."""
    from torchvision.transforms import v2

    img = photo(3, 300, 260)
    ref = lambda resize, crop: v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop),  # noqa: E731
                                           v2.PILToTensor()])(img)
    recipe = recipe_from_dict({**GOOD, "train": {"eval_resolution": 224, "eval_resize": 232}})
    for r, resize in ((224, 232), (160, 166), (288, 298)):  # round(r * 232 / 224)
        assert torch.equal(data.eval_transform(None, r, crop_pct=recipe.eval_crop_pct_at(r))(img), ref(resize, r)), r
    pct = recipe_from_dict({**GOOD, "train": {"eval_crop_pct": 0.95}})
    assert torch.equal(data.eval_transform(None, 224, crop_pct=pct.eval_crop_pct_at(224))(img), ref(236, 224))
    plain = recipe_from_dict(GOOD)
    assert plain.eval_crop_pct_at(224) is None
    assert torch.equal(data.eval_transform(None, 224)(img), ref(256, 224))

    # through the held-out loader of an image folder
    items, _ = data.image_folder_paths(str(image_folder(tmp_path / "val", classes=2, per_class=2)), "x")
    source = data.Source(data.FileImages(items), data.FileImages(items), 2, 3, (0.5,) * 3, (0.5,) * 3, None)
    (x, _), = data.eval_loader(source, 24, 8, crop_pct=24 / 26)
    for i, (path, _) in enumerate(items):
        with Image.open(path) as im:
            expected = v2.Compose([v2.Resize(26, antialias=True), v2.CenterCrop(24), v2.PILToTensor()])(im)
        assert torch.equal(x[i], expected), path


def test_in_memory_eval_crops_only_when_a_key_is_set():
    """In-memory held-out images: the whole image resized by default (as always); with a crop_pct,
    the centre round(native x crop_pct) px, then resized."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    source = data.Source(data.TensorImages(images, torch.arange(5)), data.TensorImages(images, torch.arange(5)),
                         5, 3, (0.5,) * 3, (0.5,) * 3, native_size=32)
    (whole, _), = data.eval_loader(source, 24, 8)
    assert torch.equal(whole, data.resize_batch(images, 24))
    (cropped, _), = data.eval_loader(source, 24, 8, crop_pct=0.75)
    assert torch.equal(cropped, data.resize_batch(images[:, :, 4:28, 4:28], 24))  # 24 px of 32, centred
    (full, _), = data.eval_loader(source, 24, 8, crop_pct=1.0)
    assert torch.equal(full, whole)


# -- the decoded-image cache --------------------------------------------------------------------


@pytest.mark.slow
def test_cache_is_reused_for_the_same_files_and_rebuilt_when_they_change(tmp_path, monkeypatch):
    for split in ("train", "test"):
        image_folder(tmp_path / "c10" / split, classes=10, per_class=2, size=(32, 32))
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "c10"), cache_dir=str(tmp_path / "cache"))
    first = data.load_source(cfg)
    built = sorted(os.listdir(tmp_path / "cache" / "decoded"))
    assert len(built) == 2  # train and test

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the files did not change")

    monkeypatch.setattr(data.sources, "_decode_all", no_decoding)
    again = data.load_source(cfg)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.train.labels, first.train.labels)
    monkeypatch.undo()

    changed = tmp_path / "c10" / "train" / "c3" / "1.jpg"
    photo(999, 32, 32).save(changed, quality=90)  # same name, same size on disk or not: new bytes
    rebuilt = data.load_source(cfg)
    assert len(os.listdir(tmp_path / "cache" / "decoded")) == 3
    i = [p for p, _ in data.image_folder_paths(str(tmp_path / "c10" / "train"), "x")[0]].index(str(changed))
    assert not torch.equal(rebuilt.train.images[i], first.train.images[i])
    with Image.open(changed) as im:
        assert torch.equal(rebuilt.train.images[i], torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1))

    off = DataConfig(source="cifar10", root=str(tmp_path / "c10"), cache=False, cache_dir=str(tmp_path / "none"))
    assert torch.equal(data.load_source(off).train.images, rebuilt.train.images)
    assert not os.path.exists(tmp_path / "none")


# -- unreadable files ---------------------------------------------------------------------------


def bad_folder(root):
    """An ImageNet-layout folder with every kind of awkward file, and enough good ones to train."""
    for split in ("train", "val"):
        image_folder(root / split, classes=3, per_class=6, size=(40, 30))
    t = root / "train"
    good = (t / "c0" / "0.jpg").read_bytes()
    (t / "c0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (t / "c1" / "notes.jpg").write_text("not an image\n")
    (t / "c1" / "empty.JPEG").write_bytes(b"")
    photo(5, 40, 30).convert("L").save(t / "c2" / "gray.jpg")
    photo(6, 40, 30).convert("CMYK").save(t / "c2" / "cmyk.jpg")
    photo(7, 40, 30).save(t / "c2" / "png-inside.JPEG", format="PNG")
    os.makedirs(t / "c3")  # an empty class folder
    os.makedirs(root / "val" / "c3")
    photo(8, 40, 30).save(root / "val" / "c3" / "0.jpg")
    return {str(t / "c0" / "truncated.jpg"), str(t / "c1" / "notes.jpg"), str(t / "c1" / "empty.JPEG")}


BAD_RECIPE = {
    "name": "bad-images", "seed": 1,
    "model": {"arch": "fastnet", "width": 8},
    "optimizer": {"name": "sgd", "lr": 0.05},
    "schedule": {"kind": "cosine"},
    "stages": [{"epochs": 2, "resolution": 16, "batch_size": 8}],
    "train": {"device": "cpu", "eval_every": "end"},
}


@pytest.mark.slow
def test_bad_images_are_skipped_counted_and_listed(tmp_path):
    unreadable = bad_folder(tmp_path / "d")
    raw = {**BAD_RECIPE, "data": {"source": "imagefolder", "root": str(tmp_path / "d"), "num_workers": 0}}
    setup = parts.build_setup(recipe_from_dict(raw))
    assert setup.source.num_classes == 4 and len(setup.source.train) == 3 * 6 + 6  # files, before decoding
    trainer, final = train.train(setup, str(tmp_path / "run"), progress=False)
    listed = [line.split("\t") for line in (tmp_path / "run" / "bad_images.txt").read_text().splitlines()]
    assert {p for p, _ in listed if "empty class" not in _} == unreadable  # each listed once
    assert any(p.endswith("c3") and "empty class folder" in r for p, r in listed)
    # gray, CMYK and PNG-in-a-.JPEG are images: read (converted to RGB), not listed
    assert not any(os.path.basename(p) in ("gray.jpg", "cmyk.jpg", "png-inside.JPEG") for p, _ in listed)
    rows = [r for r in rundir.read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert rows[-1]["bad_images"] == 2 * len(unreadable)  # met in each of the 2 epochs
    assert final["step"] == trainer.step == 2 * (24 // 8)
    assert final["val_top1"] in [k / 19 for k in range(20)]  # all 19 held-out images (c3's one too) evaluated


@pytest.mark.slow  # its loader worker's shutdown takes seconds
def test_bad_image_with_on_bad_image_error_names_the_file(tmp_path, capsys):
    bad_folder(tmp_path / "d")
    recipe = tmp_path / "r.yaml"
    raw = {**BAD_RECIPE, "data": {"source": "imagefolder", "root": str(tmp_path / "d"), "on_bad_image": "error"}}
    recipe.write_text(json.dumps(raw))
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "c3" in err and "class folder holds no images" in err
    assert not os.path.exists(tmp_path / "run")
    os.rmdir(tmp_path / "d" / "train" / "c3")
    os.rename(tmp_path / "d" / "val" / "c3", tmp_path / "c3-val")
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # met while training, after the start line
    assert err.startswith("cadence: error: data.root: ") and "unreadable image" in err
    assert any(name in err for name in ("truncated.jpg", "notes.jpg", "empty.JPEG")), err


def test_no_readable_image_is_an_error_before_training(tmp_path):
    for split in ("train", "val"):
        os.makedirs(tmp_path / split / "a")
        (tmp_path / split / "a" / "x.jpg").write_text("junk")
    raw = {**BAD_RECIPE, "data": {"source": "imagefolder", "root": str(tmp_path)}}
    with pytest.raises(FieldError, match="holds no readable image"):
        parts.build_setup(recipe_from_dict(raw))


def test_small_image_folder_skips_unreadable_files_at_decode(tmp_path):
    for split in ("train", "test"):
        image_folder(tmp_path / split, classes=10, per_class=2, size=(32, 32))
    (tmp_path / "train" / "c4" / "junk.jpg").write_text("junk")
    source = data.load_source(DataConfig(source="cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "cache")))
    assert len(source.train) == 20 and [os.path.basename(p) for p, _ in source.bad] == ["junk.jpg"]
    with pytest.raises(FieldError, match="junk.jpg"):
        data.load_source(DataConfig(source="cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                                    on_bad_image="error"))


# -- held-out class folders, matched to train/'s by name ----------------------------------------


def _class_of(path: str) -> str:
    return os.path.basename(os.path.dirname(path))


def test_held_out_classes_may_be_a_subset_of_train_and_get_train_indices(tmp_path):
    """val/ without c1 (absent) and with c3 empty: each val image is labelled with its class's train/
    index, and c1 and c3 are listed once each as bad images are; even with on_bad_image: error."""
    image_folder(tmp_path / "train", classes=4, per_class=2)
    image_folder(tmp_path / "val", classes=4, per_class=1)
    for name in ("c1", "c3"):
        for f in os.listdir(tmp_path / "val" / name):
            os.unlink(tmp_path / "val" / name / f)
    os.rmdir(tmp_path / "val" / "c1")
    for on_bad in ("skip", "error"):
        source = data.load_source(DataConfig(source="imagefolder", root=str(tmp_path), on_bad_image=on_bad))
        assert source.num_classes == 4
        assert [(_class_of(p), k) for p, k in source.val.items] == [("c0", 0), ("c2", 2)]
        assert source.val[1][1] == 2  # an image of c2, the third train class though val/'s second folder
        assert source.bad == [(str(tmp_path / "val" / c), "train/ class with no held-out images (not evaluated)")
                              for c in ("c1", "c3")]
    os.makedirs(tmp_path / "train" / "c4")  # an empty train/ class folder is still an error with error
    with pytest.raises(FieldError, match="class folder holds no images"):
        data.load_source(DataConfig(source="imagefolder", root=str(tmp_path), on_bad_image="error"))


def test_cifar10_folder_held_out_subset_is_relabelled_after_the_cache(tmp_path):
    image_folder(tmp_path / "c10" / "train", classes=10, per_class=1, size=(32, 32))
    image_folder(tmp_path / "c10" / "test", classes=10, per_class=1, size=(32, 32))
    for c in ("c0", "c5"):
        os.unlink(tmp_path / "c10" / "test" / c / "0.jpg")
        os.rmdir(tmp_path / "c10" / "test" / c)
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "c10"), cache_dir=str(tmp_path / "cache"))
    for _ in range(2):  # decoded, then from the cache (which keeps test/'s own indices)
        source = data.load_source(cfg)
        assert source.val.labels.tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
        assert [os.path.basename(p) for p, _ in source.bad] == ["c0", "c5"]
    assert len(os.listdir(tmp_path / "cache" / "decoded")) == 2
    image = np.asarray(Image.open(tmp_path / "c10" / "test" / "c6" / "0.jpg").convert("RGB"))
    assert torch.equal(source.val.images[4], torch.from_numpy(image).permute(2, 0, 1))  # c6's image, label 6


@pytest.mark.parametrize("source", ["imagefolder", "cifar10"])
def test_a_held_out_class_train_lacks_is_one_line_naming_it(tmp_path, capsys, source):
    split = "val" if source == "imagefolder" else "test"
    image_folder(tmp_path / "d" / "train", classes=10, per_class=1, size=(32, 32))
    image_folder(tmp_path / "d" / split, classes=10, per_class=1, size=(32, 32))
    os.rename(tmp_path / "d" / split / "c7", tmp_path / "d" / split / "c7-typo")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({**BAD_RECIPE, "data": {"source": source, "root": str(tmp_path / "d")}}))
    assert cli.main(["train", str(recipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.val_split" in err and "c7-typo" in err, err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_train_classes_without_held_out_images_are_listed_in_the_run(tmp_path):
    image_folder(tmp_path / "d" / "train", classes=3, per_class=6)
    image_folder(tmp_path / "d" / "val", classes=3, per_class=2)
    for f in os.listdir(tmp_path / "d" / "val" / "c1"):
        os.unlink(tmp_path / "d" / "val" / "c1" / f)
    os.rmdir(tmp_path / "d" / "val" / "c1")
    raw = {**BAD_RECIPE, "data": {"source": "imagefolder", "root": str(tmp_path / "d"), "num_workers": 0}}
    _, final = train.train(parts.build_setup(recipe_from_dict(raw)), str(tmp_path / "run"), progress=False)
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert listed == [f"{tmp_path / 'd' / 'val' / 'c1'}\ttrain/ class with no held-out images (not evaluated)"]
    assert final["val_top1"] in [k / 4 for k in range(5)]  # the 4 held-out images of c0 and c2


# -- the prepared copy ----------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_writes_a_bounded_copy_resumes_and_trains_from_it(tmp_path, capsys):
    for split in ("train", "val"):
        image_folder(tmp_path / "d" / split, classes=3, per_class=6, size=(80, 60))
    (tmp_path / "d" / "train" / "c1" / "junk.jpg").write_text("junk")
    out = tmp_path / "prep"
    raw = {**BAD_RECIPE, "data": {"source": "imagefolder", "root": str(tmp_path / "d"), "num_workers": 0,
                                  "prepared": str(out)}}
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(json.dumps(raw))
    with pytest.raises(FieldError, match="holds no complete prepared copy"):
        parts.build_setup(recipe_from_dict(raw))

    assert cli.main(["prepare", str(recipe_file), "--workers", "2", "--quiet"]) == 0
    assert "18px: 18 images (18 written, 0 kept from before, 1 unreadable" in capsys.readouterr().out
    manifest = json.loads((out / "18px" / "prepared.json").read_text())
    assert manifest["short_side"] == 18 and manifest["images"] == 18 and len(manifest["bad"]) == 1
    for c in range(3):
        for i in range(6):
            with Image.open(out / "18px" / "train" / f"c{c}" / f"{i}.jpg") as im:
                assert im.size == (24, 18) and im.format == "JPEG"  # 80x60 capped at shorter side 18

    os.unlink(out / "18px" / "prepared.json")  # as if killed before it finished: 2 files not written yet
    for name in ("c0/1.jpg", "c2/5.jpg"):
        os.unlink(out / "18px" / "train" / name)
    (manifest,) = prepare_copy(recipe_from_dict(raw), str(out), workers=1, progress=False)
    assert (manifest["written"], manifest["kept"]) == (2, 16)
    with pytest.raises(FieldError, match="holds a copy made with"):
        prepare_copy(recipe_from_dict(raw), str(out), quality=75, progress=False)

    # a second, larger copy: stages read the smallest copy that covers them
    big, small = prepare_copy(recipe_from_dict(raw), str(out), short_sides=[40, 18], progress=False)
    assert (big["short_side"], big["written"], small.get("already")) == (40, 18, True)
    copies = data.prepared_copies(str(out))
    assert [side for side, _ in copies] == [40, 18]
    assert [data.pick_copy(copies, r) for r in (12, 16, 20, 35, 64)] == [1, 1, 0, 0, 0]

    setup = parts.build_setup(recipe_from_dict(raw))
    assert len(setup.source.train) == 18 and len(setup.source.val) == 18
    assert setup.source.train.items[0][0].startswith(str(out))
    assert setup.source.val.items[0][0].startswith(str(tmp_path / "d" / "val"))  # evaluation: the originals
    _, final = train.train(setup, str(tmp_path / "run"), progress=False)
    assert final["step"] == 2 * (18 // 8) and final["val_top1"] in [k / 18 for k in range(19)]  # 18 val images
    x, _ = next(iter(train.Trainer(setup, "").loader(0, 0)))
    assert x.shape == (8, 3, 16, 16)


def test_batches_made_ahead_keep_their_order_raise_their_errors_and_stop_when_closed():
    import threading

    from cadence.data.loaders import ahead

    assert list(ahead(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad batch")

    it = ahead(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(it)
    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    it = ahead(endless(), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # training stopped mid-epoch: the thread ends, having made at most depth + 1 more
    assert not any(t.name == "cadence-augment" for t in threading.enumerate())
    assert len(made) <= 3 + 2 + 1


def test_in_memory_batches_are_made_ahead_only_for_an_accelerator():
    """On the CPU the model's threads have every core: each batch is made in the step. For a GPU a
    thread makes the next one during the step. The batches are the same."""
    import threading

    source = data.load_source(DataConfig(source="synthetic", samples=64, val_samples=8, image_size=16, num_classes=4))
    cfg = DataConfig(source="synthetic")
    stage = Stage(epochs=1, resolution=12, batch_size=16)
    made = {}
    for device in ("cpu", torch.device("cuda")):  # (nothing here runs on the GPU: the loader works on the CPU)
        before = set(threading.enumerate())
        it = iter(data.TrainData(source, cfg, seed=2, device=device).epoch(stage, 1, 64))
        first = next(it)
        threads = [t.name for t in set(threading.enumerate()) - before]
        assert threads == ([] if device == "cpu" else ["cadence-augment"]), device
        made[str(device)] = [first] + list(it)
    assert len(made["cpu"]) == 4
    for (x, y), (x2, y2) in zip(made["cpu"], made["cuda"]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
