"""Repository invariants: notebooks are well-formed lessons, and the package imports without the dev tools."""
import json, re, subprocess, sys
from configparser import ConfigParser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))
SETTINGS = ConfigParser(); SETTINGS.read(ROOT/'settings.ini')
S = SETTINGS['DEFAULT']

def cells(nb_path): return json.loads(nb_path.read_text())['cells']

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_a_lesson(nb):
    cs = cells(nb)
    assert all('id' in c for c in cs), 'cells need ids: run nbdev_clean'
    assert cs[0]['cell_type'] == 'markdown' and ''.join(cs[0]['source']).startswith('# '), 'first cell: the title'
    assert '\n> ' in ''.join(cs[0]['source']), 'the title cell carries a one-line summary'
    badge = f"https://colab.research.google.com/github/{S['user']}/{S['repo']}/blob/{S['branch']}/nbs/{nb.name}"
    assert any(badge in ''.join(c['source']) for c in cs[:3]), f'Open-in-Colab badge must point at {badge}'
    stem = nb.stem.split('_', 1)[1]
    assert any(''.join(c['source']).strip() == f'#| default_exp {stem}' for c in cs), f'default_exp must be {stem}'
    assert sum(1 for c in cs if c['cell_type'] == 'markdown') >= 3, 'prose that explains the why'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_install_and_manifest(nb):
    "On Colab: an install cell (skipped by the tests) that leaves Colab's torch alone, then the manifest."
    code = [''.join(c['source']) for c in cells(nb)[:6] if c['cell_type'] == 'code']
    install = [s for s in code if 'pip install' in s]
    assert install, 'an install cell near the top'
    assert install[0].startswith('#| eval: false') and 'qlora_nb' in install[0]
    assert not re.search(r'\btorch\b', install[0].split('pip install', 1)[1]), 'never reinstall Colab\'s torch'
    assert any('show_manifest()' in s for s in code[code.index(install[0]) + 1:]), 'the manifest right after the install'

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_keeps_colab_gpu_metadata(nb):
    meta = json.loads(nb.read_text())['metadata']
    assert meta.get('accelerator') == 'GPU' and 'colab' in meta

def test_package_imports_without_dev_tools():
    code = ("import sys, importlib, pkgutil, qlora_nb\n"
            "for m in pkgutil.iter_modules(qlora_nb.__path__):\n"
            "    if not m.name.startswith('_'): importlib.import_module('qlora_nb.' + m.name)\n"
            "bad = [m for m in ('nbdev', 'fastcore', 'execnb') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT/'tests')

def test_runtime_requirements_leave_out_dev_pins():
    reqs = S['requirements'].split()
    assert not any(r.startswith(('nbdev', 'fastcore', 'execnb')) for r in reqs)
    for needed in ('torch', 'transformers', 'peft', 'bitsandbytes', 'datasets', 'accelerate', 'ipywidgets', 'matplotlib'):
        assert any(re.match(needed + r'\b', r) for r in reqs), needed

def test_torch_floor_has_the_security_fixes():
    "torch.load's pickle fixes: CVE-2025-32434 (2.6) and CVE-2026-24747 (2.10); the package never allows an older torch."
    torch_req = next(r for r in S['requirements'].split() if re.match(r'torch\b', r))
    floor = tuple(int(p) for p in re.search(r'>=([\d.]+)', torch_req)[1].split('.'))
    assert floor >= (2, 10), torch_req

def test_the_reliability_table_names_tests_that_exist():
    "tests/reliability.md gives the test of each fault case; a renamed or deleted test must not leave the row pointing nowhere."
    rows = [l for l in (ROOT/'tests'/'reliability.md').read_text().splitlines() if re.match(r'\| [A-Z]\d+ \|', l)]
    assert len(rows) == 29, len(rows)
    for row in rows:
        last = None
        named = re.findall(r'`(?:(test_\w+\.py))?::(\w+)`', row) + [(f, None) for f in re.findall(r'`(test_\w+\.py)` \(all\)', row)]
        assert named, row
        for file, test in named:
            last = file or last
            assert test is None or f'def {test}(' in (ROOT/'tests'/last).read_text(), f'{row.split("|")[1].strip()}: {last}::{test} does not exist'
