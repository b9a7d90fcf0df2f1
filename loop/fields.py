"""Every config field's range or choices, checked before a run writes anything.

One table per family (keyed by dotted path under config), mirroring configs/: BASE for
the run-wide fields of configs/base.py, then VISION, DETECTION, LANGUAGE and SPEECH for
the fields their bases add. A run's table is BASE + its task's family + the optimizer and
schedule tables of optim/factory.py + its model class's CONFIG_FIELDS (models/registry.py).
Fields that are deliberately free-form (paths, split names, the rules table) say so with F.Free.
Cross-field rules (a batch that divides over the mesh, min <= max) stay where the values
are used; this layer catches a value that is wrong on its own.
"""

from collections.abc import Mapping

from compress import pruning
from compress import quantize
from core import fields as F
from core.errors import KilnError
from loop import guard
from input_pipeline import audio, augment, sources, text, tokenizers
from models import registry as model_registry
from optim import factory
from parallel.strategy import STRATEGIES
from tasks import TASKS
from trust.training import adversarial, fairness, privacy
from tasks import fairness as group_metrics
from backends import ops

_TFDS = (sources.TFDS_PREFIX,)
_STEPS = F.POSITIVE_INT  # Cadences (log, eval, checkpoint) in steps.


def _eval_metrics(config) -> tuple[str, ...]:
  """The task's eval metric names known before its data is read."""
  task = TASKS[config.task]
  # With config.fairness.group: the gaps between groups (per-group rates are prefixes below).
  gaps = group_metrics.gap_names(task, config)
  if hasattr(task, 'metrics_class'):
    return (*task.metrics_class.__annotations__, *gaps)
  # Speech: its rates (which depend on config.decoding), plus per-speaker/accent ones below.
  return ('loss', *task(config).rates, *gaps)


def _eval_metric_prefixes(config) -> tuple[str, ...]:
  group = getattr(TASKS[config.task], 'group_rate', None)
  prefixes = (f'{group}_speaker_', f'{group}_accent_') if group else ()
  feature = config.get('fairness', {}).get('group', '')
  if feature:
    prefixes += (f"{group or 'accuracy'}_{feature}_",)
  return prefixes


