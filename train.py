"""Kiln's entry point: the story of one training run.

  python train.py --config=configs/default.py --workdir=runs/default \
      [--config.optimizer.learning_rate=1e-3 ...]

`train_and_evaluate(config, workdir)` is importable from tests and notebooks.
"""

import functools
import os
import sys

# TensorFlow's C++ INFO lines (e.g. tf.data's end-of-sequence notices); read at its import.
# Its oneDNN notice at import ignores this and still prints.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from core.errors import KilnError  # noqa: E402
from loop.training import train_and_evaluate  # noqa: E402,F401 (offered to notebooks, tests)
from parallel import distributed  # noqa: E402


class _OwnLinesOnly:
  """Keeps the run's own lines (Kiln's modules; CLU's echo of metrics and progress) and every
  library's warnings; drops libraries' INFO lines (Orbax alone logs ~40 per checkpoint)."""

  _KEPT_LIBRARY_PATHS = ('/clu/metric_writers/', '/clu/platform/')

  def filter(self, record) -> bool:
    if record.levelno >= logging.converter.STANDARD_WARNING:  # logging.WARNING is absl's -1.
      return True
    if record.funcName == 'write_hparams':  # The whole config on one line; TensorBoard has it.
      return False
    path = record.pathname.replace(os.sep, '/')
    if '/site-packages/' in path or '/dist-packages/' in path:
      return any(kept in path for kept in self._KEPT_LIBRARY_PATHS)
    return True


def main(argv, config_flag, workdir_flag):
  # Every logger (absl's, jax's, tensorflow's) ends in this handler once app.run has set it up.
  logging.get_absl_handler().addFilter(_OwnLinesOnly())
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}: pass settings as --config.KEY=VALUE')
  if not workdir_flag.value:
    sys.exit('error: --workdir is required: pass the directory for this run')
  try:
    config = config_flag.value
    config.to_dict()  # A config file that failed to load raises only when first used.
  except OSError as e:  # The config file itself could not be loaded.
    sys.exit(f"error: {' '.join(str(e).split())}: pass an existing file to --config")
  distributed.initialize(config.distributed)
  try:
    train_and_evaluate(config, workdir_flag.value)
  except KilnError as e:
    sys.exit(f'error: {e}')
  workdir = os.path.abspath(workdir_flag.value)
  logging.info('Results in %s: summary.json, checkpoints/, TensorBoard events (tensorboard '
               '--logdir=%s)', workdir, workdir)


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _bad_flag_exit(error: Exception, argv: list[str]):
  """Reports a bad --config.KEY=VALUE as one line instead of a traceback."""
  overrides = [a for a in argv[1:] if a.startswith('--config.')]
  detail = ' '.join(str(error).replace('"', '').split())
  culprit = next((a for a in overrides if a.split('=')[0].rsplit('.', 1)[-1] in detail), None)
  where = f'{culprit}: ' if culprit else ''
  sys.exit(f'error: {where}{detail}: use only keys and value types that the config file defines')


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _bad_flag_exit(e, argv)


if __name__ == '__main__':
  try:  # ml_collections applies --config.KEY overrides while defining the flag.
    config_flag = config_flags.DEFINE_config_file(
        'config', 'configs/default.py', 'Experiment config file.', lock_config=True)
  except _FLAG_ERRORS as e:
    _bad_flag_exit(e, sys.argv)
  workdir_flag = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, events, summary.')
  app.run(functools.partial(main, config_flag=config_flag, workdir_flag=workdir_flag),
          flags_parser=_parse_flags)
