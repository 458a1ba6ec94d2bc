"""The recipe reference lists every key the code accepts (and no key it does not)."""

from __future__ import annotations

import dataclasses
import os
import re

from cadence.recipe import DataConfig, ModelConfig, OptimizerConfig, TrainConfig
from helpers import ROOT

SCHEDULE_KEYS = {"lr", "reference_batch_size", "lr_scaling"}  # documented in schedules.md


def test_docs_recipes_lists_every_key():
    text = open(os.path.join(ROOT, "docs", "recipes.md")).read()
    sections = dict(re.findall(r"## `(\w+)`\n(.*?)(?=\n## |\Z)", text, flags=re.S))
    for name, cls in (("model", ModelConfig), ("optimizer", OptimizerConfig), ("data", DataConfig),
                      ("train", TrainConfig)):
        documented = {k for row in re.findall(r"^\| (`.*?) \|", sections[name], flags=re.M)
                      for k in re.findall(r"`(\w+)`", row)}
        fields = {f.name for f in dataclasses.fields(cls)} - (SCHEDULE_KEYS if name == "optimizer" else set())
        assert documented == fields, (name, fields ^ documented)
