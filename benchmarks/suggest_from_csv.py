"""Print the range-test suggestions for saved ``lr_find.csv`` files (the rules are pure functions of
the curve, so this is what ``cadence find-lr`` prints for those runs).

    .venv/bin/python benchmarks/suggest_from_csv.py /tmp/cadence-bench-lr/*/lr_find.csv
"""

import csv
import math
import sys

from cadence.lr_finder import RangeTestError, suggest

for path in sys.argv[1:]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for stage in sorted({r["stage"] for r in rows}):
        part = [(float(r["lr"]), float(r["loss"])) for r in rows if r["stage"] == stage]
        finite = [(lr, loss) for lr, loss in part if math.isfinite(loss)]
        try:  # as range_test does: finite losses only; a non-finite one means the range diverged
            s = suggest([lr for lr, _ in finite], [loss for _, loss in finite], diverged=len(finite) < len(part))
            print(f"{path} stage {stage}: steepest {s.steepest:.3g}, minimum/10 {s.minimum_div_10:.3g}, "
                  f"valley {s.valley:.3g}, edge {s.edge:.3g}, recommended {s.recommended:.3g}")
        except RangeTestError as e:
            print(f"{path} stage {stage}: no suggestion: {e}")
