"""Lowerings of one channels-last convolution, and the per-shape choice between them.

XLA's native CPU convolution is slow for the small maps and many channels of a
ResNet's late stages and for several backward passes: a small fraction of the speed of
a matmul doing the same arithmetic (benchmarks/conv_throughput.py prints both per shape).
A convolution is a matrix product once the inputs each output reads are
laid side by side, so the GEMM lowerings here rewrite it into `dot_general`s, which
XLA's CPU backend runs near its matmul peak.

Lowerings (all exact rewrites of `lax.conv_general_dilated`, forward and backward):
- 'native': `lax.conv_general_dilated` itself (always what accelerators use).
- 'im2col': the input slices each kernel tap reads (strided, dilated) concatenated
  along channels, then one matmul with the kernel as a (taps * C_in, C_out) matrix.
  Taps that read only zero padding for every output are dropped, so a 3x3 'SAME'
  conv on a 1x1 map is a plain matmul. 1x1 convs are a (strided) slice + one matmul.
  Grouped convs batch the matmul over groups; depthwise convs (one input channel per
  group) are a sum of per-tap multiply-adds, since their matmuls would be 1 deep.
- 'shifted': the same taps as one matmul each, summed, with no patch matrix built
  (ungrouped convs).
- 'dense': for maps of a few pixels, the whole conv as one matmul from the flattened
  input map (H*W*C_in) to the flattened output map (H'*W'*C_out), its matrix built
  from the kernel taps each (input, output) pixel pair uses (zero where none). On a
  2x2 map every pair is a real tap, so it does exactly the conv's arithmetic, where
  im2col would multiply 5 of 9 taps against padding.
- 'direct': Kiln's compiled CPU kernel (backends/cpu/kernels.py): per thread, tiles of
  whole images whose patches (live taps only) are gathered into a cache-sized buffer and
  multiplied with Eigen GEMMs; input gradients scatter the patch gradients back. The
  im2col arithmetic without the patch matrix ever leaving the core's cache, and without
  the padding rows of taps at a small map's top and bottom edges. Float32 1-D
  and 2-D ungrouped convs, on CPU when the kernels build.

Each pass of a conv (forward, input gradient, kernel gradient) may take a different
lowering (a `Plan`, joined by a custom VJP): XLA's CPU convolution is often fast
forward on 8x8 maps and slow for the same conv's kernel gradient.

`choose` picks a plan per (backend, shape, dtype, strides, padding, dilation, groups):
accelerators always take 'native'. On one CPU device, by default, it takes the rule table
(`rule`) where the convs run with an instruction set the table was measured on
(RULE_TABLE_ISAS: AVX-512), and elsewhere (an AVX2 build or host) times every candidate per
pass, as KILN_CONV_LOWERING=measure does everywhere: best of a few runs, the fastest per
pass wins, and the plan is cached on disk per host and instruction set next to the
measured matmul peak (core.host.cache_dir()). With several
CPU devices (the tests' fake devices), whose per-device shards no single-device rule
or timing represents, convs stay native unless a mode is set. KILN_CONV_LOWERING also
takes 'rules', or a lowering's name to force on every conv (e.g. 'native' to compare).
"""

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from core import host
from core.errors import KilnError
from core.io import write_json_atomic
from backends.cpu import kernels as cpu_kernels

