"""The few ops a backend may run faster than plain JAX, behind one switch.

Models call these instead of the JAX functions they stand for:

- `causal_attention(q, k, v, *, dropout_rate, key)`: softmax(q k^T, causal) v on token-major
  [B, T, N, H] arrays (q already scaled), dropout on the weights when `key` is given;
- `causal_attention_packed(qkv, *, scale, rotary, dropout_rate, key)`: the same on q * scale,
  k and v packed [B, T, 3, N, H] as a qkv projection writes them, q and k first turned by
  rotary tables (`apply_rotary`, a plain helper) if given;
- `random_bits(key, shape)`: uniform uint32 words (dropout masks);
- `conv_general_dilated(...)`: `jax.lax.conv_general_dilated`, as `nnx.Conv` calls it;
- `max_pool(x, window_shape, strides, padding)`: `nnx.max_pool`;
- `erf(x)`: `jax.lax.erf`, in plain StableHLO arithmetic on the portable path;
- `lstm(gates, mask, kernels, *, reverse, bias)`: the LSTM recurrence of one layer's
  directions from their projected inputs (a `lax.scan` on the portable path);
- `dense(x, kernel)`: x @ kernel for a dense layer's [..., I] x [I, O] (the same product;
  a backend may compute its kernel gradient its own way); `dot_general` is the hook
  `nnx.Linear` takes, sending its product to `dense`;
- `LayerNorm`: `nnx.LayerNorm` (same parameters), whose float32 normalisation over the last
  axis a backend's 'layer_norm(x, scale, bias, epsilon)' may take (biased variance; it
  returns None for what it declines); nnx.LayerNorm's own code is the portable path.

Each has a portable implementation here in plain JAX: what accelerators run, what
`jax.export` sees, and all there is when no backend package is installed. A backend package
(backends/cpu/) registers its own implementations for one platform with `register`.
`config.backend.cpu_kernels`, applied once per run by `configure`, decides whether they
run: 'auto' (default) where the platform is JAX's default backend and the implementation
can run there, 'xla' never (plain XLA everywhere), 'cpu' always (a one-line KilnError
where they cannot). The choice is made when a model is traced, so `portable()` around a
trace gives plain JAX whatever the run's setting (export: no custom calls).

`accelerated(op)` tells a model whether a registered implementation runs now, for a model
whose own plain-JAX formulation differs from the portable one here (the Transformer keeps
its blocked attention and its own dropout stream when nothing faster runs).
"""

import contextlib
import functools
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from backends import installed_cpu
from core.errors import KilnError

OPS = ('causal_attention', 'causal_attention_packed', 'random_bits', 'conv_general_dilated',
       'max_pool', 'lstm', 'dense', 'layer_norm')
MODES = ('auto', 'xla', 'cpu')  # config.backend.cpu_kernels values.


@dataclasses.dataclass(frozen=True)
class _Entry:
  implementation: Callable
  platform: str  # jax.default_backend() where it runs.
  ready: Callable[[], None] | None  # Raises KilnError where it cannot run (no compiler...).

  def require(self) -> None:
    """Raises a one-line KilnError unless this implementation runs here ('cpu' asks it)."""
    if jax.default_backend() != self.platform:
      raise KilnError(f"config.backend.cpu_kernels='cpu' needs a CPU backend, not "
                      f"{jax.default_backend()}: use 'auto' or 'xla'")
    if self.ready is not None:
      self.ready()

  def usable(self) -> bool:
    """Whether it runs here ('auto' takes it then, else the portable path)."""
    try:
      self.require()
    except KilnError:
      return False
    return True


_REGISTRY: dict[str, _Entry] = {}
_mode = 'auto'  # The run's config.backend.cpu_kernels (`configure`).
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar('kiln_ops_mode', default=None)


