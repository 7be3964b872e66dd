#!/usr/bin/env bash
# On the GPU machine: the step notebooks, the training notebook and the main job on a Llama-2-7B-shaped model.
# Needs the wheels in .whl (bitsandbytes, peft, datasets, dill, multiprocess). Writes logs and figures to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export QLORA_NB_MODEL=/tmp/models/llama2-7b QLORA_NB_DATASET=qlora_nb/reverse-words QLORA_NB_CACHE=/tmp/qlora_nb_cache
python3 -c "import torch, transformers, peft, bitsandbytes, datasets; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, datasets.__version__, torch.cuda.get_device_name(0))"
python3 bench/make_model.py llama2-7b /tmp/models/llama2-7b
IN_TEST=1 python3 tools/run_notebook.py nbs/00_core.ipynb nbs/01_config.ipynb nbs/02_models.ipynb nbs/03_data.ipynb nbs/04_monitor.ipynb nbs/05_quantization.ipynb nbs/06_loading.ipynb nbs/07_kbit.ipynb nbs/08_lora.ipynb nbs/09_peft_model.ipynb --flags cuda 2>&1 | grep -v -i "warn" | tee $OUT/steps.log
IN_TEST=1 python3 tools/run_notebook.py nbs/10_training.ipynb --flags cuda 2>&1 | grep -v -i "warn" | tail -c 20000 > $OUT/train_nb.log
python3 -c "from qlora_nb.cli import main; import sys; sys.exit(main(['train', '--set', 'max_steps=30', '--set', 'eval_steps=15', '--set', 'save_steps=15', '--set', 'logging_steps=5', '--set', 'max_length=256', '--output-dir', '/tmp/run7b']))" 2>&1 | grep -v -i "warn" | tail -c 8000 > $OUT/main_job.log
cp /tmp/run7b/training.png $OUT/training_7b.png; python3 -c "import json; m=json.load(open('/tmp/run7b/metrics.json')); m.pop('history'); m.pop('config'); print(json.dumps(m, indent=1))" > $OUT/metrics_7b.json
tail -n 5 $OUT/steps.log $OUT/train_nb.log $OUT/main_job.log
IN_TEST=1 timeout 200 python3 tools/run_notebook.py nbs/11_saving.ipynb --flags cuda 2>&1 | grep -v -i "warn" | tail -c 20000 > $OUT/saving_nb.log
tail -3 $OUT/saving_nb.log