BASE: dict[str, F.Constraint] = {
    'seed': F.SEED,
    'task': F.Choices(tuple(TASKS)),
    'dataset.name': F.Choices(sources.LOCAL_SOURCES, _TFDS, sources.check_dataset_name),
    'dataset.data_dir': F.Free('a folder; sources check that their files are there'),
    'dataset.tfds_data_dir': F.Free('a folder; TFDS checks it holds the prepared data'),
    'dataset.train_split': F.Free('a TFDS split name; checked against the builder'),
    'dataset.eval_split': F.Free('a TFDS split name; checked against the builder'),
    'dataset.holdout_fraction': F.OPEN_FRACTION,
    'dataset.split_seed': F.SEED,
    'dataset.shuffle_buffer': F.POSITIVE_INT,
    'dataset.prefetch_batches': F.POSITIVE_INT,
    'batch_size': F.POSITIVE_INT,  # 'auto' is resolved to a number before validation.
    'auto_batch.limit_gb': F.NON_NEGATIVE,  # 0: the device's own limit.
    'auto_batch.max_batch_size': F.POSITIVE_INT,
    'optimizer.lr_scaling': F.Choices(('none', 'linear', 'sqrt')),
    'optimizer.reference_batch_size': F.NON_NEGATIVE_INT,  # 0: none given.
    'eval_batch_size': F.POSITIVE_INT,
    'num_epochs': F.POSITIVE,
    'num_train_steps': F.Range(-1, integer=True, nonzero=True),  # -1: from num_epochs.
    'optimizer.name': F.Choices(tuple(factory.OPTIMIZERS)),
    'optimizer.learning_rate': factory.LEARNING_RATE,
    **{f'optimizer.{spec.section}.{key}': constraint
       for spec in factory.OPTIMIZERS.values() for key, constraint in spec.fields.items()},
    **{f'schedule.{key}': constraint for key, constraint in factory.SCHEDULE_FIELDS.items()},
    'regularization.l1': F.NON_NEGATIVE,
    'regularization.l2': F.NON_NEGATIVE,
    'regularization.weight_decay': F.NON_NEGATIVE,
    'regularization.exclude': F.Free('a regex on parameter paths', F.regex),
    'gradient.clip_global_norm': F.NON_NEGATIVE,
    'gradient.clip_value': F.NON_NEGATIVE,
    'gradient.accumulation_steps': F.POSITIVE_INT,
    'ema.decay': F.RATE,
    'ema.use_for_eval': F.FLAG,
    'log_every_steps': _STEPS,
    'eval_every_steps': _STEPS,
    'checkpoint_every_steps': _STEPS,
    'keep_checkpoints': F.POSITIVE_INT,
    'early_stopping.metric': F.Choices(_eval_metrics, _eval_metric_prefixes),
    'early_stopping.mode': F.Choices(('max', 'min')),
    'early_stopping.patience': F.NON_NEGATIVE_INT,
    'guard.policy': F.Choices(guard.POLICIES),
    'guard.spike_zscore': F.NON_NEGATIVE,  # 0: spikes off.
    'guard.window': F.Range(2, integer=True),  # A standard deviation needs two losses.
    'guard.min_history': F.Range(2, integer=True),
    'guard.rollback_skip_batches': F.NON_NEGATIVE_INT,
    'guard.rollback_lr_factor': F.Range(0, 1, low_open=True),
    'guard.max_rollbacks': F.NON_NEGATIVE_INT,
    'guard.inject_nan_at_step': F.Range(-1, integer=True),  # -1: never.
    'doctor.checks': F.Free('comma-separated groups; checked by doctor/run.py'),
    'doctor.sample_examples': F.POSITIVE_INT,
    'doctor.overfit_steps': F.POSITIVE_INT,
    'doctor.overfit_target': F.Range(0, 1, low_open=True, high_open=True),
    'doctor.lr_range': F.Range(0, low_open=True, each=True),  # low < high: doctor/run.py.
    'doctor.lr_range_steps': F.Range(2, integer=True),
    'doctor.lr_scaling': F.Choices(('linear', 'sqrt')),
    'mesh.data': F.Range(-1, integer=True, nonzero=True),  # -1: the devices that remain.
    'mesh.fsdp': F.Range(-1, integer=True, nonzero=True),
    'mesh.tensor': F.Range(-1, integer=True, nonzero=True),
    'parallel.strategy': F.Choices(tuple(STRATEGIES)),
    'parallel.rules': F.Free('(logical name, mesh axes) pairs; parsed against the mesh'),
    'distributed.initialize': F.FLAG,
    'distributed.coordinator_address': F.Free('host:port; JAX resolves it'),
    'distributed.num_processes': F.Range(-1, integer=True, nonzero=True),  # -1: detect.
    'distributed.process_id': F.Range(-1, integer=True),  # -1: detect.
    'init.checkpoint_dir': F.Free('a run folder; checked for a checkpoint before any write'),
    # --- pruning (compress/pruning.py; cross-field rules checked in pruning.from_config) ---
    'pruning.method': F.Choices(pruning.METHODS),
    'pruning.target_sparsity': F.RATE,  # [0, 1): 1 would prune every weight.
    'pruning.initial_sparsity': F.RATE,
    'pruning.begin_step': F.Range(-1, integer=True),  # -1: derived from the run's length.
    'pruning.end_step': F.Range(-1, integer=True),
    'pruning.update_every': F.POSITIVE_INT,
    'pruning.scope': F.Choices(pruning.SCOPES),
    'pruning.exclude': F.Free('a regex on parameter paths', F.regex),
    'pruning.n': F.POSITIVE_INT,
    'pruning.m': F.Range(2, integer=True),
    # --- end pruning ---
    # --- distillation ---
    'distillation.teacher_workdir': F.Free('a run folder; its config.json and checkpoint are '
                                           'checked before any write'),
    'distillation.alpha': F.FRACTION,
    'distillation.temperature': F.POSITIVE,
    # --- low-rank and LoRA (cross-field rules in compress/low_rank.plan, compress/lora.build) ---
    'low_rank.energy': F.FRACTION,  # (0, 1]; 0 off. A rank cannot exceed a layer's size.
    'low_rank.rank_ratio': F.FRACTION,
    'low_rank.include': F.Free('a regex on parameter paths', F.regex),
    'low_rank.exclude': F.Free('a regex on parameter paths', F.regex),
    'lora.rank': F.NON_NEGATIVE_INT,  # 0 off; above a targeted kernel's size fails at build.
    'lora.alpha': F.POSITIVE,
    'lora.targets': F.Free('a regex on parameter paths', F.regex),
    'lora.trainable': F.Free('a regex on parameter paths', F.regex),
    # --- end low-rank and LoRA ---
    'quantization.mode': F.Choices(quantize.QAT_MODES),
    'quantization.exclude': F.Free('a regex on parameter paths', F.regex),
    # --- differential privacy (cross-field rules in trust.training.privacy.from_config) ---
    'privacy.enabled': F.FLAG,
    'privacy.clip_norm': F.Range(0, low_open=True),
    'privacy.noise_multiplier': F.NON_NEGATIVE,
    'privacy.target_epsilon': F.NON_NEGATIVE,  # 0: use noise_multiplier as it is.
    'privacy.delta': F.Range(0, 1, low_open=True, high_open=True),
    'privacy.accountant': F.Choices(privacy.ACCOUNTANTS),
    'privacy.max_batch_size': F.Range(-1, integer=True, nonzero=True),  # -1: chosen.
    # --- end differential privacy ---
    # --- fairness (tasks/fairness.py: groups and gaps; trust/training/fairness.py) ---
    'fairness.group': F.Free("a feature of the task's data; checked when the data is read"),
    'fairness.mitigation': F.Choices(fairness.MITIGATIONS),
    'fairness.dro_step_size': F.NON_NEGATIVE,  # 0: q stays uniform (plain ERM).
    'fairness.dro_adjustment': F.NON_NEGATIVE,
    # --- end fairness ---
    # --- robustness (trust/training/adversarial.py) ---
    'adversarial.eval': F.FLAG,
    'adversarial.train': F.Choices(adversarial.TRAINING),
    'adversarial.norm': F.Choices(adversarial.NORMS),
    'adversarial.epsilon': F.Range(0, low_open=True),
    'adversarial.eval_steps': F.POSITIVE_INT,
    'adversarial.eval_step_size': F.Range(0, low_open=True),
    'adversarial.restarts': F.POSITIVE_INT,
    'adversarial.random_start': F.FLAG,
    'adversarial.train_steps': F.POSITIVE_INT,
    'adversarial.train_step_size': F.Range(-1, nonzero=True),  # -1: chosen from epsilon.
    'adversarial.train_noise': F.NON_NEGATIVE,
    'adversarial.epsilon_warmup_steps': F.NON_NEGATIVE_INT,  # 0: no ramp.
    # --- end robustness ---
    'export.calibration_batches': F.POSITIVE_INT,
    'export.max_eval_examples': F.NON_NEGATIVE_INT,
    'export.latency_runs': F.POSITIVE_INT,
    **{f'export.min_agreement.{name}': F.Range(0, 1) for name in (
        'jax', 'saved_model', 'tflite', 'onnx', 'tflite_fp16', 'tflite_dynamic', 'tflite_int8',
        'jax_int8', 'jax_int8_dynamic', 'jax_int8_static', 'jax_bf16', 'jax_fp16')},
    'profile.first_step': F.NON_NEGATIVE_INT,
    'profile.num_steps': F.NON_NEGATIVE_INT,
    'backend.cpu_kernels': F.Choices(ops.MODES),
    'compilation_cache_dir': F.Free('a folder; created by JAX'),
}

