"""Checkpoints that hold everything needed to resume bit for bit, written atomically."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re

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


CHECKSUM = "checksum"  # the state's key holding digest(state without it)
# what a cadence checkpoint holds at least, and of which type (anything else is refused on load)
REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "step": int, "rng": dict,
            "recipe": dict, "evals": list, "elapsed": (int, float)}


def digest(obj) -> str:
    """A BLAKE2b digest of a state: every tensor's dtype, shape and bytes and every plain value, walked
    in a fixed order. A flipped byte anywhere in the data changes it."""
    h = hashlib.blake2b(digest_size=20)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[" if isinstance(x, list) else b"(")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def save_atomic(obj: dict, path: str) -> None:
    """``torch.save`` of ``obj`` and its :func:`digest` to ``path``, with
    :func:`cadence.files.write_atomic` (fsynced, renamed, folder fsynced): a crash at any moment leaves
    the previous checkpoint or the new one, never half of one. The state is serialised in memory first,
    so a full disk fails in a plain ``write`` (``OSError`` ENOSPC naming ``path``, the previous file
    intact), not inside torch's zip writer."""
    buf = io.BytesIO()
    torch.save({**obj, CHECKSUM: digest(obj)}, buf)
    files.write_atomic(path, lambda f: f.write(buf.getbuffer()))


def _refusal(e: Exception) -> str:
    """Why torch would not load a file, in one line, without its advice to turn the protection off."""
    text = " ".join(str(e).split())
    blocked = re.search(r"GLOBAL ([\w.]+)", text)
    if blocked:
        return (f"refused: it would import {blocked.group(1)} to load (code, not data); a cadence checkpoint "
                "holds only tensors and plain values")
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return f"refused: not a readable checkpoint ({first[:160]})"


def load(path: str, map_location="cpu") -> dict:
    """A cadence checkpoint, loaded with ``weights_only=True`` (tensors and plain values only, so no
    pickled code runs) and checked: a regular file (not a FIFO, device or dangling link), the keys and
    types of a cadence state, its digest (a damaged byte is caught), finite model weights. Anything
    else raises FieldError (exit 2) naming the file and the reason."""
    if not os.path.isfile(path):
        why = "no such file" if not os.path.lexists(path) else "not a regular file"
        raise FieldError("(checkpoint)", path, why)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError for a damaged zip)
        raise FieldError("(checkpoint)", path, _refusal(e)) from None
    if not isinstance(state, dict):
        raise FieldError("(checkpoint)", path, f"is not a cadence checkpoint (it holds a {type(state).__name__})")
    for key, kind in REQUIRED.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            got = type(state[key]).__name__ if key in state else "nothing"
            raise FieldError("(checkpoint)", path, f"is not a cadence checkpoint: '{key}' holds {got}")
    if (state["step"] < 0 or not all(isinstance(v, torch.Tensor) for v in state["model"].values())
            or not isinstance(state["rng"].get("torch"), torch.Tensor)
            or not all(isinstance(e, dict) and isinstance(e.get("step"), int) and "val_top1" in e for e in state["evals"])):
        raise FieldError("(checkpoint)", path, "is not a cadence checkpoint: a negative step, non-tensor weights, "
                         "no RNG state or malformed evaluations")
    saved = state.pop(CHECKSUM, None)
    if saved is not None and saved != digest(state):
        raise FieldError("(checkpoint)", path, "is damaged: its contents do not match the checksum written "
                         "with it (restore it from a backup, or start a new run)")
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FieldError("(checkpoint)", path, f"holds non-finite weights ({bad[0]}{' and more' if bad[1:] else ''})")
    return state


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
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isfile(out)):
        raise FieldError("--out", out, "is not a regular file (a link, a folder, a device or a FIFO): export "
                         "replaces only regular files")
    files.write_atomic(out, lambda f: f.write(save(tensors, metadata=meta)))
    return out, meta
