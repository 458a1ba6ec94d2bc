"""Optional experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow
(``train.loggers: [wandb, mlflow]``, extras ``pip install 'cadence[wandb]'`` / ``'cadence[mlflow]'``).

Each gets every row ``metrics.jsonl`` gets (numbers only), keyed by the optimizer step, and the
recipe as its config. A run's tracker id is kept in the run folder, so a resumed run (or a launch
run again) logs into the same tracked run. Torch-free; the trackers are imported when a run starts.
"""

from __future__ import annotations

import os
import secrets

from cadence.errors import FieldError
from cadence.rundir import RunDir

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # logger -> module (and pip extra)


def check(names: list[str]) -> None:
    """FieldError (one line) for a logger whose package is not installed: before anything is written."""
    for name in names:
        _module(name)


def _module(name: str):
    try:
        return __import__(EXTRAS[name])
    except ImportError:
        raise FieldError("train.loggers", name, f"needs {EXTRAS[name]}, an optional extra: "
                         f"pip install 'cadence[{name}]'") from None


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Wandb:
    """A W&B run (project ``$WANDB_PROJECT``, default ``cadence``), its id kept in ``.wandb-id``;
    ``WANDB_MODE=offline`` works as usual."""

    def __init__(self, run: RunDir, name: str, config: dict):
        wandb = _module("wandb")
        id_file = run.file(".wandb-id")
        run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cadence"), name=name, id=run_id,
                              resume="allow", config=config, dir=run.path)
        with open(id_file, "w") as f:
            f.write(run_id + "\n")

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Mlflow:
    """An MLflow run, in ``$MLFLOW_TRACKING_URI`` or else the run folder's ``mlruns/``; its id kept in
    ``.mlflow-id``; the recipe's keys as parameters."""

    def __init__(self, run: RunDir, name: str, config: dict):
        mlflow = _module("mlflow")
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder (MLflow 3 asks to opt in)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri("file:" + os.path.abspath(run.file("mlruns")))
        id_file = run.file(".mlflow-id")
        if os.path.exists(id_file):
            self.run = mlflow.start_run(run_id=open(id_file).read().strip())
        else:
            self.run = mlflow.start_run(run_name=name)
            mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
            with open(id_file, "w") as f:
                f.write(self.run.info.run_id + "\n")

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(_numbers(row), step=row["step"])

    def close(self) -> None:
        self.mlflow.end_run()


def start(names: list[str], run: RunDir, name: str, config: dict) -> list:
    """The trackers a recipe asks for, started (or continued) for this run."""
    return [{"wandb": Wandb, "mlflow": Mlflow}[n](run, name, config) for n in names]
