"""Every sub-module's output in one forward pass of any NNX model, in call order.

The guard names the first layer whose output went non-finite, and the doctor measures
activation scales and dead units per layer, without models cooperating (no `sow` calls):
while `recording` is open, the `__call__` of each module class in the model records what
its instances return. Use it inside one trace (a jitted function) or eagerly; the classes
are restored on exit. Calls made inside an inner trace (a module run in a `lax.scan` body, as
RNN-T decoding does) are not recorded: their values do not exist outside that body.
"""

import contextlib

import jax
from flax import nnx
from jax._src import core as jax_core  # Private: only to tell an inner trace from ours.



@contextlib.contextmanager
def recording(model: nnx.Module, replace_root_output=None):
  """Yields a list that fills with (module path, output) as `model`'s modules run.

  `replace_root_output`, a function of the root module's output, replaces what the model
  returns (the doctor's uniform-prediction loss: zeros in place of the logits).
  """
  # iter_modules paths are tuples of attribute names and list indices.
  paths = {id(module): '/'.join(map(str, path)) or '<model>'
           for path, module in nnx.iter_modules(model)}
  records: list[tuple[str, object]] = []
  outer_trace = _current_trace()
  classes = {type(module) for _, module in nnx.iter_modules(model)}
  originals = {cls: (cls.__dict__.get('__call__'), cls.__call__) for cls in classes
               if callable(getattr(cls, '__call__', None))}

  def wrap(call):
    def recorded(self, *args, **kwargs):
      out = call(self, *args, **kwargs)
      path = paths.get(id(self))
      if path is not None and _current_trace() is outer_trace:
        if path == '<model>' and replace_root_output is not None:
          out = replace_root_output(out)
        records.append((path, out))
      return out
    return recorded

  try:
    for cls, (_, resolved) in originals.items():
      cls.__call__ = wrap(resolved)
    yield records
  finally:
    for cls, (own, _) in originals.items():
      if own is None:
        del cls.__call__
      else:
        cls.__call__ = own


def _current_trace():
  """The trace values are being made in (JAX's own, private: None where it is not there)."""
  context = getattr(jax_core, 'trace_ctx', None)
  return None if context is None else context.trace


def array_leaves(output) -> list[jax.Array]:
  """The floating-point arrays a module returned (tuples, dicts and caches included)."""
  return [x for x in jax.tree.leaves(output)
          if hasattr(x, 'dtype') and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
