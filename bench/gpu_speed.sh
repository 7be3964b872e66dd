#!/usr/bin/env bash
# On the GPU machine: the speed benchmark (bench/speed.py) on Llama-2-7B or Llama-3-8B shapes, seq 2048.
# Needs the wheels in .whl (bitsandbytes, peft, datasets, dill, multiprocess, liger_kernel). Appends every RESULT and
# PARITY line to $OUT/speed.jsonl and keeps the full output in $OUT/speed.log. One shape fits one 10-minute call:
#   bash bench/gpu_speed.sh llama2-7b     # about 5 minutes on one H200
#   bash bench/gpu_speed.sh llama3-8b     # about 6 minutes
# then, on the same warm machine, Unsloth: bash bench/gpu_unsloth.sh; and anywhere:
#   python bench/speed.py --table speed.jsonl unsloth.log
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false IN_TEST=1  # IN_TEST: no progress bars
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))"
python3 -c "from qlora_nb.config import liger_status; print('Liger:', *liger_status())"

speed() {   # one process: its settings share a loaded model; a hung one is stopped after 5 minutes
  echo "== speed.py $*" | tee -a "$OUT/speed.log"
  timeout 300 python3 bench/speed.py --seq 2048 --warmup 2 --out "$OUT/speed.jsonl" "$@" >> "$OUT/speed.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all"; tail -n 60 "$OUT/speed.log" | grep -E '^(RESULT|PARITY)' | cut -c1-250
}

for shape in ${1:-llama2-7b}; do
  python3 bench/make_model.py "$shape" "/tmp/models/$shape"
  speed --shape "$shape" --bsz 2 8 --steps 12 --offload off on                  # the default path, without and with activation offload
  speed --shape "$shape" --recipe plain --bsz 2 8 --steps 10 --dropout 0.05     # the usual recipe (dropout 0.05), as in the issue
  speed --shape "$shape" --bsz 2 --steps 30 --compare                          # plain and the default path, dropout 0: loss parity
done
python3 bench/speed.py --table "$OUT/speed.jsonl" | tee "$OUT/speed_table.md"
