"""Re-run notebooks in place so their stored outputs are fresh, for commits that refresh outputs. Uses a Jupyter
kernel on this venv's python, working directory nbs/, 1800 s per cell at most. Cells that have a `#| eval: false`,
`#| cuda` or `#| slow` line are skipped and keep no output. Known noise is silenced before the first cell, and
stderr, local paths, progress bars and widget state are taken out of the outputs; then tools/clean.py runs.
Figures are stored as 128-colour PNGs, about a third of the size and the same to the eye. A notebook whose run fails
is left as it was; the script then exits non-zero.

    python tools/execute.py [nbs/05_x.ipynb ...]     (default: every numbered notebook in nbs/, in order)
    python tools/execute.py --figures-only [...]      only make the stored figures small, running nothing"""
import base64, io, json, os, re, subprocess, sys, tempfile, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient

root = Path(__file__).resolve().parents[1]
SKIP = {'#|eval:false', '#|cuda', '#|slow'}
ENV = dict(HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', TRANSFORMERS_OFFLINE='1', TOKENIZERS_PARALLELISM='false',
           MPLBACKEND='module://matplotlib_inline.backend_inline', HF_DATASETS_DISABLE_PROGRESS_BARS='1',
           TRANSFORMERS_VERBOSITY='error', PYTHONWARNINGS='ignore', TQDM_DISABLE='1', QLORA_NB_QUIET='1')
SETUP = f"""\
import sys as _sys
assert _sys.prefix == {sys.prefix!r}, f'the kernel runs {{_sys.executable}}, not this venv'
import warnings; warnings.filterwarnings('ignore')
import logging; logging.disable(logging.WARNING)
try:
    import transformers.utils.logging as _tl; _tl.set_verbosity_error(); _tl.disable_progress_bar()
except ImportError: pass
try:
    import datasets.utils.logging as _dl; _dl.disable_progress_bar()
except ImportError: pass
import matplotlib as _mpl; _mpl.rcParams['figure.dpi'] = 56   # stored figures stay small: notebooks are read on GitHub too
get_ipython().run_line_magic('config', "InlineBackend.rc = {{'figure.dpi': 56}}")
"""
WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'
PROGRESS = re.compile(r'\d+%\||FloatProgress|IntProgress')

def skipped(cell) -> bool:
    return any(l.replace(' ', '') in SKIP for l in cell.source.splitlines())

class Client(NotebookClient):
    "Leaves the skipped cells unrun and without output."
    async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
        if cell.cell_type == 'code' and skipped(cell):
            cell.outputs, cell.execution_count = [], None
            return cell
        return await super().async_execute_cell(cell, cell_index, *args, **kwargs)

def placeholders() -> list:
    "(compiled pattern, placeholder) for the local paths outputs must not show, longest first."
    paths = {}
    for path, short in ((root, '<repo>'), (tempfile.gettempdir(), '<tmp>'), (Path.home(), '~')):
        for form in {str(path), os.path.realpath(path)}:
            if len(form) > 1: paths[form.rstrip('/')] = short
    return [(re.compile(re.escape(p) + r'(?![\w-])'), s) for p, s in sorted(paths.items(), key=lambda x: -len(x[0]))]

def small_png(data: str) -> str:
    "A base64 PNG as a 128-colour one, if that is smaller (plots have few colours, so nothing visible changes)."
    from PIL import Image
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert('RGB')
    buffer = io.BytesIO()
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buffer, 'PNG', optimize=True)
    small = base64.b64encode(buffer.getvalue()).decode()
    return small + '\n' if len(small) < len(data) else data

def shrink_figures(nb):
    for cell in nb.cells:
        for out in cell.get('outputs', []):
            if 'image/png' in out.get('data', {}): out.data['image/png'] = small_png(''.join(out.data['image/png']))

def tidy(nb, subs):
    "Drop stderr and progress-bar outputs; put placeholders in place of local paths in text outputs; shrink figures."
    def sub(text):
        text = ''.join(text)
        for pattern, short in subs: text = pattern.sub(short, text)
        return text
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        kept = []
        for out in cell.outputs:
            if out.output_type == 'stream':
                if out.name == 'stderr': continue
                out.text = sub(out.text)
            elif 'data' in out:
                if WIDGET_VIEW in out.data and PROGRESS.search(''.join(out.data.get('text/plain', ''))): continue
                for k in out.data:
                    if k.startswith('text/'): out.data[k] = sub(out.data[k])
            kept.append(out)
        cell.outputs = kept
    shrink_figures(nb)

def kernelspec(folder: Path):
    "A `python3` kernel spec on this venv's python, found first through $JUPYTER_PATH."
    spec = folder/'kernels'/'python3'
    spec.mkdir(parents=True)
    argv = [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}']
    (spec/'kernel.json').write_text(json.dumps(dict(argv=argv, display_name='python3', language='python')))
    os.environ['JUPYTER_PATH'] = str(folder)

def execute(path: Path, subs) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
    Client(nb, timeout=1800, kernel_name='python3', record_timing=False,   # widget state is kept while running (nbclient needs it), then stripped
           resources={'metadata': {'path': str(root/'nbs')}}).execute()
    nb.cells.pop(0)
    tidy(nb, subs)
    nbformat.write(nb, path)
    subprocess.run([sys.executable, root/'tools'/'clean.py', path], check=True, stdout=subprocess.DEVNULL)

def main(args):
    figures_only = '--figures-only' in args
    args = [a for a in args if a != '--figures-only']
    paths = [Path(a).resolve() for a in args] or sorted((root/'nbs').glob('[0-9]*.ipynb'))
    if figures_only:
        for path in paths:
            nb = nbformat.read(path, as_version=4); shrink_figures(nb); nbformat.write(nb, path)
            subprocess.run([sys.executable, root/'tools'/'clean.py', path], check=True, stdout=subprocess.DEVNULL)
        return
    os.environ.update(ENV)
    subs, failed = placeholders(), []
    with tempfile.TemporaryDirectory() as tmp:
        kernelspec(Path(tmp))
        for path in paths:
            start = time.time()
            try: execute(path, subs)
            except Exception as e:   # a cell's error, a timeout, a dead kernel
                failed.append(path.name)
                print(f'{path.name}: FAILED after {time.time() - start:.0f} s, notebook left as it was\n{e}', flush=True)
                continue
            print(f'{path.name}: {time.time() - start:.0f} s, {path.stat().st_size / 1024:.0f} KB', flush=True)
    if failed: sys.exit(f'failed: {", ".join(failed)}')

if __name__ == '__main__': main(sys.argv[1:])