LOWERINGS = ('native', 'im2col', 'shifted', 'dense', 'direct')
CACHE_FILE = 'conv_lowerings.json'
MODE_ENV = 'KILN_CONV_LOWERING'
# Instruction sets `rule` was derived on (benchmarks/conv_throughput.py, figures in
# benchmarks/README.md, "conv lowerings": a 2-core AMD EPYC with AVX-512). On an AVX2-only
# host timing each shape trained ResNet-18 1.1-1.7x faster than the table (issue 26), and
# on an AVX2 build here 1.13x, so convs running another instruction set are timed instead.
RULE_TABLE_ISAS = ('AVX-512',)
# 'dense' multiplies every (input pixel, output pixel) pair; past this many pairs (an
# 8x8 map has 4096) its matrix outgrows the conv's own arithmetic and memory.
DENSE_MAX_PIXEL_PAIRS = 64
# `measure` times runs of at least this long (several calls of a fast pass).
MIN_TIMED_SECONDS = 0.002


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Everything a lowering's speed depends on, for channels-last layouts
  (N, *spatial, C_in) * (*kernel, C_in / groups, C_out) -> (N, *out_spatial, C_out)."""
  input_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  dilation: tuple[int, ...]
  groups: int
  dtype: str

  @property
  def rank(self) -> int:
    return len(self.strides)

  @property
  def out_spatial(self) -> tuple[int, ...]:
    return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1 for size, k, d, s, (lo, hi) in zip(
        self.input_shape[1:-1], self.kernel_shape[:-2], self.dilation, self.strides,
        self.padding))

  def live_taps(self) -> list[tuple[int, ...]]:
    """Kernel taps that read real input for at least one output position."""
    per_dim = []
    for size, k, d, s, (lo, _), out in zip(self.input_shape[1:-1], self.kernel_shape[:-2],
                                           self.dilation, self.strides, self.padding,
                                           self.out_spatial):
      per_dim.append([t for t in range(k)
                      if any(0 <= o * s - lo + t * d < size for o in range(out))])
    return list(itertools.product(*per_dim))

  def tap_index(self) -> np.ndarray:
    """[input pixel, output pixel] -> flat kernel tap that joins them, or -1 for none."""
    spatial, out = self.input_shape[1:-1], self.out_spatial
    kernel = self.kernel_shape[:-2]
    index = np.full((math.prod(spatial), math.prod(out)), -1, dtype=np.int64)
    for o_flat, o in enumerate(itertools.product(*(range(n) for n in out))):
      for t_flat, t in enumerate(itertools.product(*(range(k) for k in kernel))):
        pos = [oi * s - lo + ti * d for oi, ti, s, d, (lo, _) in zip(
            o, t, self.strides, self.dilation, self.padding)]
        if all(0 <= p < n for p, n in zip(pos, spatial)):
          index[np.ravel_multi_index(pos, spatial), o_flat] = t_flat
    return index

  def key(self, backend: str) -> str:
    return (f'{backend} {self.dtype} in{list(self.input_shape)} k{list(self.kernel_shape)} '
            f's{list(self.strides)} p{[list(p) for p in self.padding]} '
            f'd{list(self.dilation)} g{self.groups}')


def channels_last_spec(inputs, kernel, window_strides, padding, *, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None,
                       feature_group_count: int = 1) -> ConvSpec | None:
  """The ConvSpec of a `conv_general_dilated` call, or None if the GEMM lowerings do not
  cover it (not channels-last as nnx.Conv lays it out, input dilation, batch groups)."""
  rank = inputs.ndim - 2
  if rank < 1 or kernel.ndim != inputs.ndim:
    return None
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return None
  if rank > 3:
    return None
  spatial = 'HWD'[:rank]
  channels_last = lax.conv_dimension_numbers(
      inputs.shape, kernel.shape, (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'))
  if lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers) != channels_last:
    return None
  dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * rank
  strides = tuple(window_strides)
  spans = [(k - 1) * d + 1 for k, d in zip(kernel.shape[:-2], dilation)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(inputs.shape[1:-1], spans, strides, padding)
  else:
    pads = padding
  return ConvSpec(tuple(inputs.shape), tuple(kernel.shape), strides,
                  tuple((int(lo), int(hi)) for lo, hi in pads), dilation,
                  int(feature_group_count), jnp.dtype(inputs.dtype).name)


def _dot(a, b, precision, preferred_element_type):
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _tap_slices(x: jax.Array, spec: ConvSpec, taps) -> list[jax.Array]:
  """Per tap, the (N, *out_spatial, C_in) input values it multiplies (padding included)."""
  x = lax.pad(x, jnp.zeros((), x.dtype),
              [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in spec.padding] + [(0, 0, 0)])
  out = spec.out_spatial
  slices = []
  for tap in taps:
    start = [0] + [t * d for t, d in zip(tap, spec.dilation)] + [0]
    limit = ([x.shape[0]] + [st + (o - 1) * s + 1 for st, o, s in
                              zip(start[1:-1], out, spec.strides)] + [x.shape[-1]])
    slices.append(lax.slice(x, start, limit, (1,) + spec.strides + (1,)))
  return slices



def _tap_numbers(spec: ConvSpec) -> list[int]:
  return [int(np.ravel_multi_index(t, spec.kernel_shape[:-2])) for t in spec.live_taps()]


def _live_kernel(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """The kernel's live taps as (T_live, C_in / groups, C_out)."""
  flat = _tap_numbers(spec)
  k = kernel.reshape((-1,) + kernel.shape[-2:])
  return k if len(flat) == k.shape[0] else k[np.asarray(flat)]


