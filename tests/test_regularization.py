"""Regularization planned per stage: per-image policies (torchvision's, keyed), batch mixing, the
losses, the plan's columns, and bad input."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from scipy import stats
from torch.nn import functional as F
from torchvision.transforms import v2

from cadence import changes, data
from cadence.cli import main as cadence_main
from cadence.data.keys import EpochSampler, mix
from cadence.mixing import BatchMixer, Loss, Targets, draw
from cadence.plan import Stage
from cadence.recipe import DataConfig, load_recipe, recipe_from_dict
from cadence.regularization import DEFAULTS, Regularization
from helpers import GOOD, TINY, assert_plan_refuses, assert_same_state, image_folder, run, write_recipe

STRONG = Regularization(policy="trivialaugment", random_erasing=0.5, color_jitter=0.3).over(DEFAULTS)


def _images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- per-image policies ---------------------------------------------------------------------------


def _torchvision_chain(policy, image, d, i=0):
    """What torchvision's own transforms do with the draws ``d`` of image ``i``: ColorJitter's
    ``transform`` with its params, the policy's operations in turn, then ``erase``."""
    if policy.jitter is not None:
        image = v2.ColorJitter(0.3, 0.3, 0.3).transform(image, policy.jitter_params(d, i))
    for name, mag in zip(d.get("ops", [[]] * (i + 1))[i], d.get("magnitudes", [[]] * (i + 1))[i]):
        image = policy.policy._apply_image_or_video_transform(image, name, float(mag), interpolation="nearest",
                                                              fill={"others": None})
    if not isinstance(image, torch.Tensor):
        image = v2.functional.pil_to_tensor(image)
    box = d.get("erase", [None] * (i + 1))[i]
    return image if box is None else v2.functional.erase(image, **box)


def test_a_policy_runs_torchvisions_operations_on_draws_from_the_image_key_and_leaves_the_rng_alone():
    x = _images(1)[0]
    reg = Regularization(policy="randaugment", num_ops=3, magnitude=12, random_erasing=1.0).over(DEFAULTS)
    policy = data.ImagePolicy(reg, (0.5, 0.4, 0.3))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ours = policy(x, 77)
    assert torch.equal(torch.get_rng_state(), before)  # the training RNG is untouched
    d = policy.draw([77], 24, 24)
    assert torch.equal(ours, _torchvision_chain(policy, x, d))
    table = v2.RandAugment()._AUGMENTATION_SPACE
    for name, mag in zip(d["ops"][0], d["magnitudes"][0]):  # RandAugment's table at bin 12, either sign
        values = table[name][0](31, 24, 24)
        assert (mag == 0 if values is None else abs(mag) == pytest.approx(float(values[12])))
    assert d["erase"][0]["v"].flatten().tolist() == [128, 102, 76]  # the mean colour
    assert torch.equal(policy(x, 77), ours) and not torch.equal(policy(x, 78), ours)
    batch = torch.stack([x, x, x])
    out = policy.batch(batch, np.array([78, 77, 5], dtype=np.uint64))
    assert torch.equal(out[1], ours)  # an image's result depends on its key, not its place in the batch


def test_vectorised_key_uniforms_are_the_scalar_generator():
    keys = mix(21, np.arange(50))
    u = data.uniforms_of(keys, 9)
    assert all(u[i].tolist() == data.uniforms(int(k), 9) for i, k in enumerate(keys.tolist()))
    assert 0 <= u.min() and u.max() < 1 and np.abs(np.corrcoef(data.uniforms_of(keys[:1] + np.arange(
        20000, dtype=np.uint64), 4).T) - np.eye(4)).max() < 0.03  # nearby keys, columns: uncorrelated


def test_autoaugment_draws_are_its_imagenet_sub_policies():
    policy = data.ImagePolicy(Regularization(policy="autoaugment").over(DEFAULTS), (0.5, 0.5, 0.5))
    d = policy.draw(mix(3, np.arange(4000)), 32, 32)
    steps = {name for sub in policy.policy._policies for name, _, _ in sub}
    first = [(name, p) for sub in policy.policy._policies for name, p, _ in sub[:1]]
    assert set(d["ops"].ravel()) <= steps | {"Identity"}
    # each slot's operation is applied with its probability: the share of Identity matches the table's
    expected = 1 - np.mean([p for _, p in first])
    assert abs(np.mean(d["ops"][:, 0] == "Identity") - expected) < 0.03