def register(op: str, implementation: Callable, *, platform: str,
             ready: Callable[[], None] | None = None) -> None:
  """Makes `implementation` stand in for `op` on `platform` (a backend package's job)."""
  if op not in OPS:
    raise KilnError(f"backend op '{op}' does not exist: register one of {', '.join(OPS)}")
  _REGISTRY[op] = _Entry(implementation, platform, ready)


def _checked(mode: str) -> str:
  """`mode` if it is a setting that can hold here; for 'cpu', every registered
  implementation must run here. Else a one-line KilnError."""
  if mode not in MODES:
    raise KilnError(f"config.backend.cpu_kernels='{mode}' must be one of {', '.join(MODES)}")
  if mode == 'cpu':
    if not _REGISTRY:
      raise KilnError("config.backend.cpu_kernels='cpu' but no CPU backend is installed "
                      "(backends/cpu/ is absent): use 'auto' or 'xla'")
    for entry in _REGISTRY.values():
      entry.require()
  return mode


def configure(backend) -> None:
  """Applies config.backend (its `cpu_kernels`) to this process; KilnError on bad values."""
  global _mode
  _mode = _checked(backend.cpu_kernels)


def mode() -> str:
  """The setting in force here: a `use`/`portable` scope's, else the run's."""
  return _scoped.get() or _mode


@contextlib.contextmanager
def use(cpu_kernels: str) -> Iterator[None]:
  """config.backend.cpu_kernels=`cpu_kernels` for what is traced inside (tests, benchmarks)."""
  token = _scoped.set(_checked(cpu_kernels))
  try:
    yield
  finally:
    _scoped.reset(token)


def portable() -> contextlib.AbstractContextManager[None]:
  """Every op takes its plain-JAX path inside (for jax.export: no backend custom calls).
  It acts on tracing: jit a function not traced before (jit reuses a function's trace)."""
  return use('xla')


def _chosen(op: str) -> Callable | None:
  """The registered implementation of `op` that runs now, or None for the portable one."""
  current = mode()
  entry = _REGISTRY.get(op)
  if current == 'xla' or entry is None:
    return None
  if current == 'cpu':
    entry.require()
    return entry.implementation
  return entry.implementation if entry.usable() else None


def accelerated(op: str) -> bool:
  """Whether a registered (faster) implementation of `op` runs if called now."""
  return _chosen(op) is not None


_LEVELS = 1 << 16  # Dropout keeps 16-bit draws below (1 - rate) * 2^16, as the kernels do.


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float = 0.0,
                     key: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T, causal) v on token-major [B, T, N, H] arrays (q already scaled by
  1/sqrt(H)), inverted dropout at `dropout_rate` on the softmax weights when `key` is given;
  float32 inside, q's dtype out. The portable path's masks come from jax.random, so they
  differ from a backend's for the same key."""
  chosen = _chosen('causal_attention')
  if chosen is not None:
    return chosen(q, k, v, dropout_rate=dropout_rate, key=key)
  length = q.shape[1]
  scores = jnp.einsum('btnh,bsnh->bnts', q, k, preferred_element_type=jnp.float32)
  visible = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  if key is not None and dropout_rate > 0.0:
    threshold = round((1.0 - dropout_rate) * _LEVELS)
    keep = (jax.random.bits(key, weights.shape, jnp.uint32) >> 16) < threshold
    weights = jnp.where(keep, weights * (_LEVELS / threshold), 0.0)
  y = jnp.einsum('bnts,bsnh->btnh', weights, v.astype(jnp.float32))
  return y.astype(q.dtype)


