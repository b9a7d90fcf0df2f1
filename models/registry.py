"""Config picks a model by name; the model sees only the keys it is handed.

Adding a model is its module plus one `register_model` call (or a line in MODELS). A model
counts its own cost with `forward_flops(input_shape) -> float` (see models.cost); one
without it gets XLA's count of its compiled forward pass, with a warning. It declares what
its config.model keys may hold in a `CONFIG_FIELDS` table of core.fields constraints (or a
`config_fields(model_config)` classmethod where the table depends on the config); keys
without one are only checked by the model's own constructor.
"""

import inspect

from flax import nnx

from core.errors import KilnError
from core import fields as F
from models.cnn import CNN
from models.conformer import ConformerEncoder
from models.detector import YOLO
from models.mlp import MLP
from models.recurrent import LSTMEncoder
from models.resnet import ResNet, ResNet18, ResNet34, ResNet50
from models.rnnt import Transducer
from models.transformer import BERT, GPT

MODELS = {
    'cnn': CNN,
    'mlp': MLP,
    'gpt': GPT,
    'bert': BERT,
    'lstm': LSTMEncoder,  # Speech: (bi)LSTM encoder with a frame-wise head.
    'conformer': ConformerEncoder,  # Speech: Conformer encoder with a frame-wise head.
    'transducer': Transducer,  # Speech: RNN-T encoder + prediction + joint networks.
    'resnet': ResNet,
    'resnet18': ResNet18,
    'resnet34': ResNet34,
    'resnet50': ResNet50,
    'yolo': YOLO,  # Detection: grid detector (objectness, box, class per anchor).
}

# Models that map one image [H, W, C] to class logits: the speech classifier also runs them
# over log-mel frames as a one-channel image (models.spectrogram_image).
IMAGE_CLASSIFIERS = ('cnn', 'mlp', 'resnet', 'resnet18', 'resnet34', 'resnet50')


def register_model(name: str, model_cls: type[nnx.Module]) -> type[nnx.Module]:
  """Makes `model_cls` buildable as `config.model.name = name` (a fork or a test adds a
  model without editing this file); returns `model_cls`."""
  if name in MODELS:
    raise KilnError(f"model name '{name}' is already registered to "
                    f"{MODELS[name].__name__}: pick another name")
  MODELS[name] = model_cls
  return model_cls


def field_constraints(model_config) -> dict[str, F.Constraint]:
  """The constraints on `model_config`'s keys (relative to config.model), 'name' included;
  {'name': ...} alone when the name is unknown (its check then fails)."""
  out = {'name': F.Choices(tuple(MODELS))}
  model_cls = MODELS.get(model_config.get('name'))
  if model_cls is None:
    return out
  if hasattr(model_cls, 'config_fields'):
    out.update(model_cls.config_fields(model_config))
  else:
    out.update(getattr(model_cls, 'CONFIG_FIELDS', {}))
  return out


def check_fields(model_config) -> list[str]:
  """Checks config.model against its model's constraints; returns the keys they lack
  (create_model rejects those the constructor does not take)."""
  constraints = field_constraints(model_config)
  constraints['name'].check('model.name', model_config.get('name'))
  return F.check_fields(model_config, constraints, prefix='model.')


def create_model(model_config, rngs: nnx.Rngs, **task_args) -> nnx.Module:
  """Builds `MODELS[model_config.name]` from the other keys of `model_config` plus
  what the task derives from the data (e.g. num_classes, input_shape)."""
  kwargs = dict(model_config)
  name = kwargs.pop('name')
  if name not in MODELS:
    raise KilnError(f"unknown model '{name}': set config.model.name to one of "
                    f"{', '.join(sorted(MODELS))}")
  check_fields(model_config)  # Ranges and choices of its keys, one-line errors.
  model_cls = MODELS[name]
  accepted = inspect.signature(model_cls.__init__).parameters
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise KilnError(f"config.model has keys {unknown} that model '{name}' does not take: "
                    f"remove them (it takes {sorted(set(accepted) - {'self', 'rngs'})})")
  # Context from the task (e.g. norm_axis_name) goes only to models that take it.
  task_args = {k: v for k, v in task_args.items() if k in accepted}
  return model_cls(**kwargs, **task_args, rngs=rngs)
