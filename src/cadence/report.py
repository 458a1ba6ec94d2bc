"""Pictures and the HTML report: matplotlib (Agg) figures of plans, training curves and comparisons."""

from __future__ import annotations

import csv
import html
import base64
import json
import math
import os

import numpy as np

from cadence.files import write_text_atomic
from cadence import regularization
from cadence.plan import Timeline, ema_horizon_start, final_decay_start
from cadence.rundir import RunDir, read_metrics
from cadence.smoothing import smooth

STAGE_COLOR = "0.55"
LABEL_SIZE = 7  # points: the stage labels
PLOT_POINTS = 20_000  # a longer plan is drawn through this many of its steps (each bucket's LR extremes)


def _figure(nrows: int, ncols: int, figsize: tuple[float, float], title: str = "", titled: bool = False, **kw):
    """A matplotlib ``Figure`` and its ``subplots`` with fixed margins in inches: room for two-line y
    labels beside each column, x labels below (the columns share x, so only the bottom row's ticks are
    labelled), ``title`` above and each axes' own title if ``titled``. Constrained layout would fit
    them to the tick labels, but it measures every one by drawing the picture once more: about half of
    a plan picture's CPU. (A Figure of its own, not pyplot's: no global state or backend is touched,
    and nothing needs closing; PNG is drawn by Agg. Imported here: ``cadence plan`` without a picture
    does not pay for matplotlib.)"""
    from matplotlib.figure import Figure

    w, h = figsize
    left, right, gap, bottom = 1.0, 0.2, 1.05, 0.55
    top = (0.5 if title else 0.15) + (0.3 if titled else 0)
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, **kw)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=gap / ((w - left - right - gap * (ncols - 1)) / ncols),
                        hspace=0.18 / ((h - top - bottom - 0.18 * (nrows - 1)) / nrows))
    if title:
        fig.suptitle(title)
    return fig, axes


def plot_steps(t: Timeline, limit: int = PLOT_POINTS) -> np.ndarray:
    """The steps a picture of ``t`` draws: all of them, or for a longer plan the first and last step
    of each stage and, in ``limit / 2`` equal buckets of steps, the one with the lowest and the one with
    the highest LR (momentum moves with it): the curve's envelope and every stage change survive."""
    n = len(t)
    if n <= limit:
        return np.arange(n)
    k = -(-n // (limit // 2))
    lr = np.concatenate([t.lr.array, np.full(-n % k, np.nan)]).reshape(-1, k)
    base = np.arange(0, n, k)
    ends = np.array(t.stage_starts[:-1] + [s - 1 for s in t.stage_starts[1:]])
    picks = [base + np.nanargmin(lr, axis=1), base + np.nanargmax(lr, axis=1), ends]
    return np.unique(np.concatenate(picks))


def _wide_range(values) -> bool:
    """More than two decades between the smallest positive value and the largest."""
    positive = np.asarray(values)[np.asarray(values) > 0]
    return bool(len(positive)) and positive.max() / positive.min() > 100


def _mark_stages(ax, bounds, labels=None, top=False) -> None:
    """Stage boundaries dashed; on the ``top`` row each labelled beside its line, a line of text lower
    where it would run into an earlier label (a stage short on this axis, e.g. in wall time)."""
    for x in bounds:
        ax.axvline(x, color=STAGE_COLOR, linestyle="--", linewidth=0.8, zorder=0)
    if not (top and labels):
        return
    lo, hi = ax.get_xlim()
    points = ax.get_position().width * ax.figure.get_figwidth() * 72  # the axes' width
    ends: list[float] = []  # where the last label of each line of text ends (axes fraction)
    for x, label in zip(bounds, labels):
        at = (x - lo) / (hi - lo)
        line = next((i for i, end in enumerate(ends) if end < at), len(ends))
        ends[line:line + 1] = [at + (3 + LABEL_SIZE * 0.62 * len(label)) / points]  # ~0.62 em a character
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3 - 1.25 * LABEL_SIZE * line),
                    textcoords="offset points", va="top", fontsize=LABEL_SIZE, color="0.3")


