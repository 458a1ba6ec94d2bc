"""The layering docs/architecture.md promises: no import cycle, no private names imported across
modules, and a recipe layer that never loads torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for folder, _, names in os.walk(os.path.join(SRC, "cadence")):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[mod] = ast.parse(open(path).read())
    return out


def _imports(mods: dict[str, ast.Module]) -> dict[str, set[tuple[str, str]]]:
    """Module -> {(imported module, name)}, lazy imports inside functions included."""
    out = {}
    for mod, tree in mods.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cadence"):
                found |= {(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module, a.name)
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {(a.name, "") for a in node.names if a.name.startswith("cadence")}
        out[mod] = found
    return out


def test_no_module_imports_another_modules_private_names():
    mods = _modules()
    private = [(mod, src, name) for mod, found in _imports(mods).items() for src, name in found
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_there_is_no_import_cycle_even_through_lazy_imports():
    mods = _modules()
    edges = {mod: {src for src, _ in found if src in mods and src != mod} for mod, found in _imports(mods).items()}
    # a package's __init__ importing its own submodules is not a cycle
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_the_recipe_layer_and_the_plan_command_never_load_torch():
    """(Unless a recipe sets parameter groups: plan checks them on its model, built on the meta device.)"""
    recipe = os.path.join(os.path.dirname(SRC), "recipes", "imagenet-resnet50-progressive.yaml")
    code = ("import sys, contextlib, io; import cadence.recipe, cadence.plan, cadence.schedules, cadence.changes, "
            "cadence.rundir, cadence.files, cadence.smoothing; from cadence import cli\n"
            f"with contextlib.redirect_stdout(io.StringIO()): assert cli.main(['plan', {recipe!r}]) == 0\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
