"""Every notebook in notebooks/ runs top to bottom with small settings, as a user's kernel
would run it, shows at least one plot and stays small on disk, with or without outputs."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / 'notebooks'
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob('*.ipynb'))
MAX_BYTES = 1_000_000  # Per notebook, as committed and with the outputs of a run.
CELL_TIMEOUT_S = 600
_FAKE_DEVICES_FLAG = '--xla_force_host_platform_device_count'


def test_notebooks_exist():
  assert len(NOTEBOOKS) >= 4, 'expected the tour, Transformer, speech and scale notebooks'


def kernel_env(runs_dir: Path) -> dict[str, str]:
  """This process's environment with the notebooks' small settings, minus conftest's fake
  devices: a notebook that needs 8 devices has to ask for them itself, as in Colab."""
  env = dict(os.environ, KILN_NOTEBOOK_QUICK='1', KILN_NOTEBOOK_RUNS=str(runs_dir))
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_FAKE_DEVICES_FLAG)]
  env['XLA_FLAGS'] = ' '.join(flags)
  if not env['XLA_FLAGS']:
    del env['XLA_FLAGS']
  return env


@pytest.mark.slow  # Each notebook is a fresh kernel and a few training runs.
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_plots(path, tmp_path):
  assert path.stat().st_size < MAX_BYTES, f'{path.name}: strip its outputs before committing'
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOKS_DIR)}})
  client.execute(env=kernel_env(tmp_path))  # Raises CellExecutionError naming the failed cell.

  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  plots = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert plots, f'{path.name} shows no plot'
  executed = tmp_path / path.name
  nbformat.write(notebook, executed)
  assert executed.stat().st_size < MAX_BYTES, f'{path.name}: outputs of a run exceed 1 MB'


def test_run_log_reads_back_what_a_run_writes(tmp_path):
  from clu import metric_writers
  from core.errors import KilnError
  from monitor import run_log

  first = metric_writers.create_default_writer(str(tmp_path))
  first.write_hparams({'lr': 0.1, 'name': 'cnn'})  # Non-scalar tensors: left out.
  first.write_scalars(1, {'loss': 2.0, 'mfu': 0.25})
  first.write_scalars(2, {'loss': 1.5})
  first.close()
  resumed = metric_writers.create_default_writer(str(tmp_path))  # Repeats step 2.
  resumed.write_scalars(2, {'loss': 1.25})
  resumed.write_scalars(3, {'loss': 1.0})
  resumed.close()

  scalars = run_log.read_scalars(str(tmp_path))
  assert set(scalars) == {'loss', 'mfu'}
  steps, values = scalars['loss']
  assert steps.tolist() == [1, 2, 3] and values.tolist() == [2.0, 1.25, 1.0]
  assert scalars['mfu'][1].tolist() == [0.25]
  with pytest.raises(KilnError, match='no summary.json'):
    run_log.read_summary(str(tmp_path))
  with pytest.raises(KilnError, match='no TensorBoard scalars'):
    run_log.read_scalars(str(tmp_path / 'empty'))


def test_load_model_without_a_checkpoint_says_where_to_train(tmp_path):
  from loop import trained
  from core.errors import KilnError
  from tests.tiny import tiny_config

  with pytest.raises(KilnError, match='no checkpoint in .* train there first'):
    trained.load_model(tiny_config(), str(tmp_path))
