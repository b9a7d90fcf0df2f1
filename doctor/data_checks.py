"""Data checks: what the model will be fed, read on the host before any training.

Every check works on batches as the task yields them (dicts of NumPy arrays), so it holds
for any task: float arrays are inputs, 1-D integer 'label' arrays are class labels, 'tokens'
are vocabulary ids, keys ending in 'mask' weigh examples or positions.
"""

import hashlib

import numpy as np

from doctor.findings import Finding
from input_pipeline import batching

BOOKKEEPING = ('label', 'labels', 'mask', 'index', 'label_len', 'boxes', 'mix_label', 'mix_weight')
LEAKAGE_LIMIT = 0.01  # Share of eval examples found in train above which it is an error.
NORMALISED_MEAN = 2.0  # |mean| of an input channel above this: not normalised.
NORMALISED_STD = (1e-3, 4.0)  # Std of an input channel outside this: not normalised (or constant).
NEIGHBOUR_EXAMPLES = 1024  # Examples in the nearest-neighbour label check.


def take_examples(batches, limit: int) -> dict[str, np.ndarray]:
  """The first `limit` examples (mask 1 where batches carry a mask) of `batches`, concatenated."""
  parts, count = [], 0
  for batch in batches:
    if 'mask' in batch and np.ndim(batch['mask']) == 1:
      keep = np.asarray(batch['mask']) > 0
      batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    parts.append(batch)
    count += len(next(iter(batch.values())))
    if count >= limit:
      break
  return {k: np.concatenate([p[k] for p in parts])[:limit] for k in parts[0]}


def _inputs(examples: dict) -> dict[str, np.ndarray]:
  return {k: v for k, v in examples.items() if k not in BOOKKEEPING and 'mask' not in k}


def _float_inputs(examples: dict) -> dict[str, np.ndarray]:
  return {k: v for k, v in _inputs(examples).items() if np.issubdtype(v.dtype, np.floating)}


def _hashes(examples: dict) -> list[bytes]:
  arrays = [np.ascontiguousarray(v) for _, v in sorted(_inputs(examples).items())]
  return [hashlib.sha1(b''.join(a[i].tobytes() for a in arrays)).digest()
          for i in range(len(arrays[0]))] if arrays else []


def check_nonfinite(split: str, examples: dict) -> list[Finding]:
  out = []
  for key, values in _float_inputs(examples).items():
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
      out.append(Finding('nonfinite_inputs', 'error',
                         f"{int(bad.sum())} of {len(bad)} {split} examples have NaN/Inf in "
                         f"'{key}' (first at example {int(np.argmax(bad))})",
                         'drop or repair those records in the input pipeline',
                         {'split': split, 'key': key, 'count': int(bad.sum())}))
  return out


def check_normalisation(examples: dict) -> list[Finding]:
  out = []
  for key, values in _float_inputs(examples).items():
    flat = values.reshape(-1, values.shape[-1] if values.ndim > 2 else 1).astype(np.float64)
    flat = flat[np.isfinite(flat).all(axis=1)]
    if not len(flat):
      continue
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    off = (np.abs(mean) > NORMALISED_MEAN) | (std < NORMALISED_STD[0]) | (std > NORMALISED_STD[1])
    if off.any():
      out.append(Finding(
          'unnormalized_inputs', 'error' if (std > NORMALISED_STD[1]).any() else 'warning',
          f"'{key}' is not normalised: per-channel mean {np.round(mean, 3).tolist()[:8]}, std "
          f'{np.round(std, 3).tolist()[:8]} (expected |mean| <= {NORMALISED_MEAN} and std in '
          f'[{NORMALISED_STD[0]}, {NORMALISED_STD[1]}])',
          'scale inputs to about zero mean and unit std (images: pixels in [0, 1], then '
          'config.augment.mean/std)',
          {'key': key, 'mean': mean.tolist(), 'std': std.tolist()}))
  return out