def apply_rotary(x: jax.Array, cos, sin) -> jax.Array:
  """x [..., T, N, H] turned by rotary angles (Su et al. 2021) whose cos and sin are [..., T,
  H/2]: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in x's dtype."""
  cos, sin = (jnp.asarray(t, x.dtype)[..., None, :] for t in (cos, sin))
  # split, not x[..., :half]: indexing under a symbolic batch dim (jax.export) lowers to a
  # dynamic gather that the TFLite converter cannot read.
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_attention_packed(qkv: jax.Array, *, scale: float, rotary=None,
                            dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
  """`causal_attention` of q * scale, k and v packed in qkv [B, T, 3, N, H] (a qkv
  projection's output), q and k first turned by `apply_rotary` with `rotary` = (cos, sin)
  [T, H/2] if given -> [B, T, N, H]. A backend may do all of it in one call each way: no
  slices of qkv, rotations or concatenated gradients around it."""
  chosen = _chosen('causal_attention_packed')
  if chosen is not None:
    return chosen(qkv, scale=scale, rotary=rotary, dropout_rate=dropout_rate, key=key)
  q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
  if rotary is not None:
    q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
  return causal_attention(q * scale, k, v, dropout_rate=dropout_rate, key=key)


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform uint32 words of `shape` (jax.random.bits where no backend draws them)."""
  chosen = _chosen('random_bits')
  if chosen is not None:
    return chosen(key, shape)
  return jax.random.bits(key, shape, jnp.uint32)


def conv_general_dilated(inputs: jax.Array, kernel: jax.Array, window_strides, padding,
                         **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated` (same arguments), the hook `nnx.Conv` takes."""
  chosen = _chosen('conv_general_dilated')
  if chosen is not None:
    return chosen(inputs, kernel, window_strides, padding, **kwargs)
  return lax.conv_general_dilated(inputs, kernel, window_strides, padding, **kwargs)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding='VALID') -> jax.Array:
  """`nnx.max_pool` (same arguments, outputs and gradients)."""
  chosen = _chosen('max_pool')
  if chosen is not None:
    return chosen(x, window_shape, strides, padding)
  return nnx.max_pool(x, window_shape=tuple(window_shape), strides=strides, padding=padding)


# Eigen's / XLA's float32 erf: x * P(x^2) / Q(x^2) on x clamped to [-4, 4] (|error| < 1e-6
# against float64 erf), highest power first.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def erf(x: jax.Array) -> jax.Array:
  """`jax.lax.erf`; on the portable path the rational approximation XLA's CPU erf expands to,
  written in plain ops. `lax.erf` lowers to chlo.erf, which a serialized artifact carries as
  a StableHLO composite that TensorFlow 2.21's XlaCallModule cannot read (export fails)."""
  if mode() != 'xla':
    return jax.lax.erf(x)
  clamped = jnp.clip(x.astype(jnp.float32), -4.0, 4.0)
  square = clamped * clamped
  numerator = functools.reduce(lambda acc, c: acc * square + c, _ERF_P, jnp.zeros_like(square))
  denominator = functools.reduce(lambda acc, c: acc * square + c, _ERF_Q, jnp.zeros_like(square))
  return (clamped * numerator / denominator).astype(x.dtype)


