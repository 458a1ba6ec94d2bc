#!/usr/bin/env bash
# What each of airbench94's techniques is worth inside cadence (issue #21): the recipe that beats it,
# recipes/cifar10-fast.yaml (airbench's recipe in cadence's keys, its first four epochs at 24 and 28 px),
# with one technique taken out at a time. Each seed is trained alone on one core with
# one thread by `benchmarks/vs_airbench.py --cadence-only`, in two lanes (one per core), and read against
# airbench94's run of the same seed. Every result is added to benchmarks/figures/vs_airbench.json (a
# seed takes ~1.2 h of CPU here, so the figures of several sessions add up there), where the recipe's
# own seeds are too. (What progressive resizing adds is cifar10-fast.yaml against cifar10-airbench.yaml.)
#
#   benchmarks/airbench_ablations.sh CIFAR10_ROOT [OUT] [SEEDS] [ABLATION ...]
#
# CIFAR10_ROOT holds train/ and test/ of JPEGs; SEEDS is a list like "0 1 2" (default "0"); ABLATION
# names some of those below (default: all); CORES="0 1" are the lanes' cores; RECIPE another base. Each
# is recorded (and its run named) NAME@BASE, BASE the recipe's file name; one whose seed is in the
# results file is skipped. A run stopped at a checkpoint (SIGTERM to its `cadence train`: the session
# ends) goes on from it when the same command runs again with the same OUT (cadence's launch line
# continues a run of the same recipe; its training CPU is in the checkpoint); a stopped lane: exit 1.
# The test-time augmentation needs no training: `cadence eval RUN --set train.tta=flip` (or none).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
root=${1:?usage: benchmarks/airbench_ablations.sh CIFAR10_ROOT [OUT] [SEEDS] [ABLATION ...]}
out=${2:-runs/vs-airbench}
seeds=${3:-0}
shift $(($# < 3 ? $# : 3))
recipe=${RECIPE:-recipes/cifar10-fast.yaml}  # (the tests give a tiny recipe and results file)
results=${RESULTS:-benchmarks/figures/vs_airbench.json}

ablations=(  # name, then what is taken out of airbench's recipe as --set overrides; the default order
  "no-lookahead train.lookahead=null"
  "no-dirac model.dirac=false"
  "random-flip regularization.flip=random"
  "no-translate regularization.translate=0"
  "torch-bn model.bn_momentum=null model.bn_eps=null"
  "no-bias-lr optimizer.groups.norm_bias=null"
  "bn-scales-trained optimizer.groups.norm_weight=null"
  "whiten-bias-always optimizer.groups.whiten_bias=null"
  "no-smoothing regularization.label_smoothing=0"
)
declare -A sets=()
for a in "${ablations[@]}"; do sets[${a%% *}]=${a#* }; done
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ablations[@]%% *}")
for n in "${names[@]}"; do
  [ -n "${sets[$n]:-}" ] || { echo "airbench_ablations: unknown ablation '$n' (known: ${ablations[*]%% *})" >&2; exit 2; }
done

base=$(basename "$recipe" .yaml)
one() {  # core name seed: recorded and run as NAME@BASE (the same ablation of another base is another entry)
  local core=$1 name=$2 seed=$3 args=() s
  for s in ${sets[$name]}; do args+=(--set "$s"); done
  "$python" benchmarks/vs_airbench.py --cadence-only --skip-recorded --name "$name@$base" --recipe "$recipe" \
    --data "$root" --seeds "$seed" --cores "$core" "$core" --out "$out" --results "$results" "${args[@]}"
}

jobs=()
for s in $seeds; do
  for n in "${names[@]}"; do jobs+=("$n $s"); done
done
read -r -a cores <<< "${CORES:-0 1}"  # the two lanes' cores
lane() {  # lane: every other job, on the lane's core
  local i
  for ((i = $1; i < ${#jobs[@]}; i += 2)); do one "${cores[$1]}" ${jobs[$i]}; done
}
lane 0 & first=$!
lane 1 & second=$!
status=0
wait $first || status=$?
wait $second || status=$?
exit $status  # a lane that stopped (a run stopped at a checkpoint, a failure) is not success
