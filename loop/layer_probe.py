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
def recording(model: nnx.Module, replace_root_output=None, root_method: str = '__call__'):
  """Yields a list that fills with (module path, output) as `model`'s modules run.

  The root's output ('<model>') is what its `root_method` returns (a task's
  prediction_method: 'classify' for a BERT's class logits); `replace_root_output`, a function
  of it, replaces it (the doctor's uniform-prediction loss: zeros in place of the logits).
  """
  # iter_modules paths are tuples of attribute names and list indices.
  paths = {id(module): '/'.join(map(str, path)) for path, module in nnx.iter_modules(model)}
  records: list[tuple[str, object]] = []
  outer_trace = _current_trace()
  wrapped = {(type(module), '__call__') for _, module in nnx.iter_modules(model)}
  wrapped.add((type(model), root_method))
  originals = {(cls, name): (cls.__dict__.get(name), getattr(cls, name)) for cls, name in wrapped
               if callable(getattr(cls, name, None))}

  def wrap(call, name):
    def recorded(self, *args, **kwargs):
      out = call(self, *args, **kwargs)
      path = paths.get(id(self))
      if path == '' and name != root_method:  # The root's other methods are not its output.
        path = None
      if path is not None and _current_trace() is outer_trace:
        if path == '':
          path = '<model>'
          if replace_root_output is not None:
            out = replace_root_output(out)
        records.append((path, out))
      return out
    return recorded

  try:
    for (cls, name), (_, resolved) in originals.items():
      setattr(cls, name, wrap(resolved, name))
    yield records
  finally:
    for (cls, name), (own, _) in originals.items():
      if own is None:
        delattr(cls, name)
      else:
        setattr(cls, name, own)


def _current_trace():
  """The trace values are being made in (JAX's own, private: None where it is not there)."""
  context = getattr(jax_core, 'trace_ctx', None)
  return None if context is None else context.trace


def array_leaves(output) -> list[jax.Array]:
  """The floating-point arrays a module returned (tuples, dicts and caches included)."""
  return [x for x in jax.tree.leaves(output)
          if hasattr(x, 'dtype') and jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
