"""RNN-T (Graves 2012): an acoustic encoder, a prediction network over the labels emitted
so far, and a joint network combining them at every (frame, label position).

The prediction network is an embedding and one LSTM layer fed [blank, y_1, ..., y_U]
(blank doubles as the start symbol); the joint network is tanh(W_e enc + W_p pred) followed
by a projection to blank + vocabulary (He et al. 2019, "Streaming end-to-end speech
recognition for mobile devices"). The encoder is any Kiln speech encoder, named by
`encoder['name']` with its own constructor keys.
"""

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from backends import ops
from core.errors import KilnError
from core import fields as F
from models.conformer import ConformerEncoder
from models.cost import linear_flops
from models.recurrent import LSTMEncoder, LSTMLayer

ENCODERS = {'lstm': LSTMEncoder, 'conformer': ConformerEncoder}


class Transducer(nnx.Module):
  # What each key under config.model may hold; checked before the model is built.
  CONFIG_FIELDS = {
      'encoder.name': F.Choices(tuple(ENCODERS)),
      'max_label_len': F.NON_NEGATIVE_INT,
      'embed_dim': F.POSITIVE_INT,
      'pred_hidden_dim': F.POSITIVE_INT,
      'joint_dim': F.POSITIVE_INT,
  }

  @classmethod
  def config_fields(cls, model_config) -> dict:
    """CONFIG_FIELDS plus the chosen encoder's own, as 'encoder.<key>'."""
    encoder = ENCODERS.get((model_config.get('encoder') or {}).get('name'))
    nested = {f'encoder.{key}': constraint
              for key, constraint in getattr(encoder, 'CONFIG_FIELDS', {}).items()
              if key != 'num_outputs'}  # The transducer sets it.
    return {**cls.CONFIG_FIELDS, **nested}


  def __init__(self, *, input_dim: int, vocab_size: int, encoder, max_label_len: int = 0,
               embed_dim: int = 128, pred_hidden_dim: int = 256, joint_dim: int = 256,
               norm_axis_name: str | None = None, rngs: nnx.Rngs):
    """`max_label_len`: label positions per lattice, kept for FLOP counting only."""
    encoder = dict(encoder)
    name = encoder.pop('name', None)
    if name not in ENCODERS:
      raise KilnError(f"config.model.encoder.name={name!r} must be one of {sorted(ENCODERS)}")
    encoder_cls = ENCODERS[name]
    if 'norm_axis_name' in inspect.signature(encoder_cls.__init__).parameters:
      encoder['norm_axis_name'] = norm_axis_name  # Its BatchNorms average over this axis.
    self.encoder = encoder_cls(input_dim=input_dim, num_outputs=0, **encoder, rngs=rngs)
    self.max_label_len = max_label_len
    self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs,
                           embedding_metadata={'logical_axes': ('vocab', 'embed')})
    self.predictor = LSTMLayer(embed_dim, pred_hidden_dim, rngs=rngs)
    self.enc_proj = nnx.Linear(self.encoder.output_dim, joint_dim, rngs=rngs,
                               dot_general=ops.dot_general,
                               kernel_metadata={'logical_axes': ('embed', 'mlp')})
    self.pred_proj = nnx.Linear(pred_hidden_dim, joint_dim, use_bias=False, rngs=rngs,
                                dot_general=ops.dot_general,
                                kernel_metadata={'logical_axes': ('embed', 'mlp')})
    self.joint_out = nnx.Linear(joint_dim, vocab_size, rngs=rngs,
                                dot_general=ops.dot_general,
                                kernel_metadata={'logical_axes': ('mlp', 'vocab')})

  def encode(self, features, frames, *, train: bool = False, rngs=None):
    """-> (encoder outputs [B, T', D], valid frames [B])."""
    return self.encoder(features, frames, train=train, rngs=rngs)

  def project_encoder(self, encoded: jax.Array) -> jax.Array:
    return self.enc_proj(encoded)

  def joint(self, enc_projected: jax.Array, pred_projected: jax.Array) -> jax.Array:
    return self.joint_out(jnp.tanh(enc_projected + pred_projected)).astype(jnp.float32)

  def joint_lattice(self, encoded, labels, *, train: bool = False, rngs=None) -> jax.Array:
    """Logits [B, T', U+1, V] for every frame and every label prefix y_1..y_u."""
    del train, rngs  # No dropout in the prediction and joint networks.
    tokens = jnp.pad(labels, ((0, 0), (1, 0)))  # Blank first: the start symbol.
    hidden = self.predictor(self.embed(tokens), jnp.ones(tokens.shape, bool))
    return self.joint(self.project_encoder(encoded)[:, :, None, :],
                      self.pred_proj(hidden)[:, None, :, :])

  def predict_step(self, state, tokens: jax.Array):
    """Feeds one label per utterance: -> (new LSTM state, projected prediction [B, J])."""
    state = self.predictor.cell(state, self.predictor.input_proj(self.embed(tokens)))
    return state, self.pred_proj(state[0])

  def initial_prediction(self, batch: int):
    """(state, projected prediction) after the start symbol."""
    return self.predict_step(self.predictor.initial_state(batch),
                             jnp.zeros((batch,), jnp.int32))

  def joint_step(self, enc_projected: jax.Array, pred_projected: jax.Array) -> jax.Array:
    """Logits [B, V] for one frame and the current prediction."""
    return self.joint(enc_projected, pred_projected)

  def forward_flops(self, input_shape) -> float:
    """One utterance's forward FLOPs: the encoder, the prediction network over U+1
    labels, and the joint network at every (frame, label position) of the T' x (U+1)
    lattice, U = max_label_len."""
    frames = self.encoder.output_frames(input_shape[0])
    labels = self.max_label_len + 1
    prediction = labels * (self.predictor.sequence_flops(1) + linear_flops(self.pred_proj))
    joint = frames * linear_flops(self.enc_proj) + frames * labels * linear_flops(self.joint_out)
    return self.encoder.forward_flops(input_shape) + prediction + joint
