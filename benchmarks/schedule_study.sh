#!/usr/bin/env bash
# The schedule study of issue #7: 9 recipes (recipes/study/{short,long}/), one model (fastnet width 32,
# bf16 autocast, channels_last), equal training images per recipe within a budget, 3 seeds, two budgets
# (3 and 9 CIFAR-10 epochs), held-out accuracy every 25 (short) or 50 (long) steps. Then the LR range
# test's claim: `cadence find-lr` on fixed one-cycle (short budget) for 3 seeds, and seed 0 trained
# at the LR it recommends, at what `optimizer.lr: auto` picks and at a sweep, as in the study
# (OUT/lr/study/); with --lr also at batch 128 without label smoothing (OUT/lr/b128/) and with AdamW
# (OUT/lr/adamw/).
#
#   benchmarks/schedule_study.sh CIFAR10_ROOT [OUT]            # the whole study, ~105 min on 2 cores
#   benchmarks/schedule_study.sh --quick CIFAR10_ROOT [OUT]    # short budget, 1 seed, ~8 min
#   benchmarks/schedule_study.sh --lr CIFAR10_ROOT [OUT]       # the LR claim alone, 3 settings, ~35 min
#
# CIFAR10_ROOT is an ImageFolder of the JPEGs (train/, test/). Finished runs are reused and
# unfinished ones resumed, so a killed study continues where it stopped; seed 0 of both budgets
# comes first, so a study cut short still has every recipe at both budgets. Each budget's
# compare.html, summary.json and figures land in OUT/<budget>/ (--quick: OUT/short/, 1 seed).
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0 lr_only=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
if [ "${1:-}" = "--lr" ]; then lr_only=1; shift; fi
root=${1:?usage: benchmarks/schedule_study.sh [--quick | --lr] CIFAR10_ROOT [OUT]}
out=${2:-runs/study}
cadence=${CADENCE:-cadence}
command -v "$cadence" >/dev/null || cadence=.venv/bin/cadence

run() {  # budget seeds folder thresholds...
  local budget=$1 seeds=$2 folder=$3; shift 3
  "$cadence" compare recipes/study/"$budget"/*.yaml --seeds "$seeds" --set data.root="$root" --quiet \
      --out "$out/$folder" --baseline "fixed-cosine-warmup-$budget" --thresholds "$@"
}

lr_claim_one() {  # folder sweep-LRs [--set ...]: range test (3 seeds), then train at its pick, at lr: auto, at a sweep
  local dir=$out/lr/$1 lrs=$2 recipe=recipes/study/short/fixed-onecycle.yaml picked s lr
  shift 2
  mkdir -p "$dir"
  for s in 0 1 2; do  # the recipe's own range (optimizer.lr_find), as lr: auto would run it
    [ -s "$dir/find-lr-seed$s.txt" ] || "$cadence" find-lr "$recipe" --set data.root="$root" "$@" --set seed=$s \
        --quiet --out "$dir/find-lr-seed$s" > "$dir/find-lr-seed$s.txt" || true
  done
  picked=$(sed -n 's/.*(optimizer.lr: \([0-9.e+-]*\) at reference.*/\1/p' "$dir/find-lr-seed0.txt")
  [ -n "$picked" ] || echo "the range test recommended nothing for seed 0: see $dir/find-lr-seed0.txt" >&2
  for lr in $picked auto $lrs; do
    "$cadence" compare "$recipe" --set data.root="$root" "$@" --set optimizer.lr="$lr" --set name="onecycle-lr-$lr" \
        --quiet --out "$dir"
  done
  "$cadence" compare "$dir"/onecycle-*-seed0 --out "$dir" --thresholds 0.6 0.7
}

lr_claim() {  # does the range test find the right max_lr? fixed one-cycle, short budget, seed 0
  lr_claim_one study "0.05 0.1 0.2 0.4 0.8"  # as in the study: batch 512, label smoothing 0.2
}

lr_claim_more() {  # the same at two more settings (--lr only: the whole study must stay under 2 hours)
  lr_claim_one b128 "0.025 0.05 0.1 0.2 0.4 0.8" --set "stages=[{epochs: 3, resolution: 32, batch_size: 128}]" \
      --set optimizer.reference_batch_size=128 --set train.label_smoothing=0 --set train.eval_every=100
  lr_claim_one adamw "0.001 0.003 0.01 0.03" --set optimizer.name=adamw --set optimizer.nesterov=false
}

if [ "$lr_only" = 1 ]; then
  lr_claim
  lr_claim_more
elif [ "$quick" = 1 ]; then
  run short 1 short 0.6 0.7   # seed 0 of the full study's short budget (reused by it)
else
  run short 1 short 0.6 0.7
  run long 1 long 0.8 0.85
  lr_claim
  run short 3 short 0.6 0.7
  run long 3 long 0.8 0.85
fi
