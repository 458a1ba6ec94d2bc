"""The recipe reference lists every key the code accepts (and no key it does not)."""

from __future__ import annotations

import dataclasses
import os
import re

from cadence.recipe import DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from cadence.regularization import Regularization
from helpers import ROOT

SCHEDULE_KEYS = {"lr", "reference_batch_size", "lr_scaling"}  # documented in schedules.md


def test_docs_recipes_lists_every_key():
    text = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    sections = dict(re.findall(r"## `(\w+)`\n(.*?)(?=\n## |\Z)", text, flags=re.S))
    for name, cls in (("model", ModelConfig), ("optimizer", OptimizerConfig), ("data", DataConfig),
                      ("train", TrainConfig), ("regularization", Regularization)):
        documented = {k for row in re.findall(r"^\| (`.*?) \|", sections[name], flags=re.M)
                      for k in re.findall(r"`(\w+)`", row)}
        fields = {f.name for f in dataclasses.fields(cls)} - (SCHEDULE_KEYS if name == "optimizer" else set())
        assert documented == fields, (name, fields ^ documented)


def test_readme_lists_the_resume_safe_fields_of_changes():
    """The README's `model` and `free` lists on resume are changes.MODEL and changes.FREE."""
    from cadence import changes

    text = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    model = re.search(r"`model` \((.*?)\) is refused", text).group(1)
    free = re.search(r"`free` \((.*?)\) is accepted", text).group(1)
    names = lambda listed: {n.removesuffix(".*") for n in re.findall(r"`([\w.*]+)`", listed)}  # noqa: E731
    assert names(model) == set(changes.MODEL)
    assert names(free) == set(changes.FREE)