def test_image_folders_apply_the_policy_to_the_pil_crop_as_torchvisions_reference_does():
    """Colour jitter and the policy run on the PIL image (torchvision's reference order), erasing on
    the tensor after it; the draws are the key's either way."""
    from PIL import Image

    x = _images(1, 40, seed=6)[0]
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    reg = Regularization(policy="trivialaugment", color_jitter=0.3, random_erasing=1.0).over(DEFAULTS)
    policy = data.ImagePolicy(reg, (0.5, 0.4, 0.3))
    ours = policy(pil, 99)
    theirs = _torchvision_chain(policy, pil, policy.draw([99], 40, 40))
    assert ours.dtype == torch.uint8 and torch.equal(ours, theirs)


@pytest.mark.parametrize("keys", [
    {"policy": "trivialaugment"}, {"policy": "randaugment", "num_ops": 3, "magnitude": 14},
    {"policy": "autoaugment", "random_erasing": 0.5}, {"policy": "trivialaugment", "color_jitter": 0.4,
                                                       "random_erasing": 0.3, "erasing_scale": [0.1, 0.5]}])
@pytest.mark.parametrize("size", [20, 31])
def test_a_batch_is_augmented_bit_for_bit_as_its_images_one_by_one(keys, size):
    """The in-memory path runs each drawn operation once on every image that drew it, and the colour
    blends once for all images with a factor each; the result is the per-image transform's, exactly
    (31 px: rows with a vector tail; a third of the images grey, where a blend's rounding decides)."""
    x = _images(96, size, seed=8)
    x[::3] = x[::3, :1]
    policy = data.ImagePolicy(Regularization(**keys).over(DEFAULTS), (0.5, 0.4, 0.3))
    ks = mix(11, np.arange(96))
    one_by_one = torch.stack([policy(img, int(k)) for img, k in zip(x, ks)])
    assert torch.equal(policy.batch(x, ks), one_by_one)
    assert not torch.equal(one_by_one, x)


@pytest.mark.parametrize("name", ["Posterize", "Solarize"])
def test_posterize_and_solarize_of_a_batch_take_a_magnitude_per_image_as_torchvision_does(name):
    """Every magnitude bin of TrivialAugmentWide's table (8 bits: unchanged; threshold 255: only white
    inverted), each image its own, against torchvision's operation on that image."""
    policy = data.ImagePolicy(Regularization(policy="trivialaugment").over(DEFAULTS), (0.5, 0.4, 0.3))
    names, values, _, _ = policy._tables(9, 9)
    mags = np.concatenate([values[names.index(name)], values[names.index(name)][::-1]])
    x = _images(len(mags), 9, seed=4)
    x[0], x[-1] = 255, 0
    theirs = torch.stack([policy._op(img, name, float(m)) for img, m in zip(x, mags)])
    ours = policy._apply(x.clone(), name, np.array([name] * len(mags), dtype=object), mags)
    assert torch.equal(ours, theirs) and not torch.equal(ours, x)


@pytest.mark.parametrize("channels", [3, 1])
def test_colour_blends_of_a_batch_are_torchvisions_kernels_with_a_factor_per_image(channels):
    fns = {"Brightness": v2.functional.adjust_brightness, "Color": v2.functional.adjust_saturation,
           "Contrast": v2.functional.adjust_contrast, "Sharpness": v2.functional.adjust_sharpness}
    for size in (3, 17, 32):
        x = _images(64, size, seed=size)[:, :channels]
        x[::4] = x[::4, :1]  # grey images: r = g = b
        x[1::4, :, ::2] = 255  # saturated rows
        factors = np.concatenate([[0.0, 1.0, 0.05, 1.95, 2.0], np.random.default_rng(size).uniform(0, 2.5, 59)])
        for name, fn in fns.items():
            ours = data.colour_batch(x, name, factors)
            theirs = torch.stack([fn(img, float(f)) for img, f in zip(x, factors)])
            assert ours.dtype == torch.uint8 and torch.equal(ours, theirs), (name, size)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trivialaugment", "randaugment", "autoaugment"])
def test_keyed_policies_have_the_distribution_of_torchvisions_own(name):
    """The mean absolute change each policy makes to one image, over 1,500 keys, against 1,500 draws
    of torchvision's transform from its own global RNG (two-sample Kolmogorov-Smirnov)."""
    x = _images(1, 32, seed=4)[0]
    reg = Regularization(policy=name).over(DEFAULTS)
    ours = data.ImagePolicy(reg, (0.5, 0.5, 0.5))
    theirs = {"trivialaugment": v2.TrivialAugmentWide(), "randaugment": v2.RandAugment(),
              "autoaugment": v2.AutoAugment()}[name]
    change = lambda y: (y.float() - x.float()).abs().mean().item()  # noqa: E731
    a = [change(ours(x, k)) for k in mix(9, np.arange(1500)).tolist()]
    torch.manual_seed(2024)
    b = [change(theirs(x)) for _ in range(1500)]
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert 0.01 < np.mean(np.array(a) == 0) < 0.5  # the identity op (and no-op magnitudes) now and then


