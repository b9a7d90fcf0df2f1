"""Artifact integrity: every checkpoint and export carries a SHA-256 manifest, checked before
it is loaded; one flipped byte is refused with one line naming the file. Nothing is loaded
with pickle."""

import ast
import json
import os
import shutil

import numpy as np
import pytest

import train
from core import integrity
from core.errors import KilnError
from export import artifact, exporter, formats
from loop import trained as trained_lib
from loop.checkpoint import CHECKPOINTS_FOLDER, Checkpointer, CorruptCheckpoint
from serve import model as serve_model
from tests.checkpoints import latest_params
from tests.tiny import REPO, tiny_config


def _flip_byte(path: str) -> None:
  """Inverts one byte in the middle of `path`: the same size, one bit pattern changed."""
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))


def _largest_file(folder: str) -> str:
  """The artifact's biggest file: in a checkpoint, an array data file."""
  paths = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
           if name != integrity.MANIFEST_FILE]
  return max(paths, key=os.path.getsize)


def _relative(path: str, folder: str) -> str:
  return os.path.relpath(path, folder).replace(os.sep, '/')


def _refusal(error: Exception, name: str) -> str:
  message = str(error)
  assert '\n' not in message and f'file {name} ' in message, message
  return message


# ------------------------------------------------------------------------- the manifest itself

@pytest.fixture
def folder(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'weights.bin').write_bytes(bytes(range(256)) * 64)
  (tmp_path / 'sub' / 'signature.json').write_text('{"a": 1}')
  return str(tmp_path)


def test_manifest_lists_every_file_and_an_intact_folder_verifies(folder):
  digests = integrity.write_manifest(folder)
  assert sorted(digests) == ['sub/signature.json', 'weights.bin']
  with open(os.path.join(folder, integrity.MANIFEST_FILE)) as f:
    assert json.load(f) == {'algorithm': 'sha256', 'files': digests}
  assert integrity.verify(folder, 'this artifact', 'write it again')
  assert not [n for n in os.listdir(folder) if n.startswith('.tmp-')]  # Renamed into place.


@pytest.mark.parametrize('change, name, says', [
    ('flip', 'weights.bin', 'the file was changed after it was written'),
    ('remove', 'sub/signature.json', 'listed in its manifest but missing'),
    ('add', 'sub/extra.bin', 'is not in its manifest'),
])
def test_changed_removed_or_added_file_is_refused_in_one_line(folder, change, name, says):
  integrity.write_manifest(folder)
  path = os.path.join(folder, name)
  if change == 'flip':
    _flip_byte(path)
  elif change == 'remove':
    os.remove(path)
  else:
    with open(path, 'wb') as f:
      f.write(b'x')
  with pytest.raises(integrity.TamperedArtifact) as caught:
    integrity.verify(folder, 'this artifact', 'write it again')
  message = _refusal(caught.value, name)
  assert message.startswith('this artifact: ') and says in message
  assert message.endswith('write it again')


@pytest.mark.parametrize('content', ['[]', '{"algorithm": "md5", "files": {}}', '{"files": '])
def test_an_unreadable_or_foreign_manifest_is_refused_in_one_line(folder, content):
  with open(os.path.join(folder, integrity.MANIFEST_FILE), 'w') as f:
    f.write(content)
  with pytest.raises(integrity.TamperedArtifact) as caught:
    integrity.verify(folder, 'this artifact', 'write it again')
  message = str(caught.value)
  assert '\n' not in message and message.startswith(f'this artifact: its {integrity.MANIFEST_FILE}')


def test_a_folder_without_manifest_is_unverified_and_logged_once(folder, caplog):
  caplog.set_level('WARNING', logger='absl')
  assert integrity.verify(folder, 'an old artifact', 'x') is False
  assert integrity.verify(folder, 'an old artifact', 'x') is False
  logged = [r for r in caplog.records if 'an old artifact has no' in r.getMessage()]
  assert len(logged) == 1 and 'unverified' in logged[0].getMessage()


