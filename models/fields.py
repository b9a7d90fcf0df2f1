"""What each model's constructor keys may hold: one table per name in models.MODELS,
keyed by the key under config.model. The loop's config check (loop/fields.py) and
create_model both read it, so a bad value fails before any parameter is built."""

from core import fields as F
from models.resnet import BLOCKS, STEMS
from models.transformer import DTYPES, REMAT_POLICIES

_DTYPE = F.Choices(tuple(DTYPES))  # Compute dtype; parameters stay float32.
_CLASSES = F.NON_NEGATIVE_INT  # Classifier outputs; 0 = none, or taken from the data.

CNN = {
    'features': F.Range(1, integer=True, each=True),
    'dense_features': F.POSITIVE_INT,
    'dropout_rate': F.RATE,
}
MLP = {
    'hidden_features': F.Range(1, integer=True, each=True),
    'dropout_rate': F.RATE,
}
RESNET = {
    'stage_sizes': F.Range(1, integer=True, each=True),
    'block': F.Choices(BLOCKS),
    'width': F.POSITIVE_INT,
    'stem': F.Choices(STEMS),
    'zero_init_last_bn': F.FLAG,
    'dtype': _DTYPE,
}
YOLO = {
    'anchors': F.Range(0, low_open=True, each=True),  # (w, h) pixel pairs.
    'stem_width': F.POSITIVE_INT,
    'widths': F.Range(1, integer=True, each=True),
    'stage_sizes': F.Range(1, integer=True, each=True),
    'head_width': F.POSITIVE_INT,
    'dtype': _DTYPE,
}
LSTM = {
    'num_outputs': _CLASSES,
    'hidden_dim': F.POSITIVE_INT,
    'num_layers': F.POSITIVE_INT,
    'bidirectional': F.FLAG,
    'frame_stack': F.POSITIVE_INT,
    'dropout_rate': F.RATE,
}
CONFORMER = {
    'num_outputs': _CLASSES,
    'model_dim': F.POSITIVE_INT,
    'num_layers': F.POSITIVE_INT,
    'num_heads': F.POSITIVE_INT,
    'ff_ratio': F.POSITIVE_INT,
    'conv_kernel_size': F.POSITIVE_INT,
    'subsample_channels': F.POSITIVE_INT,
    'dropout_rate': F.RATE,
    'conv_norm': F.Choices(('batch', 'layer')),
}
_ENCODERS = {'lstm': LSTM, 'conformer': CONFORMER}  # models.rnnt.ENCODERS' keys.
TRANSDUCER = {
    'encoder.name': F.Choices(tuple(_ENCODERS)),
    'max_label_len': F.NON_NEGATIVE_INT,
    'embed_dim': F.POSITIVE_INT,
    'pred_hidden_dim': F.POSITIVE_INT,
    'joint_dim': F.POSITIVE_INT,
    # encoder.<key>: the named encoder's table, added by `table`.
}
_TRANSFORMER = {
    'num_layers': F.POSITIVE_INT,
    'num_heads': F.POSITIVE_INT,
    'embed_dim': F.POSITIVE_INT,
    'mlp_ratio': F.POSITIVE_INT,
    'dropout_rate': F.RATE,
    'positions': F.Choices(('learned', 'rotary')),
    'use_bias': F.FLAG,
    'scan_layers': F.FLAG,
    'remat_policy': F.Choices(tuple(REMAT_POLICIES)),
    'dtype': _DTYPE,
}
GPT = {**_TRANSFORMER, 'tie_embeddings': F.FLAG}
BERT = {**_TRANSFORMER, 'num_classes': _CLASSES, 'pooling': F.Choices(('cls', 'mean'))}

TABLES = {
    'cnn': CNN, 'mlp': MLP, 'gpt': GPT, 'bert': BERT, 'lstm': LSTM, 'conformer': CONFORMER,
    'transducer': TRANSDUCER, 'resnet': RESNET, 'resnet18': RESNET, 'resnet34': RESNET,
    'resnet50': RESNET, 'yolo': YOLO,
}


def table(model_config) -> dict[str, F.Constraint]:
  """The constraints on `model_config`'s keys (relative to config.model), 'name' included;
  {'name': ...} alone when the name is unknown (its check then fails)."""
  from models.registry import MODELS  # The registry imports this module's users.
  name = model_config.get('name')
  out = {'name': F.Choices(tuple(MODELS))}
  if name not in TABLES:
    return out
  out.update(TABLES[name])
  if name == 'transducer':
    encoder = model_config.get('encoder') or {}
    for key, constraint in _ENCODERS.get(encoder.get('name'), {}).items():
      if key != 'num_outputs':  # The transducer sets it.
        out[f'encoder.{key}'] = constraint
  return out


def check(model_config) -> list[str]:
  """Checks config.model against its model's table; returns the keys the table lacks
  (create_model rejects those the constructor does not take)."""
  constraints = table(model_config)
  constraints['name'].check('model.name', model_config.get('name'))
  return F.check_fields(model_config, constraints, prefix='model.')
