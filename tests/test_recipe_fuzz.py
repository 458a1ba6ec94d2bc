"""Property: any recipe -- valid ones mutated at random (wrong types, missing and extra keys, zero,
negative, huge and non-finite numbers, bad strings, nested junk, bad schedules and stage lists) --
either becomes a plan with finite, non-negative LRs, or raises FieldError naming a field. Nothing
else: no TypeError, no ZeroDivisionError, no hang."""

from __future__ import annotations

import copy
import glob
import math
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from cadence import schedules
from cadence.cli import out_of_memory, plan_checks_model
from cadence.errors import FieldError
from cadence.recipe import load_recipe, recipe_from_dict
from helpers import GOOD, ROOT, TINY

pytestmark = pytest.mark.slow  # 300 to 1,200 recipes planned per test


def _bases() -> list[dict]:
    out = [GOOD, TINY]
    for path in sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))):
        with open(path) as f:
            raw = yaml.safe_load(f)
        if raw.get("data", {}).get("source") in ("imagefolder", "cifar10"):  # no data on disk here
            raw["data"] = {"source": "synthetic", "train_samples": 20_000}  # (ImageNet's 1.28M: slow to plan)
        out.append(raw)
    return out


BASES = _bases()
NUMBERS = [0, 1, 2, 3, -1, -0.0, 0.5, 0.999, 1.5, 1e-12, 7, 64, 10**9, 2**63, 1e308, -1e308,
           math.inf, -math.inf, math.nan, True, False]
STRINGS = ["", " ", "abc", "auto", "none", "1e-4", "3", "0.5", "2 epochs", "0 epochs", "-1 steps", "1e400 steps",
           "1M samples", "1.5k steps", "3 fortnights", "nan", "inf", "epochs", "10 steps ", "1 epoch 2",
           "cos", "linear", "global", "per_stage", "samples", "steps", "sgd", "adamw", "fp16", "skip"]
KEYS = ["kind", "duration", "warmup", "epochs", "batch_size", "resolution", "lr", "momentum", "scale",
        "pieces", "floor", "extra", "stages", "schedule", "x"]

leaf = st.one_of(st.none(), st.sampled_from(NUMBERS), st.sampled_from(STRINGS),
                 st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True, width=64))
junk = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                    max_leaves=6)

# plausible schedule keys, so that mutated schedules get past the first type check and into build()
PLAUSIBLE = st.one_of(st.sampled_from([0.1, 0.3, 0.5, 0.99, 1, 2, 10, 1e4, 1e308, math.inf, "1 epochs", "2 steps", "3 steps",
                                       "100 samples", "0.5 epochs", [0.95, 0.85], ["1 epochs", "2 epochs"],
                                       ["2 steps", "1 steps"], {"duration": "1 steps"},
                                       {"duration": 0.1, "start_factor": 0.1, "shape": "cos"},
                                       "cos", "linear", "triangular2", "exp_range", "sqrt", True]),
                      st.sampled_from([0.2, 0.9, "1 steps", "5 steps", "1e-300 steps"]), junk).map(copy.deepcopy)  # (never one shared object, so mutations cannot make cycles)


@st.composite
def schedule_specs(draw, depth: int = 0) -> dict:
    kind = draw(st.sampled_from(sorted(schedules.KINDS)))
    cls = schedules.KINDS[kind]
    spec = {"kind": kind}
    for name in draw(st.lists(st.sampled_from([f.name for f in cls.__dataclass_fields__.values()
                                               if f.name != "kind"] or ["scale"]), max_size=4, unique=True)):
        if name == "pieces" and depth < 1:
            spec[name] = draw(st.lists(st.builds(lambda s, d: {**s, **({"duration": d} if d is not None else {})},
                                                 schedule_specs(depth=depth + 1),
                                                 st.one_of(st.none(), PLAUSIBLE)), min_size=0, max_size=3))
        else:
            spec[name] = draw(PLAUSIBLE)
    if draw(st.booleans()):
        spec.update(scope=draw(st.sampled_from(["global", "per_stage", "both"])),
                    progress=draw(st.sampled_from(["steps", "samples", "epochs"])))
    return spec


