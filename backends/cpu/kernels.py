"""Compiled CPU kernels (backends/cpu/csrc/cpu_kernels.cc) for what XLA:CPU does slowly.

- `causal_attention`: causal softmax attention with dropout on the weights, forward and
  backward. XLA:CPU runs attention's small per-(batch, head) dots at about a third of its
  matmul peak and writes every [T, T] intermediate to memory; the kernel gives each thread
  whole (batch, head) pairs, keeps a block of scores in cache and multiplies with
  single-threaded Eigen GEMMs on XLA's intra-op threads; the softmax probabilities are
  kept for the backward pass (as XLA keeps them), the dropout mask is regenerated there
  (gains: benchmarks/README.md, "attention kernel"). `causal_attention_packed` runs it on
  the qkv projection's packed output, scaling q and turning q and k by rotary tables
  inside, so no slices, rotations or concatenated gradients run around it.
- `random_bits`: uniform 32-bit words from Philox-4x32-10 (AVX-512 where the CPU has it),
  for dropout masks; XLA lowers jax.random's Threefry on CPU as a rolled loop over whole
  arrays.
- `lstm`: the LSTM recurrence of a layer's directions, forward and backward. XLA runs the
  `lax.scan` as a while loop of small kernels per step; the kernel gives each thread a
  (direction, block of batch rows) for all steps, with the hidden kernel packed once per
  call for a register-tiled matmul, and the backward pass's thread goes on to its rows'
  share of the kernels' gradients (gains: benchmarks/README.md, "LSTM kernel").
- `dense`: a dense layer's product x @ kernel whose kernel gradient x^T g is `weight_grad`'s
  register-tiled kernel. XLA:CPU gives that dot (both operands contracted on their first
  dimension) to Eigen, which packs both operands on every call; the GPT steps' weight
  gradients ran at a third to three quarters of the matmul peak there (gains:
  benchmarks/README.md, "weight-gradient kernel").

The library is compiled from source on first use with the C++ compiler on PATH (`$CXX`,
else g++), against the XLA FFI headers that ship with jaxlib and the Eigen headers that
ship with TensorFlow (a Kiln dependency), for this CPU (-march=native, plus
$KILN_CPU_ARCH_FLAGS, e.g. '-mno-avx512f' to build for a lower instruction set), and cached
in `core.host.cache_dir()` under a name hashing the source, the flags, JAX's version, the
compiler's identity and version, and the instruction-set macros -march=native resolves to
on this CPU: hosts sharing a home folder (AVX-512 and AVX2-only) each get their own build
instead of one that dies with SIGILL on the other. backends/cpu/__init__.py registers them
as backends.ops' CPU implementations; config.backend.cpu_kernels decides whether they run
('auto' on a CPU backend when they build, 'xla' never, 'cpu' always, or a one-line
KilnError where they cannot be built).

Masks come from the kernels' own Philox streams keyed by bits drawn from the caller's JAX
key, so they differ from jax.random's for the same key; they do not depend on how the
arrays are sharded (counters are global element indices).
"""

import functools
import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from core.errors import KilnError
from core import host, logical_axes

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_kernels.cc')
_FLAGS = ('-O3', '-march=native', '-DNDEBUG', '-fPIC', '-shared', '-std=c++17', '-pthread')
_TARGETS = {'forward': 'KilnCausalAttentionForward', 'backward': 'KilnCausalAttentionBackward',
            'packed_forward': 'KilnPackedAttentionForward',
            'packed_backward': 'KilnPackedAttentionBackward',
            'bits': 'KilnPhiloxBits', 'conv_forward': 'KilnConvForward',
            'conv_input_grad': 'KilnConvInputGrad', 'conv_kernel_grad': 'KilnConvKernelGrad',
            'lstm_inference': 'KilnLstmInference', 'lstm_forward': 'KilnLstmForward',
            'lstm_backward': 'KilnLstmBackward', 'weight_grad': 'KilnWeightGrad',
            'norm_forward': 'KilnLayerNormForward', 'norm_backward': 'KilnLayerNormBackward'}
ARCH_FLAGS_ENV = 'KILN_CPU_ARCH_FLAGS'
_FIX = "or set config.backend.cpu_kernels='xla'"
_LEVELS = 1 << 16  # Dropout draws are 16-bit, as in models/dropout.py.
_lock = threading.Lock()
_state: dict = {}  # 'error' (why it cannot be built) or 'registered' once loaded.


