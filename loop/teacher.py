"""A frozen teacher for knowledge distillation: another run's model, rebuilt from its workdir.

The teacher's run left its config (config.json, loop/run_config.py) and checkpoints there.
Its model is built by the same `tasks.create_task` from that config; the data it needs only
for sizes (classes, vocabulary, input shape) comes from the student's task when the two
runs read the same data, else from loading the teacher's. Its parameters and model state
(e.g. BatchNorm statistics; its EMA parameters where its run evaluated with them) come
from its newest checkpoint, are placed on the mesh by their own logical axes, and ride in
`TrainState.teacher` (so a resumed student continues with exactly the same teacher). The
train step runs the teacher's forward in eval mode under stop_gradient inside the same
jitted step, and the loss is compress/distillation.py's (Hinton et al. 2015).
"""

import copy
import dataclasses

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from compress import distillation
from core.errors import KilnError
from core.logical_axes import Rules
from core.paths import path_string
from loop import pretrained, run_config
from loop.checkpoint import Checkpointer
from loop.state import ModelTemplate
from parallel import sharding
from tasks import create_task
from tasks.base import Task

KEY = 'config.distillation.teacher_workdir'
# Config fields that decide what a model's inputs look like: a teacher must have been
# trained on inputs prepared as the student's are.
INPUT_FIELDS = ('augment.image_size', 'augment.mean', 'augment.std', 'audio.num_mels',
                'audio.window_ms', 'audio.hop_ms', 'dataset.tokenizer')
# The sections that, when equal, let the teacher's model be sized from the student's data.
DATA_SECTIONS = ('dataset', 'augment', 'audio')


