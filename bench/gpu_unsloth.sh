#!/usr/bin/env bash
# On the GPU machine, right after bench/gpu_speed.sh (same warm machine: its bitsandbytes in /tmp/site and its models in
# /tmp/models): Unsloth's reference recipe on the same shapes, batches and sequence length, for the side-by-side table.
# Needs .whl_unsloth/ (ignored by git) holding Unsloth's wheels (list: ../shared/bench/README.md) and the reference
# script unsloth_recipe.py copied from ../shared/bench. Writes $OUT/unsloth.log.
#   bash bench/gpu_unsloth.sh "llama2-7b llama3-8b" "2 8"
set -uo pipefail
[ -f .whl_unsloth/unsloth_recipe.py ] || { echo "copy ../shared/bench/unsloth_recipe.py into .whl_unsloth/ first" >&2; exit 2; }
[ -d /tmp/site/bitsandbytes ] || { echo "run bench/gpu_speed.sh first on this machine: it installs bitsandbytes in /tmp/site" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_unsloth .whl_unsloth/*.whl || exit 1
export PYTHONPATH=/tmp/site_unsloth:/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
for shape in ${1:-llama2-7b llama3-8b}; do
  for bsz in ${2:-2 8}; do
    echo "== unsloth $shape bsz $bsz" | tee -a "$OUT/unsloth.log"
    timeout 240 python3 .whl_unsloth/unsloth_recipe.py --shape "$shape" --bsz "$bsz" --seq 2048 --steps 12 --warmup 2 >> "$OUT/unsloth.log" 2>&1
    echo "   exit $? after ${SECONDS}s"; grep '^RESULT' "$OUT/unsloth.log" | tail -n 1 | cut -c1-250
  done
done
