#!/usr/bin/env bash
# The whole method: supervised baseline, then pseudo-labels + joint training, then test results.
#   bash pseudo_lbl_rand_init.sh <tr> <comb> <dataset> [flags]
#   bash pseudo_lbl_rand_init.sh tr2 c1 acdc
#   bash pseudo_lbl_rand_init.sh tr2 c1 demo --device cpu
# Each flag goes to the step(s) that read it (--n_iter to the baseline, the joint step's own to
# step 2, the rest to both). Works from any working directory; stops at the first failure.
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

# The trainers' one parser says which step reads each flag (utils/flags.py): it sets the bash
# arrays `baseline` and `joint`. -P: the repository's utils/, not one in the working directory.
routed=$(PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$py" -P -m utils.flags route "$@")
eval "$routed"

baseline_out=$(mktemp); joint_out=$(mktemp)
trap 'rm -f "$baseline_out" "$joint_out"' EXIT

echo "== step 1: supervised baseline ($dataset $tr/$comb)"
"$py" "$here/train_model/tr_baseline.py" --dataset="$dataset" --no_of_tr_imgs="$tr" \
  --comb_tr_imgs="$comb" ${baseline[@]+"${baseline[@]}"} | tee "$baseline_out"
baseline_dir=$(sed -n 's/^run directory: //p' "$baseline_out" | tail -n 1)

echo "== step 2: pseudo-labels + joint training ($dataset $tr/$comb)"
"$py" "$here/train_model/prop_method_joint_tr_rand_init.py" --dataset="$dataset" \
  --no_of_tr_imgs="$tr" --comb_tr_imgs="$comb" --pretr_dir="$baseline_dir" \
  ${joint[@]+"${joint[@]}"} | tee "$joint_out"
joint_dir=$(sed -n 's/^run directory: //p' "$joint_out" | tail -n 1)

"$py" "$here/scripts/compare_runs.py" "$baseline_dir" "$joint_dir"