def test_random_erasing_and_jitter_rates():
    x = _images(1, 32, seed=5)[0]
    erase = data.ImagePolicy(Regularization(random_erasing=0.25).over(DEFAULTS), (0.5, 0.5, 0.5))
    erased = [not torch.equal(erase(x, k), x) for k in range(2000)]
    assert abs(np.mean(erased) - 0.25) < 0.035  # binomial sd ~ 0.01
    box = erase(x, next(k for k in range(2000) if erased[k])) != x
    assert box.any() and (erase(x, next(k for k in range(2000) if erased[k]))[box] == 128).all()


def test_memory_loader_batches_are_the_same_across_resume_and_ranks():
    source = data.load_source(DataConfig(source="synthetic", samples=64, val_samples=8, image_size=16))
    cfg = DataConfig(source="synthetic", num_workers=0)
    stage = Stage(epochs=1, resolution=16, batch_size=16)

    def batches(rank=0, world=1, skip=0):
        td = data.TrainData(source, cfg, seed=5, rank=rank, world=world)
        return [x for x, _ in td.epoch(stage, 3, 64, skip, STRONG)]

    whole = batches()
    assert torch.equal(torch.cat(batches(skip=2)), torch.cat(whole[2:]))
    for r in range(2):
        assert torch.equal(torch.cat(batches(r, 2)), torch.cat([b[r::2] for b in whole]))
    plain = [x for x, _ in data.TrainData(source, cfg, seed=5).epoch(stage, 3, 64)]
    assert not torch.equal(torch.cat(plain), torch.cat(whole))  # the policy did something
    assert all(b.dtype == torch.uint8 for b in whole)


@pytest.mark.slow
def test_file_loader_applies_the_stage_policy_in_workers_as_in_the_main_process(tmp_path):
    image_folder(tmp_path / "train", classes=2, per_class=8)
    image_folder(tmp_path / "val", classes=2, per_class=2)
    cfg = DataConfig(source="imagefolder", root=str(tmp_path))
    source = data.load_source(cfg)
    stage = Stage(epochs=1, resolution=24, batch_size=4)
    reg = Regularization(policy="autoaugment", random_erasing=0.5, crop_scale=(0.5, 1.0)).over(DEFAULTS)

    def epoch(workers: int, rank=0, world=1):
        td = data.TrainData(source, DataConfig(source="imagefolder", root=str(tmp_path), num_workers=workers),
                            seed=1, rank=rank, world=world)
        try:
            return torch.cat([x for x, _ in td.epoch(stage, 0, 16, 0, reg)])
        finally:
            td.close()

    main = epoch(0)
    assert torch.equal(main, epoch(1))
    assert torch.equal(epoch(0, 1, 2), main[1::2])
    # without the policy, the crop alone (its scale now from the recipe) is what decode_crop gives
    sampler = EpochSampler(16, 16, seed=1, epoch=0)
    idx, keys = sampler.keyed()
    plain = data.TrainData(source, DataConfig(source="imagefolder", root=str(tmp_path), num_workers=0), seed=1)
    first = next(iter(plain.epoch(stage, 0, 16, 0, Regularization(crop_scale=(0.5, 1.0)).over(DEFAULTS))))[0][0]
    path = source.train.items[int(idx[0])][0]
    assert torch.equal(first, data.decode_crop(path, int(keys[0]), 24, scale=(0.5, 1.0)).permute(2, 0, 1))


# -- batch mixing ---------------------------------------------------------------------------------