def _eigen_include() -> str | None:
  spec = importlib.util.find_spec('tensorflow')
  for root in (spec.submodule_search_locations or []) if spec else []:
    include = os.path.join(root, 'include')
    if os.path.isfile(os.path.join(include, 'Eigen', 'Core')):
      return include
  return None


def arch_flags() -> tuple[str, ...]:
  """$KILN_CPU_ARCH_FLAGS split as a shell would: flags after -march=native."""
  return tuple(shlex.split(os.environ.get(ARCH_FLAGS_ENV, '')))


@functools.lru_cache(maxsize=None)
def target_fingerprint(compiler: str, extra_flags: tuple[str, ...] = ()) -> bytes:
  """What a build depends on besides the source and Kiln's flags: the compiler's identity
  and version (`--version`), and every macro -march=native (with `extra_flags`) defines
  here, which names the instruction sets the code may use (__AVX512F__, __AVX2__, ...).
  A CPU model name would not do: one name covers hosts with different features enabled."""
  def output(*args, stdin=None):
    result = subprocess.run([compiler, *args], input=stdin, capture_output=True, text=True)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or ['(no output)']
      raise KilnError(f"'{compiler} {' '.join(args)}' failed ({lines[-1].strip()}): fix the "
                      f"compiler or ${ARCH_FLAGS_ENV}, {_FIX}")
    return result.stdout
  version = output('--version')
  macros = sorted(output('-march=native', *extra_flags, '-dM', '-E', '-x', 'c++', '-',
                         stdin='').splitlines())
  return '\n'.join([version, *macros]).encode()


def instruction_set(extra_flags: tuple[str, ...] | None = None) -> str:
  """The widest x86 vector extension the kernels are compiled for here, with `extra_flags`
  (default `arch_flags()`): 'AVX-512', 'AVX2', 'AVX', 'SSE2', or 'no x86 vector extension'."""
  extra = arch_flags() if extra_flags is None else tuple(extra_flags)
  macros = target_fingerprint(os.environ.get('CXX') or 'g++', extra).decode().splitlines()
  for macro, name in (('__AVX512F__', 'AVX-512'), ('__AVX2__', 'AVX2'), ('__AVX__', 'AVX'),
                      ('__SSE2__', 'SSE2')):
    if any(line.startswith(f'#define {macro} ') for line in macros):
      return name
  return 'no x86 vector extension'


def build(extra_flags: tuple[str, ...] | None = None) -> str:
  """Path of the compiled kernel library for this CPU and compiler, with `extra_flags`
  after -march=native (default `arch_flags()`), compiling it on first use; KilnError if
  it cannot be."""
  compiler = os.environ.get('CXX') or 'g++'
  if shutil.which(compiler) is None:
    raise KilnError(f"no C++ compiler '{compiler}' on PATH for Kiln's CPU kernels: "
                    f"install g++ (or set $CXX), {_FIX}")
  eigen = _eigen_include()
  if eigen is None:
    raise KilnError("Kiln's CPU kernels need the Eigen headers that ship with the "
                    f"tensorflow package: pip install tensorflow-cpu, {_FIX}")
  extra = arch_flags() if extra_flags is None else tuple(extra_flags)
  flags = (*_FLAGS, *extra)
  with open(_SOURCE, 'rb') as f:
    source = f.read()
  digest = hashlib.sha256(b'\0'.join([
      source, ' '.join(flags).encode(), compiler.encode(), jax.__version__.encode(),
      target_fingerprint(compiler, extra)])).hexdigest()[:16]
  path = os.path.join(host.cache_dir(), f'cpu_kernels-{digest}.so')
  if os.path.exists(path):
    return path
  os.makedirs(host.cache_dir(), exist_ok=True)
  # Another process may build the same library: compile to a temp name, then rename.
  fd, temp = tempfile.mkstemp(suffix='.so', dir=host.cache_dir())
  os.close(fd)
  command = [compiler, *flags, '-isystem', jax.ffi.include_dir(), '-isystem', eigen, _SOURCE,
             '-o', temp]
  try:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or ['(no output)']
      first_error = next((line for line in lines if 'error' in line), lines[-1]).strip()
      raise KilnError(f"compiling Kiln's CPU kernels failed ({first_error}): fix the "
                      f"compiler or ${ARCH_FLAGS_ENV}, {_FIX}")
    os.replace(temp, path)
  finally:
    if os.path.exists(temp):
      os.remove(temp)
  return path


