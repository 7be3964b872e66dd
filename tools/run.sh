#!/usr/bin/env bash
# The two commands of the README.
#   bash tools/run.sh train [ARGS]   set up .venv, then run the whole QLoRA workflow on the embedded default
#   bash tools/run.sh test           set up .venv with the dev tools, check notebooks/package/README agree, run the tests
# Without a CUDA GPU it installs PyTorch's CPU build first; with one, it keeps the torch that is there.
# Both stay off the Hub, except `train` with arguments that name a Hub model or dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-test}; shift || true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! $VPY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $VPY -m pip install -q "torch>=2.10"
  else $VPY -m pip install -q "torch==2.13.0" || $VPY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
fi
offline() { export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}; }
export IPYTHONDIR=${IPYTHONDIR:-$PWD/.ipython} MPLBACKEND=${MPLBACKEND:-Agg} TOKENIZERS_PARALLELISM=false
case "$what" in
  train)
    extras=""; if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then extras="[fast]"; fi   # Liger's GPU kernels
    $VPY -m pip install -q -e ".$extras"
    # offline unless the arguments name a model or dataset on the Hub (the embedded default needs no network)
    $VPY -c 'import sys; from qlora_nb.cli import hub_wanted; sys.exit(hub_wanted(sys.argv[1:]))' train "$@" && offline
    exec .venv/bin/qlora-nb train "$@" ;;
  test)
    offline; $VPY -m pip install -q -e ".[dev]"
    $VPY tools/check_sources.py
    exec $VPY -m pytest -q tests "$@" ;;
  *) echo "usage: bash tools/run.sh train|test" >&2; exit 2 ;;
esac
