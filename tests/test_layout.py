"""The tutorial's layout, read from the files (nothing runs): notebooks nbs/NN_name.ipynb, each with
`#| default_exp name` exporting qlora_nb/name.py, read in number order; seven of them are the seven steps."""
import ast, json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
def number(p): return int(re.match(r'\d+', p.name)[0])
ALL_NOTEBOOKS = sorted((ROOT/'nbs').glob('*.ipynb'))
NOTEBOOKS = sorted((ROOT/'nbs').glob('[0-9]*.ipynb'), key=lambda p: (number(p), p.name))
MODULES = sorted(p for p in (ROOT/'qlora_nb').glob('*.py') if p.name not in ('__init__.py', '_modidx.py'))

def cells(nb): return json.loads(nb.read_text(encoding='utf-8'))['cells']
def source(cell): return ''.join(cell['source'])
def code_cells(nb): return [c for c in cells(nb) if c['cell_type'] == 'code']
def title(nb):
    first = cells(nb)[0]
    return source(first).split('\n', 1)[0] if first['cell_type'] == 'markdown' else ''

EXPORTS = {}   # module name -> the notebook that exports it
for nb in NOTEBOOKS:
    for c in code_cells(nb):
        if m := re.search(r'^#\|\s*default_exp\s+(\S+)', source(c), re.M): EXPORTS[m[1]] = nb
KNOWN = set(EXPORTS) | {p.stem for p in MODULES}

def package_imports(tree, relative=False):
    "(node, module) for each import of a qlora_nb module in `tree`; `relative`: count `from .x import` too."
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node, a.name.split('.')[1]) for a in node.names if a.name.startswith('qlora_nb.'))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ''
            if node.level == 0 and module.startswith('qlora_nb.'): yield node, module.split('.')[1]
            elif (node.level == 0 and module == 'qlora_nb') or (relative and node.level == 1 and not module):
                yield from ((node, a.name) for a in node.names if a.name in KNOWN)
            elif relative and node.level == 1: yield node, module.split('.')[0]

def cell_tree(cell):
    "A code cell's syntax tree, with IPython's `!` and `%` lines read as `pass`."
    return ast.parse(re.sub(r'^(\s*)[!%].*$', r'\1pass', source(cell), flags=re.M))

def test_reading_order():
    bad = []
    for nb in NOTEBOOKS:
        for i, c in enumerate(cells(nb)):
            if c['cell_type'] != 'code': continue
            for _, mod in package_imports(cell_tree(c)):
                src = EXPORTS.get(mod)
                if src is None: bad.append(f'{nb.name} cell {i} imports qlora_nb.{mod}, which no notebook exports')
                elif number(src) > number(nb):
                    bad.append(f'{nb.name} cell {i} imports qlora_nb.{mod}, exported later by {src.name}')
    assert not bad, ('a notebook may use only what it or an earlier notebook exports; move the code or the import:\n'
                     + '\n'.join(bad))

def test_modules_import_only_earlier_modules():
    bad = []
    for py in MODULES:
        if py.stem not in EXPORTS: bad.append(f'{py.name}: no notebook has `#| default_exp {py.stem}`'); continue
        for node, mod in package_imports(ast.parse(py.read_text()), relative=True):
            src = EXPORTS.get(mod)
            if src is None or number(src) >= number(EXPORTS[py.stem]):
                bad.append(f'{py.name}:{node.lineno} imports {mod} (exported by {src.name if src else "no notebook"}, '
                           f'{py.name} by {EXPORTS[py.stem].name})')
    assert not bad, ('a module may import only modules of earlier notebooks; move the shared code earlier:\n'
                     + '\n'.join(bad))

def test_no_function_local_package_imports():
    bad = {}   # (file, line) -> message; ast.walk goes outside in, so the innermost scope's name stays
    for py in MODULES:
        for scope in ast.walk(ast.parse(py.read_text())):
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for node, mod in package_imports(scope, relative=True):
                    bad[py.name, node.lineno] = f'{py.name}:{node.lineno} (in {scope.name}) imports {mod}'
    assert not bad, ('import package modules at the top of the module, not inside functions or classes '
                     '(a module that needs a later one belongs after it):\n' + '\n'.join(bad.values()))

