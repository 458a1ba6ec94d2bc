"""Bad recipes: `cadence plan` exits 2 with ONE line on stderr naming the file, the field and the value."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import yaml

from cadence.cli import main as cadence_main
from cadence.errors import FieldError
from cadence.recipe import load_recipe, recipe_from_dict
from helpers import GOOD, ROOT


def edit(path: str, value):
    """A copy of GOOD with ``path`` (dotted) set to ``value`` (or removed, for ``DELETE``)."""
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return raw


DELETE = object()

# (id, recipe as written, --set overrides, field path, value as printed)
CASES = [
    ("unknown key", edit("optimizer.lrr", 0.1), [], "optimizer.lrr", "0.1"),
    ("fastnet widths: two blocks", GOOD, ["model.widths=[32, 64]"], "model.widths", "[32, 64]"),
    ("no such model", GOOD, ["model.arch=resnet-50"], "model.arch", "'resnet-50'"),
    ("timm model without a name", GOOD, ["model.arch=timm/"], "model.arch", "'timm/'"),
    ("fastnet's setting on a ResNet", GOOD, ["model.arch=resnet50", "model.dirac=true"], "model.dirac", "True"),
    ("fastnet widths: zero", GOOD, ["model.widths=[32, 0, 64]"], "model.widths", "[32, 0, 64]"),
    ("unknown top-level key", edit("epochs", 3), [], "epochs", "3"),
    ("unknown stage key", edit("stages.1.res", 64), [], "stages.1.res", "64"),
    ("unknown key in a schedule", edit("schedule.floor", 0.1), [], "schedule.floor", "0.1"),
    ("wrong type: int", edit("stages.0.epochs", "ten"), [], "stages.0.epochs", "'ten'"),
    ("wrong type: bool for int", edit("stages.0.batch_size", True), [], "stages.0.batch_size", "True"),
    ("wrong type: number", GOOD, ["optimizer.lr=fast"], "optimizer.lr", "'fast'"),
    ("wrong type: list", edit("schedule", {"kind": "multistep", "milestones": "2 epochs"}), [],
     "schedule.milestones", "'2 epochs'"),
    ("wrong type: mapping", edit("optimizer", [0.1]), [], "optimizer", "[0.1]"),
    ("missing required key", edit("name", DELETE), [], "name", "None"),
    ("negative lr", edit("optimizer.lr", -0.1), [], "optimizer.lr", "-0.1"),
    ("zero lr", GOOD, ["optimizer.lr=0"], "optimizer.lr", "0.0"),
    ("infinite lr", GOOD, ["optimizer.lr=.inf"], "optimizer.lr", "inf"),
    ("pct_start above 1", edit("schedule.pct_start", 1.5), [], "schedule.pct_start", "1.5"),
    ("pct_start 0", edit("schedule.pct_start", 0.0), [], "schedule.pct_start", "0.0"),
    ("pct_start 1", GOOD, ["schedule.pct_start=1"], "schedule.pct_start", "1.0"),
    ("pct_start >= 0.5 with three_phase", GOOD, ["schedule.three_phase=true", "schedule.pct_start=0.6"],
     "schedule.pct_start", "0.6"),
    ("data_fraction 0", edit("stages.1.data_fraction", 0), [], "stages.1.data_fraction", "0.0"),
    ("data_fraction above 1", GOOD, ["stages.0.data_fraction=1.5"], "stages.0.data_fraction", "1.5"),
    ("duration longer than its scope", edit("schedule", {"kind": "step", "step_size": "9 epochs"}), [],
     "schedule.step_size", "'9 epochs'"),
    ("milestone beyond the run", edit("schedule", {"kind": "multistep", "milestones": ["1 epochs", "5000 steps"]}),
     [], "schedule.milestones.1", "'5000 steps'"),
    ("milestones not increasing", edit("schedule", {"kind": "multistep", "milestones": ["3 epochs", "1 epochs"]}),
     [], "schedule.milestones", "['3 epochs', '1 epochs']"),
    ("warmup longer than the run", GOOD, ["schedule.warmup={duration: 5 epochs}"],
     "schedule.warmup.duration", "'5 epochs'"),
    ("warmup as long as the run", GOOD, ["schedule.warmup={duration: 1.0}"], "schedule.warmup.duration", "'1'"),
    ("warmup start_factor", GOOD, ["schedule.warmup={duration: 0.1, start_factor: 2}"],
     "schedule.warmup.start_factor", "2.0"),
    ("unknown schedule kind", edit("schedule.kind", "cosine_annealing"), [], "schedule.kind",
     "'cosine_annealing'"),
    ("unknown scope", GOOD, ["schedule.scope=everywhere"], "schedule.scope", "'everywhere'"),
    ("momentum not [max, min]", GOOD, ["schedule.momentum=[0.85, 0.95]"], "schedule.momentum", "[0.85, 0.95]"),
    ("gamma above 1", edit("schedule", {"kind": "exponential", "gamma": 1.5}), [], "schedule.gamma", "1.5"),
    ("bad duration unit", edit("schedule", {"kind": "step", "step_size": "3 fortnights"}), [],
     "schedule.step_size", "'3 fortnights'"),
    ("bare number above 1", edit("schedule", {"kind": "step", "step_size": 30}), [], "schedule.step_size", "30"),
    ("sequence pieces overflow", edit("schedule", {"kind": "sequence", "pieces": [
        {"kind": "constant", "duration": 0.7}, {"kind": "cosine", "duration": 0.5}, {"kind": "constant"}]}), [],
     "schedule.pieces.1.duration", "'0.5'"),
    ("bad key inside a sequence piece", edit("schedule", {"kind": "sequence", "pieces": [
        {"kind": "cosine", "duration": 0.5, "floor": 2}, {"kind": "constant"}]}), [],
     "schedule.pieces.0.floor", "2.0"),
    ("range test too short", GOOD, ["optimizer.lr_find.steps=3"], "optimizer.lr_find.steps", "3"),
    ("range test ends below its start", GOOD, ["optimizer.lr_find={start: 1, end: 0.1}"], "optimizer.lr_find.end",
     "0.1"),
    ("no stages", edit("stages", []), [], "stages", "[]"),
    ("batch larger than an epoch", GOOD, ["stages.1.batch_size=600"], "stages.1.batch_size", "600"),
    ("resolution past int32 (the fuzzer found 1e308)", GOOD, ["stages.1.resolution=1.0e+12"], "stages.1.resolution",
     "1000000000000"),
    ("eval_resolution past any image", GOOD, ["train.eval_resolution=100000"], "train.eval_resolution", "100000"),
    ("train_samples 0", edit("data.train_samples", 0), [], "data.train_samples", "0"),
    ("eval_crop_pct 0", GOOD, ["train.eval_crop_pct=0"], "train.eval_crop_pct", "0.0"),
    ("eval_crop_pct above 1", GOOD, ["train.eval_crop_pct=1.2"], "train.eval_crop_pct", "1.2"),
    ("eval_resize and eval_crop_pct", GOOD, ["train.eval_resize=56", "train.eval_crop_pct=0.9"], "train.eval_resize",
     "56"),
    ("eval_resize below the eval resolution", GOOD, ["train.eval_resize=40"], "train.eval_resize", "40"),
    ("--set to a nonexistent list index", GOOD, ["stages.5.batch_size=64"], "stages.5",
     "'stages.5.batch_size=64'"),
    ("--set without =", GOOD, ["optimizer.lr"], "--set", "'optimizer.lr'"),
    ("--set into a scalar", GOOD, ["name.first=x"], "name.first", "'name.first=x'"),
]


def run_plan(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = cadence_main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not exactly one line: {err!r}"
    line = err.rstrip("\n")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.mark.parametrize("raw,sets,field,value", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_recipe_exits_2_with_one_line(tmp_path, capsys, raw, sets, field, value):
    path = tmp_path / "bad-recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    args = [str(path)] + [a for s in sets for a in ("--set", s)]
    rc, out, err = run_plan(capsys, args)
    assert rc == 2
    assert out == ""
    line = assert_one_line(err, str(path))
    # "FILE: FIELD: VALUE: reason"
    assert f"{path}: {field}: {value}: " in line


@pytest.mark.parametrize("world_size,needle", [("3", "stages.0.batch_size: 10: "), ("0", "world_size: 0: ")])
def test_bad_world_size(tmp_path, capsys, world_size, needle):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    rc, out, err = run_plan(capsys, [str(path), "--world-size", world_size])
    assert rc == 2 and out == ""
    assert_one_line(err, f"{path}: {needle}")


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    rc, out, err = run_plan(capsys, [str(path)])
    assert rc == 2
    assert_one_line(err, f"{path}: (file): {str(path)!r}: cannot read")


@pytest.mark.parametrize("text,where", [
    ("name: [unclosed\n", "line 2"),
    ("name: t\n  stages: : x\n", "line 2"),
    ("name: t\nstages:\n\t- 1\n", "line 3"),  # a tab for indentation
    ("name: t\x07\n", "(file)"),  # a control character: the YAML reader's error is two lines long
])
def test_invalid_yaml(tmp_path, capsys, text, where):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    rc, out, err = run_plan(capsys, [str(path)])
    assert rc == 2
    assert_one_line(err, f"{path}: {where}: {str(path)!r}: is not valid YAML")


def test_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    rc, out, err = run_plan(capsys, [str(path)])
    assert rc == 2
    assert_one_line(err, f"{path}: (file): {str(path)!r}: is not UTF-8")


def test_a_recipe_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    rc, out, err = run_plan(capsys, [str(path)])
    assert rc == 2
    assert_one_line(err, f"{path}: (top level): [1, 2]: must be a mapping")


def test_field_errors_carry_file_field_and_value():
    with pytest.raises(FieldError) as err:
        recipe_from_dict(edit("schedule.pct_start", 1.5), "r.yaml")
    assert (err.value.file, err.value.field, err.value.value) == ("r.yaml", "schedule.pct_start", 1.5)
    with pytest.raises(FieldError) as err:
        load_recipe(os.path.join(ROOT, "recipes", "demo.yaml"), ["stages.1.data_fraction=0"])
    assert err.value.field == "stages.1.data_fraction" and err.value.file.endswith("demo.yaml")


# ---------------------------------------------------------------------------------------------
# The real command line, as a separate process


def cadence(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cadence.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["missing.yaml"], "missing.yaml: (file): 'missing.yaml': cannot read"),
    (["broken.yaml"], "broken.yaml: line 2: 'broken.yaml': is not valid YAML"),
    (["good.yaml", "--set", "schedule.pct_start=1.5"], "good.yaml: schedule.pct_start: 1.5: "),
    (["good.yaml", "--set", "schedule.kind=triangle"], "good.yaml: schedule.kind: 'triangle': "),
])
def test_subprocess_exits_2_with_one_line(tmp_path, args, needle):
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(GOOD))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    proc = cadence("plan", *args, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    line = assert_one_line(proc.stderr, needle)
    assert line.startswith("cadence: error: ")


def test_subprocess_good_recipe_exits_0(tmp_path):
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(GOOD))
    proc = cadence("plan", "good.yaml", "--csv", "plan.csv", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "plan.csv").read_text().splitlines()
    # 2 epochs of 100 steps (1000 / 10), then 2 epochs of 25 (500 / 20)
    assert len(rows) == 1 + 250
    assert rows[0] == "step,stage,epoch,resolution,batch_size,samples_seen,lr,momentum"
    assert rows[-1].startswith("249,1,3,48,20,3000,")


@pytest.mark.parametrize("args,needle", [
    (["train", "good.yaml", "--max-steps", "-3"], "--max-steps: -3: must be >= 1"),
    (["eval", "somewhere", "--resolution", "0"], "--resolution: 0: must be 8 .. 65536 px"),
    (["eval", "somewhere", "--resolution", "16", "4"], "--resolution: 4: must be 8 .. 65536 px"),
    (["eval", "somewhere", "--resolution", "70000"], "--resolution: 70000: must be 8 .. 65536 px"),
    (["eval", "somewhere", "--resolution", "16", "16"], "--resolution: [16, 16]: gives a resolution twice"),
    (["prepare", "good.yaml", "--out", "copy"], "good.yaml: data.source: "),
])
def test_bad_command_line_values_exit_2_and_write_nothing(tmp_path, capsys, monkeypatch, args, needle):
    from cadence import cli

    (tmp_path / "good.yaml").write_text(yaml.safe_dump(GOOD))
    before = sorted(os.listdir(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    assert_one_line(capsys.readouterr().err, needle)
    assert sorted(os.listdir(tmp_path)) == before
