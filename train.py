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

backends.configure_host(may_restart=__name__ == '__main__')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from core.errors import KilnError  # noqa: E402
from parallel import distributed  # noqa: E402


def __getattr__(name):
  """`train.train_and_evaluate` for notebooks and tests, imported when first asked for: the
  training stack (JAX, TensorFlow, CLU: ~5 s) is then not loaded before a bad flag or file
  has been reported."""
  if name == 'train_and_evaluate':
    from loop.training import train_and_evaluate
    return train_and_evaluate
  raise AttributeError(f"module 'train' has no attribute {name!r}")


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


def check_arguments(argv) -> None:
  """The start of every config-driven entry point (train.py, doctor.py, tune.py): only the
  run's own log lines, and no stray positional arguments."""
  # Every logger (absl's, jax's, tensorflow's) ends in this handler once app.run has set it up.
  logging.get_absl_handler().addFilter(_OwnLinesOnly())
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}: pass settings as --config.KEY=VALUE')


def load_config(config_flag):
  """--config's ConfigDict, or one line naming the file that could not be loaded."""
  try:
    config = config_flag.value
    config.to_dict()  # A config file that failed to load raises only when first used.
  except OSError as e:  # The config file itself could not be loaded.
    sys.exit(f"error: {' '.join(str(e).split())}: pass an existing file to --config")
  return config


def main(argv, config_flag, workdir_flag):
  check_arguments(argv)
  if not workdir_flag.value:
    sys.exit('error: --workdir is required: pass the directory for this run')
  config = load_config(config_flag)
  distributed.initialize(config.distributed)
  try:
    from loop.training import train_and_evaluate
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


def define_config_flag(help_text: str = 'Experiment config file.'):
  """--config (a config file, with --config.KEY=VALUE overrides); a bad override exits in one
  line. For entry points' `__main__` only: it reads sys.argv."""
  try:  # ml_collections applies --config.KEY overrides while defining the flag.
    return config_flags.DEFINE_config_file('config', 'configs/default.py', help_text,
                                           lock_config=True)
  except _FLAG_ERRORS as e:
    _bad_flag_exit(e, sys.argv)


def run_entry_point(main_fn, **flag_holders) -> None:
  """app.run(main_fn) with bad --config.KEY=VALUE flags reported in one line."""
  app.run(functools.partial(main_fn, **flag_holders), flags_parser=_parse_flags)


if __name__ == '__main__':
  config_flag = define_config_flag()
  workdir_flag = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, events, summary.')
  run_entry_point(main, config_flag=config_flag, workdir_flag=workdir_flag)
