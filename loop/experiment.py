"""A run's ingredients, built and validated from the config before anything is written."""

import dataclasses
import functools
import math

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from backends import ops
from compress import lora as lora_lib
from compress import low_rank as low_rank_lib
from compress import pruning as pruning_lib
from compress import quantize as quantize_lib
from compress import stats as stats_lib
from loop import fields, pretrained, steps
from loop import teacher as teacher_lib
from core.errors import KilnError
from core.logical_axes import Rules
from loop.state import ModelTemplate, create_sharded_state
from monitor import flops
from optim import build_schedule
from optim.chain import build_transform
from parallel import mesh as mesh_lib
from parallel import sharding
from parallel.placement import DevicePrefetcher
from parallel.strategy import JitStrategy, PmapStrategy, create_strategy
from tasks import create_task
from tasks.base import Task
from trust.training import adversarial
from trust.training import fairness as fairness_lib
from trust.training import privacy as privacy_lib


def batch_multiple(mesh, micro_batches: int = 1) -> int:
  """What every global batch must be a multiple of: shards x processes x micro-batches."""
  return math.lcm(mesh_lib.batch_divisor(mesh), jax.process_count()) * micro_batches


def global_batch_check(name: str, size: int, mesh, micro_batches: int = 1) -> int:
  """Returns this host's share of a global batch, or says how to fix the size."""
  divisor = batch_multiple(mesh, micro_batches)
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
  rules: Rules  # Logical axis name -> mesh axes.
  strategy: JitStrategy | PmapStrategy
  teacher: teacher_lib.Teacher | None = None  # Distillation's frozen teacher (loop/teacher.py).
  lora: lora_lib.LoRA | None = None  # LoRA adapters' targets and scale (compress/lora.py).
  low_rank: low_rank_lib.Plan | None = None  # Layers factored by SVD (compress/low_rank.py).
  eval_attack: adversarial.Attack | None = None  # Robust metrics at eval (config.adversarial).

  @property
  def use_ema(self) -> bool:
    return self.step_options.ema_decay > 0

  @property
  def privacy(self) -> privacy_lib.Privacy | None:
    return self.step_options.privacy

  def fairness_report(self, state) -> dict | None:
    """summary.json['fairness']: the groups, their training sizes and the mitigation (with
    Group DRO's final weights q); None when config.fairness.group is ''."""
    groups = self.task.groups
    if groups is None:
      return None
    report = {'group': groups.feature, 'groups': list(groups.names),
              'train_examples': [int(n) for n in groups.train_counts],
              'mitigation': self.config.fairness.mitigation}
    fairness = self.strategy.checkpoint_view(state).fairness
    if fairness is not None:
      report['group_weights'] = [float(q) for q in np.asarray(fairness['group_weights'])]
    return report

  def train_batches(self, start_step: int):
    """This host's endless training batches from `start_step` (Poisson samples, padded to a
    fixed shape, under DP-SGD)."""
    if self.privacy is None:
      return self.task.train_batches(self.host_batch, start_step)
    return self.task.train_batches(self.host_batch, start_step,
                                   sampling_rate=self.privacy.sampling_rate)

  def create_state(self):
    """(state, shardings): the initial train state, built sharded on the mesh."""
    state, shardings = create_sharded_state(self.template, self.tx, self.config.seed, self.mesh,
                                            self.rules, self.use_ema, self.step_options.pruning,
                                            lora=self.lora, guard=self.step_options.guard,
                                            fairness=self.step_options.fairness)
    # --- distillation: the teacher's values join the state, in their own sharded layout ---
    if self.teacher is not None:
      teacher_shardings = self.teacher.shardings(self.mesh, self.rules)
      state = state.replace(teacher=self.teacher.placed(teacher_shardings))
      shardings = shardings.replace(teacher=teacher_shardings)
    # --- end distillation ---
    return self.strategy.distribute(state, shardings), shardings

  # --- pruning / model statistics ---
  def model_stats(self, state) -> dict:
    """compress.stats.model_stats of `state`'s params: kernels that config.pruning.exclude
    misses count as prunable (whether or not pruning ran), N:M-stored after n_m pruning."""
    pruning = self.step_options.pruning
    prunable = pruning_lib.prunable_layouts(
        pruning_lib.flat_layouts(self.template.kernel_layout()), self.config.pruning.exclude)
    n_m = (pruning.n, pruning.m) if pruning is not None and pruning.method == 'n_m' else None
    return stats_lib.model_stats(self.strategy.checkpoint_view(state).params, prunable, n_m)
  # --- end pruning / model statistics ---

  def train_step_flops(self) -> float:
    """Analytic model FLOPs of one optimizer step over the global batch."""
    model = nnx.eval_shape(lambda: self.template.build_model(nnx.Rngs(0)))
    total = flops.train_step_flops(model, self.task.model_input_shape, self.config.batch_size,
                                   self.task.model_input_dtype)
    if self.teacher is not None:  # Distillation: plus the teacher's forward (no backward).
      teacher = nnx.eval_shape(lambda: self.teacher.template.build_model(nnx.Rngs(0)))
      total += self.config.batch_size * flops.forward_flops(
          teacher, self.task.model_input_shape, self.task.model_input_dtype)
    return total

  def evaluate(self, eval_step, state, split: str = 'eval'):
    """The task's eval metrics merged over one pass of `split` ('eval': held out, or
    'test'; not yet computed); None for a 'test' split the task does not have."""
    if split not in ('eval', 'test'):
      raise ValueError(f"split must be 'eval' or 'test', got {split!r}")
    batches = (self.task.eval_batches if split == 'eval' else self.task.test_batches)(
        self.host_eval_batch)
    if batches is None:
      return None
    total = None
    for batch in DevicePrefetcher(batches, self.strategy.place):
      batch_metrics = eval_step(state, batch)
      total = batch_metrics if total is None else total.merge(batch_metrics)
    return total

  def train_step(self, shardings, task=None):
    """Compiled `(state, batch) -> (state, task metrics, optimizer scalars)`; `task` in place
    of the run's (the doctor's, with its randomness drawn once)."""
    return self.strategy.compile_train(steps.train_step_fn(
        self.task if task is None else task, self.template, self.tx, self.step_options,
        mesh=self.mesh if self.strategy.name == 'jit' else None,
        axis_name=self.strategy.norm_axis_name, teacher=self.teacher, lora=self.lora),
        shardings)

  def eval_step(self, shardings):
    """Compiled `(state, batch) -> task metrics`."""
    return self.strategy.compile_eval(steps.eval_step_fn(
        self.task, self.template, self.use_ema and self.config.ema.use_for_eval,
        axis_name=self.strategy.norm_axis_name, lora=self.lora, attack=self.eval_attack),
        shardings)


