"""What `make train` prints: the run's own lines (progress, metrics, where the results are),
not its libraries' INFO chatter (Orbax alone logged ~40 lines per checkpoint)."""

import subprocess
import sys

import pytest

from tests.tiny import REPO


@pytest.mark.slow  # A whole train.py run in a fresh interpreter.
def test_train_prints_its_own_lines(tmp_path):
  config = tmp_path / 'tiny.py'
  config.write_text('from tests.tiny import tiny_config as get_config  # noqa: F401\n')
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'train.py', f'--config={config}', f'--workdir={workdir}'], cwd=REPO,
      capture_output=True, text=True, timeout=600)
  lines = (result.stdout + result.stderr).splitlines()
  assert result.returncode == 0, '\n'.join(lines[-30:])
  assert not [line for line in lines if 'orbax' in line.lower()], '\n'.join(lines)
  assert any('eval_accuracy=' in line for line in lines), '\n'.join(lines)
  assert str(workdir) in lines[-1]
  # 40 steps: 4 train logs of 2 lines, 2 evals, progress, final eval, results, TF's 4 at import.
  assert len(lines) <= 30, '\n'.join(lines)
