"""Reading back what a run wrote to its workdir: `summary.json` and TensorBoard scalars.

For notebooks and scripts that plot a run (while it trains or after it finished);
the loop itself only writes.
"""

import json
import os

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from core.errors import KilnError

SUMMARY_FILE = 'summary.json'  # As train.train_and_evaluate names it.


def read_summary(workdir: str) -> dict:
  """The run's summary.json (final eval, throughput, MFU, memory, ...)."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    raise KilnError(f"no {SUMMARY_FILE} in '{workdir}': pass the workdir of a run that "
                    'train.py (or train_and_evaluate) has finished')
  with open(path) as f:
    return json.load(f)


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """tag -> (steps, values) of every scalar in the workdir's TensorBoard event files,
  sorted by step. A step written twice (a resumed run repeats its last log step) keeps
  the value written last."""
  tags = []
  if os.path.isdir(workdir):
    # CLU writes scalars as summary-v2 tensors; size_guidance 0 keeps every one of them.
    accumulator = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()[event_accumulator.TENSORS]
  if not tags:
    raise KilnError(f"no TensorBoard scalars in '{workdir}': pass the workdir of a run "
                    'that has logged at least once')
  scalars = {}
  for tag in tags:
    by_step = {}
    for event in accumulator.Tensors(tag):
      value = tensor_util.make_ndarray(event.tensor_proto)
      if value.ndim == 0 and value.dtype.kind in 'fiu':  # Skips text (e.g. hparams) tensors.
        by_step[event.step] = float(value)
    if by_step:
      steps = np.array(sorted(by_step))
      scalars[tag] = (steps, np.array([by_step[s] for s in steps]))
  return scalars
