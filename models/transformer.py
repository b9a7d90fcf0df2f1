"""One Transformer block library for a GPT decoder and a BERT encoder.

Pre-LayerNorm blocks; heads-major softmax attention written out (`attend`); learned or
rotary positions; optional weight tying; layers either unrolled or stacked and run
with `lax.scan` (with a remat policy); float32 parameters with an optional bfloat16
compute dtype. Parameter dimensions carry logical names for the sharding rules.
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from backends import ops
from core import fields as F
from core.errors import KilnError
from models.cost import attention_flops
from models.dropout import Dropout
from core.logical_axes import constrain

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Names of jax.checkpoint_policies offered for scanned layers ('none' keeps everything).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# What the keys GPT and BERT share under config.model may hold.
TRANSFORMER_FIELDS = {
    'num_layers': F.POSITIVE_INT,
    'num_heads': F.POSITIVE_INT,
    'embed_dim': F.POSITIVE_INT,
    'mlp_ratio': F.POSITIVE_INT,
    'dropout_rate': F.RATE,
    'positions': F.Choices(('learned', 'rotary')),
    'use_bias': F.FLAG,
    'scan_layers': F.FLAG,
    'remat_policy': F.Choices(tuple(REMAT_POLICIES)),
    'dtype': F.Choices(tuple(DTYPES)),
}
_INIT = nnx.initializers.normal(0.02)  # GPT-2 / BERT initializer range.


def _param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], init=_INIT,
           **metadata):
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(axes),
                   **metadata)


def rotary_tables(positions, half: int, base: float = 10_000.0):
  """(cos, sin) of the rotary angles (Su et al. 2021) of positions [B, T], half a head's
  width each: numpy constants [T, half] where the positions are known when tracing and the
  same in every row (a training step's 0..T-1: XLA:CPU otherwise ran sin and cos of every
  angle in every layer, every step, 1.7% of the GPT CPU config's step), else traced
  [B, T, half]; float32 either way, so both give the same angles."""
  if isinstance(positions, np.ndarray) and (positions == positions[:1]).all():
    frequencies = np.float32(base) ** (-np.arange(half, dtype=np.float32) / np.float32(half))
    angles = positions[0, :, None].astype(np.float32) * frequencies
    return np.cos(angles), np.sin(angles)
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * frequencies
  return jnp.cos(angles), jnp.sin(angles)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) on [B, T, N, H] with positions [B, T]."""
  return ops.apply_rotary(x, *rotary_tables(positions, x.shape[-1] // 2, base))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None,
           drop: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """softmax(q k^T + bias) v over heads-major [B, N, T, H] queries and [B, N, S, H] keys and
  values; `q` already carries the 1/sqrt(H) scale and `bias` is additive (0 or -1e30),
  broadcastable to [B, N, T, S]. Scores and softmax are float32. `drop` (training) is
  dropout on the attention weights, as in GPT-2/nanoGPT and BERT.

  Written out rather than jax.nn.dot_product_attention on [B, T, N, H], whose CPU forward
  and backward were slower at the baby GPT shape (benchmarks/README.md, "attention")."""
  scores = jnp.einsum('bnth,bnsh->bnts', q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    scores = scores + bias
  # Unnormalised exp, then divide the [.., T, H] output rather than the [.., T, S] weights.
  weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  total = weights.sum(-1, keepdims=True)
  if drop is not None:  # Dropping unnormalised weights, then dividing by the full total,
    weights = drop(weights)  # equals dropout on the softmax probabilities.
  y = jnp.einsum('bnts,bnsh->bnth', weights.astype(v.dtype), v,
                 preferred_element_type=jnp.float32)
  return (y / total).astype(q.dtype)


_MASKED = -1e30  # Additive bias of a masked score: exp() underflows to exactly 0.
# Query rows per block of causal attention (see causal_attend); shorter sequences are one block.
CAUSAL_BLOCK = 128


def causal_bias(length: int, keys: int | None = None, offset: int = 0) -> jax.Array:
  """[length, keys] additive bias letting query i (at position offset + i) see keys <= it."""
  keys = length if keys is None else keys
  visible = jnp.arange(keys)[None, :] <= offset + jnp.arange(length)[:, None]
  return jnp.where(visible, 0.0, _MASKED).astype(jnp.float32)


def causal_attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                  block: int = CAUSAL_BLOCK,
                  drop: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Causal `attend` in query blocks, each reading only the keys up to its last row, so
  the fully masked upper blocks are never computed: with two blocks the scores shrink to
  3/4 (step gain: benchmarks/README.md, "attention")."""
  length = q.shape[2]
  if length <= block or length % block:
    mask = causal_bias(length)
    return attend(q, k, v, mask if bias is None else bias + mask, drop)
  outputs = []
  for start in range(0, length, block):
    end = start + block
    mask = causal_bias(block, end, start)
    block_bias = mask if bias is None else bias[..., :end] + mask
    outputs.append(attend(q[:, :, start:end], k[:, :, :end], v[:, :, :end], block_bias, drop))
  return jnp.concatenate(outputs, axis=2)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection and an optional KV cache."""

  def __init__(self, embed_dim: int, num_heads: int, *, use_bias: bool, rotary_positions: bool,
               dtype, rngs: nnx.Rngs, out_init=_INIT):
    if embed_dim % num_heads:
      raise KilnError(f'config.model.embed_dim={embed_dim} must be a multiple of num_heads='
                      f'{num_heads}: change one of them')
    head_dim = embed_dim // num_heads
    self.num_heads, self.rotary_positions, self.dtype = num_heads, rotary_positions, dtype
    # The [E, 3, N, H] kernel is one [E, 3E] matrix: pruning and adapters see it that way.
    self.qkv = _param(rngs, (embed_dim, 3, num_heads, head_dim), ('embed', None, 'heads', None),
                      fan_out_dims=3)
    self.out = _param(rngs, (num_heads, head_dim, embed_dim), ('heads', None, 'embed'), out_init)
    zeros = nnx.initializers.zeros
    self.qkv_bias = _param(rngs, (3, num_heads, head_dim), (None, 'heads', None),
                           zeros) if use_bias else None
    self.out_bias = _param(rngs, (embed_dim,), ('embed',), zeros) if use_bias else None

  def __call__(self, x, *, positions, causal: bool, key_mask=None, cache=None,
               dropout: Dropout | None = None, rngs: nnx.Rngs | None = None):
    """x [B, T, E]; positions [B, T]; key_mask [B, S] (True = attend); cache (k, v, index)
    holds [B, N, S, H] keys/values of earlier positions; `dropout` (with `rngs`, training)
    is dropout on the attention weights. Returns (y, new cache or None)."""
    batch, length, embed = x.shape
    _, _, heads, head_dim = self.qkv.shape
    # One 2D [B*T, E] x [E, 3E] matmul (the parameter's [E, 3, N, H] layout flattens for
    # free); with heads-major attention and the 2D output matmul below, a faster step than
    # the 'bte,eknh->kbtnh' / 'btnh,nhe->bte' einsums (benchmarks/README.md, "attention").
    qkv = ops.dense(x.reshape(batch * length, embed),
                    self.qkv[...].astype(self.dtype).reshape(embed, -1))
    if self.qkv_bias is not None:
      qkv = qkv + self.qkv_bias[...].astype(self.dtype).reshape(-1)
    tables = rotary_tables(positions, head_dim // 2) if self.rotary_positions else None
    # A backend's fused causal attention (backends.ops) where one runs: no padding or cache.
    fused = causal and cache is None and key_mask is None and ops.accelerated('causal_attention')
    if fused:
      key = rngs.dropout() if dropout is not None and rngs is not None else None
      rate = 0.0 if dropout is None else dropout.rate
      if tables is None or isinstance(tables[0], np.ndarray):
        # q, k and v as the projection wrote them, scaled and turned inside the kernel: at the
        # GPT CPU config's shapes a layer's attention forward + backward took 509 instead of
        # 730 us with the slices, rotations and concatenated gradients around it
        # (benchmarks/attention.py).
        y = ops.causal_attention_packed(qkv.reshape(batch, length, 3, heads, head_dim),
                                        scale=head_dim ** -0.5, rotary=tables,
                                        dropout_rate=rate, key=key)
        return self._project_out(y.reshape(batch * length, heads * head_dim), x.shape), None
    # Split along the matmul's columns, so the backward pass concatenates the three gradients
    # (no pad + add); measured neutral on CPU, kept for the simpler backward graph.
    q, k, v = (t.reshape(batch, length, heads, head_dim) for t in jnp.split(qkv, 3, axis=1))
    if tables is not None:
      q, k = ops.apply_rotary(q, *tables), ops.apply_rotary(k, *tables)
    if fused:
      y = ops.causal_attention(q * head_dim ** -0.5, k, v, dropout_rate=rate, key=key)
      return self._project_out(y.reshape(batch * length, heads * head_dim), x.shape), None
    drop = (functools.partial(dropout, deterministic=False, rngs=rngs)
            if dropout is not None and rngs is not None else None)
    # Heads-major [B, N, T, H]: attention's dots then batch over the leading (b, n) dims.
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * head_dim ** -0.5, k, v))
    q = constrain(q, ('batch', 'heads', None, None))
    bias = None
    if key_mask is not None:
      bias = jnp.where(key_mask, 0.0, _MASKED).astype(jnp.float32)[:, None, None, :]
    new_cache = None
    if cache is not None:
      k_cache, v_cache, index = cache
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=2)
      new_cache = (k, v, index + length)
      # Query t (at index + t) sees cached keys up to its own position.
      mask = causal_bias(length, k.shape[2], index)
      bias = mask if bias is None else bias + mask
    if causal and cache is None:
      y = causal_attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, drop=drop)
    else:
      y = attend(q, k.astype(q.dtype), v.astype(q.dtype), bias, drop)
    # Back to token-major [B*T, N*H] for one [B*T, E] x [E, E] output matmul.
    y = y.transpose(0, 2, 1, 3).reshape(batch * length, heads * head_dim)
    return self._project_out(y, x.shape), new_cache

  def _project_out(self, y, shape):
    """[B*T, N*H] attention output -> [B, T, E] through the output projection."""
    y = ops.dense(y, self.out[...].astype(self.dtype).reshape(y.shape[-1], shape[-1]))
    if self.out_bias is not None:
      y = y + self.out_bias[...].astype(self.dtype)
    return y.reshape(shape)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), as published (nanoGPT's nn.GELU()). Through lax.erf rather
  than jax.nn.gelu(approximate=False), whose erfc expansion XLA fuses into a transposing
  copy in the backward pass (step gain: benchmarks/README.md, "GELU"); `ops.erf` is lax.erf
  except on the portable path, where it is spelled in ops an exported artifact can carry.
  The forward pass also keeps the slope Phi(x) + x phi(x), so the backward pass is one
  multiply: autodiff kept erf's output and x, and its backward pass computed exp over the
  whole MLP activation, which took longer than the forward pass (benchmarks/README.md,
  "GELU slope")."""
  return x * _normal_cdf(x)


def _normal_cdf(x):
  return 0.5 * (1 + ops.erf(x * _SQRT_HALF))


def _gelu_forward(x):
  cdf = _normal_cdf(x)
  return x * cdf, cdf + x * jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_backward(slope, out_grad):
  return (out_grad * slope,)


gelu.defvjp(_gelu_forward, _gelu_backward)


class MLP(nnx.Module):
  def __init__(self, embed_dim: int, hidden_dim: int, *, use_bias: bool, dtype, rngs: nnx.Rngs,
               out_init=_INIT):
    self.dtype = dtype
    self.fc1 = nnx.Linear(embed_dim, hidden_dim, use_bias=use_bias, dtype=dtype, rngs=rngs,
                          kernel_init=_INIT, dot_general=ops.dot_general,
                          kernel_metadata={'logical_axes': ('embed', 'mlp')},
                          bias_metadata={'logical_axes': ('mlp',)})
    self.fc2 = nnx.Linear(hidden_dim, embed_dim, use_bias=use_bias, dtype=dtype, rngs=rngs,
                          kernel_init=out_init, dot_general=ops.dot_general,
                          kernel_metadata={'logical_axes': ('mlp', 'embed')},
                          bias_metadata={'logical_axes': ('embed',)})

  def __call__(self, x):
    h = constrain(gelu(self.fc1(x)), ('batch', None, 'mlp'))
    return self.fc2(h)


def _layer_norm(embed_dim: int, use_bias: bool, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm whose bias follows the projections' (nanoGPT's LayerNorm(bias=...))."""
  norm = {'logical_axes': ('embed',)}
  return ops.LayerNorm(embed_dim, dtype=dtype, use_bias=use_bias, scale_metadata=norm,
                       bias_metadata=norm, rngs=rngs)


class Block(nnx.Module):
  """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: int, dropout_rate: float, *,
               use_bias: bool, rotary_positions: bool, dtype, rngs: nnx.Rngs, out_init=_INIT):
    self.ln1 = _layer_norm(embed_dim, use_bias, dtype, rngs)
    self.attn = Attention(embed_dim, num_heads, use_bias=use_bias,
                          rotary_positions=rotary_positions, dtype=dtype, rngs=rngs,
                          out_init=out_init)
    self.ln2 = _layer_norm(embed_dim, use_bias, dtype, rngs)
    self.mlp = MLP(embed_dim, mlp_ratio * embed_dim, use_bias=use_bias, dtype=dtype, rngs=rngs,
                   out_init=out_init)
    self.dropout = Dropout(dropout_rate)

  def __call__(self, x, *, positions, causal, key_mask=None, cache=None, train=False, rngs=None):
    y, cache = self.attn(self.ln1(x), positions=positions, causal=causal, key_mask=key_mask,
                         cache=cache, dropout=self.dropout if train else None, rngs=rngs)
    x = x + self.dropout(y, deterministic=not train, rngs=rngs)
    x = x + self.dropout(self.mlp(self.ln2(x)), deterministic=not train, rngs=rngs)
    return constrain(x, ('batch', None, 'embed')), cache


class Transformer(nnx.Module):
  """Token (and learned position) embeddings, a stack of blocks, a final LayerNorm."""

  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int, num_heads: int,
               embed_dim: int, mlp_ratio: int = 4, dropout_rate: float = 0.0,
               positions: str = 'learned', use_bias: bool = True, scan_layers: bool = False,
               remat_policy: str = 'none', dtype: str = 'float32',
               scaled_residual_init: bool = False, rngs: nnx.Rngs):
    """`scaled_residual_init`: GPT-2's initialisation, the projections that end each
    residual branch drawn with std 0.02 / sqrt(2 * num_layers) instead of 0.02."""
    if positions not in ('learned', 'rotary'):
      raise KilnError(f"config.model.positions={positions!r} is not a choice: set it to "
                      "'learned' or 'rotary'")
    if remat_policy not in REMAT_POLICIES:
      raise KilnError(f'config.model.remat_policy={remat_policy!r} is not a choice: set it to '
                      f'one of {sorted(REMAT_POLICIES)}')
    if dtype not in DTYPES:
      raise KilnError(f'config.model.dtype={dtype!r} is not a choice: set it to one of '
                      f'{sorted(DTYPES)}')
    self.dtype = DTYPES[dtype]
    self.max_len, self.scan_layers, self.num_layers = max_len, scan_layers, num_layers
    self.remat_policy = remat_policy
    self.token_embed = _param(rngs, (vocab_size, embed_dim), ('vocab', 'embed'))
    self.position_embed = (_param(rngs, (max_len, embed_dim), (None, 'embed'))
                           if positions == 'learned' else None)
    self.dropout = Dropout(dropout_rate)

    out_init = (nnx.initializers.normal(0.02 / math.sqrt(2 * num_layers))
                if scaled_residual_init else _INIT)

    def make_block(block_rngs):
      return Block(embed_dim, num_heads, mlp_ratio, dropout_rate, use_bias=use_bias,
                   rotary_positions=positions == 'rotary', dtype=self.dtype, rngs=block_rngs,
                   out_init=out_init)

    if scan_layers:  # One stacked block: parameters gain a leading (unsharded) layer axis.
      keys = jax.random.split(rngs.params(), num_layers)
      self.blocks = nnx.vmap(lambda key: make_block(nnx.Rngs(params=key)))(keys)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(num_layers)])
    self.ln_f = _layer_norm(embed_dim, use_bias, self.dtype, rngs)

  def embed(self, tokens, positions, *, train, rngs):
    x = self.token_embed[...][tokens]
    if self.position_embed is not None:
      x = x + self.position_embed[...][positions]
    x = self.dropout(x.astype(self.dtype), deterministic=not train, rngs=rngs)
    return constrain(x, ('batch', None, 'embed'))

  def __call__(self, tokens, *, causal: bool, positions=None, key_mask=None, cache=None,
               train: bool = False, rngs: nnx.Rngs | None = None):
    """Hidden states [B, T, E] (and the updated cache when `cache` is given)."""
    batch, length = tokens.shape
    if positions is None and cache is None and isinstance(batch, int):
      positions = np.broadcast_to(np.arange(length), (batch, length))  # Known when tracing.
    elif positions is None:
      start = 0 if cache is None else self._cache_index(cache)
      positions = jnp.broadcast_to(start + jnp.arange(length), (batch, length))
    x = self.embed(tokens, positions, train=train, rngs=rngs)
    kwargs = dict(positions=positions, causal=causal, key_mask=key_mask, train=train)
    if self.scan_layers:
      x, cache = self._scanned(x, cache, rngs, kwargs)
    else:
      new_cache = [] if cache is not None else None
      for i, block in enumerate(self.blocks):
        x, layer_cache = block(x, cache=None if cache is None else cache[i], rngs=rngs, **kwargs)
        if new_cache is not None:
          new_cache.append(layer_cache)
      cache = new_cache
    return self.ln_f(x), cache

  def _cache_index(self, cache):
    """Tokens already in the cache (every layer holds the same count)."""
    return cache[2][0] if self.scan_layers else cache[0][2]

  def _scanned(self, x, cache, rngs, kwargs):
    graphdef, stacked = nnx.split(self.blocks)
    keys = (jax.random.split(rngs.dropout(), self.num_layers) if rngs is not None and
            kwargs['train'] else None)

    def layer(x, per_layer):
      state, key, layer_cache = per_layer
      layer_rngs = None if key is None else nnx.Rngs(dropout=key)
      x, layer_cache = nnx.merge(graphdef, state)(x, cache=layer_cache, rngs=layer_rngs, **kwargs)
      return x, layer_cache

    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != 'none':
      layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    return jax.lax.scan(layer, x, (stacked, keys, cache))

  def init_cache(self, batch_size: int, max_len: int | None = None):
    """Empty per-layer (keys, values, index) caches for `decode`."""
    attn = self.blocks.attn if self.scan_layers else self.blocks[0].attn
    heads, head_dim = attn.qkv.shape[-2:]
    shape = (batch_size, heads, max_len or self.max_len, head_dim)  # Heads-major, as `attend`.

    def empty():
      return (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((), jnp.int32))
    if self.scan_layers:
      return jax.tree.map(lambda x: jnp.broadcast_to(x, (self.num_layers, *x.shape)), empty())
    return [empty() for _ in range(self.num_layers)]

  def attention_shape(self) -> tuple[int, int]:
    """(heads, head_dim), read from a block (scanned layers keep a leading layer axis)."""
    blocks = self.blocks if self.scan_layers else self.blocks[0]
    return tuple(blocks.attn.qkv.shape[-2:])

  def stack_flops(self, length: int, causal: bool) -> float:
    """One sequence of `length` through the blocks: per token and layer the QKV, output
    and MLP projections (2 FLOPs per weight), plus attention over `length` keys, causal
    counted half (models.cost.attention_flops; attention is ~10% of a 6x384 layer at 256)."""
    blocks = self.blocks if self.scan_layers else self.blocks[0]
    embed_dim, _, heads, head_dim = blocks.attn.qkv.shape[-4:]
    mlp_dim = blocks.mlp.fc1.out_features
    projections = 2.0 * (3 * embed_dim * heads * head_dim + heads * head_dim * embed_dim
                         + 2 * embed_dim * mlp_dim)
    attention = attention_flops(length, length, heads * head_dim, causal)
    return self.num_layers * (length * projections + attention)


class GPT(nnx.Module):
  """Decoder-only language model (causal attention), logits over the vocabulary."""
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {**TRANSFORMER_FIELDS, 'tie_embeddings': F.FLAG}


  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int = 6, num_heads: int = 6,
               embed_dim: int = 384, mlp_ratio: int = 4, dropout_rate: float = 0.0,
               positions: str = 'learned', use_bias: bool = True, tie_embeddings: bool = True,
               scan_layers: bool = False, remat_policy: str = 'none', dtype: str = 'float32',
               rngs: nnx.Rngs):
    self.transformer = Transformer(
        vocab_size=vocab_size, max_len=max_len, num_layers=num_layers, num_heads=num_heads,
        embed_dim=embed_dim, mlp_ratio=mlp_ratio, dropout_rate=dropout_rate, positions=positions,
        use_bias=use_bias, scan_layers=scan_layers, remat_policy=remat_policy, dtype=dtype,
        scaled_residual_init=True, rngs=rngs)
    self.lm_head = None if tie_embeddings else _param(rngs, (embed_dim, vocab_size),
                                                      ('embed', 'vocab'))

  def logits(self, hidden):
    t = self.transformer
    if self.lm_head is None:
      return jnp.einsum('bte,ve->btv', hidden, t.token_embed[...].astype(t.dtype))
    return jnp.einsum('bte,ev->btv', hidden, self.lm_head[...].astype(t.dtype))

  def __call__(self, tokens, *, train: bool = False, rngs: nnx.Rngs | None = None):
    hidden, _ = self.transformer(tokens, causal=True, train=train, rngs=rngs)
    return self.logits(hidden).astype(jnp.float32)

  def init_cache(self, batch_size: int, max_len: int | None = None):
    return self.transformer.init_cache(batch_size, max_len)

  def decode(self, tokens, cache):
    """Logits for `tokens` [B, T] that continue the sequence held in `cache`."""
    hidden, cache = self.transformer(tokens, causal=True, cache=cache)
    return self.logits(hidden).astype(jnp.float32), cache

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One sequence's forward FLOPs, `input_shape` = (length,): the causal stack and the
    vocabulary projection at every position."""
    (length,) = input_shape
    vocab, embed = self.transformer.token_embed.shape
    return self.transformer.stack_flops(length, causal=True) + 2.0 * length * embed * vocab

  def palm_flops_per_token(self, length: int) -> float:
    """Training FLOPs per token as the PaLM paper counts them (Chowdhery et al. 2022,
    appendix B; also nanoGPT's `estimate_mfu`): 6N + 12*L*H*Q*T, N the parameters less
    learned position embeddings, attention over all T keys (not halved when causal)."""
    params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(self, nnx.Param)))
    stack = self.transformer
    if stack.position_embed is not None:
      params -= stack.position_embed.size
    heads, head_dim = stack.attention_shape()
    return 6.0 * params + 12.0 * stack.num_layers * heads * head_dim * length