def _dead_taps_zeroed(live: jax.Array, spec: ConvSpec) -> jax.Array:
  """(T_live, C_in, C_out) per live tap -> the kernel's shape, zeros for dead taps."""
  flat = _tap_numbers(spec)
  total = math.prod(spec.kernel_shape[:-2])
  if len(flat) == total:
    return live.reshape(spec.kernel_shape)
  where = {t: i for i, t in enumerate(flat)}
  zero = jnp.zeros(live.shape[1:], live.dtype)
  return jnp.stack([live[where[t]] if t in where else zero
                    for t in range(total)]).reshape(spec.kernel_shape)


def _patches(x: jax.Array, spec: ConvSpec) -> jax.Array:
  """(N * out pixels, T_live * C_in): the im2col matrix of live taps."""
  cols = _tap_slices(x, spec, spec.live_taps())
  patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
  return patches.reshape(-1, patches.shape[-1])


def im2col(x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  c_in, c_out, groups = x.shape[-1], kernel.shape[-1], spec.groups
  k = _live_kernel(kernel, spec)
  batch_out = (x.shape[0],) + spec.out_spatial
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, kernel.dtype)
  if groups == 1:
    y = _dot(_patches(x, spec), k.reshape(-1, c_out), precision, preferred_element_type)
    return y.reshape(batch_out + (c_out,)).astype(out_dtype)
  cols = _tap_slices(x, spec, spec.live_taps())
  c_group, o_group = c_in // groups, c_out // groups
  if c_group == 1:
    # Depthwise: per tap an elementwise multiply-add (a matmul would be 1 deep).
    k = k.reshape(len(cols), groups, o_group)
    y = None
    for col, kt in zip(cols, k):
      term = (col[..., :, None] * kt).astype(out_dtype)
      y = term if y is None else y + term
    return y.reshape(batch_out + (c_out,))
  patches = jnp.stack([c.reshape(-1, groups, c_group) for c in cols], axis=1)  # m t g c
  k = k.reshape(len(cols), c_group, groups, o_group)
  y = jnp.einsum('mtgc,tcgo->mgo', patches, k, precision=precision,
                 preferred_element_type=preferred_element_type)
  return y.reshape(batch_out + (c_out,)).astype(out_dtype)


def shifted(x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  """Sum over live taps of (the input slice the tap reads) @ (the tap's C_in x C_out
  matrix): the same matmuls as im2col without materialising the patches."""
  c_in, c_out = x.shape[-1], kernel.shape[-1]
  k = _live_kernel(kernel, spec)
  y = None
  for col, kt in zip(_tap_slices(x, spec, spec.live_taps()), k):
    term = _dot(col.reshape(-1, c_in), kt, precision, preferred_element_type)
    y = term if y is None else y + term
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, kernel.dtype)
  return y.reshape((x.shape[0],) + spec.out_spatial + (c_out,)).astype(out_dtype)


def dense_supported(spec: ConvSpec) -> bool:
  pairs = math.prod(spec.input_shape[1:-1]) * math.prod(spec.out_spatial)
  return spec.groups == 1 and pairs <= DENSE_MAX_PIXEL_PAIRS


def _dense_matrix(kernel: jax.Array, spec: ConvSpec) -> jax.Array:
  """(P_in * C_in, P_out * C_out): block (i, o) is the kernel tap joining input pixel i
  to output pixel o, zero where none does."""
  index = spec.tap_index()
  c_in, c_out = kernel.shape[-2:]
  taps = kernel.reshape(-1, c_in, c_out)
  zero = jnp.zeros((c_in, c_out), kernel.dtype)
  rows = [jnp.stack([taps[t] if t >= 0 else zero for t in row], axis=1) for row in index]
  return jnp.stack(rows, axis=0).reshape(index.shape[0] * c_in, -1)