VISION = {
    'dataset.name': F.Choices(sources.LOCAL_SOURCES, _TFDS, sources.check_dataset_name),
    'augment.image_size': F.NON_NEGATIVE_INT,
    'augment.crop': F.Choices(augment.CROPS),
    'augment.pad': F.NON_NEGATIVE_INT,
    'augment.crop_scale': F.Range(0, 1, low_open=True, each=True),
    'augment.crop_ratio': F.Range(0, low_open=True, each=True),
    'augment.eval_crop_fraction': F.Range(0, 1, low_open=True),
    'augment.flip': F.FLAG,
    'augment.mean': F.Range(0, 1, each=True),  # Pixels are in [0, 1].
    'augment.std': F.Range(0, low_open=True, each=True),
    'augment.mixup_alpha': F.NON_NEGATIVE,
    'augment.cutmix_alpha': F.NON_NEGATIVE,
}

DETECTION = {
    **VISION,
    'dataset.name': F.Choices(('mnist_t10k',)),  # Canvases are pasted from MNIST digits.
    'detection.canvas_size': F.POSITIVE_INT,
    'detection.min_objects': F.POSITIVE_INT,
    'detection.max_objects': F.POSITIVE_INT,
    'detection.digit_size': F.Range(1, integer=True, each=True),
    'detection.num_train_canvases': F.POSITIVE_INT,
    'detection.num_eval_canvases': F.POSITIVE_INT,
    'detection.canvas_seed': F.SEED,
    'detection.box_weight': F.NON_NEGATIVE,
    'detection.objectness_weight': F.NON_NEGATIVE,
    'detection.class_weight': F.NON_NEGATIVE,
    'detection.ignore_iou': F.FRACTION,
    'detection.score_threshold': F.FRACTION,
    'detection.nms_iou': F.FRACTION,
    'detection.max_detections': F.POSITIVE_INT,
}

LANGUAGE = {
    'dataset.name': F.Choices(text.TEXT_SOURCES, _TFDS, text.check_text_dataset_name),
    'dataset.text_file': F.Free('a UTF-8 file; read (and checked) by the text source'),
    'dataset.tokenizer': F.Choices(tokenizers.TOKENIZERS, (), tokenizers.check_tokenizer_name),
    'dataset.vocab_size': F.Range(len(tokenizers.SPECIAL_TOKENS) + 1, integer=True),
    'dataset.seq_len': F.POSITIVE_INT,
    'dataset.window_stride': F.NON_NEGATIVE_INT,  # 0: seq_len.
}

