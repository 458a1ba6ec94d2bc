"""Markdown tables (and the claims' numbers) from the schedule study's summary.json files.

    python benchmarks/study_table.py runs/study/short runs/study/long
"""

from __future__ import annotations

import json
import os
import sys


def table(folder: str) -> str:
    with open(os.path.join(folder, "summary.json")) as f:
        s = json.load(f)
    base = s.pop("_baseline", None)
    thresholds = [t for t, _ in next(iter(s.values()))["reach"] if base is None or t != base["top1"]]
    head = "| recipe | seeds | final top-1 % (mean +- std) | per seed | training time (s) | " + \
        " | ".join(f"time to {100 * t:g}% (s)" for t in thresholds) + \
        (f" | time to baseline's {100 * base['top1']:.2f}% (ratio)" if base else "") + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in sorted(s.items(), key=lambda kv: -kv[1]["top1_mean"]):
        reach = dict((t, v) for t, v in r["reach"])
        cells = [name, str(r["n"]), f"{100 * r['top1_mean']:.2f} +- {100 * r['top1_std']:.2f}",
                 " / ".join(f"{100 * v:.2f}" for v in r["finals"]), f"{r['time_mean']:.0f}"]
        cells += ["-" if reach[t] is None else f"{reach[t]:.0f}" for t in thresholds]
        if base:
            ratio = base["ratios"][name]
            cells.append("never" if ratio is None else f"{reach[base['top1']]:.0f} ({ratio:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(f"**{os.path.basename(os.path.normpath(folder))}** ({folder})\n")
        print(table(folder) + "\n")
