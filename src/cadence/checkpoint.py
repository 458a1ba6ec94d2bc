"""Checkpoints that hold everything needed to resume bit for bit, written atomically."""

from __future__ import annotations

import random

import numpy as np
import torch

from cadence import files
from cadence.errors import FieldError
from cadence.rundir import RunDir


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with ``weights_only=True``)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj: dict, path: str) -> None:
    """``torch.save`` to ``path`` with :func:`cadence.files.write_atomic` (fsynced, renamed, folder
    fsynced): a crash at any moment leaves the previous checkpoint or the new one, never half of one. A
    failed write (disk full, no permission) raises ``OSError`` naming ``path``, the previous file intact."""
    files.write_atomic(path, lambda f: torch.save(obj, f))


def load(path: str, map_location="cpu") -> dict:
    """Load with ``weights_only=True``: tensors and plain values only, so no pickled code runs.
    A file that needs more (or is not a checkpoint) raises FieldError (exit 2) with the reason."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FieldError("(checkpoint)", path, "no such file") from None
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError for a damaged zip)
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        reason = next((l for l in lines if "Unsupported global" in l), lines[0])[:200]
        raise FieldError("(checkpoint)", path, f"refused: not a weights-only checkpoint ({reason})") from None


def export(run_dir: str, out: str | None = None) -> tuple[str, dict[str, str]]:
    """The model weights of ``run_dir``'s last checkpoint as a safetensors file (default
    ``RUN_DIR/model.safetensors``, written atomically), with the recipe's name, the architecture, the
    step, the last held-out top-1 (and its step) and the whole recipe (YAML) as metadata.
    Returns the path and the metadata; a folder without a checkpoint raises FieldError."""
    import yaml
    from safetensors.torch import save

    run = RunDir(run_dir)
    if not run.has_checkpoint():
        raise FieldError("RUN_DIR", run_dir, "holds no checkpoints/last.pt")
    state = load(run.last)
    recipe = state.get("recipe") or {}
    meta = {"format": "cadence", "name": str(recipe.get("name")), "step": str(state["step"]),
            "arch": str((recipe.get("model") or {}).get("arch", "fastnet")),
            "recipe": yaml.safe_dump(recipe, sort_keys=False)}
    if state.get("evals"):
        meta.update(val_top1=repr(state["evals"][-1]["val_top1"]), val_step=str(state["evals"][-1]["step"]))
    tensors = {k: v.detach().clone().contiguous() for k, v in state["model"].items()}  # no shared storage
    out = out or run.file("model.safetensors")
    files.write_atomic(out, lambda f: f.write(save(tensors, metadata=meta)))
    return out, meta
