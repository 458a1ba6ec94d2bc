"""Pictures and the HTML report: matplotlib (Agg) figures of plans, training curves and comparisons."""

from __future__ import annotations

import csv
import html
import io
import base64
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cadence.plan import Timeline  # noqa: E402

STAGE_COLOR = "0.55"


def _wide_range(values) -> bool:
    """More than two decades between the smallest positive value and the largest."""
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) / min(positive) > 100


def _mark_stages(ax, bounds, labels=None, top=False) -> None:
    for i, x in enumerate(bounds):
        ax.axvline(x, color=STAGE_COLOR, linestyle="--", linewidth=0.8, zorder=0)
        if top and labels:
            ax.annotate(labels[i], (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", va="top", fontsize=7, color="0.3")


def plot_plan(timeline: Timeline, path: str, title: str = "") -> None:
    """LR, momentum, resolution and batch size against optimizer steps (left) and epochs (right),
    with stage boundaries dashed and labelled."""
    t = timeline
    steps = list(range(len(t)))
    epochs = t.epoch_progress
    starts = t.stage_starts[:-1]
    short = [f"S{k}" for k in range(len(starts))]
    labels = [f"S{k}: {t.resolution[a]}px, batch {t.batch_size[a]}" for k, a in enumerate(starts)]
    rows = [("lr", t.lr, "LR")]
    if _wide_range(t.lr):  # a log copy shows warmup starts and floors that the linear one flattens
        rows.append(("lr_log", t.lr, "LR (log scale)"))
    rows += [("momentum", t.momentum, "momentum / beta1"), ("resolution", t.resolution, "resolution (px)"),
             ("batch", t.batch_size, "global batch (images)")]
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 2.1 * len(rows) + 1), sharex="col",
                             constrained_layout=True, squeeze=False)
    for r, (name, ys, ylabel) in enumerate(rows):
        for c, (xs, bounds) in enumerate([(steps, starts), (epochs, [epochs[a] for a in starts])]):
            ax = axes[r][c]
            step_like = name in ("resolution", "batch")
            (ax.step if step_like else ax.plot)(xs, ys, linewidth=1.4, **({"where": "post"} if step_like else {}))
            if name == "lr_log":
                ax.set_yscale("log")
            _mark_stages(ax, bounds, labels if c else short, top=r == 0)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    axes[-1][1].set_xlabel("epoch")
    fig.suptitle(title or "training plan")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plan_csv(timeline: Timeline, path: str) -> None:
    """One row per optimizer step: ``step,stage,epoch,resolution,batch_size,samples_seen,lr,momentum``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Timeline.CSV_COLUMNS)
        for row in timeline.rows():
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])


def read_plan_csv(path: str) -> dict[str, list]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) if k in ("lr", "momentum") else int(r[k]) for r in rows]
            for k in Timeline.CSV_COLUMNS}


def plan_table(timeline: Timeline) -> str:
    """Per-stage summary, as printed by ``cadence plan``."""
    head = ("stage", "res", "batch", "data", "epochs", "steps", "samples", "lr min", "lr max")
    lines = [head]
    total_steps = total_samples = 0
    for s in timeline.stage_summary():
        lines.append((str(s["stage"]), f"{s['resolution']}px", str(s["batch_size"]),
                      f"{s['data_fraction']:g}", str(s["epochs"]),
                      f"{s['steps']:,}", f"{s['samples']:,}", f"{s['lr_min']:.4g}", f"{s['lr_max']:.4g}"))
        total_steps += s["steps"]
        total_samples += s["samples"]
    lines.append(("total", "", "", "", str(timeline.epoch[-1] + 1), f"{total_steps:,}", f"{total_samples:,}",
                  f"{min(timeline.lr):.4g}", f"{max(timeline.lr):.4g}"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]])