def ensure() -> None:
  """Compiles (first time) and loads the kernels into this process; KilnError if it cannot."""
  with _lock:
    if 'registered' in _state:
      return
    if 'error' in _state:
      raise KilnError(_state['error'])
    try:
      import ctypes  # Only here: the library is loaded once per process.
      library = ctypes.cdll.LoadLibrary(build())
      for target in _TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, target)),
                                    platform='cpu')
    except KilnError as error:
      _state['error'] = str(error)
      raise
    except OSError as error:  # An unwritable cache folder, or a library this CPU rejects.
      _state['error'] = (f"Kiln's CPU kernels could not be built or loaded ({error}): set "
                         f"$KILN_CACHE_DIR to a writable folder, {_FIX}")
      raise KilnError(_state['error']) from error
    _state['registered'] = True


def available() -> bool:
  """Whether the kernels are (or can be) compiled and loaded in this process."""
  try:
    ensure()
  except KilnError:
    return False
  return True


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform uint32 words of `shape` from Philox-4x32-10 seeded by two words of `key`."""
  ensure()
  seed = jax.random.bits(key, (2,), jnp.uint32)
  return jax.ffi.ffi_call(_TARGETS['bits'], jax.ShapeDtypeStruct(shape, jnp.uint32),
                          vmap_method='sequential')(seed)


def keep_threshold(rate: float) -> int:
  """16-bit draws below this are kept; 65536 keeps everything."""
  return round((1.0 - rate) * _LEVELS)


def _forward(q, k, v, seed, shard, threshold):
  """(output, the [B, N, T, T] softmax probabilities kept for the backward pass)."""
  batch, length, heads, _ = q.shape
  out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
  probabilities = jax.ShapeDtypeStruct((batch, heads, length, length), jnp.float32)
  return jax.ffi.ffi_call(_TARGETS['forward'], (out, probabilities), vmap_method='sequential')(
      q, k, v, seed, shard, threshold=np.int32(threshold))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, seed, shard, threshold):
  return _forward(q, k, v, seed, shard, threshold)[0]


def _attention_fwd(q, k, v, seed, shard, threshold):
  out, probabilities = _forward(q, k, v, seed, shard, threshold)
  return out, (q, k, v, seed, shard, out, probabilities)


def _attention_bwd(threshold, residuals, out_grad):
  q, k, v, seed, shard, out, probabilities = residuals
  shapes = [jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 3
  q_grad, k_grad, v_grad = jax.ffi.ffi_call(_TARGETS['backward'], shapes,
                                            vmap_method='sequential')(
      q, k, v, seed, shard, out, probabilities, out_grad.astype(jnp.float32),
      threshold=np.int32(threshold))
  no_grad = [np.zeros(x.shape, jax.dtypes.float0) for x in (seed, shard)]
  return q_grad, k_grad, v_grad, *no_grad


_attention.defvjp(_attention_fwd, _attention_bwd)


def _shard_index(spec_entry, mesh) -> jax.Array:
  """This device's position along the mesh axes that split one array dimension."""
  axes = () if spec_entry is None else (
      (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry))
  index = jnp.int32(0)
  for axis in axes:
    index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
  return index