class BERT(nnx.Module):
  """Bidirectional encoder with a masked-LM head and an optional classification head."""
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {**TRANSFORMER_FIELDS, 'num_classes': F.NON_NEGATIVE_INT,
                   'pooling': F.Choices(('cls', 'mean'))}


  def __init__(self, *, vocab_size: int, max_len: int, num_layers: int = 4, num_heads: int = 4,
               embed_dim: int = 256, mlp_ratio: int = 4, dropout_rate: float = 0.1,
               positions: str = 'learned', use_bias: bool = True, num_classes: int = 0,
               pooling: str = 'cls', scan_layers: bool = False, remat_policy: str = 'none',
               dtype: str = 'float32', rngs: nnx.Rngs):
    """`pooling`: what the classifier reads, the first ([CLS]) position's hidden state
    ('cls', as in BERT) or the mean over unpadded positions ('mean')."""
    if pooling not in ('cls', 'mean'):
      raise KilnError(f"config.model.pooling={pooling!r} is not a choice: set it to 'cls' or "
                      "'mean'")
    self.pooling = pooling
    self.encoder = Transformer(
        vocab_size=vocab_size, max_len=max_len, num_layers=num_layers, num_heads=num_heads,
        embed_dim=embed_dim, mlp_ratio=mlp_ratio, dropout_rate=dropout_rate, positions=positions,
        use_bias=use_bias, scan_layers=scan_layers, remat_policy=remat_policy, dtype=dtype,
        rngs=rngs)
    dt = self.encoder.dtype
    # MLM head as in BERT: dense + GELU + LayerNorm, then the tied embedding and a bias.
    self.mlm_dense = nnx.Linear(embed_dim, embed_dim, dtype=dt, kernel_init=_INIT, rngs=rngs,
                                kernel_metadata={'logical_axes': ('embed', 'mlp')})
    self.mlm_norm = ops.LayerNorm(embed_dim, dtype=dt, rngs=rngs)
    self.mlm_bias = _param(rngs, (vocab_size,), ('vocab',), nnx.initializers.zeros)
    self.classifier = (nnx.Linear(embed_dim, num_classes, kernel_init=_INIT, rngs=rngs)
                       if num_classes else None)

  def encode(self, tokens, key_mask=None, *, train=False, rngs=None):
    hidden, _ = self.encoder(tokens, causal=False, key_mask=key_mask, train=train, rngs=rngs)
    return hidden

  def mlm_logits(self, hidden):
    h = self.mlm_norm(jax.nn.gelu(self.mlm_dense(hidden)))
    embed = self.encoder.token_embed[...].astype(h.dtype)
    return (jnp.einsum('bte,ve->btv', h, embed) + self.mlm_bias[...]).astype(jnp.float32)

  def __call__(self, tokens, *, key_mask=None, train: bool = False, rngs=None):
    """Masked-LM logits [B, T, V]."""
    return self.mlm_logits(self.encode(tokens, key_mask, train=train, rngs=rngs))

  def forward_flops(self, input_shape: Sequence[int]) -> float:
    """One sequence's forward FLOPs, `input_shape` = (length,): the bidirectional stack
    plus the MLM head (dense + tied vocabulary projection) at every position."""
    (length,) = input_shape
    vocab, embed = self.encoder.token_embed.shape
    head = 2.0 * length * (embed * embed + embed * vocab)
    return self.encoder.stack_flops(length, causal=False) + head

  def classify(self, tokens, *, key_mask=None, train: bool = False, rngs=None):
    """Class logits from the pooled hidden states (see `pooling`)."""
    if self.classifier is None:
      raise ValueError('this BERT has no classification head: build it with num_classes > 0')
    hidden = self.encode(tokens, key_mask, train=train, rngs=rngs)
    if self.pooling == 'cls':
      pooled = hidden[:, 0]
    else:
      weights = (jnp.ones(tokens.shape, hidden.dtype) if key_mask is None
                 else key_mask.astype(hidden.dtype))[..., None]
      pooled = (hidden * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return self.classifier(pooled).astype(jnp.float32)
