"""A run's ingredients, built and validated from the config before anything is written."""

import dataclasses
import math

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from core import steps
from core.errors import KilnError
from core.state import ModelTemplate, create_sharded_state
from optim import build_schedule
from optim.chain import build_transform
from parallel import mesh as mesh_lib
from tasks import create_task
from tasks.base import Task


def global_batch_check(name: str, size: int, mesh, micro_batches: int = 1) -> int:
  """Returns this host's share of a global batch, or says how to fix the size."""
  divisor = math.lcm(mesh_lib.batch_divisor(mesh), jax.process_count()) * micro_batches
  if size <= 0 or size % divisor:
    raise KilnError(f'config.{name}={size} must be a positive multiple of {divisor} '
                    '(batch shards on the mesh x processes x accumulation steps)')
  return size // jax.process_count()


@dataclasses.dataclass
class Experiment:
  """Everything a run is built from, checked before anything is written."""
  config: ml_collections.ConfigDict
  task: Task
  mesh: Mesh
  template: ModelTemplate
  schedule: optax.Schedule
  tx: optax.GradientTransformation
  step_options: steps.StepOptions
  num_steps: int
  host_batch: int
  host_eval_batch: int

  @property
  def use_ema(self) -> bool:
    return self.step_options.ema_decay > 0

  def create_state(self):
    """(state, shardings): the initial train state, built sharded on the mesh."""
    return create_sharded_state(self.template, self.tx, self.config.seed, self.mesh, self.use_ema)

  def train_step(self, shardings):
    return steps.make_train_step(self.task, self.template, self.tx, self.mesh, shardings,
                                 self.step_options)

  def eval_step(self, shardings):
    return steps.make_eval_step(self.task, self.template, self.mesh, shardings,
                                self.use_ema and self.config.ema.use_for_eval)


def build_experiment(config, devices=None) -> Experiment:
  """Validates `config` against the data and devices; raises KilnError on bad input."""
  task = create_task(config)
  task.load_data(jax.process_index(), jax.process_count())
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  step_options = steps.StepOptions.from_config(config)
  host_batch = global_batch_check('batch_size', config.batch_size, mesh,
                                   step_options.accumulation_steps)
  host_eval_batch = global_batch_check('eval_batch_size', config.eval_batch_size, mesh)
  num_steps = config.num_train_steps
  if num_steps < 0:
    num_steps = math.ceil(config.num_epochs * task.num_train_examples / config.batch_size)
  steps_per_epoch = max(task.num_train_examples // config.batch_size, 1)
  schedule = build_schedule(config.schedule, config.optimizer.learning_rate, num_steps,
                            steps_per_epoch)
  if config.early_stopping.metric not in task.eval_metric_names:
    raise KilnError(f"config.early_stopping.metric='{config.early_stopping.metric}' is not an "
                    f"eval metric of this task: choose one of {', '.join(task.eval_metric_names)}")
  return Experiment(config=config, task=task, mesh=mesh, template=ModelTemplate(task.build_model),
                    schedule=schedule, tx=build_transform(config, schedule),
                    step_options=step_options, num_steps=num_steps, host_batch=host_batch,
                    host_eval_batch=host_eval_batch)