def plot_plan(timeline: Timeline, path: str, title: str = "") -> None:
    """LR, momentum, resolution and batch size against optimizer steps (left) and epochs (right),
    with stage boundaries dashed and labelled."""
    t = timeline
    steps = plot_steps(t)  # every step, or a long plan's envelope
    epochs = t.epoch_progress.array[steps]
    starts = t.stage_starts[:-1]
    short = [f"S{k}" for k in range(len(starts))]
    labels = [f"S{k}: {t.resolution[a]}px, batch {t.batch_size[a]}" for k, a in enumerate(starts)]
    lr = t.lr.array[steps]
    rows = [("lr", lr, "LR")]
    if _wide_range(lr):  # a log copy shows warmup starts and floors that the linear one flattens
        rows.append(("lr_log", lr, "LR (log scale)"))
    rows += [("momentum", t.momentum.array[steps], "momentum / beta1"),
             ("resolution", t.resolution.array[steps], "resolution (px)"),
             ("batch", t.batch_size.array[steps], "global batch (images)")]
    keys = regularization.set_keys(t.regularization)
    if keys:
        rows.append(("regularization", None, "regularization\n(share of its largest value)"))
    fig, axes = _figure(len(rows), 2, (12, 2.1 * len(rows) + 1), title or "training plan", sharex="col",
                        squeeze=False)
    for r, (name, ys, ylabel) in enumerate(rows):
        for c, (xs, bounds) in enumerate([(steps, starts), (epochs, [t.epoch_progress[a] for a in starts])]):
            ax = axes[r][c]
            h = ema_horizon_start(t)
            if h is not None and name.startswith("lr"):
                ax.axvspan(t.epoch_progress[h] if c else h, xs[-1], color="C2", alpha=0.12, zorder=0,
                           label="half the final EMA's weight" + (" (past the LR decay)" if h < final_decay_start(t)
                                                                  else ""))
                if r == 0:
                    ax.legend(loc="upper right", fontsize=7)
            step_like = name in ("resolution", "batch")
            if name == "regularization":
                _plot_regularization(ax, t, keys, xs, steps)
            else:
                (ax.step if step_like else ax.plot)(xs, ys, linewidth=1.4, **({"where": "post"} if step_like else {}))
            if name == "lr_log":
                ax.set_yscale("log")
            _mark_stages(ax, bounds, labels if c else short, top=r == 0)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    axes[-1][1].set_xlabel("epoch")
    fig.savefig(path, dpi=110)


def _plot_regularization(ax, t: Timeline, keys: list[str], xs, steps: np.ndarray) -> None:
    """Each regularization key the recipe sets, at each drawn step, as a share of its largest value
    over the run (the legend gives the values; a policy is drawn as 0 or 1 and named)."""
    for i, name in enumerate(keys):
        per_stage = np.array([regularization.numeric(name, getattr(r, name)) for r in t.regularization], float)
        top = per_stage.max() or 1.0
        shown = list(dict.fromkeys(regularization.describe(name, getattr(r, name)) for r in t.regularization))
        ax.step(xs, per_stage[t.stage.array[steps]] / top, where="post", linewidth=1.4, color=f"C{i % 10}",
                label=f"{name}: {' / '.join(shown)}")
    ax.set_ylim(-0.05, 1.1)
    ax.legend(loc="lower right", fontsize=7, ncol=2)


def _regularization_columns(timeline: Timeline) -> list[str]:
    return regularization.set_keys(timeline.regularization) if timeline.regularization else []


def write_plan_csv(timeline: Timeline, path: str) -> None:
    """One row per optimizer step: ``step,stage,epoch,resolution,batch_size,samples_seen,lr,momentum``,
    then a column per regularization key the recipe sets (its value at that step), then the weight
    EMA's decay (``ema_decay``) if the recipe averages."""
    keys = _regularization_columns(timeline)
    values = [[regularization.describe(k, getattr(r, k)) for k in keys] for r in timeline.regularization]
    ema = timeline.ema_decay
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(Timeline.CSV_COLUMNS + tuple(keys) + (("ema_decay",) if ema else ()))
        for row in timeline.rows():
            w.writerow([repr(v) if isinstance(v, float) else v for v in row] + (values[row[1]] if keys else [])
                       + ([repr(ema[row[0]])] if ema else []))


def read_plan_csv(path: str) -> dict[str, list]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) if k in ("lr", "momentum") else int(r[k]) for r in rows]
            for k in Timeline.CSV_COLUMNS}


