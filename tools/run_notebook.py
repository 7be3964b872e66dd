"""Run notebooks' code cells in order, in one namespace, without Jupyter: for machines that have the libraries but
no Jupyter kernel (such as a bare GPU server). Honours $QLORA_NB_GPU_MEMORY_GIB (a memory cap) and prints each
notebook's peak GPU memory. Skips `#| eval: false` cells; runs `#| cuda` and `#| slow` cells
only when their flag is given. Prints each cell's output as it goes.

    python tools/run_notebook.py nbs/06_loading.ipynb [more.ipynb] [--flags cuda slow]"""
import argparse, gc, json, os, sys, time, traceback
from pathlib import Path
import torch
from qlora_nb.core import limit_gpu_memory

parser = argparse.ArgumentParser()
parser.add_argument('notebooks', nargs='+')
parser.add_argument('--flags', nargs='*', default=[])
args = parser.parse_args()
os.environ.setdefault('MPLBACKEND', 'Agg')
cap = limit_gpu_memory()   # $QLORA_NB_GPU_MEMORY_GIB: act like a smaller GPU (a T4: 15)
if cap and torch.cuda.is_available(): print(f'GPU memory capped at {cap} GiB', flush=True)
failed = []
for path in args.notebooks:
    path = Path(path).resolve()
    cells = [c for c in json.loads(path.read_text())['cells'] if c['cell_type'] == 'code']
    namespace = {'__name__': '__main__'}
    cwd = os.getcwd(); os.chdir(path.parent)
    start = time.time()
    print(f'=== {path.name}', flush=True)
    try:
        for i, cell in enumerate(cells):
            source = ''.join(cell['source'])
            directives = [l[3:].strip() for l in source.splitlines() if l.startswith('#|')]
            if any(d.replace(' ', '') == 'eval:false' for d in directives): continue
            flags = {d.split()[0] for d in directives if d}
            if flags & {'cuda', 'slow'} and not flags & set(args.flags): continue
            code = '\n'.join(l for l in source.splitlines() if not l.lstrip().startswith(('!', '%')))
            exec(compile(code, f'{path.name}[cell {i}]', 'exec'), namespace)
        print(f'=== {path.name}: ok in {time.time() - start:.0f} s', flush=True)
    except Exception:
        traceback.print_exc(); failed.append(path.name)
        print(f'=== {path.name}: FAILED after {time.time() - start:.0f} s', flush=True)
    finally:
        os.chdir(cwd); namespace.clear(); gc.collect()
        if torch.cuda.is_available():
            print(f'=== {path.name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, '
                  f'{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved', flush=True)
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
sys.exit(1 if failed else 0)