def check_labels(train: dict, eval_: dict, num_classes: int | None) -> list[Finding]:
  """Label counts per split and classes a split lacks; labels unrelated to their inputs
  (leave-one-out 1-nearest-neighbour agreement on the inputs no better than chance)."""
  if 'label' not in train or np.ndim(train['label']) != 1:
    return []
  out = []
  num_classes = num_classes or int(max(train['label'].max(), eval_.get('label', [0]).max())) + 1
  counts = {split: np.bincount(np.asarray(ex['label']).astype(int), minlength=num_classes)
            for split, ex in (('train', train), ('eval', eval_)) if 'label' in ex}
  for split, count in counts.items():
    absent = np.flatnonzero(count == 0).tolist()
    # A sample of a few per class could miss one by chance: only count absences that can't be.
    if absent and count.sum() >= 20 * num_classes:
      out.append(Finding('class_absent', 'error',
                         f'{split} split: classes {absent[:10]} never appear in {int(count.sum())} '
                         f'examples ({num_classes} classes)',
                         'check the split and the label mapping; stratify the held-out split',
                         {'split': split, 'absent': absent, 'counts': count.tolist()}))
    share = count.max() / max(count.sum(), 1)
    if num_classes > 2 and share > 0.9:
      out.append(Finding('label_imbalance', 'warning',
                         f'{split} split: class {int(count.argmax())} is {share:.0%} of labels',
                         'reweight or resample classes, and judge by a per-class metric',
                         {'split': split, 'counts': count.tolist()}))
  inputs = _float_inputs(train)
  if len(inputs) == 1:
    x = next(iter(inputs.values()))[:NEIGHBOUR_EXAMPLES]
    labels = np.asarray(train['label'][:NEIGHBOUR_EXAMPLES]).astype(int)
    x = x.reshape(len(x), -1).astype(np.float32)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    squared = (x * x).sum(axis=1)
    distances = squared[:, None] + squared[None, :] - 2 * x @ x.T
    np.fill_diagonal(distances, np.inf)
    agreement = float(np.mean(labels[distances.argmin(axis=1)] == labels))
    chance = float(np.bincount(labels).max() / len(labels))
    if agreement < chance + 0.1 * (1 - chance):
      out.append(Finding('labels_unrelated', 'error',
                         f"training labels look unrelated to the inputs: an example's nearest "
                         f'neighbour shares its label {agreement:.1%} of the time, chance is '
                         f'{chance:.1%} ({len(labels)} examples)',
                         'check that labels stay aligned with their inputs (shuffled or '
                         'misordered labels, a wrong label column)',
                         {'agreement': agreement, 'chance': chance}))
  return out


def check_leakage(train_examples, eval_examples) -> list[Finding]:
  train_hashes = set(_hashes(train_examples))
  eval_hashes = _hashes(eval_examples)
  shared = sum(h in train_hashes for h in eval_hashes)
  if not eval_hashes or shared / len(eval_hashes) <= LEAKAGE_LIMIT:
    return []
  return [Finding('leakage', 'error',
                  f'{shared} of {len(eval_hashes)} eval examples ({shared / len(eval_hashes):.1%})'
                  ' also appear in the training split (identical inputs, by content hash)',
                  'split before augmenting or windowing and deduplicate across splits; eval '
                  'figures are inflated until then',
                  {'shared': shared, 'eval_examples': len(eval_hashes)})]


def check_tokens(examples: dict, vocab_size: int | None) -> list[Finding]:
  if 'tokens' not in examples or not vocab_size:
    return []
  tokens = np.asarray(examples['tokens'])
  bad = (tokens < 0) | (tokens >= vocab_size)
  if not bad.any():
    return []
  return [Finding('tokens_out_of_vocab', 'error',
                  f'{int(bad.sum())} token ids lie outside [0, {vocab_size}) (min {tokens.min()}, '
                  f'max {tokens.max()}); an embedding lookup clamps or fills them silently',
                  'use the tokenizer the model was sized for, or raise the vocabulary size',
                  {'count': int(bad.sum())})]


def check_masks(examples: dict) -> list[Finding]:
  out = []
  for key, mask in examples.items():
    if 'mask' not in key or key == 'mask' or np.ndim(mask) < 2:
      continue
    empty = np.asarray(mask).reshape(len(mask), -1).sum(axis=1) == 0
    if empty.mean() > 0.01:
      out.append(Finding('empty_mask', 'error',
                         f"'{key}' is all zero for {int(empty.sum())} of {len(empty)} examples: "
                         'they add nothing to the loss',
                         'check the padding mask (which positions count) and sequence lengths',
                         {'key': key, 'empty': int(empty.sum())}))
  return out


def run(task, host_batch: int, sample_examples: int) -> tuple[list[Finding], dict]:
  """The data findings for `task` (data loaded), and the statistics behind them."""
  train = take_examples(task.train_batches(host_batch, 0), sample_examples)
  eval_ = take_examples(task.eval_batches(host_batch), sample_examples)
  # Leakage: every example of both splits as stored (train un-augmented), up to a bound.
  limit = 50 * sample_examples
  train_all = take_examples(batching.eval_batches(task.source.train, host_batch), limit)
  eval_all = take_examples(task.eval_batches(host_batch), limit)
  vocab = getattr(getattr(task, 'tokenizer', None), 'vocab_size', None)
  findings = [*check_nonfinite('train', train), *check_nonfinite('eval', eval_),
              *check_normalisation(train),
              *check_labels(train, eval_, getattr(task.source, 'num_classes', None)),
              *check_leakage(train_all, eval_all),
              *check_tokens(train, vocab), *check_tokens(eval_, vocab),
              *check_masks(train)]
  stats = {'train_examples_read': len(next(iter(train.values()))),
           'eval_examples_read': len(next(iter(eval_.values())))}
  return findings, stats

