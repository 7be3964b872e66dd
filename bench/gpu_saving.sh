#!/usr/bin/env bash
# On the GPU machine: step 5 and step 7 notebooks on a Llama-2-7B-shaped model (wheels in .whl, as gpu_steps.sh).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false IN_TEST=1
export QLORA_NB_MODEL=/tmp/models/llama2-7b QLORA_NB_DATASET=qlora_nb/reverse-words QLORA_NB_CACHE=/tmp/qlora_nb_cache
python3 bench/make_model.py llama2-7b /tmp/models/llama2-7b
python3 tools/run_notebook.py nbs/09_peft_model.ipynb --flags cuda 2>&1 | grep -v -i "warn\|Loading weights" > $OUT/peft_nb.log
timeout ${SAVING_TIMEOUT:-250} python3 tools/run_notebook.py nbs/11_saving.ipynb --flags cuda 2>&1 | grep -v -i "warn\|Loading weights" > $OUT/saving_nb.log
tail -n 4 $OUT/peft_nb.log; tail -n 30 $OUT/saving_nb.log