def example_forward(task: Task):
  """model -> one eval forward on a batch of zeros shaped like the task's serving inputs (or
  its one model input): what quantisation-aware training runs to create its statistics."""
  def forward(model):
    try:
      serving = task.serving()
    except KilnError:  # A task without a serving signature.
      return model(np.zeros((1, *task.model_input_shape), task.model_input_dtype), train=False)
    return serving.forward(model, {name: np.zeros((1, *shape), dtype)
                                   for name, (shape, dtype) in serving.inputs.items()})
  return forward


def build_experiment(config, devices=None) -> Experiment:
  """Validates `config` against the data and devices; raises KilnError on bad input."""
  fields.validate(config)  # Every field against its range or choices, before any data is read.
  ops.configure(config.backend)  # Before any model is traced: which op implementations run.
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
  rules = sharding.parse_rules(config.parallel.rules, mesh)
  strategy = create_strategy(config.parallel.strategy, mesh, rules)
  build_model = functools.partial(task.build_model, norm_axis_name=strategy.norm_axis_name)
  # --- low-rank: ranks from the trained checkpoint's kernels; the template is the factored
  # model (training.py starts it from the SVD factors) ---
  low_rank = low_rank_lib.plan(
      config, lambda: nnx.eval_shape(lambda: build_model(nnx.Rngs(0))),
      lambda: pretrained.read_params(config.init.checkpoint_dir)[1])
  if low_rank is not None:
    build_model = low_rank.build(build_model)
  # --- end low-rank ---
  # --- quantisation-aware training: the model trains and evaluates with int8 fake quant ---
  build_model = quantize_lib.qat(config.quantization, build_model, example_forward(task))
  # --- end quantisation-aware training ---
  template = ModelTemplate(build_model)
  # --- pruning: -1 steps resolved from the run's length; N:M groups checked against the model ---
  step_options = dataclasses.replace(step_options, pruning=pruning_lib.from_config(
      config.pruning, num_steps, pruning_lib.flat_layouts(template.kernel_layout()),
      pruning_lib.flat_layouts(template.param_shapes())))
  # --- end pruning ---
  # --- DP-SGD: noise calibrated to the budget now; batches padded Poisson samples ---
  privacy = privacy_lib.from_config(config.privacy, config.batch_size, task.num_train_examples,
                                    num_steps, batch_multiple(mesh, step_options.accumulation_steps))
  if privacy is not None:
    privacy_lib.check_compatible(config, nnx.eval_shape(lambda: build_model(nnx.Rngs(0))))
    host_batch = global_batch_check('privacy.max_batch_size', privacy.padded_batch_size, mesh,
                                    step_options.accumulation_steps)
    step_options = dataclasses.replace(step_options, privacy=privacy)
  # --- end DP-SGD ---
  # --- fairness: groups read with the data; reweighting or Group DRO wraps the loss ---
  if config.fairness.group and task.groups is None:
    raise KilnError(f"config.fairness.group={config.fairness.group!r}: task '{config.task}' "
                    "has no groups: set it to '' (classification and the speech tasks have them)")
  fairness = fairness_lib.from_config(config, task.groups)
  if fairness is not None:
    if type(task).example_train_losses is Task.example_train_losses:
      task.example_train_losses(None, {}, None)  # Raises the task's one-line error.
    step_options = dataclasses.replace(step_options, fairness=fairness)
  # --- end fairness ---
  # --- robustness: attacks at eval and/or in training, on tasks with an input to attack ---
  eval_attack, train_attack = adversarial.eval_attack(config), adversarial.train_attack(config)
  if eval_attack is not None or train_attack is not None:
    if type(task).attack_pixels is Task.attack_pixels:
      task.attack_pixels({})  # Raises the task's one-line error.
    step_options = dataclasses.replace(step_options, train_attack=train_attack)
  # --- end robustness ---
  # --- distillation: the teacher run's config.json and newest checkpoint, before any write ---
  teacher = teacher_lib.load(config, task, strategy.norm_axis_name, jax.process_index(),
                             jax.process_count())
  # --- end distillation ---
  # --- LoRA: adapters on the targeted kernels; the optimizer sees only what trains ---
  tx = build_transform(config, schedule)
  lora = lora_lib.build(config, jax.eval_shape(lambda: template.split(
      template.build_model(nnx.Rngs(0)))[0]), template.kernel_layout())
  if lora is not None:
    if step_options.pruning is not None or step_options.ema_decay:
      raise KilnError('config.lora.rank > 0 trains adapters on a frozen base: set '
                      'config.pruning off and config.ema.decay=0 with it')
    tx = lora.wrap_transform(tx)
  # --- end LoRA ---
  return Experiment(config=config, task=task, mesh=mesh, template=template,
                    schedule=schedule, tx=tx,
                    step_options=step_options, num_steps=num_steps, host_batch=host_batch,
                    host_eval_batch=host_eval_batch, rules=rules, strategy=strategy,
                    teacher=teacher, lora=lora, low_rank=low_rank, eval_attack=eval_attack)
