#!/usr/bin/env bash
# LR range test stability (3 seeds) on the demo and on CIFAR-10, and demo accuracy with the
# suggested LR vs the hand-set one, each with the recipe's range (optimizer.lr_find, what lr: auto
# runs; CIFAR_STEPS=N to change its steps). Usage: benchmarks/lr_find_stability.sh CIFAR10_JPEG_ROOT
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR=${1:?give the CIFAR-10 ImageFolder root (train/, test/)}
OUT=${OUT:-/tmp/cadence-bench-lr}
rm -rf "$OUT"/demo-*; mkdir -p "$OUT"
C=.venv/bin/cadence
PART=${PART:-all}  # all | demo | cifar
if [ "$PART" != cifar ]; then
for seed in 0 1 2; do
  echo "== demo find-lr seed $seed"
  $C find-lr recipes/demo.yaml --set seed=$seed --quiet --out "$OUT/demo-$seed" | grep -E "stage|recommended" || true  # exit 1: no suggestion (printed)
done
for seed in 0 1 2; do
  echo "== demo train hand-set lr, seed $seed"
  $C train recipes/demo.yaml --set seed=$seed --quiet --out "$OUT/demo-hand-$seed" | grep held
  echo "== demo train lr auto, seed $seed"
  $C train recipes/demo.yaml --set seed=$seed --set optimizer.lr=auto --quiet --out "$OUT/demo-auto-$seed" 2>&1 | grep -E "held|auto ->"
done
fi
[ "$PART" = demo ] && exit 0
for seed in 0 1 2; do
  echo "== cifar10-progressive find-lr seed $seed"
  $C find-lr recipes/cifar10-progressive.yaml --set seed=$seed --set data.root="$CIFAR" ${CIFAR_STEPS:+--steps $CIFAR_STEPS} \
      --quiet --out "$OUT/cifar-$seed" | grep -E "stage|recommended" || true
done