def _by_attention_shard(attend, sharded, replicated, logical, heads: int):
  """attend(*sharded, *replicated, shard) -> [B, T, N, H]: on one device as it is, else inside
  `core.logical_axes.activate` with a multi-device mesh on each device's [batch, heads] shard
  (shard_map by the 'batch' and 'heads' rules over the `logical` axes of the `sharded`
  arrays), `shard` telling the kernel where its shard sits among the `heads` heads, so its
  dropout masks are the single-device ones."""
  active = logical_axes.active()
  if active is None or active[0].size == 1:
    return attend(*sharded, *replicated, jnp.array([0, 0, heads], jnp.int32))
  mesh, rules = active
  spec = logical_axes.logical_to_spec(logical, sharded[0].shape, mesh, rules)
  entries = (*spec, *[None] * len(logical))  # P drops trailing Nones.
  batch_axes, head_axes = entries[logical.index('batch')], entries[logical.index('heads')]

  def local(*arrays):
    shard = jnp.stack([_shard_index(batch_axes, mesh) * arrays[0].shape[0],
                       _shard_index(head_axes, mesh) * arrays[0].shape[logical.index('heads')],
                       jnp.int32(heads)])
    return attend(*arrays, shard)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(*[spec] * len(sharded), *[P()] * len(replicated)),
                       out_specs=P(batch_axes, None, head_axes), check_vma=False)(
      *sharded, *replicated)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, dropout_rate: float = 0.0,
                     key: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T, causal) v on token-major [B, T, N, H] arrays (q already scaled by
  1/sqrt(H)), with dropout at `dropout_rate` on the attention weights when `key` is given.
  Computes in float32 and returns q's dtype.

  Inside `core.logical_axes.activate` with a multi-device mesh the kernel runs on each
  device's [batch, heads] shard (shard_map by the 'batch' and 'heads' rules), and its
  dropout masks are the same as on one device."""
  ensure()
  if not (q.shape == k.shape == v.shape and q.ndim == 4):
    raise KilnError(f'causal_attention needs q, k, v of one [B, T, N, H] shape, got '
                    f'{q.shape}, {k.shape}, {v.shape}')
  threshold, seed = _dropout_seed(key, dropout_rate)
  dtype, heads = q.dtype, q.shape[2]
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  def attend(q, k, v, seed, shard):
    return _attention(q, k, v, seed, shard, threshold)
  return _by_attention_shard(attend, (q, k, v), (seed,), ('batch', None, 'heads', None),
                             heads).astype(dtype)


def _packed_forward(qkv, tables, seed, shard, threshold, scale, rotary):
  """(output [B, T, N, H], the [B, N, T, T] probabilities) from qkv [B, T, 3, N, H]."""
  batch, length, _, heads, dim = qkv.shape
  out = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.float32)
  probabilities = jax.ShapeDtypeStruct((batch, heads, length, length), jnp.float32)
  return jax.ffi.ffi_call(_TARGETS['packed_forward'], (out, probabilities),
                          vmap_method='sequential')(
      qkv, tables, seed, shard, threshold=np.int32(threshold), scale=np.float32(scale),
      rotary=np.int32(rotary))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _packed_attention(qkv, tables, seed, shard, threshold, scale, rotary):
  return _packed_forward(qkv, tables, seed, shard, threshold, scale, rotary)[0]


def _packed_attention_fwd(qkv, tables, seed, shard, threshold, scale, rotary):
  out, probabilities = _packed_forward(qkv, tables, seed, shard, threshold, scale, rotary)
  return out, (qkv, tables, seed, shard, out, probabilities)


def _packed_attention_bwd(threshold, scale, rotary, residuals, out_grad):
  qkv, tables, seed, shard, out, probabilities = residuals
  qkv_grad = jax.ffi.ffi_call(_TARGETS['packed_backward'],
                              jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                              vmap_method='sequential')(
      qkv, tables, seed, shard, out, probabilities, out_grad.astype(jnp.float32),
      threshold=np.int32(threshold), scale=np.float32(scale), rotary=np.int32(rotary))
  # The tables are constants of the model (positions' angles): no gradient flows to them.
  no_grad = [np.zeros(x.shape, jax.dtypes.float0) for x in (seed, shard)]
  return qkv_grad, jnp.zeros_like(tables), *no_grad


_packed_attention.defvjp(_packed_attention_fwd, _packed_attention_bwd)


def _dropout_seed(key, dropout_rate):
  """(threshold, the kernel's 2-word seed) for dropout at `dropout_rate` under `key`."""
  threshold = _LEVELS if key is None or dropout_rate == 0.0 else keep_threshold(dropout_rate)
  seed = (jnp.zeros((2,), jnp.uint32) if key is None
          else jax.random.bits(key, (2,), jnp.uint32))
  return threshold, seed


def causal_attention_packed(qkv: jax.Array, *, scale: float,
                            rotary: tuple[jax.Array, jax.Array] | None = None,
                            dropout_rate: float = 0.0, key: jax.Array | None = None) -> jax.Array:
  """backends.ops.causal_attention_packed: `causal_attention` of q * scale, k and v packed
  in qkv [B, T, 3, N, H] (q and k first turned by the rotary tables (cos, sin) [T, H/2],
  if given) -> [B, T, N, H] in qkv's dtype; one kernel call each way, with no slices,
  rotations or concatenation around it. Sharded as `causal_attention` is."""
  ensure()
  if qkv.ndim != 5 or qkv.shape[2] != 3:
    raise KilnError(f'causal_attention_packed needs qkv [B, T, 3, N, H], got {qkv.shape}')
  _, length, _, heads, dim = qkv.shape
  if rotary is None:
    tables = jnp.zeros((2, 1, 1), jnp.float32)
  else:
    if dim % 2 or any(np.shape(t) != (length, dim // 2) for t in rotary):
      raise KilnError(f'causal_attention_packed needs rotary tables [T, H/2] = '
                      f'[{length}, {dim // 2}] for an even H, got '
                      f'{[np.shape(t) for t in rotary]}')
    tables = jnp.stack([jnp.asarray(t, jnp.float32) for t in rotary])
  threshold, seed = _dropout_seed(key, dropout_rate)
  dtype = qkv.dtype
  qkv = qkv.astype(jnp.float32)
  turned = rotary is not None

  def attend(qkv, tables, seed, shard):
    return _packed_attention(qkv, tables, seed, shard, threshold, float(scale), turned)
  return _by_attention_shard(attend, (qkv,), (tables, seed),
                             ('batch', None, None, 'heads', None), heads).astype(dtype)


def _conv_call(target: str, result_shape, a, b, strides, padding, dilation):
  geometry = np.array([*strides, padding[0][0], padding[1][0], *dilation], np.int64)
  return jax.ffi.ffi_call(_TARGETS[target], jax.ShapeDtypeStruct(result_shape, jnp.float32),
                          vmap_method='sequential')(a, b, geometry=geometry)


def conv2d(x, kernel, out_shape, strides, padding, dilation):
  """The channels-last 2-D conv of float32 x [N, H, W, C] and kernel [KH, KW, C, O] into
  `out_shape` [N, OH, OW, O], with `strides`, ((top, bottom), (left, right)) zero
  `padding` and kernel `dilation`; not differentiable (conv_lowering.py pairs it
  with conv2d_input_grad and conv2d_kernel_grad)."""
  ensure()
  return _conv_call('conv_forward', out_shape, x, kernel, strides, padding, dilation)


def conv2d_input_grad(out_grad, kernel, input_shape, strides, padding, dilation):
  """d loss / d x of `conv2d` from out_grad = d loss / d output."""
  ensure()
  return _conv_call('conv_input_grad', input_shape, out_grad, kernel, strides, padding,
                    dilation)


def conv2d_kernel_grad(x, out_grad, kernel_shape, strides, padding, dilation):
  """d loss / d kernel of `conv2d` from out_grad = d loss / d output."""
  ensure()
  return _conv_call('conv_kernel_grad', kernel_shape, x, out_grad, strides, padding, dilation)


def weight_grad(x: jax.Array, g: jax.Array, directions: int = 1) -> jax.Array:
  """sum over rows n of x[n, d]^T g[n, d] for each of `directions` blocks of columns: x
  [N, D*I] and g [N, D*O] (direction d's columns at d*I and d*O) -> [D, I, O] float32;
  what a dense layer's kernel gradient is (x its inputs, g its output gradients)."""
  ensure()
  rows, width = x.shape
  if g.ndim != 2 or g.shape[0] != rows or width % directions or g.shape[1] % directions:
    raise KilnError(f'weight_grad needs x [N, D*I] and g [N, D*O] with D={directions}, got '
                    f'{x.shape} and {g.shape}')
  return _weight_grad_call(directions)(x.astype(jnp.float32), g.astype(jnp.float32))


@functools.lru_cache(maxsize=None)
def _weight_grad_call(directions: int):
  """The kernel call for `directions` blocks of columns; under vmap (DP-SGD's per-example
  gradients) XLA's batched dot instead, where the kernel would run once per example."""
  @jax.custom_batching.custom_vmap
  def call(x, g):
    shape = (directions, x.shape[1] // directions, g.shape[1] // directions)
    return jax.ffi.ffi_call(_TARGETS['weight_grad'],
                            jax.ShapeDtypeStruct(shape, jnp.float32))(x, g)

  @call.def_vmap
  def batched(axis_size, in_batched, x, g):
    x, g = (t if is_batched else jnp.broadcast_to(t, (axis_size, *t.shape))
            for t, is_batched in zip((x, g), in_batched))
    rows = x.shape[1]
    return jnp.einsum('bndi,bndo->bdio', x.reshape(axis_size, rows, directions, -1),
                      g.reshape(axis_size, rows, directions, -1)), True
  return call


def _single_device() -> bool:
  """Whether arrays traced now live on one device: no multi-device mesh is active (on a
  sharded batch a weight gradient is a sum across devices, which XLA's own dot does)."""
  active = logical_axes.active()
  return active is None or active[0].size == 1


@jax.custom_vjp
def _dense(x, kernel):
  return x @ kernel


def _dense_fwd(x, kernel):
  return x @ kernel, (x, kernel)


def _dense_bwd(residuals, out_grad):
  x, kernel = residuals
  x_grad = out_grad @ kernel.T
  kernel_grad = weight_grad(x.reshape(-1, x.shape[-1]), out_grad.reshape(-1, out_grad.shape[-1]))
  return x_grad, kernel_grad[0].astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """backends.ops.dense: x [..., I] @ kernel [I, O], whose kernel gradient (float32, one
  device) is `weight_grad`'s instead of the dot XLA:CPU gives to Eigen."""
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or kernel.ndim != 2 or \
      not _single_device():
    return x @ kernel
  ensure()
  return _dense(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  rows = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
  y, mean, rstd = jax.ffi.ffi_call(
      _TARGETS['norm_forward'], (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows),
      vmap_method='sequential')(x, scale, bias, epsilon=np.float32(epsilon))
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(epsilon, residuals, out_grad):
  del epsilon
  x, scale, mean, rstd = residuals
  vector = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  return tuple(jax.ffi.ffi_call(
      _TARGETS['norm_backward'], (jax.ShapeDtypeStruct(x.shape, jnp.float32), vector, vector),
      vmap_method='sequential')(x, scale, mean, rstd, out_grad))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array | None,
               epsilon: float) -> jax.Array | None:
  """The 'layer_norm' op ops.LayerNorm takes: LayerNorm over x's last axis in one kernel call
  each way (float32, one device); None where it does not apply (nnx.LayerNorm's code runs)."""
  if x.dtype != jnp.float32 or scale.dtype != jnp.float32 or \
      (bias is not None and bias.dtype != jnp.float32) or not _single_device():
    return None
  ensure()
  width = x.shape[-1]
  if bias is None:  # The kernel always adds one; its gradient is then dropped.
    bias = jnp.zeros((width,), jnp.float32)
  y = _layer_norm(x.reshape(-1, width), scale, bias, float(epsilon))
  return y.reshape(x.shape)


def _reverse_bits(reverse: tuple[bool, ...]) -> np.int32:
  return np.int32(sum(1 << d for d, backwards in enumerate(reverse) if backwards))


def _per_batch_shard(function, batch_major, replicated):
  """`function(*batch_major, *replicated)` on each device's batch shard inside
  `core.logical_axes.activate` with a multi-device mesh (the kernels run on local arrays:
  without this, XLA would gather the whole batch onto every device), else as it is. Every
  array of `batch_major` and every result has the batch first (or [B * T] rows, b-major),
  and the first one's first axis is the batch itself, which decides the split."""
  active = logical_axes.active()
  if active is None or active[0].size == 1:
    return function(*batch_major, *replicated)
  mesh, rules = active
  spec = logical_axes.logical_to_spec(('batch',), batch_major[0].shape[:1], mesh, rules)
  return jax.shard_map(function, mesh=mesh,
                       in_specs=(*[spec] * len(batch_major), *[P()] * len(replicated)),
                       out_specs=spec, check_vma=False)(*batch_major, *replicated)


def _lstm_forward(x, input_kernel, mask, kernels, bias, reverse, *, train: bool):
  target = _TARGETS['lstm_forward' if train else 'lstm_inference']

  def local(mask, x, input_kernel, kernels, bias):  # A device's own shapes in the shard_map.
    batch, length = mask.shape
    directions, hidden, _ = kernels.shape
    states = jax.ShapeDtypeStruct((batch, length, directions * hidden), jnp.float32)
    activations = jax.ShapeDtypeStruct((batch * length, input_kernel.shape[1]), jnp.float32)
    shapes = (states, activations, states, states, states) if train else states
    return jax.ffi.ffi_call(target, shapes, vmap_method='sequential')(
        x, input_kernel, mask, kernels, bias, reverse=_reverse_bits(reverse))
  # The mask first: it sets the split, whole utterances of x's [B * T] rows per device.
  return _per_batch_shard(local, (mask, x), (input_kernel, kernels, bias))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lstm(x, input_kernel, mask, kernels, bias, reverse):
  return _lstm_forward(x, input_kernel, mask, kernels, bias, reverse, train=False)


def _lstm_fwd(x, input_kernel, mask, kernels, bias, reverse):
  out, activations, h_before, c_before, tanh_cell = _lstm_forward(
      x, input_kernel, mask, kernels, bias, reverse, train=True)
  return out, (x, input_kernel, mask, kernels, activations, h_before, c_before, tanh_cell)


def _lstm_bwd(reverse, residuals, out_grad):
  x, input_kernel, mask, kernels, activations, h_before, c_before, tanh_cell = residuals

  def local(mask, activations, c_before, tanh_cell, out_grad, x, h_before, kernels):
    # The gate gradients go where the activations were (each read just before); the
    # device's bias and kernel gradients come with a leading axis of 1 (batch-major like the
    # rest, so a sharded batch's are summed across devices below).
    width = activations.shape[-1]  # D * 4H
    return jax.ffi.ffi_call(
        _TARGETS['lstm_backward'],
        (jax.ShapeDtypeStruct(activations.shape, jnp.float32),
         jax.ShapeDtypeStruct((1, width), jnp.float32),
         jax.ShapeDtypeStruct((1, x.shape[1], width), jnp.float32),
         jax.ShapeDtypeStruct((1, *kernels.shape), jnp.float32)),
        vmap_method='sequential', input_output_aliases={2: 0})(
        mask, kernels, activations, c_before, tanh_cell, out_grad, x, h_before,
        reverse=_reverse_bits(reverse))
  gates_grad, bias_grads, input_grads, kernels_grads = _per_batch_shard(
      local, (mask, activations, c_before, tanh_cell, out_grad.astype(jnp.float32), x, h_before),
      (kernels,))
  # x's gradient stays XLA's dot: unused (a first layer's), it is left out of the program.
  return (gates_grad @ input_kernel.T, input_grads.sum(0),
          np.zeros(mask.shape, jax.dtypes.float0), kernels_grads.sum(0), bias_grads.sum(0))


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm(x: jax.Array, input_kernel: jax.Array, mask: jax.Array, kernels: jax.Array, *,
         reverse: tuple[bool, ...], bias: jax.Array | None = None) -> jax.Array:
  """backends.ops.lstm: the LSTM layer of D directions at once from its inputs x [B, T, F],
  input kernel [F, D*4H] and `bias` [D*4H] (none: zeros), a [B, T] mask of valid frames
  and hidden kernels [D, H, 4H] -> hidden states [B, T, D*H]; direction d runs from the
  last frame when reverse[d]. Computes in float32 and returns x's dtype."""
  ensure()
  directions, hidden, four_hidden = kernels.shape
  if bias is None:
    bias = jnp.zeros((directions * four_hidden,), jnp.float32)
  if (x.ndim != 3 or mask.shape != x.shape[:2] or four_hidden != 4 * hidden
      or input_kernel.shape != (x.shape[2], directions * four_hidden)
      or len(reverse) != directions or bias.shape != (directions * four_hidden,)):
    raise KilnError(f'lstm needs x [B, T, F], input kernel [F, D*4H], mask [B, T], kernels '
                    f'[D, H, 4H], D reverse flags and a [D*4H] bias, got {x.shape}, '
                    f'{input_kernel.shape}, {mask.shape}, {kernels.shape}, {len(reverse)} '
                    f'flags, {bias.shape}')
  # The kernels take x 2-D, [B * T, F]: its rows are the matmuls' rows (frame t of b at b*T+t).
  batch, length, features = x.shape
  out = _lstm(x.reshape(batch * length, features).astype(jnp.float32),
              input_kernel.astype(jnp.float32), mask.astype(bool), kernels.astype(jnp.float32),
              bias.astype(jnp.float32), tuple(bool(r) for r in reverse))
  return out.astype(x.dtype)
