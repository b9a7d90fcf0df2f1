"""Bad input fails at start-up with one clear line and leaves nothing behind."""

import subprocess
import sys

import pytest

from tests.tiny import REPO


@pytest.mark.slow  # Each case starts train.py in a fresh interpreter.
@pytest.mark.parametrize('flags, expected', [
    (['--config.no_such_key=1'], "--config.no_such_key=1: 'no_such_key'"),
    (['--config.model.widht=3'], "--config.model.widht=3: 'widht'"),
    (['--config.batch_size=many'], "config.batch_size='many' is not a whole number"),
    (['--config.dataset.name=imagenette'], "unknown dataset 'imagenette'"),
    (['--config.dataset.name=mnist_t10k', '--config.dataset.data_dir=/no/such/dir'],
     "not found in '/no/such/dir'"),
    (['--config=configs/no_such_config.py'], 'configs/no_such_config.py'),
    (['--config.batch_size=30'], 'config.batch_size=30 must be a positive multiple'),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, flags, expected):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'train.py', f'--workdir={workdir}', *flags], cwd=REPO,
      capture_output=True, text=True, timeout=300,
      env={'PATH': '', 'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
           'JAX_PLATFORMS': 'cpu'})
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and expected in last_line, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()


@pytest.mark.slow  # Each case starts an entry point in a fresh interpreter.
@pytest.mark.parametrize('command, expected', [
    (['export.py', '--workdir=x'], 'error: --format is required: '),
    (['audit.py'], 'error: --workdir is required: '),
    (['tune.py', '--study_dir=x'], 'error: --n_trials is required: '),
    (['select_models.py'], 'error: --candidates is required: '),
    (['doctor.py', 'stray'], "error: unexpected arguments ['stray']"),
])
def test_entry_points_name_a_missing_flag_in_one_line(command, expected):
  result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={'PATH': '', 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


# The benchmark checks its counts before importing JAX, so each case takes well under a second.
@pytest.mark.parametrize('flags', [
    ['--accumulation', '0'],
    ['--accumulation', '1', '--accumulation', '2', '--torch-threads', '0'],
    ['--rounds', '0'],
])
def test_gpt_benchmark_rejects_bad_counts_in_one_line(flags):
  result = subprocess.run([sys.executable, 'benchmarks/gpt_throughput.py', *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={'PATH': ''})
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith('error: ') and '--accumulation' in last_line, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
