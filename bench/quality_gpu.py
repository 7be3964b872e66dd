"""Does 4-bit cost quality? Pretrain the `--size` fact model (cached), then fine-tune it four ways (16-bit LoRA,
NF4 + double quant, NF4, FP4) for each seed, plus the untrained control; one JSON line per result.

    GPU:  python bench/quality_gpu.py --size gpu --seeds 0 1 2 --out bench/results/quality-h200
    CPU:  python bench/quality_gpu.py --size cpu --seeds 0 1 2 --out bench/results/quality-cpu"""
import argparse, json, os, platform, sys, tempfile, time
from pathlib import Path
import torch
from qlora_nb.quality import pretrained_model_path, quality_config, compare_quantization, run_variant, weight_errors
from qlora_nb.config import update

parser = argparse.ArgumentParser()
parser.add_argument('--size', default='gpu')
parser.add_argument('--seeds', type=int, nargs='+', default=[0])
parser.add_argument('--out', default='bench/results/quality-h200')
parser.add_argument('--steps', type=int, default=None, help='fine-tune steps (default: the size\'s own)')
parser.add_argument('--no-control', action='store_true')
args = parser.parse_args()
out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
lines = out/f'quality-{args.size}.jsonl'
machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f'{platform.processor() or "cpu"}, {os.cpu_count()} cores'

def emit(kind, **row):
    row = dict(kind=kind, size=args.size, machine=machine, command=' '.join(['python'] + sys.argv)) | row
    print('RESULT', json.dumps(row), flush=True)
    with lines.open('a') as f: f.write(json.dumps(row) + '\n')

start = time.time()
base = pretrained_model_path(args.size)
emit('pretraining', wall_s=round(time.time() - start, 1), **json.loads((base/'pretraining.json').read_text()))
emit('weight_errors', rows=weight_errors(base))
tmp = Path(tempfile.mkdtemp())
for seed in args.seeds:
    cfg = quality_config(args.size, tmp/'questions', seed=seed, **({'max_steps': args.steps} if args.steps else {}))
    for row in compare_quantization(cfg, tmp/f'runs-{seed}'): emit('fine_tune', **row)
if not args.no_control:
    control = pretrained_model_path(args.size, pretrained=False)
    emit('fine_tune', **run_variant(update(cfg, model=str(control)), 'no pretraining', tmp/'control', quantize=False))
