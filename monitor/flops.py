"""Model FLOPs counted analytically per model family, and the MFU arithmetic built on them.

The MFU numerator is the model's own arithmetic, counted from its layers: each
matmul or convolution is 2 FLOPs per multiply-add (2*m*n*k). A training step
is 3x the forward pass (the backward pass costs about twice the forward), so
rematerialisation or XLA's own rewrites never inflate the reported MFU.
XLA's cost analysis (`xla_flops`) is the cross-check, not the numerator.

Elementwise work (activations, bias adds, BatchNorm, dropout), pooling and the
loss are ignored: they are a few FLOPs per activation against hundreds per
output of a conv or dense layer, and rarely what bounds the step.

Each family registers a counter in `FLOP_COUNTERS`; a new family (Transformers
with causal attention counted half, LSTMs per time step, ResNets) adds one.
"""

from collections.abc import Callable, Sequence

import jax
from flax import nnx

from core.errors import KilnError
from models.cnn import CNN
from models.conformer import ConformerEncoder
from models.detector import YOLO
from models.mlp import MLP
from models.recurrent import LSTMEncoder, LSTMLayer
from models.resnet import ResNet
from models.rnnt import Transducer
from models.transformer import BERT, GPT, Transformer


def linear_flops(layer: nnx.Linear) -> float:
  """One example's forward FLOPs through a dense layer (bias adds ignored)."""
  return 2.0 * layer.in_features * layer.out_features


