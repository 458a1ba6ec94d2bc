"""Print the range-test suggestions for saved ``lr_find.csv`` files (the rules are pure functions of
the curve, so this is what ``cadence find-lr`` prints for those runs).

    .venv/bin/python benchmarks/suggest_from_csv.py /tmp/cadence-bench-lr/*/lr_find.csv
"""

import csv
import sys

from cadence.lr_finder import RangeTestError, suggest

for path in sys.argv[1:]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for stage in sorted({r["stage"] for r in rows}):
        part = [r for r in rows if r["stage"] == stage]
        try:
            s = suggest([float(r["lr"]) for r in part], [float(r["loss"]) for r in part])
            print(f"{path} stage {stage}: steepest {s.steepest:.3g}, minimum/10 {s.minimum_div_10:.3g}, "
                  f"valley {s.valley:.3g}, recommended {s.recommended:.3g}")
        except RangeTestError as e:
            print(f"{path} stage {stage}: no suggestion: {e}")
