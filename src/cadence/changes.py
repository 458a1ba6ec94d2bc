"""A run resumed with a different recipe: every difference, what it moves, and where to continue.

Each difference is one of three kinds (by field path; the lists are ``MODEL`` and ``FREE`` below,
the one source of them: the README's list is tested against them):

* ``model``: the checkpoint would not fit (``MODEL``): always refused.
* ``free``: no effect on the schedule or the data order (``FREE``): accepted and recorded.
* ``schedule``: everything else (``stages``, ``schedule``, ``seed``, the LR keys of ``optimizer``, the
  rest of ``data``): refused unless a policy says where on the new timeline to continue
  (``keep-position`` or ``stretch``, see :func:`cadence.plan.continue_at`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import yaml

from cadence.errors import FieldError
from cadence.files import write_text_atomic
from cadence.recipe import DataConfig, ModelConfig, OptimizerConfig, Recipe, TrainConfig, dump_recipe, recipe_from_dict
from cadence.regularization import Regularization
from cadence.rundir import RunDir

POLICIES = ("keep-position", "stretch")
# a field path is of a kind if it equals one of these or lies under one (``train`` covers ``train.*``)
MODEL = ("model", "optimizer.name", "optimizer.decay_norm_and_bias", "optimizer.groups", "data.source",
         "data.num_classes")
FREE = ("name", "train", "data.root", "data.val_split", "data.val_samples", "data.download", "data.num_workers",
        "data.cache", "data.cache_dir", "data.prepared", "data.on_bad_image", "optimizer.weight_decay",
        "optimizer.beta2", "optimizer.nesterov", "regularization", "stages.*.regularization")
UNSET = "(unset)"


def _defaults() -> dict[str, object]:
    """Dotted path -> default, for keys a recipe may leave out (so 'unset' equals its default)."""
    out: dict[str, object] = {"seed": 0, "schedule.scope": "global", "schedule.progress": "steps"}
    for section, cls in (("data", DataConfig), ("model", ModelConfig), ("optimizer", OptimizerConfig),
                         ("train", TrainConfig), ("regularization", Regularization)):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f"{section}.{f.name}"] = f.default
    return out


DEFAULTS = _defaults()


def kind(path: str) -> str:
    """``model``, ``free`` or ``schedule`` for a dotted field path (``stages.*`` stands for any stage)."""
    path = re.sub(r"^stages\.\d+\.", "stages.*.", path)
    for name, prefixes in (("model", MODEL), ("free", FREE)):
        if any(path == p or path.startswith(p + ".") for p in prefixes):
            return name
    return "schedule"


@dataclass(frozen=True)
class Difference:
    path: str
    old: object
    new: object

    @property
    def kind(self) -> str:
        return kind(self.path)

    def __str__(self) -> str:
        return f"{self.path}: {self.old!r} -> {self.new!r}".replace(repr(UNSET), UNSET)


def differences(old: object, new: object, path: str = "") -> list[Difference]:
    """Every leaf that differs between two raw recipes (mappings by key, lists by index), in order;
    a key left out counts as its default."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{k}" if path else str(k)
            a, b = old.get(k, DEFAULTS.get(sub, UNSET)), new.get(k, DEFAULTS.get(sub, UNSET))
            out += differences(a, b, sub)
        return out
    if isinstance(old, list) and isinstance(new, list):
        n = max(len(old), len(new))
        pad = lambda xs: list(xs) + [UNSET] * (n - len(xs))  # noqa: E731
        return [d for i, (a, b) in enumerate(zip(pad(old), pad(new))) for d in differences(a, b, f"{path}.{i}")]
    if old == new and isinstance(old, bool) == isinstance(new, bool):  # 1 == 1.0, but True is not 1
        return []
    return [Difference(path or "(top level)", old, new)]


class RecipeChanged(FieldError):
    """A resume refused because the recipe changed: a summary line, then one line per difference."""

    def __init__(self, file: str, summary: str, diffs: list[Difference]):
        self.diffs = diffs
        super().__init__(diffs[0].path, diffs[0].new, summary, file)

    def __str__(self) -> str:
        lines = [f"  {d}   [{d.kind}]" for d in self.diffs]
        return "\n".join([f"{self.file}: {self.message}:"] + lines)


def reconcile(state: dict, recipe: Recipe, timeline, run_dir: str, policy: str | None, *,
              recipe_file: str, train_samples: int, world_size: int = 1, write: bool = True) -> int | None:
    """Compare the checkpoint's recipe with ``recipe`` (whose ``timeline`` was built for
    ``train_samples`` images): None if equal, else the step of ``timeline`` to continue at. Refuses
    (RecipeChanged, exit 2) changes to the model, and schedule changes without a ``policy``; those
    also get ``recipe_change.png`` (old and new LR curves). An accepted change is recorded: the run's
    previous ``recipe.yaml`` is kept as ``recipe.prev-N.yaml`` and ``recipe.yaml`` becomes ``recipe``."""
    from cadence import plan, report

    diffs = differences(state["recipe"], recipe.raw)
    if not diffs:
        return None
    done = state["step"]
    if any(d.kind == "model" for d in diffs):
        raise RecipeChanged(recipe_file, "the model or optimizer differs from the run's checkpoint, which "
                            "cannot continue under it (start a new run)", diffs)
    if not any(d.kind == "schedule" for d in diffs):
        at = done
    else:
        old = recipe_from_dict(state["recipe"])
        same_data = not any(d.path.startswith("data.") and d.kind == "schedule" for d in diffs)
        old_timeline = old.timeline(train_samples=train_samples if same_data else None, world_size=world_size)
        figure = RunDir(run_dir).file("recipe_change.png")
        if write:
            at_policy = {p: plan.continue_at(old_timeline, done, timeline, p) for p in POLICIES}
            report.plot_recipe_change(old_timeline, done, timeline, at_policy, figure)
        if policy is None:
            raise RecipeChanged(recipe_file, "the recipe differs from the run's where it sets the schedule or "
                                f"the data order (LR curves: {figure}); continue with --on-recipe-change "
                                "keep-position (at the same images seen) or stretch (at the same fraction "
                                "of training), or resume with the run's recipe", diffs)
        at = plan.continue_at(old_timeline, done, timeline, policy)
        if at >= len(timeline):
            raise FieldError("--on-recipe-change", policy, f"the run has done step {done:,} of "
                             f"{len(old_timeline):,}; the new recipe has no steps left after that "
                             f"({len(timeline):,} steps)", recipe_file)
    if write:
        if at != done or len(timeline) != state["scheduler"].get("timeline_steps"):
            report.plot_plan(timeline, RunDir(run_dir).file("plan.png"), title=recipe.name)
        record(run_dir, recipe, f"resumed with a changed recipe at step {at:,} of {len(timeline):,} "
               f"({policy or 'no change to the schedule'}; the checkpoint was at step {done:,})")
    return at


def record(run_dir: str, recipe: Recipe, note: str) -> str | None:
    """Keep the run's ``recipe.yaml`` as ``recipe.prev-N.yaml`` and write ``recipe`` in its place
    (nothing kept if it already holds ``recipe``); returns the kept file's name."""
    run = RunDir(run_dir)
    with open(run.recipe, encoding="utf-8") as f:
        current = f.read()
    if yaml.safe_load(current) == recipe.raw:
        return None
    kept = run.next_prev_recipe()
    write_text_atomic(current, kept)
    write_text_atomic(dump_recipe(recipe, note), run.recipe)
    return os.path.basename(kept)
