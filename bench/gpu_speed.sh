#!/usr/bin/env bash
# On the GPU machine: the speed benchmark (bench/speed.py) on Llama-2-7B and Llama-3-8B shapes, seq 2048.
# Needs the wheels in .whl (bitsandbytes, peft, datasets, dill, multiprocess, liger_kernel). Appends every RESULT and
# PARITY line to $OUT/speed.jsonl, keeps the full output in $OUT/speed.log, and writes $OUT/speed_table.md.
#   bash bench/gpu_speed.sh            # both shapes, about 8-9 minutes on one H200
#   bash bench/gpu_speed.sh llama2-7b  # one shape: about 5.5 minutes (llama3-8b: about 3.5), each fits one 10-minute call
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false IN_TEST=1  # IN_TEST: no progress bars
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))"
python3 -c "from qlora_nb.speed import liger_status; print('Liger available:', *liger_status())"

speed() {   # one process: its settings share a loaded model; a hung one is stopped after 4 minutes
  echo "== speed.py $*" | tee -a "$OUT/speed.log"
  timeout 240 python3 bench/speed.py --seq 2048 --steps 12 --warmup 2 --out "$OUT/speed.jsonl" "$@" >> "$OUT/speed.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all"; tail -n 40 "$OUT/speed.log" | grep -E '^(RESULT|PARITY|Liger)' | cut -c1-260
}

for shape in ${1:-llama2-7b llama3-8b}; do
  python3 bench/make_model.py "$shape" "/tmp/models/$shape"
  case $shape in
    llama2-7b)
      speed --shape llama2-7b --bsz 2 8 --lengths fixed --compare                                    # plain vs project, loss parity
      speed --shape llama2-7b --bsz 8 --lengths instruction --packing off on --recipe project         # padded vs padding-free
      speed --shape llama2-7b --bsz 2 8 --lengths fixed --recipe project --liger                      # fused kernels
      speed --shape llama2-7b --bsz 8 --lengths instruction --packing on --recipe project --liger ;;  # both
    llama3-8b)
      speed --shape llama3-8b --bsz 2 --lengths fixed --compare
      speed --shape llama3-8b --bsz 2 8 --lengths fixed --recipe project --liger ;;                   # 128k vocabulary: fused loss
  esac
done
python3 bench/speed.py --table "$OUT/speed.jsonl" | tee "$OUT/speed_table.md"
