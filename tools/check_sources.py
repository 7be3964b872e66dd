"""Fail when the notebooks, the package and README.md disagree: `nbdev_export` or `tools/clean.py` would change
files, or README.md is stale against nbs/index.ipynb. Works on a copy, so the tree is never modified."""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
failures = []

def differing(a: Path, b: Path) -> list:
    cmp = filecmp.dircmp(a, b, ignore=['__pycache__'])
    out = [str(a/f) for f in cmp.diff_files + cmp.left_only + cmp.right_only]
    for sub in cmp.common_dirs: out += differing(a/sub, b/sub)
    return out

with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp)/'repo'
    copy.mkdir()
    for name in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(root/name, copy/name)
    for name in ('nbs', 'qlora_nb', 'tools'): shutil.copytree(root/name, copy/name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    subprocess.run([bin_dir/'nbdev_export'], cwd=copy, check=True)
    if stale := differing(root/'qlora_nb', copy/'qlora_nb'):
        failures.append(f"nbdev_export changes {stale}: edit the notebooks, run nbdev_export, commit both.")
    subprocess.run([sys.executable, copy/'tools'/'clean.py'], cwd=copy, check=True, capture_output=True)
    if dirty := differing(root/'nbs', copy/'nbs'):
        failures.append(f"tools/clean.py changes {dirty}: run `python tools/clean.py` and commit.")
    subprocess.run([sys.executable, copy/'tools'/'readme.py'], cwd=copy, check=True)
    if (copy/'README.md').read_text() != (root/'README.md').read_text():
        failures.append("README.md is stale against nbs/index.ipynb: run `python tools/readme.py` and commit.")

for f in failures: print('FAIL:', f)
if failures: sys.exit(1)
print('notebooks, package and README agree')
