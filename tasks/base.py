"""The seam that keeps the training loop generic."""

import abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from clu import metrics
from flax import nnx

from core.errors import KilnError
from input_pipeline import batching

Batch = dict[str, jax.Array]


class Distilled(NamedTuple):
  """One train forward of a student and its teacher on the same inputs (compress/distillation)."""
  loss: jax.Array  # The task's own training loss (the hard term), from the student's logits.
  batch_metrics: metrics.Collection  # The task's training metrics, as `Task.loss` returns them.
  student_logits: jax.Array  # [..., C], train mode.
  teacher_logits: jax.Array  # [..., C], eval mode, no gradient.
  weights: jax.Array  # [...]: 1 where a position counts in the loss, 0 for padding.


@dataclasses.dataclass(frozen=True)
class Serving:
  """What a trained model answers outside the training loop (export/, serve/): the inputs a
  client sends, the forward pass that maps them to named outputs (what an exported artifact
  computes), and the task's eval metrics recomputed from those outputs, so an artifact is
  scored by the very code that scores the live model.

  Pre-processing a client cannot be expected to do (image normalisation) happens inside
  `forward`; what stays with the client or server (decoding files, resizing, log-mel
  features, tokenisation) is described in `preprocessing` (JSON)."""
  inputs: dict[str, tuple[tuple[int, ...], str]]  # name -> (one example's shape, dtype name).
  forward: Callable[[nnx.Module, dict], dict]  # (model, batched inputs) -> named outputs; eval mode.
  inputs_from_batch: Callable[[Batch], dict]  # An eval batch -> the inputs `forward` takes.
  score: Callable[[nnx.Module, dict, Batch], metrics.Collection]  # Eval metrics from outputs.
  # Outputs -> the labels they predict (class per example, token, anchor), for agreement.
  predicted_labels: Callable[[dict], Any]
  preprocessing: dict[str, Any]  # JSON: what a client does to raw data before calling.
  metric: str  # The eval metric that judges an artifact (accuracy, map50, wer, loss).


class Task(abc.ABC):
  """A problem Kiln can train on. Never touches devices or the mesh."""

  # Eval metric collection; its field names are the task's eval metric names.
  metrics_class: type[metrics.Collection]

  def __init__(self, config):
    self.config = config

  @property
  def eval_metric_names(self) -> tuple[str, ...]:
    return tuple(self.metrics_class.__annotations__)

  @abc.abstractmethod
  def load_data(self, process_index: int, process_count: int) -> None:
    """Reads this host's data; must be called before the methods below."""

  @property
  @abc.abstractmethod
  def num_train_examples(self) -> int:
    """Training examples over all hosts (sets the epoch length)."""

  @property
  @abc.abstractmethod
  def model_input_shape(self) -> tuple[int, ...]:
    """Shape of one example's model input (no batch dim), for analytic FLOP counts."""

  # Dtype of the model input, for XLA's FLOP count of a model that does not count its own.
  model_input_dtype = np.float32
  # The model method whose output the loss scores: the doctor zeroes it for the loss of uniform
  # predictions and compares it across inputs.
  prediction_method = '__call__'

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs, norm_axis_name: str | None = None) -> nnx.Module:
    """The model, sized from the data this task loaded; `norm_axis_name` is the mapped
    device axis over which normalization statistics are averaged (pmap), if any."""

  def train_batches(self, host_batch_size: int, start_step: int,
                    sampling_rate: float | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches for this host, resumable at `start_step`, from
    `self.source.train` (a HostSplit that load_data set up). With `sampling_rate` (DP-SGD),
    Poisson samples padded to `host_batch_size` rows, padding with batch['mask'] == 0."""
    if sampling_rate is not None:
      return batching.poisson_batches(self.source.train, host_batch_size, sampling_rate,
                                      self.config.seed, start_step)
    return batching.train_batches(self.source.train, host_batch_size, self.config.seed,
                                  self.config.dataset.shuffle_buffer, start_step)

  def eval_batches(self, host_batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass over this host's eval split; padded examples have batch['mask'] == 0."""
    return batching.eval_batches(self.source.eval, host_batch_size)

  def test_batches(self, host_batch_size: int) -> Iterator[dict[str, np.ndarray]] | None:
    """One pass over this host's test split, padded as eval_batches is; None when the
    source has none (reported once at the end of a run, never used to choose anything)."""
    test = getattr(self.source, 'test', None)
    return None if test is None else batching.eval_batches(test, host_batch_size)

  @abc.abstractmethod
  def loss(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs
           ) -> tuple[jax.Array, metrics.Collection]:
    """Training loss (scalar) and training metrics for one batch, in train mode."""

  @abc.abstractmethod
  def evaluate(self, model: nnx.Module, batch: Batch) -> metrics.Collection:
    """Eval metrics for one batch, in eval mode, ignoring examples with mask 0."""

  def serving(self) -> Serving:
    """The task's serving signature (export.py, serve.py); load_data must have run."""
    raise KilnError(f"task '{self.config.task}' has no serving signature yet: export and "
                    'serve cover classification, detection, speech_classification, '
                    'speech_ctc, sequence_classification and causal_lm')

  # --- distillation (compress/distillation.py, loop/teacher.py) ---
  def distillation_outputs(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs,
                           teacher: nnx.Module) -> Distilled:
    """What `loss` computes, from the same single forward of `model` in train mode, plus the
    logits `teacher` (a model this task built) gives in eval mode for the very inputs the
    student saw (after any on-device augmentation), under stop_gradient."""
    raise KilnError(f"task '{self.config.task}' does not support distillation: set "
                    "config.distillation.teacher_workdir='' (classification, causal_lm and "
                    'speech_classification do)')

  @classmethod
  def supports_distillation(cls) -> bool:
    return cls.distillation_outputs is not Task.distillation_outputs

  # --- fairness (tasks/fairness.py, trust/training/fairness.py) ---
  groups = None  # tasks.fairness.Groups of config.fairness.group once load_data ran; None: off.
  fairness_gaps: tuple[str, ...] = ()  # Gap metrics eval adds under config.fairness.group.

  def example_train_losses(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs
                           ) -> tuple[jax.Array, metrics.Collection]:
    """[B] per-example training losses (train mode) and the training metrics, from what
    `loss` computes: what group reweighting and Group DRO weigh."""
    raise KilnError(f"task '{self.config.task}' has no per-example training loss: set "
                    "config.fairness.mitigation='none' (classification and "
                    'speech_classification have one)')

  # --- robustness (trust/training/adversarial.py): attacks perturb [0, 1] inputs ---
  def attack_pixels(self, batch: Batch) -> jax.Array:
    """The batch's model input as the [0, 1] pixels an attack's budget is measured in."""
    raise KilnError(f"task '{self.config.task}' has no input to attack: set "
                    "config.adversarial.eval=False and train='none' (classification has one)")

  def with_pixels(self, batch: Batch, pixels: jax.Array) -> Batch:
    """`batch` with its model input made from `pixels` (the inverse of attack_pixels)."""
    raise NotImplementedError

  def example_losses(self, model: nnx.Module, batch: Batch) -> jax.Array:
    """[B] per-example losses in eval mode: what an attack maximises."""
    raise NotImplementedError