def dense(x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  n = x.shape[0]
  y = _dot(x.reshape(n, -1), _dense_matrix(kernel, spec), precision, preferred_element_type)
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, kernel.dtype)
  return y.reshape((n,) + spec.out_spatial + (kernel.shape[-1],)).astype(out_dtype)


def direct_supported(spec: ConvSpec) -> bool:
  return spec.rank in (1, 2) and spec.groups == 1 and spec.dtype == 'float32'


def _as_2d(spec: ConvSpec):
  """(input shape, kernel shape, out shape, strides, padding, dilation) of `spec` as a 2-D
  conv: a 1-D conv is one with a height-1 map and kernel."""
  if spec.rank == 2:
    out = (spec.input_shape[0],) + spec.out_spatial + (spec.kernel_shape[-1],)
    return (spec.input_shape, spec.kernel_shape, out, spec.strides, spec.padding,
            spec.dilation)
  n, length, c = spec.input_shape
  out = (n, 1) + spec.out_spatial + (spec.kernel_shape[-1],)
  return ((n, 1, length, c), (1,) + spec.kernel_shape, out, (1,) + spec.strides,
          ((0, 0),) + spec.padding, (1,) + spec.dilation)


def direct(x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  del precision  # Float32 throughout, as XLA's CPU convolution.
  x_shape, k_shape, out_shape, strides, padding, dilation = _as_2d(spec)
  y = cpu_kernels.conv2d(x.reshape(x_shape), kernel.reshape(k_shape), out_shape, strides,
                         padding, dilation)
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, kernel.dtype)
  return y.reshape((x.shape[0],) + spec.out_spatial + (kernel.shape[-1],)).astype(out_dtype)


