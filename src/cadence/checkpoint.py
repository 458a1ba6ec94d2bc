"""Checkpoints that hold everything needed to resume bit for bit, written atomically."""

from __future__ import annotations

import errno
import os
import random
import tempfile

import numpy as np
import torch

from cadence.errors import FieldError


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


TMP_PREFIX = ".tmp-"  # save_atomic's temporary files; a kill mid-write can leave one
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # (read once: files written atomically get the usual 0o666 & ~umask, not mkstemp's 0o600)


def save_atomic(obj: dict, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync it, rename it over ``path`` and fsync
    the folder: a crash at any moment leaves the previous file or the new one, never half of one, and
    the previous one stays until the new one is complete on disk. A failed write (disk full, no
    permission) raises ``OSError`` naming ``path``, with the previous file untouched."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str) -> None:
    """``text`` (UTF-8) to ``path`` the way ``save_atomic`` writes checkpoints."""
    _write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_atomic(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=folder)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(folder)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that can't sync folders
            raise
    finally:
        os.close(fd)


def remove_partial(folder: str) -> list[str]:
    """Delete what a killed ``save_atomic`` left behind in ``folder`` (``.tmp-*`` files, never
    complete checkpoints); returns their names."""
    if not os.path.isdir(folder):
        return []
    left = sorted(f for f in os.listdir(folder) if f.startswith(TMP_PREFIX))
    for name in left:
        os.unlink(os.path.join(folder, name))
    return left


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

    last = os.path.join(run_dir, "checkpoints", "last.pt")
    if not os.path.exists(last):
        raise FieldError("RUN_DIR", run_dir, "holds no checkpoints/last.pt")
    state = load(last)
    recipe = state.get("recipe") or {}
    meta = {"format": "cadence", "name": str(recipe.get("name")), "step": str(state["step"]),
            "arch": str((recipe.get("model") or {}).get("arch", "fastnet")),
            "recipe": yaml.safe_dump(recipe, sort_keys=False)}
    if state.get("evals"):
        meta.update(val_top1=repr(state["evals"][-1]["val_top1"]), val_step=str(state["evals"][-1]["step"]))
    tensors = {k: v.detach().clone().contiguous() for k, v in state["model"].items()}  # no shared storage
    out = out or os.path.join(run_dir, "model.safetensors")
    _write_atomic(out, lambda f: f.write(save(tensors, metadata=meta)))
    return out, meta
