#!/usr/bin/env bash
# The regularization study of issue #19: recipes/study/regularization/{none,constant,rising}.yaml
# (5,000 CIFAR-10 training images, 40 epochs, 16 -> 24 -> 32 px under one global WSD), 3 seeds each,
# in two lanes (one core and one thread each), then `cadence compare` over the finished runs.
#
#   benchmarks/regularization_study.sh CIFAR_SUBSET_ROOT [OUT] [SEEDS]
#
# CIFAR_SUBSET_ROOT is an ImageFolder with train/ (the first 250 files of each class of the CIFAR-10 JPEGs,
# in sorted order) and test/ (all 10,000 test JPEGs); make it from a full copy with
#   benchmarks/regularization_study.sh --make-subset CIFAR10_ROOT CIFAR_SUBSET_ROOT
# Finished runs are kept and unfinished ones resumed, so a killed study continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
cadence=${CADENCE:-cadence}
command -v "$cadence" >/dev/null || cadence=.venv/bin/cadence
if [ "${1:-}" = "--make-subset" ]; then
  src=${2:?CIFAR10_ROOT} dst=${3:?CIFAR_SUBSET_ROOT}
  for c in "$src"/train/*/; do
    c=$(basename "$c"); mkdir -p "$dst/train/$c"
    find "$src/train/$c" -maxdepth 1 -type f -printf '%f\n' | sort | sed -n 1,250p | while read -r f; do
      ln -sf "$(realpath "$src/train/$c/$f")" "$dst/train/$c/$f"
    done
  done
  ln -sfn "$(realpath "$src/test")" "$dst/test"
  exit 0
fi
root=${1:?usage: benchmarks/regularization_study.sh CIFAR_SUBSET_ROOT [OUT] [SEEDS]}
out=${2:-runs/regularization-study}
seeds=${3:-3}
mkdir -p "$out"

one() {  # core recipe seed
  local core=$1 recipe=$2 seed=$3 name dir
  name=$(basename "$recipe" .yaml)
  dir=$out/reg-$name-seed$seed
  [ -f "$dir.done" ] && return 0
  if [ -f "$dir/checkpoints/last.pt" ]; then
    OMP_NUM_THREADS=1 taskset -c "$core" "$cadence" train --resume "$dir" --quiet
  else
    rm -rf "$dir"
    OMP_NUM_THREADS=1 taskset -c "$core" "$cadence" train "$recipe" --set data.root="$root" --set seed="$seed" \
        --out "$dir" --quiet
  fi
  touch "$dir.done"
}

jobs=()
for s in $(seq 0 $((seeds - 1))); do
  for r in none constant rising; do jobs+=("recipes/study/regularization/$r.yaml $s"); done
done
lane() {  # core: every other job
  local core=$1 i
  for ((i = core; i < ${#jobs[@]}; i += 2)); do one "$core" ${jobs[$i]}; done
}
lane 0 & lane 1 & wait
"$cadence" compare "$out"/reg-*-seed*/ --out "$out/compare" --quiet