def plan_table(timeline: Timeline) -> str:
    """Per-stage summary, as printed by ``cadence plan``: a column per regularization key that changes
    between stages, and a line for those set to one value throughout."""
    regs = timeline.regularization
    varying = regularization.varying(regs) if regs else []
    head = ("stage", "res", "batch", "data", "epochs", "steps", "samples", "lr min", "lr max") + tuple(varying)
    lines = [head]
    total_steps = total_samples = 0
    for s in timeline.stage_summary():
        lines.append((str(s["stage"]), f"{s['resolution']}px", str(s["batch_size"]),
                      f"{s['data_fraction']:g}", str(s["epochs"]),
                      f"{s['steps']:,}", f"{s['samples']:,}", f"{s['lr_min']:.4g}", f"{s['lr_max']:.4g}")
                     + tuple(regularization.describe(k, getattr(regs[s["stage"]], k)) for k in varying))
        total_steps += s["steps"]
        total_samples += s["samples"]
    lines.append(("total", "", "", "", str(timeline.epoch[-1] + 1), f"{total_steps:,}", f"{total_samples:,}",
                  f"{min(timeline.lr):.4g}", f"{max(timeline.lr):.4g}") + ("",) * len(varying))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.rjust(w) for c, w in zip(row, widths))  # noqa: E731
    out = [fmt(lines[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines[1:]]
    constant = [k for k in _regularization_columns(timeline) if k not in varying]
    if constant:
        out.append("every stage: " + ", ".join(f"{k} {regularization.describe(k, getattr(regs[0], k))}"
                                               for k in constant))
    if (note := ema_note(timeline)) is not None:
        out.append(note)
    return "\n".join(out)


def training_lines(recipe) -> list[str]:
    """What ``cadence plan`` says beside the table about the optimizer, its parameter groups, lookahead
    and test-time augmentation: the keys a plan's curves do not show."""
    o, tr = recipe.optimizer, recipe.train
    opt = f"optimizer: {o.name}" + (" nesterov" if o.nesterov and o.name == "sgd" else "")
    opt += f", weight decay {o.weight_decay:.4g}" + ("" if o.decay_norm_and_bias else " (not on norms and biases)")
    groups = []
    for kind, g in o.groups.set().items():
        what = ["frozen"] if g.frozen else [f"lr x{g.lr:g}"] if g.lr != 1 else []
        what += [f"for the first {g.epochs} epoch(s)"] if g.epochs else []
        what += [f"weight decay {g.weight_decay:.4g}"] if g.weight_decay is not None else []
        groups.append(f"{kind} " + ", ".join(what or ["as the rest"]))
    lines = [opt] + (["parameter groups: " + "; ".join(groups)] if groups else [])
    if (la := tr.lookahead) is not None:
        lines.append(f"lookahead: every {la.every} steps the weights move to their average, "
                     f"decay {la.decay:.4g} x progress^{la.power:g}")
    if tr.tta != "none":
        lines.append(f"evaluation: test-time augmentation {tr.tta} ({6 if tr.tta == 'flip-translate' else 2} views)")
    return lines


def ema_note(t: Timeline) -> str | None:
    """One line on the weight EMA: its decay and how far back the final average reaches, marked when
    that is before the final LR decay begins (the average then still holds weights from before it)."""
    h = ema_horizon_start(t)
    if h is None:
        return None
    lo, hi = min(t.ema_decay), max(t.ema_decay)
    decay = f"{lo:.6g}" if lo == hi else f"{lo:.6g} to {hi:.6g}"
    back = t.samples_seen[-1] - t.samples_seen[h]
    line = f"weight EMA: decay {decay} per step; the final average takes half its weight from the last " \
           f"{len(t) - h:,} steps ({back:,} images)"
    d = final_decay_start(t)
    if h < d:
        line += (f" -- PAST the final LR decay (from step {d:,}): the averaged weights reach back before the LR "
                 "fell (a shorter half-life, or a later EMA, keeps them after it)")
    return line


# ---------------------------------------------------------------------------------------------
# After training: curves and the HTML report


def plot_curves(rows: list[dict], path: str, title: str = "") -> None:
    """Training loss, held-out top-1, LR and (if logged) the gradient norm against optimizer steps
    (left) and wall time (right), with stage boundaries dashed."""
    train = [r for r in rows if "loss" in r and "val_top1" not in r and math.isfinite(r["loss"])]  # not skipped
    evals = [r for r in rows if "val_top1" in r]
    starts = [r for i, r in enumerate(train) if i == 0 or r["stage"] != train[i - 1]["stage"]]
    norms = [r for r in train if "grad_norm" in r]
    fig, axes = _figure(4 if norms else 3, 2, (12, 10.5 if norms else 8), title or "training curves", sharex="col")
    for c, key in enumerate(("step", "time")):
        ax = axes[0][c]
        xs = [r[key] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(xs, losses, color="C0", alpha=0.25, linewidth=0.8, label="per step")
        ax.plot(xs, smooth(losses), color="C0", linewidth=1.5, label="smoothed")
        ax.set_ylabel("training loss")
        ax.legend(loc="upper right", fontsize=8)
        ax = axes[1][c]
        ax.plot([r[key] for r in evals], [100 * r["val_top1"] for r in evals], "o-", color="C2", label="top-1")
        if any("val_top5" in r for r in evals):
            ax.plot([r[key] for r in evals], [100 * r.get("val_top5", float("nan")) for r in evals], "s--",
                    color="C1", label="top-5")
        ax.set_ylabel("held-out accuracy (%)")
        ax.legend(loc="lower right", fontsize=8)
        ax = axes[2][c]
        ax.plot(xs, [r["lr"] for r in train], color="C3")
        if _wide_range([r["lr"] for r in train]):
            ax.set_yscale("log")
        ax.set_ylabel("LR")
        if norms:
            ax = axes[3][c]
            ax.plot([r[key] for r in norms], [r["grad_norm"] for r in norms], color="C4", alpha=0.35, linewidth=0.8)
            ax.plot([r[key] for r in norms], smooth([r["grad_norm"] for r in norms]), color="C4", linewidth=1.4)
            if _wide_range([r["grad_norm"] for r in norms]):
                ax.set_yscale("log")
            ax.set_ylabel("gradient norm\n(before clipping)")
        for i, row in enumerate(axes):
            _mark_stages(row[c], [r[key] for r in starts],
                         [f"S{r['stage']}: {r.get('resolution', '')}px" for r in starts], top=i == 0)
            row[c].grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimizer step")
    axes[-1][1].set_xlabel("training wall time (s)")
    fig.savefig(path, dpi=110)


def _img_tag(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def write_run_report(run_dir: str) -> str:
    """``curves.png`` and a self-contained ``report.html`` (plan, curves, final numbers, recipe)."""
    import yaml

    run = RunDir(run_dir)
    rows = read_metrics(run)
    with open(run.recipe) as f:
        recipe_text = f.read()
    name = (yaml.safe_load(recipe_text) or {}).get("name", os.path.basename(run.path))
    plot_curves(rows, run.file("curves.png"), title=name)
    evals = [r for r in rows if "val_top1" in r]
    train = [r for r in rows if "val_top1" not in r]
    facts = []
    if evals:
        last = evals[-1]
        facts.append(("held-out top-1", f"{100 * last['val_top1']:.2f}% at {last.get('resolution', '?')}px"))
        if "val_top5" in last:
            facts.append(("held-out top-5", f"{100 * last['val_top5']:.2f}%"))
        facts.append(("held-out loss", f"{last['val_loss']:.4f}"))
    if train:
        facts += [("optimizer steps", f"{train[-1]['step'] + 1:,}"),
                  ("images seen", f"{train[-1]['samples_seen']:,}"),
                  ("training time", f"{train[-1]['time']:.1f} s")]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts)
    evals_table = "".join(
        f"<tr><td>{r['step']}</td><td>{r['stage']}</td><td>{r['epoch']}</td>"
        f"<td>{100 * r['val_top1']:.2f}</td><td>{r['val_loss']:.4f}</td></tr>" for r in evals)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}th{{text-align:left;padding-right:2em}}
td{{padding-right:2em}}pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>{html.escape(name)}</h1><table>{table}</table>
<h2>Plan</h2>{_img_tag(run.file("plan.png"))}
<h2>Training curves</h2>{_img_tag(run.file("curves.png"))}
<h2>Evaluations</h2><table><tr><th>step</th><th>stage</th><th>epoch</th><th>top-1 %</th><th>loss</th></tr>
{evals_table}</table>
<h2>Recipe</h2><pre>{html.escape(recipe_text)}</pre></body></html>"""
    path = run.file("report.html")
    write_text_atomic(page, path)
    return path


# ---------------------------------------------------------------------------------------------
# Comparisons


def plot_plans_overlay(timelines: dict[str, Timeline], path: str) -> None:
    """LR, momentum, resolution and batch size of several plans, against epochs and images seen."""
    rows = [("LR", "lr"), ("momentum / beta1", "momentum"), ("resolution (px)", "resolution"),
            ("global batch", "batch_size")]
    fig, axes = _figure(len(rows), 2, (12, 9), "plans compared", sharex="col")
    for i, (name, t) in enumerate(timelines.items()):
        steps = plot_steps(t)
        seen = (t.samples_seen.array - t.samples.array)[steps]  # images seen before each step
        for r, (label, key) in enumerate(rows):
            ys = getattr(t, key).array[steps]
            for c, xs in enumerate((t.epoch_progress.array[steps], seen)):
                draw = axes[r][c].step if key in ("resolution", "batch_size") else axes[r][c].plot
                draw(xs, ys, color=f"C{i}", linewidth=1.3, label=name if r == 0 and c == 0 else None,
                     **({"where": "post"} if key in ("resolution", "batch_size") else {}))
                axes[r][c].set_ylabel(label)
                axes[r][c].grid(alpha=0.3)
    if any(_wide_range(t.lr) for t in timelines.values()):
        for ax in axes[0]:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    axes[-1][0].set_xlabel("epoch")
    axes[-1][1].set_xlabel("images seen")
    fig.savefig(path, dpi=110)


def plot_recipe_change(old: Timeline, done: int, new: Timeline, at: dict[str, int], path: str) -> None:
    """The LR of a run's recipe and of the changed one, against images seen (left: ``keep-position``
    continues at the same count) and against the fraction of training (right: ``stretch`` continues at
    the same fraction); the dashed line is where the checkpoint is, the dots where each policy goes on."""
    fig, axes = _figure(1, 2, (12, 4), f"recipe changed at step {done:,} of {len(old):,}", titled=True)
    for c, (ax, policy) in enumerate(zip(axes, ("keep-position", "stretch"))):
        for i, (label, t) in enumerate((("run so far (old recipe)", old), ("new recipe", new))):
            steps = plot_steps(t)
            seen = t.samples_seen.array - t.samples.array  # images seen before each step
            xs = seen / t.samples_seen[-1] if c else seen
            ax.plot(xs[steps], t.lr.array[steps], color=f"C{i}", linewidth=1.3, label=label)
            k = at[policy] if t is new else done
            if k < len(t):
                ax.plot([xs[k]], [t.lr[k]], "o", color=f"C{i}", markersize=6)
        x = old.samples_seen[done - 1] if done else 0
        ax.axvline(x / old.samples_seen[-1] if c else x, color=STAGE_COLOR, linestyle="--", linewidth=0.9)
        ax.set_title(f"{policy}: continues at step {at[policy]:,} of {len(new):,}", fontsize=10)
        ax.set_xlabel("fraction of training (images)" if c else "images seen")
        ax.set_ylabel("LR")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def plot_runs_overlay(summary: dict[str, dict], path: str) -> None:
    """Held-out top-1 against training images seen and against training wall time, every seed drawn
    (images, not epochs: evaluations may fall mid-epoch, and budgets in a study are equal in images)."""
    fig, axes = _figure(1, 2, (12, 4.5))
    for i, (name, s) in enumerate(summary.items()):
        for j, rows in enumerate(s["runs"]):
            ev = [r for r in rows if "val_top1" in r]
            for c, key in enumerate(("samples_seen", "time")):
                axes[c].plot([r[key] for r in ev], [100 * r["val_top1"] for r in ev], "o-", color=f"C{i}",
                             markersize=3, alpha=0.8, label=name if j == 0 and c == 0 else None)
    axes[0].set_xlabel("training images seen")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("held-out top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_summary_json(summary: dict[str, dict], path: str, baseline: tuple[str, float] | None = None) -> None:
    """The comparison's numbers (no per-step rows) for scripts and RESULTS tables."""
    out = {name: {**{k: v for k, v in s.items() if k not in ("runs", "reach")},
                  "reach": [[t, v] for t, v in s["reach"].items()]}
           for name, s in summary.items()}
    if baseline is not None:
        name, target = baseline
        out["_baseline"] = {"name": name, "top1": target, "time": summary[name]["time_mean"],
                            "ratios": {k: (None if s["reach"][target] is None
                                           else s["reach"][target] / summary[name]["time_mean"])
                                       for k, s in summary.items()}}
    write_text_atomic(json.dumps(out, indent=1), path)


def write_compare_html(summary: dict[str, dict], out_dir: str, thresholds: tuple[float, ...] = (),
                       baseline: tuple[str, float] | None = None) -> str:
    """``compare.html``: the table (mean +- std over seeds), the winner and whether its lead exceeds
    the seed-to-seed spread, time to the baseline's final accuracy, and the figures in ``out_dir``."""
    ranked = sorted(summary.items(), key=lambda kv: -kv[1]["top1_mean"])
    head = "".join(f"<th>time to {100 * t:g}% (s)</th>" for t in thresholds)
    rows = ""
    for name, s in ranked:
        reach = "".join("<td>-</td>" if s["reach"][t] is None else f"<td>{s['reach'][t]:.1f}</td>"
                        for t in thresholds)
        rows += (f"<tr><td>{html.escape(name)}</td><td>{s['n']}</td><td>{100 * s['top1_mean']:.2f} "
                 f"&plusmn; {100 * s['top1_std']:.2f}</td><td>{s['time_mean']:.1f}</td>{reach}</tr>")
    verdict = ""
    if len(ranked) > 1:
        (w, a), (_, b) = ranked[0], ranked[1]
        lead, spread = a["top1_mean"] - b["top1_mean"], max(a["top1_std"], b["top1_std"])
        verdict = (f"<p>Winner: <b>{html.escape(w)}</b>, {100 * lead:.2f} points ahead of the next; "
                   + ("the lead exceeds the seed-to-seed spread" if lead > spread and a["n"] > 1 else
                      "the lead is <b>within</b> the seed-to-seed spread (or there is one seed)") + ".</p>")
    if baseline is not None:
        name, target = baseline
        base = summary[name]["time_mean"]
        items = "".join(f"<li>{html.escape(k)}: " + ("never" if s["reach"][target] is None else
                        f"{s['reach'][target]:.1f} s ({s['reach'][target] / base:.2f}x)") + "</li>"
                        for k, s in ranked)
        verdict += (f"<p>Time to reach the baseline <b>{html.escape(name)}</b>'s final top-1 "
                    f"({100 * target:.2f}%), as a ratio of its {base:.1f} s:</p><ul>{items}</ul>")
    figs = "".join(f"<h2>{t}</h2>{_img_tag(os.path.join(out_dir, f))}"
                   for t, f in (("Plans", "plans.png"), ("Held-out accuracy", "accuracy.png")))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>compare</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:0 1em}}</style>"
            f"</head><body><h1>Recipes compared</h1><table><tr><th>recipe</th><th>seeds</th>"
            f"<th>top-1 % (mean &plusmn; std)</th><th>time (s)</th>{head}</tr>{rows}</table>{verdict}{figs}</body></html>")
    path = os.path.join(out_dir, "compare.html")
    write_text_atomic(page, path)
    return path