def _per_dim(value, rank: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


def _paddings(padding, sizes, kernel_sizes, strides) -> tuple[list[tuple[int, int]], bool]:
  """Per spatial dim (low, high) padding as nnx.Conv applies it, and whether the padded
  values are copies of the input (circular/reflect) rather than zeros."""
  rank = len(sizes)
  if isinstance(padding, str):
    mode = padding.upper()
    if mode in ('CIRCULAR', 'REFLECT'):
      return [((k - 1) // 2, k // 2) for k in kernel_sizes], True
    if mode == 'CAUSAL':
      return [(k - 1, 0) for k in kernel_sizes], False
    return list(jax.lax.padtype_to_pads(sizes, kernel_sizes, strides, mode)), False
  if isinstance(padding, int):
    return [(padding, padding)] * rank, False
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding], False


def _taps_on_input(size: int, kernel: int, dilation: int, stride: int, low: int, high: int,
                   padded_is_input: bool) -> tuple[int, int]:
  """(output positions, kernel taps summed over them that land on input rather than zero
  padding) along one spatial dim."""
  span = (kernel - 1) * dilation + 1
  outputs = (size + low + high - span) // stride + 1
  if padded_is_input:
    return outputs, outputs * kernel
  taps = sum(1 for o in range(outputs) for k in range(kernel)
             if 0 <= o * stride - low + k * dilation < size)
  return outputs, taps


def conv_flops(conv: nnx.Conv, spatial_shape: Sequence[int]) -> tuple[float, tuple[int, ...]]:
  """One example's forward FLOPs through `conv` on an input of `spatial_shape` (no channel
  dim), and the output's spatial shape.

  Only multiply-adds whose input is real data count, not those against zero padding:
  that is the model's arithmetic (and XLA's convention). On small images the
  difference is large: 'SAME' 3x3 padding is 16% of an 8x8 map's taps, 31% of a 4x4's.
  """
  kernel_sizes = tuple(conv.kernel_size)
  rank = len(kernel_sizes)
  if len(spatial_shape) != rank:
    raise KilnError(f'input spatial shape {tuple(spatial_shape)} has {len(spatial_shape)} dims '
                    f'but the conv kernel {kernel_sizes} has {rank}: pass (H, W, ...) without '
                    'batch and channel dims')
  if any(d != 1 for d in _per_dim(conv.input_dilation, rank)):
    raise KilnError('conv FLOPs with input_dilation > 1 (transposed convs) are not counted '
                    'yet: extend monitor.flops.conv_flops before using them')
  strides = _per_dim(conv.strides, rank)
  dilations = _per_dim(conv.kernel_dilation, rank)
  spans = [(k - 1) * d + 1 for k, d in zip(kernel_sizes, dilations)]
  pads, padded_is_input = _paddings(conv.padding, tuple(spatial_shape), spans, strides)
  out_shape, taps = [], 1
  for size, k, d, s, (low, high) in zip(spatial_shape, kernel_sizes, dilations, strides, pads):
    outputs, dim_taps = _taps_on_input(size, k, d, s, low, high, padded_is_input)
    out_shape.append(outputs)
    taps *= dim_taps
  in_per_group = conv.in_features // conv.feature_group_count
  return 2.0 * taps * in_per_group * conv.out_features, tuple(out_shape)


def _cnn_forward_flops(model: CNN, input_shape: Sequence[int]) -> float:
  """Mirrors models.cnn.CNN.__call__: conv blocks per stage, a 2x2/2 max-pool after each."""
  if len(input_shape) != 3:
    raise KilnError(f'CNN input_shape {tuple(input_shape)} must be one example\'s (H, W, C)')
  *spatial, channels = input_shape
  total = 0.0
  for stage in model.stages:
    for block in stage:
      if block.conv.in_features != channels:
        raise KilnError(f'input_shape {tuple(input_shape)} has {channels} channels where the '
                        f'CNN expects {block.conv.in_features}: pass the shape it was built for')
      flops, spatial = conv_flops(block.conv, spatial)
      total += flops
      channels = block.conv.out_features
    spatial = [size // 2 for size in spatial]  # VALID 2x2 windows, stride 2.
  flattened = channels
  for size in spatial:
    flattened *= size
  if flattened != model.hidden.in_features:
    raise KilnError(f'input_shape {tuple(input_shape)} flattens to {flattened} features where '
                    f'the CNN expects {model.hidden.in_features}: pass the shape it was built for')
  return total + linear_flops(model.hidden) + linear_flops(model.classifier)


def _mlp_forward_flops(model: MLP, input_shape: Sequence[int]) -> float:
  layers = [*model.hidden, model.classifier]
  flattened = 1
  for size in input_shape:
    flattened *= size
  if flattened != layers[0].in_features:
    raise KilnError(f'input_shape {tuple(input_shape)} flattens to {flattened} features where '
                    f'the MLP expects {layers[0].in_features}: pass the shape it was built for')
  return sum(linear_flops(layer) for layer in layers)


def _first_block(stack: Transformer):
  """A block to read layer shapes from (scanned layers keep a leading layer axis)."""
  return stack.blocks if stack.scan_layers else stack.blocks[0]


def _transformer_flops(stack: Transformer, length: int, causal: bool) -> float:
  """One sequence through the blocks: per token and layer, the QKV, output and MLP
  projections (2 FLOPs per weight) plus attention scores and the weighted sum over
  `length` keys (2 * length * embed each), halved when causal because half the
  score matrix is masked. XLA computes the masked half anyway, so its count runs a
  few percent higher (attention is ~10% of a 6x384 layer at length 256)."""
  blocks = _first_block(stack)
  embed_dim, _, heads, head_dim = blocks.attn.qkv.shape[-4:]
  mlp_dim = blocks.mlp.fc1.out_features
  projections = 2.0 * (3 * embed_dim * heads * head_dim + heads * head_dim * embed_dim
                       + 2 * embed_dim * mlp_dim)
  attention = 2.0 * 2 * length * heads * head_dim * (0.5 if causal else 1.0)
  return stack.num_layers * length * (projections + attention)


def _gpt_forward_flops(model: GPT, input_shape: Sequence[int]) -> float:
  (length,) = input_shape
  vocab, embed = model.transformer.token_embed.shape
  return _transformer_flops(model.transformer, length, causal=True) + 2.0 * length * embed * vocab


def _bert_forward_flops(model: BERT, input_shape: Sequence[int]) -> float:
  """Encoder plus the MLM head (dense + tied vocabulary projection) at every position."""
  (length,) = input_shape
  vocab, embed = model.encoder.token_embed.shape
  head = 2.0 * length * (embed * embed + embed * vocab)
  return _transformer_flops(model.encoder, length, causal=False) + head


def resnet_features_flops(model: ResNet, input_shape: Sequence[int]
                          ) -> tuple[float, tuple[int, ...]]:
  """Mirrors models.resnet.ResNet.features: forward FLOPs up to the last stage and that
  map's spatial shape. Convs only; the max-pool and residual adds are elementwise."""
  if len(input_shape) != 3 or input_shape[-1] != model.stem_conv.in_features:
    raise KilnError(f'input_shape {tuple(input_shape)} is not the (H, W, '
                    f'{model.stem_conv.in_features}) image the ResNet was built for')
  total, spatial = conv_flops(model.stem_conv, input_shape[:2])
  if model.stem == 'imagenet':  # 3x3/2 max-pool padded by 1.
    spatial = tuple((size + 2 - 3) // 2 + 1 for size in spatial)
  flops, spatial = _residual_blocks_flops(model.blocks, spatial)
  return total + flops, spatial


def _residual_blocks_flops(blocks, spatial) -> tuple[float, tuple[int, ...]]:
  """models.resnet.Block's in sequence: their convs and projection shortcuts."""
  total = 0.0
  for block in blocks:
    block_input = spatial
    for conv in block.convs:
      flops, spatial = conv_flops(conv, spatial)
      total += flops
    if block.projection is not None:
      total += conv_flops(block.projection, block_input)[0]
  return total, spatial


def _resnet_forward_flops(model: ResNet, input_shape: Sequence[int]) -> float:
  return resnet_features_flops(model, input_shape)[0] + linear_flops(model.classifier)


def _yolo_forward_flops(model: YOLO, input_shape: Sequence[int]) -> float:
  """Mirrors models.detector.YOLO.__call__: stem, residual blocks, head convs."""
  if len(input_shape) != 3 or input_shape[-1] != model.stem_conv.in_features:
    raise KilnError(f'input_shape {tuple(input_shape)} is not the (H, W, '
                    f'{model.stem_conv.in_features}) image the detector was built for')
  total, spatial = conv_flops(model.stem_conv, input_shape[:2])
  flops, spatial = _residual_blocks_flops(model.blocks, spatial)
  head, spatial = conv_flops(model.head_conv, spatial)
  return total + flops + head + conv_flops(model.predict, spatial)[0]



# --- Speech encoders (issue 6): input_shape is (max_frames, num_mels); padded frames count,
# since the step computes them.
def _lstm_layer_flops(layer: LSTMLayer, steps: int) -> float:
  """Per time step: the input and hidden projections into the 4 gates (the input one is
  hoisted out of the recurrence, but it is the same arithmetic)."""
  return steps * (linear_flops(layer.input_proj) + linear_flops(layer.hidden_proj))


def _lstm_forward_flops(model: LSTMEncoder, input_shape: Sequence[int]) -> float:
  frames, _ = input_shape
  steps = -(-frames // model.frame_stack)
  layers = [*model.forward_layers, *model.backward_layers]
  head = steps * linear_flops(model.head) if model.head is not None else 0.0
  return sum(_lstm_layer_flops(layer, steps) for layer in layers) + head


def _conformer_forward_flops(model: ConformerEncoder, input_shape: Sequence[int]) -> float:
  """Subsampling convs, then per block and frame the two feed-forwards, the attention
  projections plus scores and weighted sum over all frames (bidirectional), and the
  convolution module (pointwise, depthwise, pointwise)."""
  sub = model.subsample
  total, spatial = conv_flops(sub.conv1, input_shape)
  flops, spatial = conv_flops(sub.conv2, spatial)
  frames = spatial[0]
  total += flops + frames * linear_flops(sub.proj)
  for block in model.blocks:
    dim = block.attn_norm.num_features
    ffn = 2 * (linear_flops(block.ff1.fc1) + linear_flops(block.ff1.fc2))
    attention = 2.0 * 4 * dim * dim + 2.0 * 2 * frames * dim
    total += frames * (ffn + attention)
    for conv in (block.conv.pointwise1, block.conv.depthwise, block.conv.pointwise2):
      total += conv_flops(conv, (frames,))[0]
  if model.head is not None:
    total += frames * linear_flops(model.head)
  return total


def _transducer_forward_flops(model: Transducer, input_shape: Sequence[int]) -> float:
  """Encoder, the prediction network over U+1 labels, and the joint network at every
  (frame, label position) of the T' x (U+1) lattice, U = model.max_label_len."""
  encoder = forward_flops(model.encoder, input_shape)
  frames = -(-input_shape[0] // model.encoder.frame_stack) if isinstance(
      model.encoder, LSTMEncoder) else -(-(-(-input_shape[0] // 2)) // 2)  # Conformer: 4x.
  labels = model.max_label_len + 1
  prediction = labels * (_lstm_layer_flops(model.predictor, 1) + linear_flops(model.pred_proj))
  joint = frames * linear_flops(model.enc_proj) + frames * labels * linear_flops(model.joint_out)
  return encoder + prediction + joint
# --- End of speech.

# Model class -> counter of one example's forward FLOPs, `(model, input_shape) -> float`.
FLOP_COUNTERS: dict[type, Callable[[nnx.Module, Sequence[int]], float]] = {
    CNN: _cnn_forward_flops,
    MLP: _mlp_forward_flops,
    GPT: _gpt_forward_flops,
    BERT: _bert_forward_flops,
    ResNet: _resnet_forward_flops,
    YOLO: _yolo_forward_flops,
    LSTMEncoder: _lstm_forward_flops,
    ConformerEncoder: _conformer_forward_flops,
    Transducer: _transducer_forward_flops,
}


def forward_flops(model: nnx.Module, input_shape: Sequence[int]) -> float:
  """FLOPs of one example's forward pass; `input_shape` excludes the batch dim.

  Works on concrete or abstract (`nnx.eval_shape`) models: only layer shapes are read.
  """
  for cls in type(model).__mro__:
    if cls in FLOP_COUNTERS:
      return float(FLOP_COUNTERS[cls](model, tuple(input_shape)))
  raise KilnError(f'no FLOP counter for model {type(model).__name__}: register one in '
                  'monitor.flops.FLOP_COUNTERS')


def train_step_flops(model: nnx.Module, input_shape: Sequence[int], batch_size: int) -> float:
  """Model FLOPs of one optimizer step over a global batch: forward + backward (2x forward)."""
  if batch_size <= 0:
    raise KilnError(f'batch_size={batch_size} must be positive')
  return 3.0 * forward_flops(model, input_shape) * batch_size


def palm_train_step_flops(model: GPT, length: int, batch_size: int) -> float:
  """The PaLM paper's count (Chowdhery et al. 2022, appendix B), also nanoGPT's
  `estimate_mfu`: 6N + 12*L*H*Q*T FLOPs per token, N the parameters less learned position
  embeddings, attention over all T keys (not halved when causal). Reported beside
  `train_step_flops` so that MFU figures compare with those papers' and repositories'."""
  params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  stack = model.transformer
  if stack.position_embed is not None:
    params -= stack.position_embed.size
  _, _, heads, head_dim = _first_block(stack).attn.qkv.shape[-4:]
  per_token = 6.0 * params + 12.0 * stack.num_layers * heads * head_dim * length
  return per_token * length * batch_size


def xla_flops(jitted_fn, *args, **kwargs) -> float | None:
  """FLOPs XLA counts in the compiled `jitted_fn(*args, **kwargs)`; None if the backend
  gives no cost analysis. A sharded program reports one device's share.

  XLA counts elementwise ops too and skips work it removed (e.g. the input gradient
  of a first layer), so expect it near, not equal to, the analytic count.
  """
  analysis = jitted_fn.lower(*args, **kwargs).compile().cost_analysis()
  if analysis is None:
    return None
  # Older JAX returns one dict per HLO module, newer a single dict.
  modules = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  counts = [module['flops'] for module in modules if module and 'flops' in module]
  return float(sum(counts)) if counts else None


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise KilnError(f'{name}={value} must be positive')


def tflops_per_device(flops_per_step: float, step_seconds: float, num_devices: int) -> float:
  """Achieved model TFLOP/s per device."""
  _positive('step_seconds', step_seconds)
  _positive('num_devices', num_devices)
  return flops_per_step / step_seconds / num_devices / 1e12


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_flops_per_device: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak FLOP/s
  (see monitor.hardware.peak_flops_per_device); None when the peak is unknown."""
  if peak_flops_per_device is None:
    return None
  _positive('peak_flops_per_device', peak_flops_per_device)
  achieved = tflops_per_device(flops_per_step, step_seconds, num_devices) * 1e12
  return achieved / peak_flops_per_device
