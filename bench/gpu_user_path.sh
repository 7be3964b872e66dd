#!/usr/bin/env bash
# On the GPU machine: the path users run (bench/user_path.py: train(cfg) on a local jsonl) beside the benchmark's own
# path (bench/speed.py), on one shape at seq 2048, in one call of about 8 minutes. Needs the wheels in $WHEELS
# (bitsandbytes, peft, datasets, dill, multiprocess, liger_kernel). RESULT lines go to $OUT/user.jsonl and
# $OUT/speed.jsonl, full output to $OUT/*.log.
#   bash bench/gpu_user_path.sh llama2-7b
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl}/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false IN_TEST=1  # IN_TEST: no progress bars
OUT=${OUT:-/tmp/user_out}; mkdir -p "$OUT"
shape=${1:-llama2-7b}
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))"
python3 bench/make_model.py "$shape" "/tmp/models/$shape"
step() {   # one process per setting; a hung one is stopped
  echo "== $*" | tee -a "$OUT/run.log"
  timeout 240 "$@" >> "$OUT/run.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all"; tail -n 40 "$OUT/run.log" | grep -E '^RESULT' | cut -c1-300
}
step python3 bench/user_path.py --shape "$shape" --bsz 2 --out "$OUT/user.jsonl"
step python3 bench/user_path.py --shape "$shape" --bsz 2 --stock-token-count --out "$OUT/user.jsonl"
step python3 bench/speed.py --shape "$shape" --bsz 2 --steps 12 --warmup 3 --seq 2048 --offload on --out "$OUT/speed.jsonl"
step python3 bench/user_path.py --shape "$shape" --bsz 8 --out "$OUT/user.jsonl"
