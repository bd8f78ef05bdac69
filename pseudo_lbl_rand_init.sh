#!/usr/bin/env bash
# The whole method: supervised baseline, then pseudo-labels + joint training, then test results.
#   bash pseudo_lbl_rand_init.sh <tr> <comb> <dataset> [extra flags for both trainers]
#   bash pseudo_lbl_rand_init.sh tr2 c1 acdc
#   bash pseudo_lbl_rand_init.sh tr2 c1 demo --device cpu
# Works from any working directory; stops at the first failure.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: bash pseudo_lbl_rand_init.sh <tr> <comb> <dataset> [extra flags]" >&2
  exit 2
fi
tr=$1; comb=$2; dataset=$3; shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x "$here/.venv/bin/python" ]; then py="$here/.venv/bin/python"
else py=python3; fi

# Flags of the joint step only; --n_iter is the baseline's (the joint step has --n_iter_per_round).
common=(); joint=(); base_only=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  name=${arg#--}; name=${name%%=*}
  value=()
  if [[ $arg != *=* && $# -gt 0 && $1 != --* ]]; then value=("$1"); shift; fi
  case $name in
    data_aug|temp_fac|bbox_dim|pretr_n_iter|pretr_dir|local_loss_exp_no|lamda_local|\
    no_of_neg_eles|no_of_pos_eles|bt_size|test_aug_overlap|test_f1_threshold|n_rounds|\
    n_iter_per_round|loss_reduction|crf) joint+=("$arg" ${value[@]+"${value[@]}"}) ;;
    n_iter) base_only+=("$arg" ${value[@]+"${value[@]}"}) ;;
    *) common+=("$arg" ${value[@]+"${value[@]}"}) ;;
  esac
done

baseline_out=$(mktemp); joint_out=$(mktemp)
trap 'rm -f "$baseline_out" "$joint_out"' EXIT

echo "== step 1: supervised baseline ($dataset $tr/$comb)"
"$py" "$here/train_model/tr_baseline.py" --dataset="$dataset" --no_of_tr_imgs="$tr" \
  --comb_tr_imgs="$comb" ${common[@]+"${common[@]}"} ${base_only[@]+"${base_only[@]}"} \
  | tee "$baseline_out"
baseline_dir=$(sed -n 's/^run directory: //p' "$baseline_out" | tail -n 1)

echo "== step 2: pseudo-labels + joint training ($dataset $tr/$comb)"
"$py" "$here/train_model/prop_method_joint_tr_rand_init.py" --dataset="$dataset" \
  --no_of_tr_imgs="$tr" --comb_tr_imgs="$comb" --pretr_dir="$baseline_dir" \
  ${common[@]+"${common[@]}"} ${joint[@]+"${joint[@]}"} | tee "$joint_out"
joint_dir=$(sed -n 's/^run directory: //p' "$joint_out" | tail -n 1)

"$py" "$here/scripts/compare_runs.py" "$baseline_dir" "$joint_dir"
