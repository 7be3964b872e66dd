"""Run notebooks' code cells in order, in one namespace, without Jupyter: for machines that have the libraries but
no Jupyter kernel (such as a bare GPU server). Skips `#| eval: false` cells; runs `#| cuda` and `#| slow` cells
only when their flag is given. Prints each cell's output as it goes.

    python tools/run_notebook.py nbs/03_loading.ipynb [more.ipynb] [--flags cuda slow]"""
import argparse, json, os, sys, time, traceback
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument('notebooks', nargs='+')
parser.add_argument('--flags', nargs='*', default=[])
args = parser.parse_args()
os.environ.setdefault('MPLBACKEND', 'Agg')
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
    finally: os.chdir(cwd)
sys.exit(1 if failed else 0)
