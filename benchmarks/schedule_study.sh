#!/usr/bin/env bash
# The schedule study of issue #7: 9 recipes (recipes/study/{short,long}/), one model (fastnet width 32,
# bf16 autocast, channels_last), equal training images per recipe within a budget, 3 seeds, two budgets
# (3 and 9 CIFAR-10 epochs), held-out accuracy every 25 (short) or 50 (long) steps. Then the LR range
# test's claim: fixed one-cycle (short budget, seed 0) at the LR that `cadence find-lr --steps 200`
# recommends, at what `optimizer.lr: auto` picks, and at 0.05 ... 0.8 (OUT/lr/).
#
#   benchmarks/schedule_study.sh CIFAR10_ROOT [OUT]            # the whole study, ~100 min on 2 cores
#   benchmarks/schedule_study.sh --quick CIFAR10_ROOT [OUT]    # short budget, 1 seed, ~8 min
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

lr_claim() {  # does the range test find the right max_lr? fixed one-cycle, short budget, seed 0
  local dir=$out/lr recipe=recipes/study/short/fixed-onecycle.yaml picked lr
  mkdir -p "$dir"
  [ -s "$dir/find-lr.txt" ] || "$cadence" find-lr "$recipe" --set data.root="$root" --steps 200 --start 1e-4 \
      --end 10 --quiet --out "$dir/find-lr" > "$dir/find-lr.txt" || true
  picked=$(sed -n 's/.*(optimizer.lr: \([0-9.e+-]*\) at reference.*/\1/p' "$dir/find-lr.txt")
  if [ -n "$picked" ]; then
    "$cadence" compare "$recipe" --set data.root="$root" --set optimizer.lr="$picked" \
        --set name="onecycle-range-test-$picked" --quiet --out "$dir"
  else
    echo "the range test recommended nothing: see $dir/find-lr.txt" >&2
  fi
  for lr in auto 0.05 0.1 0.2 0.4 0.8; do
    "$cadence" compare "$recipe" --set data.root="$root" --set optimizer.lr="$lr" --set name="onecycle-lr-$lr" \
        --quiet --out "$dir"
  done
  "$cadence" compare "$dir"/onecycle-*-seed0 --out "$dir" --thresholds 0.6 0.7
}

if [ "$quick" = 1 ]; then
  run short 1 short 0.6 0.7   # seed 0 of the full study's short budget (reused by it)
else
  run short 1 short 0.6 0.7
  run long 1 long 0.8 0.85
  lr_claim
  run short 3 short 0.6 0.7
  run long 3 long 0.8 0.85
fi
