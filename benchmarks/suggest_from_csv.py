"""Print the range-test suggestions for saved ``lr_find.csv`` files (the rules are pure functions of
the curve, so this is what ``cadence find-lr`` prints for those runs).

    .venv/bin/python benchmarks/suggest_from_csv.py /tmp/cadence-bench-lr/*/lr_find.csv
"""

import csv
import math
import sys

from cadence.lr_finder import RangeTestError, smooth, suggest

for path in sys.argv[1:]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for stage in sorted({r["stage"] for r in rows}):
        part = [(float(r["lr"]), float(r["loss"])) for r in rows if r["stage"] == stage]
        finite = [(lr, loss) for lr, loss in part if math.isfinite(loss)]
        # as range_test does: finite losses only; it stopped at divergence on a non-finite loss or
        # once the smoothed loss passed 4x its best
        smoothed = smooth([loss for _, loss in finite])
        diverged = len(finite) < len(part) or bool(smoothed) and smoothed[-1] > 4 * min(smoothed)
        try:
            s = suggest([lr for lr, _ in finite], [loss for _, loss in finite], diverged=diverged)
            print(f"{path} stage {stage}: steepest {s.steepest:.3g}, minimum/10 {s.minimum_div_10:.3g}, "
                  f"valley {s.valley:.3g}, edge {s.edge:.3g}, recommended {s.recommended:.3g}")
        except RangeTestError as e:
            print(f"{path} stage {stage}: no suggestion: {e}")