# ---------------------------------------------------------------------------------------------
# The LR range test's curve


def write_range_csv(results: list, path: str) -> None:
    """One row per range-test step of each ``RangeResult``: stage, resolution, batch, step, LR, loss,
    smoothed loss."""
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["stage", "resolution", "batch_size", "step", "lr", "loss", "smoothed_loss"])
    for res in results:
        for i, (lr, loss, sm) in enumerate(zip(res.lrs, res.losses, res.smoothed)):
            w.writerow([res.stage, res.resolution, res.batch_size, i, repr(lr), repr(loss), repr(sm)])
    write_text_atomic(buf.getvalue(), path)


def plot_range_test(results: list, path: str, title: str = "") -> None:
    """Smoothed loss against LR (log axis), one curve per stage, the recommended LR marked."""
    fig, ax = _figure(1, 1, (8, 5), titled=True)
    for k, res in enumerate(results):
        color = f"C{k}"
        label = f"stage {res.stage}: {res.resolution}px, batch {res.batch_size}"
        ax.plot(res.lrs, res.losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(res.lrs, res.smoothed, color=color, linewidth=1.6, label=label)
        s = res.suggestions
        if s is not None:
            y = res.smoothed[min(range(len(res.lrs)), key=lambda i: abs(math.log(res.lrs[i] / s.recommended)))]
            ax.plot([s.recommended], [y], "o", color=color, markersize=8)
            ax.annotate(f"max_lr {s.recommended:.3g}", (s.recommended, y), xytext=(6, 6),
                        textcoords="offset points", color=color, fontsize=9)
            ax.axvline(s.steepest, color=color, linestyle=":", linewidth=0.8)
            ax.axvline(s.edge, color=color, linestyle="--", linewidth=0.8)
    finite = [v for res in results for v in res.smoothed if math.isfinite(v)]
    if finite:
        lo = min(finite)
        first = max(res.smoothed[0] for res in results if res.smoothed)
        ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed; raw faint)")
    ax.set_title(title or "LR range test")
    ax.text(0.01, 0.01, "dot: recommended max_lr; dashed: where the loss climbs away (10x the dot); "
            "dotted: steepest descent", transform=ax.transAxes, fontsize=8, color="0.35")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