def _paths(node, prefix=()) -> list[tuple]:
    """Every path into a raw recipe (mapping keys and list indexes), containers included."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _parent(raw, path):
    node = raw
    for p in path[:-1]:
        node = node[p]
    return node


@st.composite
def mutated_recipes(draw) -> dict:
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "delete", "add", "schedule", "stages"]))
        paths = _paths(raw)
        if op in ("set", "delete") and paths:
            path = draw(st.sampled_from(paths))
            parent = _parent(raw, path)
            if op == "set":
                parent[path[-1]] = draw(st.one_of(junk, PLAUSIBLE))
            elif isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif op == "add":
            dicts = [p for p in [()] + paths if isinstance(_parent(raw, p + ("",)) if p else raw, dict)]
            where = _parent(raw, draw(st.sampled_from(dicts)) + ("",)) if dicts else raw
            where[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)))] = draw(junk)
        elif op == "schedule":
            raw["schedule"] = draw(schedule_specs())
        else:
            stage = st.fixed_dictionaries({"epochs": st.sampled_from([1, 2, 0, -1, 1.5, "2", 10**9]),
                                           "resolution": st.sampled_from([8, 32, 7, 224, 2**40]),
                                           "batch_size": st.sampled_from([1, 10, 128, 0, 10**12, 3.0])},
                                          optional={"data_fraction": st.sampled_from([0.5, 1, 0, 1.5, 1e-9]),
                                                    "extra": junk})
            raw["stages"] = draw(st.one_of(st.lists(stage, max_size=3), junk))
    return raw


def check_field_error(e: FieldError) -> None:
    text = str(e)
    assert isinstance(e.field, str) and e.field.strip(), text
    assert isinstance(e.message, str) and e.message.strip(), text
    assert "\n" not in text and text.startswith(f"fuzz.yaml: {e.field}: "), text


def plan_or_field_error(raw: dict, world_size: int = 1) -> None:
    """What ``cadence plan`` does with a recipe: read it, plan it, check its parameter groups on its model."""
    try:
        recipe = recipe_from_dict(raw, file="fuzz.yaml")
        timeline = recipe.timeline(world_size=world_size)
        plan_checks_model(recipe)
    except FieldError as e:
        check_field_error(e.within(file="fuzz.yaml"))
        return
    except (MemoryError, RuntimeError) as e:  # a model too large to build: plan's "out of memory" line
        assert out_of_memory(e), e
        return
    assert len(timeline) > 0
    assert all(math.isfinite(v) and v >= 0 for v in timeline.lr), raw
    assert all(math.isfinite(v) for v in timeline.momentum), raw


@settings(max_examples=1200)
@given(mutated_recipes(), st.sampled_from([1, 1, 2, 3]))
def test_mutated_recipes_plan_or_name_a_field(raw, world_size):
    plan_or_field_error(raw, world_size)


@settings(max_examples=500)
@given(schedule_specs(), st.sampled_from(BASES))
def test_random_schedules_plan_or_name_a_field(spec, base):
    plan_or_field_error({**base, "schedule": spec})


OVERRIDES = st.lists(st.tuples(
    st.sampled_from(["optimizer.lr", "stages.0.epochs", "stages.5.epochs", "schedule", "schedule.kind", "train",
                     "name.x", "stages.x", "", "a..b", "seed", "stages.-1", "train.on_nonfinite"]),
    st.sampled_from(["0.4", "-1", "", "[1, 2", "{a: 1}", "null", "1e400", "cosine", "~", "'2 epochs'", "[]", ":",
                     "skip", "stop "])), max_size=3)


@settings(max_examples=300)
@given(sets=OVERRIDES, base=st.sampled_from(BASES))
def test_set_overrides_plan_or_name_a_field(sets, base, tmp_path_factory):
    path = os.path.join(tmp_path_factory.getbasetemp(), "fuzz.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(base, f)
    try:
        load_recipe(path, [f"{k}={v}" for k, v in sets]).timeline()
    except FieldError as e:
        assert e.file == path
        check_field_error(FieldError(e.field, e.value, e.message, "fuzz.yaml"))