def native(x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  rank = spec.rank
  layout = ('N' + 'HWD'[:rank] + 'C', 'HWD'[:rank] + 'IO', 'N' + 'HWD'[:rank] + 'C')
  return lax.conv_general_dilated(x, kernel, spec.strides, spec.padding,
                                  rhs_dilation=spec.dilation, dimension_numbers=layout,
                                  feature_group_count=spec.groups, precision=precision,
                                  preferred_element_type=preferred_element_type)


_FORWARD = {'native': native, 'im2col': im2col, 'shifted': shifted, 'dense': dense,
            'direct': direct}


def _check(name: str, spec: ConvSpec) -> None:
  if name not in _FORWARD:
    raise KilnError(f"conv lowering '{name}' does not exist: use 'auto' or one of {LOWERINGS}")
  if name == 'shifted' and spec.groups != 1:
    raise KilnError('the shifted conv lowering takes ungrouped convs only: use im2col or '
                    'native for grouped and depthwise convs')
  if name == 'direct' and not direct_supported(spec):
    raise KilnError('the direct conv lowering takes float32 1-D and 2-D convs without groups: '
                    'use im2col or native')
  if name == 'dense' and not dense_supported(spec):
    raise KilnError(f'the dense conv lowering takes maps of at most {DENSE_MAX_PIXEL_PAIRS} '
                    'input x output pixel pairs and no groups: use im2col or native')


def forward(name: str, x, kernel, spec: ConvSpec, precision=None, preferred_element_type=None):
  """The conv's output, computed as lowering `name` does."""
  _check(name, spec)
  return _FORWARD[name](x, kernel, spec, precision, preferred_element_type)


def input_grad(name: str, kernel, g, spec: ConvSpec, precision=None):
  """d loss / d input from g = d loss / d output, as lowering `name` computes it: the
  transpose of its forward (im2col: g @ K^T, then each tap's slice transposed and summed;
  dense: g @ W^T; native: XLA's transposed convolution)."""
  _check(name, spec)
  if name == 'direct':
    x_shape, k_shape, out_shape, strides, padding, dilation = _as_2d(spec)
    return cpu_kernels.conv2d_input_grad(
        g.astype(jnp.float32).reshape(out_shape), kernel.reshape(k_shape), x_shape,
        strides, padding, dilation).reshape(spec.input_shape)
  x = jnp.zeros(spec.input_shape, g.dtype)  # Only its shape is read: the map is linear.
  _, vjp = jax.vjp(lambda x: _FORWARD[name](x, kernel, spec, precision).astype(g.dtype), x)
  return vjp(g)[0]


def kernel_grad(name: str, x, g, spec: ConvSpec, precision=None):
  """d loss / d kernel from g = d loss / d output, as lowering `name` computes it:
  im2col: patches^T @ g; dense: input^T @ g with its blocks summed per tap; native:
  XLA's convolution of the input with g."""
  _check(name, spec)
  if name == 'direct':
    x_shape, k_shape, out_shape, strides, padding, dilation = _as_2d(spec)
    return cpu_kernels.conv2d_kernel_grad(
        x.reshape(x_shape), g.astype(jnp.float32).reshape(out_shape), k_shape, strides,
        padding, dilation).reshape(spec.kernel_shape)
  c_in, c_out = x.shape[-1], spec.kernel_shape[-1]
  contract_rows = (((0,), (0,)), ((), ()))
  if name == 'shifted':
    # Channels-major input (one transpose), so that each tap's product contracts the
    # rows of a plain row-major matrix, which XLA:CPU's matmul runs faster than
    # contracting the patches' rows.
    xt = jnp.transpose(x, (x.ndim - 1,) + tuple(range(x.ndim - 1)))
    xt = lax.pad(xt, jnp.zeros((), x.dtype),
                 [(0, 0, 0), (0, 0, 0)] + [(lo, hi, 0) for lo, hi in spec.padding])
    per_tap = []
    for tap in spec.live_taps():
      start = [0, 0] + [t * d for t, d in zip(tap, spec.dilation)]
      limit = list(xt.shape[:2]) + [st + (o - 1) * s_ + 1 for st, o, s_ in
                                    zip(start[2:], spec.out_spatial, spec.strides)]
      col = lax.slice(xt, start, limit, (1, 1) + spec.strides).reshape(c_in, -1)
      per_tap.append(_dot(col, g.reshape(-1, c_out), precision, None))
    return _dead_taps_zeroed(jnp.stack(per_tap), spec)
  if name == 'im2col' and spec.groups == 1:
    live = lax.dot_general(_patches(x, spec), g.reshape(-1, c_out), contract_rows,
                           precision=precision)
    return _dead_taps_zeroed(live.reshape(-1, c_in, c_out), spec)
  if name == 'dense':
    n = x.shape[0]
    blocks = lax.dot_general(x.reshape(n, -1), g.reshape(n, -1), contract_rows,
                             precision=precision).reshape(-1, c_in, g.size // n // c_out, c_out)
    index = spec.tap_index()
    per_tap = []
    for t in range(math.prod(spec.kernel_shape[:-2])):
      terms = [blocks[i, :, o, :] for i, o in np.argwhere(index == t)]
      per_tap.append(sum(terms[1:], terms[0]) if terms else jnp.zeros((c_in, c_out), g.dtype))
    return jnp.stack(per_tap).reshape(spec.kernel_shape)
  kernel = jnp.zeros(spec.kernel_shape, g.dtype)  # Only its shape is read.
  _, vjp = jax.vjp(lambda k: _FORWARD[name](x, k, spec, precision).astype(g.dtype), kernel)
  return vjp(g)[0]


PASSES = ('forward', 'input_grad', 'kernel_grad')


@dataclasses.dataclass(frozen=True)
class Plan:
  """The lowering of each pass of one conv: the forward and the two gradients training
  takes. They need not agree: e.g. native for a forward XLA runs well and a matmul for
  a kernel gradient it runs badly."""
  forward: str
  input_grad: str
  kernel_grad: str

  @classmethod
  def uniform(cls, name: str) -> 'Plan':
    return cls(name, name, name)

  def __str__(self) -> str:
    names = dataclasses.astuple(self)
    return names[0] if len(set(names)) == 1 else '/'.join(names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _planned(x, kernel, spec, plan, precision, preferred_element_type):
  return forward(plan.forward, x, kernel, spec, precision, preferred_element_type)


def _planned_fwd(x, kernel, spec, plan, precision, preferred_element_type):
  return _planned(x, kernel, spec, plan, precision, preferred_element_type), (x, kernel)


def _planned_bwd(spec, plan, precision, preferred_element_type, residuals, g):
  del preferred_element_type
  x, kernel = residuals
  g = g.astype(jnp.result_type(x.dtype, kernel.dtype))
  # Under jit XLA drops whichever gradient nobody uses (e.g. a first layer's input's).
  dx = input_grad(plan.input_grad, kernel, g, spec, precision).astype(x.dtype)
  dk = kernel_grad(plan.kernel_grad, x, g, spec, precision).astype(kernel.dtype)
  return dx, dk


_planned.defvjp(_planned_fwd, _planned_bwd)


def convolve(x, kernel, spec: ConvSpec, plan: Plan, precision=None,
             preferred_element_type=None) -> jax.Array:
  """The conv of `spec`, each pass lowered as `plan` says; differentiable."""
  for name in dataclasses.astuple(plan):
    _check(name, spec)
  if plan == Plan.uniform('native'):
    # XLA's own convolution and autodiff: exactly what nnx.Conv runs.
    return native(x, kernel, spec, precision, preferred_element_type)
  return _planned(x, kernel, spec, plan, precision, preferred_element_type)


def direct_available(spec: ConvSpec) -> bool:
  """Whether 'direct' takes `spec` here: the shape, and Kiln's CPU kernels build."""
  return direct_supported(spec) and cpu_kernels.available()


def candidates(spec: ConvSpec) -> tuple[str, ...]:
  return (('native', 'im2col') + (('shifted',) if spec.groups == 1 else ())
          + (('dense',) if dense_supported(spec) else ())
          + (('direct',) if direct_available(spec) else ()))


def forced(name: str, spec: ConvSpec) -> Plan:
  """`name` on every pass; where that lowering cannot take `spec` (dense on a big map,
  shifted on a grouped conv) the nearest GEMM form, im2col, instead."""
  if name not in _FORWARD:
    _check(name, spec)  # Raises: names the lowerings that exist.
  return Plan.uniform(name if name in candidates(spec) else 'im2col')


def rule(spec: ConvSpec, backend: str) -> Plan:
  """The plan to use without measuring (the CPU default where RULE_TABLE_ISAS holds the
  convs' instruction set). Native on accelerators. On CPU, from the ResNet-18 shapes timed
  by benchmarks/conv_throughput.py on an AVX-512 host (figures in benchmarks/README.md,
  "conv lowerings"): 'direct' wherever it takes the conv, except on
  maps so small that most of its patch values are padding and every (input, output) pixel
  pair is a real tap, where 'dense' does only the conv's own arithmetic. Without the
  compiled kernels: 'dense' there too; native for k>1 convs on maps of 64+ pixels, or 16+
  at stride 1, where XLA's kernel is as fast as the best XLA GEMM form or faster (im2col's
  concatenated patches cost more than its matmul there); 'im2col' elsewhere (strided convs
  on small maps, 1x1 convs). In whole training steps this table beat per-pass timing
  (see choose)."""
  if backend != 'cpu':
    return Plan.uniform('native')
  direct_ok = direct_available(spec)
  if dense_supported(spec):
    index = spec.tap_index()
    real = np.count_nonzero(index >= 0)
    patch_values = math.prod(spec.out_spatial) * len(spec.live_taps())
    if index.size <= 1.25 * real and not (direct_ok and patch_values <= 1.25 * real):
      return Plan.uniform('dense')
  if direct_ok:
    return Plan.uniform('direct')
  pixels, taps = math.prod(spec.input_shape[1:-1]), math.prod(spec.kernel_shape[:-2])
  if taps > 1 and (pixels >= 64 or (pixels >= 16 and max(spec.strides) == 1)):
    return Plan.uniform('native')
  return Plan.uniform('im2col')


# Plans chosen in this process, by cache key; loaded from / saved to the disk cache.
_CHOICES: dict[str, Plan] = {}
_LOCK = threading.Lock()


def instruction_set() -> str:
  """The instruction set this process's CPU convs run with: what Kiln's kernels are built for
  (-march=native, then $KILN_CPU_ARCH_FLAGS) where they build, else the CPU's own."""
  if cpu_kernels.available():
    return cpu_kernels.instruction_set()
  return host.cpu_instruction_set()


def auto_mode(backend: str, cpu_devices: int) -> str:
  """What mode 'auto' does for a conv on `backend` with `cpu_devices` local CPU devices:
  'native', 'rules' (the table was measured on the convs' instruction set) or 'measure'."""
  if backend != 'cpu' or cpu_devices > 1:
    # Several CPU devices (--xla_force_host_platform_device_count, as in the tests, or
    # CPU processes sharing a host) split each conv into per-device shards that timing
    # the whole shape would not represent: keep XLA's own convolution there.
    return 'native'
  return 'rules' if instruction_set() in RULE_TABLE_ISAS else 'measure'


def auto_source() -> str:
  """How mode 'auto' picks the plan of a conv on one CPU device here, for logs and
  benchmark headers."""
  isa = instruction_set()
  if auto_mode('cpu', 1) == 'rules':
    return f'the rule table (measured on {isa}, as these convs run)'
  return (f'timed per shape on this host (no rule table measured on {isa}; tables exist '
          f"for {', '.join(RULE_TABLE_ISAS)}), cached")


def mode() -> str:
  """$KILN_CONV_LOWERING: 'auto' (default: with one CPU device the rule table where it
  was measured on this instruction set, else 'measure'; native with several),
  'measure', 'rules', or a lowering forced on every conv."""
  value = os.environ.get(MODE_ENV, 'auto').strip().lower()
  if value not in ('auto', 'measure', 'rules') + LOWERINGS:
    raise KilnError(f"{MODE_ENV}='{value}' is not a conv lowering mode: use 'auto', 'measure' "
                    "(time each CPU conv shape once, cached), 'rules' (the rule table, no "
                    f'timing) or a lowering to force on every conv: {LOWERINGS}')
  return value


def _cache_path() -> str:
  return os.path.join(host.cache_dir(), CACHE_FILE)


def _machine_key() -> str:
  return (f'{host.cpu_model_name()} | {os.cpu_count()} cores | {instruction_set()} | '
          f'jax {jax.__version__}')


def measure(spec: ConvSpec, names: Sequence[str] | None = None, repeats: int = 5,
            ) -> dict[str, dict[str, float]]:
  """{pass: {lowering: seconds}} for each pass of `spec` and each lowering: the best of
  `repeats` back-to-back runs (of several calls each where one call is short), as the
  matmul peak in monitor.hardware is measured (warm caches; run interleaved, each
  candidate found the others' buffers in the cache, which cost the 0.1 ms passes of 1x1
  convs up to a quarter of their speed). Load from other
  processes only ever slows a run, so the best run is the closest to a lowering's own
  speed and medians on a shared machine pick noise.

  Runs in a fresh thread: `choose` is called while a model is traced under jit,
  and tracing state is per thread, so the timed computations run eagerly there."""

  def run() -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(spec.input_shape), spec.dtype)
    k = jnp.asarray(rng.standard_normal(spec.kernel_shape) * 0.1, spec.dtype)
    g = jnp.asarray(rng.standard_normal((spec.input_shape[0],) + spec.out_spatial +
                                        (spec.kernel_shape[-1],)), spec.dtype)
    timed = {}
    for name in names or candidates(spec):
      timed['forward', name] = (
          jax.jit(lambda x, k, name=name: forward(name, x, k, spec)), (x, k))
      timed['input_grad', name] = (
          jax.jit(lambda k, g, name=name: input_grad(name, k, g, spec)), (k, g))
      timed['kernel_grad', name] = (
          jax.jit(lambda x, g, name=name: kernel_grad(name, x, g, spec)), (x, g))
    seconds = {p: {} for p in PASSES}
    for (pass_name, name), (fn, args) in timed.items():
      jax.block_until_ready(fn(*args))  # Compile and warm up outside the timed runs.
      started = time.perf_counter()
      jax.block_until_ready(fn(*args))
      # Passes of ~0.1 ms (1x1 convs) would time Python's dispatch as much as the conv:
      # each timed run dispatches enough calls back to back to last ~2 ms.
      calls = max(1, min(50, int(MIN_TIMED_SECONDS / (time.perf_counter() - started))))
      runs = []
      for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
          out = fn(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - started) / calls)
      seconds[pass_name][name] = min(runs)
    return seconds

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(run).result()


def fastest(seconds: dict[str, dict[str, float]]) -> Plan:
  return Plan(*(min(seconds[p], key=seconds[p].get) for p in PASSES))


def _load_cache() -> dict:
  try:
    with open(_cache_path()) as f:
      cached = json.load(f)
  except (OSError, ValueError):  # No cache yet, or a damaged one: measure again.
    return {}
  return cached if isinstance(cached, dict) else {}


def _cached_plan(entry, spec: ConvSpec) -> Plan | None:
  if not isinstance(entry, dict) or not isinstance(entry.get('plan'), list):
    return None
  names, seconds = entry['plan'], entry.get('seconds')
  if len(names) != len(PASSES) or any(n not in candidates(spec) for n in names):
    return None
  if not isinstance(seconds, dict) or any(
      set(seconds.get(p, ())) != set(candidates(spec)) for p in PASSES):
    return None  # Measured before a candidate was added: measure again.
  return Plan(*names)


def choose(spec: ConvSpec, backend: str | None = None) -> Plan:
  """The plan for `spec` on `backend` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  how = mode()
  if how in LOWERINGS:
    return forced(how, spec)
  if backend != 'cpu':
    return Plan.uniform('native')  # XLA's GPU/TPU convolutions are the fast path there.
  if how == 'auto':
    how = auto_mode(backend, len(jax.devices('cpu')))
    if how == 'native':
      return Plan.uniform('native')
  if how == 'rules':
    # The rule table by default where it was measured: in whole ResNet-18 steps
    # (benchmarks/conv_throughput.py) it trained faster there than plans timed pass by
    # pass, whose isolated timings on a busy machine did not carry into the step.
    return rule(spec, backend)
  key = f'{_machine_key()} | {spec.key(backend)}'
  with _LOCK:
    if key in _CHOICES:
      return _CHOICES[key]
    plan = _cached_plan(_load_cache().get(key), spec)
    if plan is None:
      seconds = measure(spec)
      plan = fastest(seconds)
      cached = _load_cache()  # Another process may have added shapes meanwhile.
      cached[key] = {'plan': list(dataclasses.astuple(plan)), 'seconds': seconds}
      os.makedirs(os.path.dirname(_cache_path()), exist_ok=True)
      write_json_atomic(_cache_path(), cached)
    _CHOICES[key] = plan
    return plan


def conv_general_dilated(inputs: jax.Array, kernel: jax.Array, window_strides, padding, *,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, precision=None, lowering: str = 'auto',
                         **kwargs) -> jax.Array:
  """Drop-in for `jax.lax.conv_general_dilated` as `nnx.Conv` calls it (backends.ops'
  CPU path for models.conv.Conv), lowered per shape.

  `lowering`: 'auto' (`choose`: each pass, forward and both gradients, from the rule
  table or measured), or one of LOWERINGS to force it on every pass. Calls the GEMM
  lowerings do not cover (input dilation, other layouts, an explicit output sharding,
  batch groups) stay native whatever is asked.
  """
  if lowering != 'auto' and lowering not in LOWERINGS:
    raise KilnError(f"conv lowering '{lowering}' does not exist: use 'auto' or one of "
                    f'{LOWERINGS}')
  spec = None
  covered = kwargs.get('out_sharding') is None and set(kwargs) <= {'out_sharding',
                                                                   'preferred_element_type'}
  if lowering != 'native' and covered:
    spec = channels_last_spec(
        inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count)
  if spec is None:
    return lax.conv_general_dilated(
        inputs, kernel, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision, **kwargs)
  plan = choose(spec) if lowering == 'auto' else forced(lowering, spec)
  return convolve(inputs, kernel, spec, plan, precision, kwargs.get('preferred_element_type'))
