"""The README's main job, run once for the whole session: its tests and the subcommands that start from a run share it."""
import os, subprocess, sys
from pathlib import Path
import pytest

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONUNBUFFERED': '1'}
ENV.pop('IN_TEST', None)

@pytest.fixture(scope='session')
def main_job(tmp_path_factory):
    "`qlora-nb train --preset tiny` in a subprocess, as the README runs it: (its output folder, the finished process)."
    out = tmp_path_factory.mktemp('main-job')/'run'
    done = subprocess.run([Path(sys.executable).parent/'qlora-nb', 'train', '--preset', 'tiny', '--output-dir', str(out)],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