# --------------------------------------------------------------------- checkpoints (no training)

@pytest.fixture
def saved(tmp_path):
  """Two checkpoints of a small state, written the way the loop writes them."""
  workdir = str(tmp_path / 'run')
  state = {'params': {'kernel': np.arange(4096, dtype=np.float32).reshape(64, 64)}}
  checkpointer = Checkpointer(workdir, keep=3)
  for step in (10, 20):
    checkpointer.save(step, state, {'step': step})
  checkpointer.close()
  return workdir, state


def test_each_checkpoint_gets_a_manifest_and_loads_when_untouched(saved):
  workdir, state = saved
  for step in (10, 20):
    step_folder = os.path.join(workdir, CHECKPOINTS_FOLDER, str(step))
    assert integrity.verify(step_folder, f'checkpoint {step}', 'x')
    with open(os.path.join(step_folder, integrity.MANIFEST_FILE)) as f:
      assert any(name.startswith('state/') for name in json.load(f)['files'])
  np.testing.assert_array_equal(latest_params(workdir)['kernel'], state['params']['kernel'])


def test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(saved):
  workdir, _ = saved
  step_folder = os.path.join(workdir, CHECKPOINTS_FOLDER, '20')
  data = _largest_file(os.path.join(step_folder, 'state'))
  _flip_byte(data)
  reader = Checkpointer(workdir, reading=True)
  try:
    with pytest.raises(CorruptCheckpoint) as caught:
      reader.read_host(20)
    message = _refusal(caught.value, _relative(data, step_folder))
    assert message.startswith('checkpoint 20 in ') and 'changed after it was written' in message
    reader.read_host(10)  # The step before is intact.
  finally:
    reader.close()


def test_a_checkpoint_without_manifest_still_loads(saved, caplog):
  workdir, state = saved
  step_folder = os.path.join(workdir, CHECKPOINTS_FOLDER, '20')
  os.remove(os.path.join(step_folder, integrity.MANIFEST_FILE))
  caplog.set_level('WARNING', logger='absl')
  np.testing.assert_array_equal(latest_params(workdir)['kernel'], state['params']['kernel'])
  assert any('checkpoint 20' in r.getMessage() and 'unverified' in r.getMessage()
             for r in caplog.records)


# ------------------------------------------------------------- a trained run, its exports, serve

@pytest.fixture(scope='module')
def run(tmp_path_factory, devices):
  """A tiny digits run checkpointed at steps 2 and 4, and loaded as export and serve load it."""
  c = tiny_config()
  c.num_train_steps = 4
  c.checkpoint_every_steps = 2
  c.eval_every_steps = 4
  c.compilation_cache_dir = ''
  workdir = str(tmp_path_factory.mktemp('integrity_run'))
  train.train_and_evaluate(c, workdir)
  return workdir, artifact.load(workdir)


@pytest.mark.slow  # Builds the run's state.
def test_tampered_newest_checkpoint_refused_by_load_and_set_aside_by_resume(run, tmp_path,
                                                                            caplog):
  trained_dir, loaded = run
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_dir, workdir)
  step_folder = os.path.join(workdir, CHECKPOINTS_FOLDER, '4')
  data = _largest_file(os.path.join(step_folder, 'state'))
  _flip_byte(data)
  # Loading the run for eval, export or serving names one checkpoint: it refuses.
  with pytest.raises(KilnError) as caught:
    trained_lib.load_model(loaded.config, workdir, loaded.exp)
  assert 'checkpoint 4 in ' in _refusal(caught.value, _relative(data, step_folder))
  # Resuming treats it as a corrupt newest step: moved aside, and the one before restored
  # (here one from before manifests: it loads, logged as unverified).
  os.remove(os.path.join(workdir, CHECKPOINTS_FOLDER, '2', integrity.MANIFEST_FILE))
  caplog.set_level('WARNING', logger='absl')
  exp = loaded.exp
  state, shardings = exp.create_state()
  checkpointer = Checkpointer(workdir, keep=3)
  try:
    restored, _ = checkpointer.restore_newest(exp.strategy.checkpoint_view(state),
                                              exp.strategy.restore_shardings(shardings))
  finally:
    checkpointer.close()
  assert exp.strategy.step_of(restored) == 2
  messages = [r.getMessage() for r in caplog.records]
  assert any('checkpoint 4' in m and _relative(data, step_folder) in m
             and 'resuming from checkpoint 2' in m for m in messages), messages
  assert any('checkpoint 2' in m and 'unverified' in m for m in messages), messages
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '4'))


