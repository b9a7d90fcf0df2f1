"""The doctor's initial-loss and overfit-one-batch checks on every config in configs/, and the
default config trained at the range test's suggested learning rate.

  .venv/bin/python benchmarks/doctor_configs.py [CONFIG.py ...] [--overfit_steps N]
      [--set KEY=VALUE ...] [--mock_tfds N]
  .venv/bin/python benchmarks/doctor_configs.py --suggested_lr [--config configs/default.py]

Configs whose data is not on this machine (TFDS downloads) are listed as skipped, with why.
`--mock_tfds N` runs them instead on N random examples per split in the dataset's own features
(tfds.testing.mock_data): noise audio of `--mock_seconds` (TFDS's own mock gives 5-50 samples,
which pad to silence and cannot be told apart), random images, labels and lowercase transcripts.
The initial loss and memorising one batch depend on the model, the loss and the shapes, not on
what the pixels or samples show, so both checks still mean something there (the data checks
would not).
"""

import argparse
import dataclasses
import glob
import os
import sys
import tempfile
import time
import zlib

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  (first: before JAX or TF start threads)

backends.configure_host(may_restart=__name__ == '__main__')

from benchmarks.throughput import load_config  # noqa: E402
from core.errors import KilnError  # noqa: E402
from doctor import run  # noqa: E402
from loop import experiment  # noqa: E402
from tune import space  # noqa: E402


def mock_tfds(num_examples: int, audio_seconds: float):
  """tfds.testing.mock_data whose variable-length features have realistic lengths."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  def fake(feature, info, rng):
    if isinstance(feature, tfds.features.FeaturesDict):
      return {k: fake(feature[k], info[k], rng) for k in feature.keys()}
    if isinstance(feature, tfds.features.ClassLabel):
      return rng.integers(feature.num_classes)
    if info.tf_dtype == tf.string:  # Transcripts: a few lowercase words.
      return ' '.join(''.join(rng.choice(list('abcdefghijklmnopqrstuvwxyz'), rng.integers(2, 7)))
                      for _ in range(rng.integers(2, 6)))
    length = (int(audio_seconds * feature.sample_rate) if isinstance(feature, tfds.features.Audio)
              else 64)  # Images of unknown size: the pipeline resizes or crops them.
    shape = [length if d is None else d for d in info.shape]
    if info.tf_dtype == tf.uint8:
      return rng.integers(0, 256, shape).astype(np.uint8)
    if info.tf_dtype.is_integer:  # Audio samples (int16) or ids.
      return np.clip(rng.normal(0, 3000, shape), -32768, 32767).astype(info.np_dtype)
    return rng.normal(size=shape).astype(info.np_dtype)

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    features, info = self.info.features, self.info.features.get_tensor_info()
    rng = np.random.default_rng(zlib.crc32(str(split).encode()))
    examples = [fake(features, info, rng) for _ in range(num_examples)]
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.tf_dtype), info)
    return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)

  return tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset)


def check(config_path: str, overfit_steps: int, overrides: dict) -> dict:
  started = time.perf_counter()
  try:
    config = space.apply_overrides(load_config(config_path), overrides)
    exp = experiment.build_experiment(config)
  except (KilnError, OSError) as error:
    return {'config': config_path, 'skipped': ' '.join(str(error).split())}
  options = dataclasses.replace(run.Options.from_config(config), checks=('init', 'overfit'))
  if overfit_steps:  # Else the config's own doctor.overfit_steps.
    options = dataclasses.replace(options, overfit_steps=overfit_steps)
  with tempfile.TemporaryDirectory() as workdir:
    report = run.diagnose_experiment(exp, workdir, options)
  by_check = {f.check: f for f in report['findings']}
  overfit = by_check.get('overfit_one_batch') or by_check.get('overfit_failed')
  initial = [f for f in report['findings'] if f.check == 'initial_loss' and f.severity != 'info']
  return {'config': config_path, 'initial': report['initial']['loss'],
          'uniform': report['initial']['uniform_loss'], 'initial_ok': not initial,
          'overfit_ok': 'overfit_one_batch' in by_check, 'overfit': overfit.message,
          'problems': sorted({f.check for f in report['findings'] if f.severity != 'info'}),
          'seconds': time.perf_counter() - started}


def suggested_lr(config_path: str) -> None:
  import train  # Heavy: only this mode trains.
  config = load_config(config_path)
  exp = experiment.build_experiment(config)
  options = dataclasses.replace(run.Options(), checks=('lr_range',))
  with tempfile.TemporaryDirectory() as workdir:
    report = run.diagnose_experiment(exp, workdir, options)
    rate = report['lr_range']['suggested']
    config = load_config(config_path)
    config.optimizer.learning_rate = rate
    summary = train.train_and_evaluate(config, os.path.join(workdir, 'run'))
  print(f"| {config_path} | configured {load_config(config_path).optimizer.learning_rate:g} | "
        f"suggested {rate:.3g} | final accuracy {100 * summary['final_eval']['accuracy']:.2f}% |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('configs', nargs='*')
  parser.add_argument('--overfit_steps', type=int, default=0, help='0: config.doctor.overfit_steps')
  parser.add_argument('--suggested_lr', action='store_true')
  parser.add_argument('--config', default='configs/default.py')
  parser.add_argument('--set', action='append', default=[],
                      help='KEY=VALUE override for every config checked (e.g. batch_size=16)')
  parser.add_argument('--mock_tfds', type=int, default=0,
                      help='TFDS configs read N random examples per split in their real shapes')
  parser.add_argument('--mock_seconds', type=float, default=1.0,
                      help='length of the mock audio clips')
  args = parser.parse_args(argv)
  if args.suggested_lr:
    suggested_lr(args.config)
    return
  paths = args.configs or sorted(
      p for p in glob.glob(os.path.join(REPO_ROOT, 'configs', '*.py'))
      if not os.path.basename(p).startswith('_') and 'def get_config' in open(p).read())
  print('| config | initial loss | uniform loss | initial ok | overfit one batch | problems | s |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  overrides = space.parse_overrides(args.set)
  for path in paths:
    name = os.path.relpath(path, REPO_ROOT)
    row = check(name, args.overfit_steps, overrides)
    if 'skipped' in row and args.mock_tfds:  # Only configs whose real data is missing.
      with mock_tfds(args.mock_tfds, args.mock_seconds):
        row = check(name, args.overfit_steps, overrides)
      row['config'] += f' (mock data, {args.mock_tfds} examples)'
    if 'skipped' in row:
      print(f"| {row['config']} | skipped: {row['skipped']} | | | | | |", flush=True)
      continue
    uniform = 'n/a' if row['uniform'] is None else f"{row['uniform']:.4g}"
    initial_ok = 'n/a' if row['uniform'] is None else 'yes' if row['initial_ok'] else 'NO'
    print(f"| {row['config']} | {row['initial']:.4g} | {uniform} | {initial_ok} | "
          f"{'yes' if row['overfit_ok'] else 'NO'}: "
          f"{row['overfit']} | {', '.join(row['problems']) or '-'} | {row['seconds']:.0f} |",
          flush=True)


if __name__ == '__main__':
  main()