def test_seven_steps():
    steps = [(nb, int(m[1])) for nb in NOTEBOOKS if (m := re.match(r'# Step (\d+) of 7: \S', title(nb)))]
    found = [f'{nb.name}: step {k}' for nb, k in steps]
    assert [k for _, k in steps] == list(range(1, 8)), f'titles `# Step k of 7: ...` must be k = 1..7 in file order: {found}'
    nums = [number(nb) for nb, _ in steps]
    assert nums == list(range(nums[0], nums[0] + 7)), f'the seven steps must be consecutively numbered notebooks: {found}'

def words(nb): return sum(len(source(c).split()) for c in cells(nb) if c['cell_type'] == 'markdown')

def test_prose_length():
    counts = {nb.name: words(nb) for nb in ALL_NOTEBOOKS if nb.name != 'index.ipynb'}
    listing = ', '.join(f'{k}: {v}' for k, v in counts.items())
    long = [nb.name for nb in NOTEBOOKS if counts[nb.name] > 1500]
    assert not long, f'cut the prose of {long} to at most 1,500 words each ({listing})'
    assert sum(counts.values()) < 15000, f'cut the prose: {sum(counts.values())} words in all, under 15,000 wanted ({listing})'

def test_notebook_sizes():
    sizes = {nb.name: nb.stat().st_size for nb in ALL_NOTEBOOKS}
    big = {k: v for k, v in sizes.items() if v > 250_000}
    assert not big, f'notebooks over 250,000 bytes: {big}; store less output (smaller plots, fewer printed rows)'
    assert sum(sizes.values()) <= 1_600_000, f'notebooks total {sum(sizes.values()):,} bytes, over 1,600,000: {sizes}'

LOCAL_PATHS = ('/root/', '/home/', '/tmp/', '/work/', '/content/', '/private/var/', 'site-packages')
PROGRESS = re.compile(r'\b0%\||  0%\|')
WARNING = re.compile(r'Warning:|warnings\.warn|\b(User|Future|Deprecation|Runtime)Warning\b')

def output_problems(nb):
    nbj = json.loads(nb.read_text(encoding='utf-8'))
    if 'widgets' in nbj['metadata']: yield 'metadata holds widget state'
    for i, c in enumerate(nbj['cells']):
        for o in c.get('outputs', []):
            if o['output_type'] == 'stream' and o['name'] == 'stderr': yield f'cell {i}: stderr output'; continue
            texts = [o.get('text', '')] + [o.get('data', {}).get(k, '') for k in ('text/plain', 'text/html')]
            for text in map(''.join, texts):
                yield from (f'cell {i}: local path {p!r}' for p in LOCAL_PATHS if p in text)
                if PROGRESS.search(text): yield f'cell {i}: frozen progress bar'
                if m := WARNING.search(text): yield f'cell {i}: warning text {m[0]!r}'

def test_clean_outputs():
    bad = [f'{nb.name} {p}' for nb in ALL_NOTEBOOKS for p in dict.fromkeys(output_problems(nb))]
    assert not bad, ('refresh the outputs with `python tools/execute.py NOTEBOOK` (or fix the cell that prints them):\n'
                     + '\n'.join(bad))

def test_training_lesson_writes_out_the_loop():
    lesson = [nb for nb in NOTEBOOKS if title(nb).startswith('# Step 6 of 7')]
    assert len(lesson) == 1, f'one notebook must be titled `# Step 6 of 7: ...`, found {[nb.name for nb in lesson]}'
    needed = ('.backward(', 'optimizer.step(', 'zero_grad(', 'clip_grad_norm_', 'isfinite')
    sizes = []
    for c in code_cells(lesson[0]):
        src = source(c)
        if re.match(r'#\|\s*export', src.lstrip()) or not all(n in src for n in needed): continue
        sizes.append(sum(1 for l in src.splitlines() if l.strip() and not l.strip().startswith('#')))
    assert any(8 <= n <= 30 for n in sizes), (
        f'{lesson[0].name} needs an unexported cell that writes out the training loop ({", ".join(needed)}) '
        f'in 8 to 30 lines of code; cells with all of them have {sizes or "none"} lines')

def test_one_helper_each():
    bad = []
    for needle, pattern in (('2**30', r'\b2\s*\*\*\s*30\b'), ('hashlib.sha256', r'hashlib\.sha256')):
        users = [py.name for py in MODULES if py.name != 'core.py' and re.search(pattern, py.read_text())]
        if users: bad.append(f'{needle} appears in {users}')
    assert not bad, f'{"; ".join(bad)}: define the helper once in core.py and import it from there'