def lstm_cell(gates: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One LSTM step from its pre-activation gates [..., 4H] (input, forget, cell, output:
  the projected input plus h @ hidden kernel) and cell state c [..., H] -> (h', c')."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def lstm(x: jax.Array, input_kernel: jax.Array, mask: jax.Array, kernels: jax.Array, *,
         reverse: Sequence[bool], bias: jax.Array | None = None) -> jax.Array:
  """The LSTM layer of D directions (models/recurrent.py) at once, from zero state: inputs
  x [B, T, F] projected by `input_kernel` [F, D*4H] (direction d's gates at d*4H) plus
  `bias` [D*4H] if given, a [B, T] mask of valid frames and hidden kernels [D, H, 4H] ->
  hidden states [B, T, D*H] (direction d's at d*H). Direction d runs from the last frame
  when reverse[d]. A masked step leaves the state as it was and outputs 0.

  The portable path projects every frame in one 2-D matmul over the B*T frames (from a 3-D
  form, XLA:CPU's gradient transposed the [B*T, D*4H] gate gradient for the kernel's; from
  the 2-D form it transposes x, 4H / F times smaller), then runs one `lax.scan` of T steps
  that advances every direction with one batched [D, B, H] x [D, H, 4H] matmul (the
  reversed ones on flipped time)."""
  chosen = _chosen('lstm')
  if chosen is not None:
    return chosen(x, input_kernel, mask, kernels, reverse=tuple(reverse), bias=bias)
  batch, length, features = x.shape
  gates = dense(x.reshape(batch * length, features), input_kernel).reshape(batch, length, -1)
  if bias is not None:
    gates = gates + bias
  directions, hidden, _ = kernels.shape
  flip = lambda x, d: x[:, ::-1] if reverse[d] else x  # noqa: E731  [B, T, ...] time flip.
  gates = jnp.stack([flip(gates[..., d * 4 * hidden:(d + 1) * 4 * hidden], d)
                     for d in range(directions)], 1)  # [B, D, T, 4H]
  masks = jnp.stack([flip(mask, d) for d in range(directions)], 1)  # [B, D, T]

  def step(carry, inputs):
    h, c = carry
    gx, m = inputs  # [D, B, 4H], [D, B]
    h_new, c_new = lstm_cell(gx + jnp.einsum('dbh,dhk->dbk', h, kernels), c)
    m = m[..., None]
    return (jnp.where(m, h_new, h), jnp.where(m, c_new, c)), jnp.where(m, h_new, 0.0)

  zeros = jnp.zeros((directions, batch, hidden), gates.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros),
                       (gates.transpose(2, 1, 0, 3), masks.transpose(2, 1, 0)))
  # hs [T, D, B, H] -> each direction back in frame order, side by side: [B, T, D*H].
  return jnp.concatenate([flip(hs[:, d].swapaxes(0, 1), d) for d in range(directions)], -1)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., I] @ kernel [I, O] -> [..., O]: a dense layer's product."""
  chosen = _chosen('dense')
  if chosen is not None:
    return chosen(x, kernel)
  return x @ kernel


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters, so checkpoints load either way) whose float32
  normalisation over the last axis goes through a backend's `layer_norm`: XLA:CPU splits
  one into ~13 thunks forward and backward. Everything else (no backend, masks, other axes,
  dtypes the backend declines) runs nnx.LayerNorm's own code."""

  def __call__(self, x, *, mask=None):
    chosen = _chosen('layer_norm')
    if (chosen is not None and mask is None and self.use_scale and
        self.reduction_axes in (-1, (-1,)) and self.feature_axes in (-1, (-1,)) and
        self.dtype in (None, jnp.float32)):
      y = chosen(x, self.scale[...], self.bias[...] if self.use_bias else None, self.epsilon)
      if y is not None:
        return y
    return super().__call__(x, mask=mask)


_LAX_DOT_GENERAL = lax.dot_general
_LAX_DOT_GENERAL_CODE = lax.dot_general.__code__


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jax.Array:
  """`jax.lax.dot_general` (same arguments), the hook `nnx.Linear` takes: its product (lhs's
  last dimension against a 2-D rhs's first, nothing else asked) goes through `dense`.
  Quantization (qwix) swaps `lax.dot_general` out, or its code, while a model runs and may
  hand in quantized weights that are no arrays: those calls go to whatever `lax.dot_general`
  is then."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  intercepted = (lax.dot_general is not _LAX_DOT_GENERAL
                 or lax.dot_general.__code__ is not _LAX_DOT_GENERAL_CODE)
  if (not intercepted and isinstance(lhs, jax.Array) and isinstance(rhs, jax.Array)
      and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch and precision is None and lhs.dtype == rhs.dtype
      and preferred_element_type in (None, lhs.dtype)
      and all(value is None for value in kwargs.values())):
    return dense(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def _register_installed_backends() -> None:
  """The one registration: backends/cpu/ when present (delete the folder for plain XLA)."""
  cpu = installed_cpu()
  if cpu is not None:
    cpu.register(register)


_register_installed_backends()
