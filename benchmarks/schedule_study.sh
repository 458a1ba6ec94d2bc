#!/usr/bin/env bash
# The schedule study of issue #7: 9 recipes (recipes/study/{short,long}/), one model (fastnet width 32,
# bf16 autocast, channels_last), equal training images per recipe within a budget, 3 seeds, two budgets
# (3 and 9 CIFAR-10 epochs), held-out accuracy every 25 (short) or 50 (long) steps.
#
#   benchmarks/schedule_study.sh CIFAR10_ROOT [OUT]            # the whole study, ~85 min on 2 cores
#   benchmarks/schedule_study.sh --quick CIFAR10_ROOT [OUT]    # short budget, 1 seed, ~7 min
#
# CIFAR10_ROOT is an ImageFolder of the JPEGs (train/, test/). Finished runs are reused and
# unfinished ones resumed, so a killed study continues where it stopped; seed 0 of both budgets
# comes first, so a study cut short still has every recipe at both budgets. Each budget's
# compare.html, summary.json and figures land in OUT/<budget>/ (--quick: OUT/short/, 1 seed).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
root=${1:?usage: benchmarks/schedule_study.sh [--quick] CIFAR10_ROOT [OUT]}
out=${2:-runs/study}
cadence=${CADENCE:-cadence}
command -v "$cadence" >/dev/null || cadence=.venv/bin/cadence

run() {  # budget seeds folder thresholds...
  local budget=$1 seeds=$2 folder=$3; shift 3
  "$cadence" compare recipes/study/"$budget"/*.yaml --seeds "$seeds" --set data.root="$root" --quiet \
      --out "$out/$folder" --baseline "fixed-cosine-warmup-$budget" --thresholds "$@"
}

if [ "$quick" = 1 ]; then
  run short 1 short 0.6 0.7   # seed 0 of the full study's short budget (reused by it)
else
  run short 1 short 0.6 0.7
  run long 1 long 0.8 0.85
  run short 3 short 0.6 0.7
  run long 3 long 0.8 0.85
fi
