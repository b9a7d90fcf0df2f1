"""Model statistics for every run's summary: parameters, nonzeros, and stored size.

`bytes_sparse` is what a sparse format would store, each tensor in whichever of its dense
or sparse form is smaller:
- dense: 4 bytes (fp32) per value;
- unstructured sparse: the nonzero values (4 bytes each) plus a bitmask of 1 bit per weight;
- N:M: the kept n/m of the values plus, per kept value, its index within the group of m,
  ceil(log2 m) bits (2 bits for 2:4: the metadata of NVIDIA's sparse tensor cores and
  cuSPARSELt, Mishra et al. 2021, arXiv:2104.08378).
Only prunable kernels take a sparse form; every other leaf (biases, norms, embeddings)
counts fully.
"""

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp

from core.paths import path_string

FP32_BYTES = 4


def _sparse_bytes(size: int, nonzero: int, n_m: tuple[int, int] | None) -> int:
  if n_m is not None:
    n, m = n_m
    kept = size * n // m
    return kept * FP32_BYTES + math.ceil(kept * math.ceil(math.log2(m)) / 8)
  return nonzero * FP32_BYTES + math.ceil(size / 8)


def model_stats(params, prunable: Iterable[str] | None = None,
                n_m: tuple[int, int] | None = None) -> dict:
  """{'params', 'nonzero_params', 'sparsity', 'model_sparsity', 'prunable_params',
  'bytes_dense', 'bytes_sparse'} of a params tree (jax or NumPy arrays; sharded arrays are
  counted where they live, only scalars come to the host).

  `prunable`: the 'a/b/kernel' paths pruning may touch (None: every leaf of 2 or more
  dims); `sparsity` is the fraction of their weights that are zero, `model_sparsity` that
  of all parameters. `n_m`: (n, m) when the prunable kernels are N:M sparse.
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  prunable = None if prunable is None else set(prunable)
  total = nonzero = prunable_total = prunable_nonzero = sparse_bytes = 0
  for path, leaf in leaves:
    size = math.prod(leaf.shape)
    count = int(jnp.count_nonzero(leaf))
    total += size
    nonzero += count
    is_prunable = leaf.ndim >= 2 if prunable is None else path_string(path) in prunable
    if is_prunable:
      prunable_total += size
      prunable_nonzero += count
      sparse_bytes += min(size * FP32_BYTES, _sparse_bytes(size, count, n_m))
    else:
      sparse_bytes += size * FP32_BYTES
  return {
      'params': total,
      'nonzero_params': nonzero,
      'sparsity': 1.0 - prunable_nonzero / prunable_total if prunable_total else 0.0,
      'model_sparsity': 1.0 - nonzero / total if total else 0.0,
      'prunable_params': prunable_total,
      'bytes_dense': total * FP32_BYTES,
      'bytes_sparse': sparse_bytes,
  }