@pytest.mark.slow  # Exports a run.
def test_jax_export_carries_a_manifest_and_a_flipped_byte_is_refused(run, tmp_path):
  workdir, loaded = run
  out = str(tmp_path / 'export')
  report = exporter.export(workdir, 'jax', out, max_examples=64, min_agreement=0.0,
                           trained=loaded)
  with open(os.path.join(out, integrity.MANIFEST_FILE)) as f:
    listed = set(json.load(f)['files'])
  assert listed == {'model.jax', exporter.SIGNATURE_JSON, exporter.EXPORT_JSON}
  assert serve_model.from_export(out, 'digits', 2).task == 'classification'
  _flip_byte(os.path.join(out, 'model.jax'))
  for load in (lambda: serve_model.from_export(out, 'digits', 2),
               lambda: formats.runner('jax', report['path'])):
    with pytest.raises(KilnError) as caught:
      load()
    message = _refusal(caught.value, 'model.jax')
    assert message.startswith(f"export '{out}'") and 'export the run again' in message


# --------------------------------------------------------------------------------- no pickle

PROJECT_FOLDERS = ('backends', 'benchmarks', 'compress', 'configs', 'core', 'doctor', 'export',
                   'input_pipeline', 'loop', 'models', 'monitor', 'optim', 'parallel', 'serve',
                   'tasks', 'trust', 'tune', 'tests')
PICKLING_MODULES = {'pickle', 'cPickle', 'cloudpickle', 'dill', 'joblib', 'shelve', 'marshal',
                    'jsonpickle'}
PICKLING_CALLS = {'torch.load', 'pd.read_pickle', 'pandas.read_pickle', 'yaml.load',
                  'yaml.unsafe_load'}


def _dotted(node) -> str:
  if isinstance(node, ast.Attribute):
    return f'{_dotted(node.value)}.{node.attr}'
  return node.id if isinstance(node, ast.Name) else ''


def test_nothing_is_loaded_with_pickle():
  """Every import and call in the project's Python: no pickling module, no loader that
  unpickles, and every np.load says allow_pickle=False."""
  sources = [path for top in PROJECT_FOLDERS for path in (REPO / top).rglob('*.py')]
  sources += list(REPO.glob('*.py'))
  found = []
  for path in sources:
    text = path.read_text()
    if 'load' not in text and not any(name in text for name in PICKLING_MODULES):
      continue  # Cannot import a pickling module or call a loader: not worth parsing.
    for node in ast.walk(ast.parse(text, filename=str(path))):
      where = f'{path.relative_to(REPO)}:{getattr(node, "lineno", 0)}'
      if isinstance(node, ast.Import):
        found += [f'{where} imports {a.name}' for a in node.names
                  if a.name.split('.')[0] in PICKLING_MODULES]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        if node.module.split('.')[0] in PICKLING_MODULES:
          found.append(f'{where} imports from {node.module}')
      elif isinstance(node, ast.Call):
        name = _dotted(node.func)
        if name in PICKLING_CALLS:
          found.append(f'{where} calls {name}')
        elif name in ('np.load', 'numpy.load') and not any(
            k.arg == 'allow_pickle' and isinstance(k.value, ast.Constant) and k.value.value is False
            for k in node.keywords):
          found.append(f'{where} calls {name} without allow_pickle=False')
  assert len(sources) > 100
  assert not found, found
