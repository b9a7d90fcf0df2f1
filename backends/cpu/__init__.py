"""CPU-only machinery: compiled kernels, conv lowering choice, max-pool rewrite, host memory.

Models never import this package: `backends.ops` registers what is here (`register`) as the
CPU implementations of its ops, and deleting this folder leaves the portable plain-JAX ones
(backends/ops.py tolerates its absence). Importing the package starts nothing (no JAX), so
scripts can reach `host_memory` before JAX starts.

- `kernels`: compiled attention, Philox dropout bits, direct convolutions, the LSTM
  recurrence, dense layers' kernel gradients and LayerNorm (C++ in csrc/, built on first use for this
  CPU and cached);
- `conv_lowering`: the per-shape choice between XLA's convolution and GEMM rewrites of it;
- `max_pool`: max-pool and its gradient as fused elementwise work (XLA:CPU's
  select_and_scatter is slow);
- `host_memory`: glibc settings that stop XLA's buffers page-faulting (scripts' first lines).

Switches, all in one place:
- config.backend.cpu_kernels ('auto' | 'xla' | 'cpu'), applied by backends.ops.configure
  where a run starts: whether anything registered here runs at all ('xla': plain XLA
  everywhere, native convolutions and nnx.max_pool included; 'cpu': always, or a one-line
  error where the kernels cannot build). `backends.ops.portable()` is 'xla' for one trace.
- KILN_CONV_LOWERING ('auto' | 'measure' | 'rules' | a lowering's name): how convs are
  lowered when the above lets this package choose (conv_lowering.mode).
- KILN_HOST_MALLOC ('auto' | 'keep' | 'system'): read before JAX starts (host_memory.mode).
- KILN_HUGE_PAGES ('auto' | 'off'): kept memory in transparent huge pages, for which a
  script re-executes itself once (host_memory.huge_pages_need_restart).
- KILN_CPU_ARCH_FLAGS (e.g. '-mno-avx512f'): extra compiler flags for the kernels, to build
  for a lower instruction set than this host's (kernels.build).
- CXX (default g++) and KILN_CACHE_DIR (default ~/.cache/kiln): the compiler and where the
  built library, measured conv plans and the matmul peak are kept.
"""


def register(register_op) -> None:
  """Registers the CPU implementations through `register_op` (backends.ops.register)."""
  from backends.cpu import conv_lowering, kernels, max_pool
  register_op('causal_attention', kernels.causal_attention, platform='cpu',
              ready=kernels.ensure)
  register_op('causal_attention_packed', kernels.causal_attention_packed, platform='cpu',
              ready=kernels.ensure)
  register_op('random_bits', kernels.random_bits, platform='cpu', ready=kernels.ensure)
  register_op('conv_general_dilated', conv_lowering.conv_general_dilated, platform='cpu')
  register_op('max_pool', max_pool.max_pool, platform='cpu')
  register_op('lstm', kernels.lstm, platform='cpu', ready=kernels.ensure)
  register_op('dense', kernels.dense, platform='cpu', ready=kernels.ensure)
  register_op('layer_norm', kernels.layer_norm, platform='cpu', ready=kernels.ensure)