def test_mixing_draws_follow_their_distributions():
    both = Regularization(mixup=0.4, cutmix=1.0, mix_prob=0.8, switch_prob=0.3).over(DEFAULTS)
    draws = [draw(both, 7, s, 32, 32) for s in range(4000)]
    kinds = [d.kind for d in draws]
    assert abs(kinds.count(None) / 4000 - 0.2) < 0.025
    assert abs(kinds.count("cutmix") / (4000 - kinds.count(None)) - 0.3) < 0.03
    mixup = [d.lam for d in draws if d.kind == "mixup"]
    assert stats.kstest(mixup, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    for d in draws:
        if d.kind == "cutmix":
            top, bottom, left, right = d.box
            assert d.lam == pytest.approx(1 - (bottom - top) * (right - left) / 1024)
    assert draw(both, 7, 11, 32, 32) == draws[11]  # keyed by (seed, step): the same draw every time


def test_mixup_and_cutmix_images_and_targets_in_closed_form():
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    mixup = BatchMixer(Regularization(mixup=1.0, label_smoothing=0.1).over(DEFAULTS), seed=1)
    out, t = mixup(x, y, 5)
    lam, partner = t.lam, torch.tensor([3, 4, 5, 0, 1, 2])
    assert torch.allclose(out, lam * x + (1 - lam) * x[partner])
    assert torch.equal(t.partner, y[partner]) and t.smoothing == 0.1
    dense = t.dense(6)
    assert torch.allclose(dense[0], torch.tensor([lam, 0, 0, 1 - lam, 0, 0]))
    cut = BatchMixer(Regularization(cutmix=1.0).over(DEFAULTS), seed=1)
    out, t = cut(x, y, 5)
    top, bottom, left, right = draw(cut.reg, 1, 5, 8, 8).box
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert torch.equal(out[:, :, inside], x[partner][:, :, inside])
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert t.lam == pytest.approx(1 - inside.float().mean().item())


def test_mixing_pairs_are_the_same_for_one_process_and_for_each_rank():
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8)
    mixer = BatchMixer(Regularization(mixup=0.5, cutmix=0.5).over(DEFAULTS), seed=3)
    for step in range(20):
        whole, tw = mixer(x, y, step)
        for r in range(2):  # rank r holds global positions r, r + 2, ...
            part, tp = mixer(x[r::2], y[r::2], step)
            assert torch.equal(part, whole[r::2])
            assert torch.equal(tp.dense(8), tw.dense(8)[r::2])


def test_losses_against_torch_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    logits, a, b = torch.randn(5, 7, generator=g), torch.tensor([0, 3, 6, 2, 2]), torch.tensor([1, 1, 5, 0, 2])
    hard = Loss("ce", 0.1)(logits, a)
    assert torch.equal(hard, torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, a))  # as before, bit for bit
    mixed = Loss("ce")(logits, Targets(a, b, 0.7, 0.1))
    ce = lambda y: F.cross_entropy(logits, y, label_smoothing=0.1)  # noqa: E731
    expect = 0.7 * ce(a) + 0.3 * ce(b)
    assert mixed.item() == pytest.approx(expect.item(), rel=1e-6)  # the loss is linear in the target
    p = 0.7 * F.one_hot(a, 7).float() + 0.3 * F.one_hot(b, 7).float()
    p = p * 0.9 + 0.1 / 7
    bce = -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).mean()
    assert Loss("bce")(logits, Targets(a, b, 0.7, 0.1)).item() == pytest.approx(bce.item(), rel=1e-6)
    thresholded = F.binary_cross_entropy_with_logits(logits, (p > 0.2).float())
    assert Loss("bce", target_threshold=0.2)(logits, Targets(a, b, 0.7, 0.1)).item() == pytest.approx(
        thresholded.item(), rel=1e-6)


# -- recipes and the plan -------------------------------------------------------------------------


PER_STAGE = {**GOOD, "regularization": {"mixup": 0.2, "label_smoothing": 0.1},
             "stages": [{**GOOD["stages"][0], "regularization": {"policy": "randaugment", "magnitude": 5}},
                        {**GOOD["stages"][1], "regularization": {"policy": "randaugment", "magnitude": 15,
                                                                 "cutmix": 1.0}}]}


