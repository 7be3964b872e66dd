#!/usr/bin/env bash
# On the GPU machine, act like a free Colab T4: the process may use 15 GiB ($QLORA_NB_GPU_MEMORY_GIB) and the GPU reports
# compute capability 7.5 ($QLORA_NB_COMPUTE_CAPABILITY), so the colab-t4 preset computes in float16 with loss scaling.
# Model: Qwen2.5-7B's shape (the preset's model) with random weights; needs the wheels in .whl (see gpu_steps.sh).
#   bash bench/gpu_t4.sh main                  steps 1-7 from the command line at sequence length 1024
#   bash bench/gpu_t4.sh nbs/00_core.ipynb ... the notebooks, top to bottom, under the same cap
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export QLORA_NB_GPU_MEMORY_GIB=15 QLORA_NB_COMPUTE_CAPABILITY=7.5 QLORA_NB_PRESET=colab-t4
export QLORA_NB_MODEL=/tmp/models/qwen2.5-7b QLORA_NB_CACHE=/tmp/qlora_nb_cache OUT=${OUT:-/tmp/out}
mkdir -p $OUT
python3 bench/make_model.py qwen2.5-7b /tmp/models/qwen2.5-7b
if [ "${1:-main}" = main ]; then
  # text rows longer than 1024 tokens (the tokenizer is byte-level), so that every sequence is 1024 tokens long
  python3 - <<'PY'
import json, random
random.seed(0)
letters = 'abcdefghijklmnopqrstuvwxyz'
with open('/tmp/long-text.jsonl', 'w') as f:
    for _ in range(2000):
        words = [''.join(random.choice(letters) for _ in range(random.randint(2, 9))) for _ in range(260)]
        f.write(json.dumps({'text': ' '.join(words)}) + '\n')
PY
  QLORA_NB_DATASET=/tmp/long-text.jsonl python3 -c "
from qlora_nb.cli import main; import sys
sys.exit(main(['train', '--set', 'max_steps=20', '--set', 'eval_steps=10', '--set', 'save_steps=10', '--set', 'logging_steps=2',
               '--set', 'checkpoint_mirror=/tmp/t4-drive', '--output-dir', '/tmp/t4run']))" 2>&1 | grep -v -i "warn" | tail -c 6000 | tee $OUT/t4_main.log
  python3 - <<'PY' | tee $OUT/t4_metrics.txt
import json, math
m = json.load(open('/tmp/t4run/metrics.json'))
losses = [l for _, l in m['history']['step_loss']]
print({k: m.get(k) for k in ('micro_batch', 'grad_accum', 'steps', 'tokens_seen', 'tokens_per_second', 'train_seconds',
                             'measured_gpu_peak_gib', 'predicted_gpu_peak_gib', 'eval_loss_before', 'eval_loss_after')})
print('precision:', m['manifest']['precision'], '| capability', m['manifest'].get('capability'), '| cap', m['manifest'].get('gpu_memory_cap_gib'))
print('config:', {k: m['config'][k] for k in ('model', 'compute_dtype', 'max_length', 'micro_batch', 'grad_accum', 'auto_micro_batch', 'optimizer')})
print(f'{len(losses)} step losses, all finite: {all(math.isfinite(l) for l in losses)}; first {losses[0]:.3f}, last {losses[-1]:.3f}')
PY
  cp /tmp/t4run/training.png $OUT/t4_training.png; ls /tmp/t4-drive | tee -a $OUT/t4_metrics.txt
else
  export QLORA_NB_DATASET=qlora_nb/reverse-words IN_TEST=1
  python3 tools/run_notebook.py "$@" --flags cuda 2>&1 | grep -v -i "warn\|Loading weights" > $OUT/t4_notebooks.log
  grep "^===" $OUT/t4_notebooks.log; grep -B 30 "FAILED" $OUT/t4_notebooks.log | tail -60
fi