SEQUENCE_CLASSIFICATION = {  # Language, plus the fields configs/bert_classify_shakespeare adds.
    **LANGUAGE,
    'dataset.num_speakers': F.Range(2, integer=True),
    'dataset.pretrain_holdout_fraction': F.OPEN_FRACTION,
}

SPEECH = {
    'dataset.name': F.Choices(audio.LOCAL_SPEECH_SOURCES, _TFDS),
    'audio.num_mels': F.POSITIVE_INT,
    'audio.window_ms': F.POSITIVE,
    'audio.hop_ms': F.POSITIVE,
    'audio.max_frames': F.POSITIVE_INT,
    'audio.eval_max_frames': F.NON_NEGATIVE_INT,  # 0: max_frames.
    'audio.max_label_len': F.POSITIVE_INT,
    'audio.eval_max_label_len': F.NON_NEGATIVE_INT,  # 0: max_label_len.
    'audio.max_digits': F.POSITIVE_INT,
    'audio.min_silence_ms': F.NON_NEGATIVE,
    'audio.max_silence_ms': F.NON_NEGATIVE,
    'audio.num_train_utterances': F.POSITIVE_INT,
    'audio.num_eval_utterances': F.POSITIVE_INT,
    'audio.freq_masks': F.NON_NEGATIVE_INT,
    'audio.freq_width': F.NON_NEGATIVE_INT,
    'audio.time_masks': F.NON_NEGATIVE_INT,
    'audio.time_width': F.NON_NEGATIVE_INT,
    'audio.time_width_fraction': F.FRACTION,
    'decoding.beam_size': F.NON_NEGATIVE_INT,  # 0: greedy only.
    'decoding.max_symbols_per_frame': F.POSITIVE_INT,
    'decoding.beam_max_symbols_per_frame': F.NON_NEGATIVE_INT,  # 0: max_symbols_per_frame.
    'dataset.subsample_speaker': F.Free('an FSDD speaker name; checked when the data is read'),
    'dataset.subsample_fraction': F.FRACTION,  # 0 keeps one recording (never none).
}

# Task -> (its family's table, the family base a config for it starts from).
TASK_TABLES: dict[str, tuple[Mapping[str, F.Constraint], str]] = {
    'classification': (VISION, 'configs/vision.py'),
    'detection': (DETECTION, 'configs/detection.py'),
    'causal_lm': (LANGUAGE, 'configs/language.py'),
    'masked_lm': (LANGUAGE, 'configs/language.py'),
    'sequence_classification': (SEQUENCE_CLASSIFICATION, 'configs/language.py'),
    'speech_classification': (SPEECH, 'configs/speech.py'),
    'speech_ctc': (SPEECH, 'configs/speech.py'),
    'speech_rnnt': (SPEECH, 'configs/speech.py'),
}
assert set(TASK_TABLES) == set(TASKS), 'every task needs a family table'


def _has(config, path: str) -> bool:
  node = config
  for key in path.split('.'):
    if not hasattr(node, 'keys') or key not in node:
      return False
    node = node[key]
  return True


def table(config) -> dict[str, F.Constraint]:
  """The constraints on every field of `config` outside config.model (whose keys are the
  model's: its CONFIG_FIELDS, via models/registry.py); checks config.task first, as the
  table depends on it."""
  if not _has(config, 'task'):
    raise KilnError('config has no task: start it from a family base in configs/')
  BASE['task'].check('task', config.task)
  family, base_file = TASK_TABLES[config.task]
  out = {**BASE, **family}
  for path in out:
    if not _has(config, path):
      raise KilnError(f'config.{path} is missing, and task {config.task!r} needs it: start the '
                      f'config from {base_file}')
  return out


def _check_all(config) -> list[str]:
  constraints = table(config)
  if not _has(config, 'model.name'):
    raise KilnError('config.model.name is missing: name a model in models.MODELS')
  missing = model_registry.check_fields(config.model)
  for path, value in F.leaves(config):
    if path.startswith('model.'):
      continue
    constraint = constraints.get(path)
    if constraint is None:
      missing.append(path)
    else:
      constraint.check(path, value, config)
  return missing


def validate(config) -> None:
  """Raises a one-line KilnError naming the first field out of its range or choices.

  Fields no table names pass here (a fork's new field still runs; tests/test_config_fields
  makes the project's own configs declare every one)."""
  _check_all(config)


def unconstrained(config) -> list[str]:
  """Dotted paths of `config`'s leaves that no table constrains (after validating it)."""
  return _check_all(config)