@dataclasses.dataclass
class Teacher:
  """A teacher's model template and values (host NumPy), and how it teaches."""
  workdir: str
  step: int  # Of the checkpoint read.
  config: ml_collections.ConfigDict  # The teacher run's own config.
  task: Task  # The teacher's task (its data possibly shared with the student's).
  template: ModelTemplate
  values: dict  # {'params': ..., 'model_state': ...}, NumPy, in the template's layout.
  alpha: float
  temperature: float

  def shardings(self, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings of `values` by the teacher's own logical axes (FSDP/TP like the
    student's parameters)."""
    param_axes, state_axes = self.template.logical_axes()
    specs = {'params': sharding.tree_specs(self.values['params'], param_axes, mesh, rules),
             'model_state': sharding.tree_specs(self.values['model_state'], state_axes, mesh,
                                                rules)}
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def placed(self, shardings: dict) -> dict:
    """`values` on the devices in the layout of `shardings`."""
    return pretrained.place(self.values, shardings)

  def loss(self, task: Task, model: nnx.Module, batch, rngs: nnx.Rngs, values: dict):
    """(alpha * T^2 KL + (1 - alpha) * task loss, the task's train metrics plus the
    distill_soft/hard/total terms) for the student `model`; `values` are this teacher's
    (traced) parameters and model state."""
    teacher_model = self.template.merge(jax.lax.stop_gradient(values['params']),
                                        jax.lax.stop_gradient(values['model_state']))
    out = task.distillation_outputs(model, batch, rngs, teacher_model)
    total, per_position, _ = distillation.objective(
        out.loss, out.student_logits, out.teacher_logits, out.weights, self.alpha,
        self.temperature)
    return total, distillation.with_terms(out.batch_metrics, per_position, out.weights,
                                          out.loss, total)


def _get(config, dotted: str):
  node = config
  for key in dotted.split('.'):
    if not hasattr(node, 'keys') or key not in node:
      return None
    node = node[key]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  try:
    return run_config.load(workdir)
  except FileNotFoundError:
    raise KilnError(f"{KEY}='{workdir}' holds no {run_config.CONFIG_FILE}: point it at the "
                    'workdir of a finished Kiln run (runs save their config there)') from None
  except ValueError as error:  # Unreadable JSON.
    raise KilnError(f"{KEY}='{workdir}': its {run_config.CONFIG_FILE} is not readable "
                    f'({error}): point it at the workdir of a finished Kiln run') from None


def _read_checkpoint(workdir: str) -> tuple[int, dict]:
  reader = Checkpointer(workdir, reading=True)
  try:
    step = reader.latest_step()
    if step is None:
      raise KilnError(f"{KEY}='{workdir}' holds no checkpoint: train the teacher there first "
                      '(or point the key at a finished run)')
    return step, reader.read_host(step)
  finally:
    reader.close()


def _check_inputs(config, teacher_config) -> None:
  for field in INPUT_FIELDS:
    if _get(teacher_config, field) != _get(config, field):
      raise KilnError(f'the teacher in {KEY} was trained with config.{field}='
                      f'{_get(teacher_config, field)!r}, this run has {_get(config, field)!r}: '
                      'prepare the inputs as the teacher did')


def _teacher_task(config, teacher_config, task: Task, process_index: int,
                  process_count: int) -> Task:
  """The teacher's task with data: the student's own, shared, when both runs read the
  same data; otherwise the teacher's, loaded."""
  if all(_get(teacher_config, s) == _get(config, s) for s in DATA_SECTIONS):
    teacher_task = copy.copy(task)  # Shares the loaded source; only the config differs.
    teacher_task.config = teacher_config
    return teacher_task
  teacher_task = create_task(teacher_config)
  teacher_task.load_data(process_index, process_count)
  return teacher_task


def _check_outputs(task: Task, teacher_task: Task) -> None:
  """The teacher must score the student's classes (or tokens), in the same order."""
  student, teacher = task.source, teacher_task.source
  for name in ('num_classes', 'image_shape', 'num_mels'):
    if getattr(student, name, None) != getattr(teacher, name, None):
      raise KilnError(f"the teacher in {KEY} has {name}={getattr(teacher, name, None)}, this "
                      f'run {getattr(student, name, None)}: distil from a run on the same '
                      'classes and inputs')
  tokenizer, teacher_tokenizer = (getattr(s, 'tokenizer', None) for s in (student, teacher))
  if tokenizer is not None:
    if (tokenizer.vocab_size != teacher_tokenizer.vocab_size
        or getattr(tokenizer, 'chars', None) != getattr(teacher_tokenizer, 'chars', None)):
      raise KilnError(f'the teacher in {KEY} has another vocabulary ({teacher_tokenizer.vocab_size}'
                      f' tokens, this run {tokenizer.vocab_size}): distil from a run with the '
                      'same tokenizer and text')
    if teacher.seq_len < student.seq_len:
      raise KilnError(f'the teacher in {KEY} saw windows of {teacher.seq_len} tokens, shorter '
                      f'than config.dataset.seq_len={student.seq_len}: use a seq_len <= '
                      "the teacher's")


def _fill(abstract: dict, stored: dict, what: str, workdir: str) -> dict:
  """NumPy copies of the `stored` leaves (string keys) in `abstract`'s layout."""
  leaves = {path_string(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}

  def take(path, leaf):
    name = path_string(path)
    value = leaves.get(name)
    if value is None or tuple(value.shape) != tuple(leaf.shape):
      found = 'none' if value is None else tuple(value.shape)
      raise KilnError(f"{KEY}='{workdir}': its checkpoint's {what}/{name} ({found}) does not "
                      f'fit the model its config.json builds {tuple(leaf.shape)}: point the '
                      'key at a run whose config and checkpoints belong together')
    return np.asarray(value, dtype=leaf.dtype)
  return jax.tree_util.tree_map_with_path(take, abstract)


def load(config, task: Task, norm_axis_name: str | None = None, process_index: int = 0,
         process_count: int = 1) -> Teacher | None:
  """The teacher `config.distillation` names (None when it names none); one-line KilnError
  on a workdir without config.json or checkpoint, a teacher of another task, or one whose
  outputs (classes, vocabulary) or inputs differ from the student's."""
  workdir = config.distillation.teacher_workdir
  if not workdir:
    return None
  if not task.supports_distillation():
    raise KilnError(f"task '{config.task}' does not support distillation: set {KEY}='' "
                    '(classification, causal_lm and speech_classification do)')
  teacher_config = _read_config(workdir)
  if teacher_config.get('task') != config.task:
    raise KilnError(f"the teacher in {KEY}='{workdir}' was trained for task "
                    f"'{teacher_config.get('task')}', this run is '{config.task}': distil from a "
                    'run of the same task')
  _check_inputs(config, teacher_config)
  step, stored = _read_checkpoint(workdir)
  teacher_task = _teacher_task(config, teacher_config, task, process_index, process_count)
  _check_outputs(task, teacher_task)
  template = ModelTemplate(lambda rngs: teacher_task.build_model(rngs, norm_axis_name))
  abstract_params, abstract_state = jax.eval_shape(
      lambda: template.split(template.build_model(nnx.Rngs(0))))
  ema = teacher_config.get('ema', {})
  use_ema = (ema.get('decay', 0) > 0 and ema.get('use_for_eval', False)
             and stored.get('ema_params') is not None)
  params = _fill(abstract_params, stored['ema_params' if use_ema else 'params'],
                 'ema_params' if use_ema else 'params', workdir)
  model_state = _fill(abstract_state, stored.get('model_state') or {}, 'model_state', workdir)
  count = sum(np.size(leaf) for leaf in jax.tree.leaves(params))
  logging.info('Teacher: %s parameters (%s) from step %d of %s; alpha %g, T %g', f'{count:,}',
               'EMA' if use_ema else 'raw', step, workdir, config.distillation.alpha,
               config.distillation.temperature)
  return Teacher(workdir=workdir, step=step, config=teacher_config, task=teacher_task,
                 template=template, values={'params': params, 'model_state': model_state},
                 alpha=float(config.distillation.alpha),
                 temperature=float(config.distillation.temperature))
