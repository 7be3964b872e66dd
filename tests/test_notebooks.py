"""Every notebook runs top to bottom, as `nbdev_test` runs it: offline, with `IN_TEST=1`, skipping the cells
flagged `#| slow`, `#| cuda` or `#| eval: false`."""
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook   # aliased, or pytest would collect it as a test

ROOT = Path(__file__).resolve().parents[1]
CONFIG = get_config(path=ROOT)
NOTEBOOKS = sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))

def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, NOTEBOOKS

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(nb, monkeypatch):
    monkeypatch.setenv('IN_TEST', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    ok, seconds = run_notebook(nb, skip_flags=CONFIG.tst_flags.split(), basepath=CONFIG.config_path, do_print=True)
    assert ok, f'{nb.name} failed; run `nbdev_test --path nbs/{nb.name}` to see the failing cell'
