"""The project's clean step: `nbdev_clean`, then what it leaves that we never want stored — ipywidgets' saved
widget state (`metadata.widgets`) and the widget-view entries of outputs (an output with nothing else is dropped).
Writes a notebook back only if it changed, with execnb's `write_nb`, the writer nbdev_clean uses, so the bytes
are the same as nbdev_clean's.

    python tools/clean.py [notebook.ipynb ...]     (default: every nbs/*.ipynb)"""
import json, subprocess, sys
from pathlib import Path
from execnb.nbio import write_nb

root = Path(__file__).resolve().parents[1]
WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'

def strip_widgets(nb: dict) -> bool:
    "Remove widget state and widget-view outputs from `nb` in place; return whether anything changed."
    changed = nb.get('metadata', {}).pop('widgets', None) is not None
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        kept = []
        for out in cell.get('outputs', []):
            data = out.get('data')
            if data is not None and WIDGET_VIEW in data:
                del data[WIDGET_VIEW]; changed = True
                if not data: continue
            kept.append(out)
        cell['outputs'] = kept
    return changed

def clean(paths: list) -> list:
    "Clean `paths` (all nbs/*.ipynb when empty); return the notebooks this step changed."
    bin_dir = Path(sys.executable).parent
    targets = [Path(p).resolve() for p in paths] or [root/'nbs']
    paths = [Path(p).resolve() for p in paths] or sorted((root/'nbs').glob('*.ipynb'))
    before = {p: p.read_bytes() for p in paths}
    for target in targets:   # nbdev_clean finds settings.ini from its working directory
        subprocess.run([bin_dir/'nbdev_clean', '--fname', str(target)], cwd=root, check=True)
    for p in paths:
        nb = json.loads(p.read_text(encoding='utf-8'))
        if strip_widgets(nb): write_nb(nb, p)
    return [p for p in paths if p.read_bytes() != before[p]]

if __name__ == '__main__':
    for p in clean(sys.argv[1:]): print('cleaned', p.relative_to(root) if p.is_relative_to(root) else p)