@pytest.mark.pictures
def test_stages_override_the_recipe_and_the_plan_shows_each_key(tmp_path, capsys):
    recipe = recipe_from_dict(PER_STAGE)
    regs = recipe.stage_regularization()
    assert [(r.policy, r.magnitude, r.mixup, r.cutmix, r.label_smoothing) for r in regs] == [
        ("randaugment", 5, 0.2, 0.0, 0.1), ("randaugment", 15, 0.2, 1.0, 0.1)]
    path, out, png = write_recipe(tmp_path, PER_STAGE), tmp_path / "plan.csv", tmp_path / "plan.png"
    assert cadence_main(["plan", path, "--csv", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("stage"))
    assert header.split()[-2:] == ["magnitude", "cutmix"]
    assert "every stage: policy randaugment, mixup 0.2, label_smoothing 0.1" in text
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[8:] == ["policy", "magnitude", "mixup", "cutmix", "label_smoothing"]
    t = recipe.timeline()
    assert [r["magnitude"] for r in rows] == [str(regs[k].magnitude) for k in t.stage]
    assert png.stat().st_size > 30_000


def test_old_recipes_keep_their_label_smoothing_and_train_as_before():
    raw = {**GOOD, "train": {"label_smoothing": 0.2}}
    assert recipe_from_dict(raw).stage_regularization()[0].label_smoothing == 0.2
    with pytest.raises(Exception, match="train.label_smoothing: 0.2: is also set"):
        recipe_from_dict({**raw, "regularization": {"label_smoothing": 0.1}})


def test_changing_regularization_on_resume_is_free():
    for path in ("regularization.mixup", "stages.1.regularization.magnitude", "train.loss"):
        assert changes.kind(path) == "free", path
    assert changes.kind("stages.1.resolution") == "schedule"
    diffs = changes.differences(PER_STAGE, {**PER_STAGE, "regularization": {"mixup": 0.2, "label_smoothing": 0.1,
                                                                           "cutmix": 0.5}})
    assert [(d.path, d.kind) for d in diffs] == [("regularization.cutmix", "free")]


@pytest.mark.parametrize("where, value, says", [
    ("regularization.policy", "autoaugmentt", "must be one of none, trivialaugment"),
    ("regularization.magnitude", 31, "must be in 0 .. 30"),
    ("stages.1.regularization.num_ops", 0, "must be in 1 .. 16"),
    ("regularization.random_erasing", 1.5, "is a probability"),
    ("stages.0.regularization.mix_prob", -0.1, "is a probability"),
    ("regularization.mixup", -0.2, "alpha: must be >= 0"),
    ("regularization.cutmix", ".inf", "alpha: must be >= 0 and finite"),
    ("regularization.crop_scale", "[0.5, 0.2]", "must be [min, max]"),
    ("regularization.erasing_scale", "[0.1]", "must be a list of 2"),
    ("regularization.label_smoothing", 1, "must be in [0, 1)"),
    ("regularization.color_jitter", 2, "must be in [0, 1]"),
    ("stages.0.regularization.crop_scale", "[0.3, 1]", "applies to image files"),
    ("train.bce_target_threshold", 0.2, "with loss: bce"),
    ("regularization.colour_jitter", 0.4, "unknown key"),
])
def test_bad_regularization_exits_2_naming_file_field_and_value(tmp_path, capsys, where, value, says):
    assert_plan_refuses(tmp_path, capsys, where, value, says)


# -- training -------------------------------------------------------------------------------------


REGULARIZED = {**TINY, "regularization": {"policy": "trivialaugment", "random_erasing": 0.25, "mixup": 0.2,
                                          "cutmix": 1.0, "label_smoothing": 0.1},
               "stages": [{**TINY["stages"][0], "regularization": {"policy": "randaugment", "magnitude": 5,
                                                                   "cutmix": 0.0}}, TINY["stages"][1]],
               "train": {**TINY["train"], "loss": "bce"}}


@pytest.mark.slow
def test_a_regularized_run_resumes_bit_for_bit(tmp_path):
    whole, final = run(REGULARIZED, str(tmp_path / "whole"))
    assert final is not None and np.isfinite(final["val_loss"])
    run(REGULARIZED, str(tmp_path / "resumed"), stop_at=4)  # mid-epoch, mid-stage 0
    resumed, _ = run(REGULARIZED, str(tmp_path / "resumed"), resume=True)
    assert_same_state(whole, resumed)
    plain, _ = run(TINY, str(tmp_path / "plain"))  # the regularization changed the training
    assert not torch.equal(next(plain.parts.model.parameters()), next(whole.parts.model.parameters()))


def test_the_range_test_trains_like_its_stage():
    """``find-lr`` on a stage uses that stage's policy and mixing: its first loss is the training
    step's first loss."""
    from cadence import lr_finder, parts

    recipe = recipe_from_dict(REGULARIZED)
    setup = parts.build_setup(recipe)
    built = parts.build_parts(setup)
    result = lr_finder.range_test_stage(setup, built, 0, steps=5, start=1e-4, end=1e-3)
    td = data.TrainData(setup.source, recipe.data, seed=recipe.seed)
    x, y = next(iter(td.epoch(recipe.stages[0], 0, 48, 0, setup.timeline.regularization[0])))
    x, y = BatchMixer(setup.timeline.regularization[0], recipe.seed)(built.normalize(x), y, 0)
    for g in built.optimizer.param_groups:
        g["lr"] = 1e-4
    assert built.forward_backward(x, y).item() == pytest.approx(result.losses[0], rel=1e-6)


def test_load_recipe_reads_stage_regularization_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata: {source: synthetic, train_samples: 100}\nschedule: {kind: cosine}\n"
                    "stages:\n  - {epochs: 1, resolution: 32, batch_size: 10, regularization: {mixup: 0.3}}\n")
    assert load_recipe(str(path)).stage_regularization()[0].mixup == 0.3
