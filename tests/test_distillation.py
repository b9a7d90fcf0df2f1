"""Knowledge distillation (Hinton et al. 2015): the loss against its formula and gradient, a
frozen teacher from another run's workdir, training, resume, FSDP, and bad input."""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train
from compress import distillation
from core.errors import KilnError
from core.paths import path_string
from loop import run_config
from loop import teacher as teacher_lib
from loop.experiment import build_experiment
from monitor import run_log
from tasks import create_task
from tests.checkpoints import latest_params
from tests.stepping import host_batches, run_steps
from tests.tiny import tiny_config, tiny_gpt_config


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_soft(student, teacher, temperature):
  """T^2 * sum_c p_c (log p_c - log q_c), p = softmax(t/T), q = softmax(s/T), in float64."""
  student, teacher = np.float64(student), np.float64(teacher)
  p, q = _softmax(teacher / temperature), _softmax(student / temperature)
  return temperature ** 2 * (p * (np.log(p) - np.log(q))).sum(-1)


def _logits(seed, shape, scale=3.0):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('temperature', [0.5, 1.0, 2.0, 4.0, 8.0])
def test_soft_term_is_zero_when_student_equals_teacher(temperature):
  logits = _logits(0, (16, 10), scale=10.0)
  soft = distillation.soft_term(jnp.asarray(logits), jnp.asarray(logits), temperature)
  np.testing.assert_allclose(soft, 0.0, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0, 8.0])
def test_soft_term_equals_the_formula(temperature):
  student, teacher = _logits(1, (4, 7, 10)), _logits(2, (4, 7, 10))
  soft = distillation.soft_term(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(soft, _numpy_soft(student, teacher, temperature), rtol=1e-5,
                             atol=1e-6)
  assert (np.asarray(soft) > 0).all()


@pytest.mark.parametrize('alpha,temperature', [(0.9, 4.0), (0.5, 1.0), (1.0, 8.0)])
def test_gradient_is_hintons(alpha, temperature):
  """d/ds of the batch-mean objective = alpha * T * (softmax(s/T) - softmax(t/T)) / B."""
  batch = 8
  student, teacher = _logits(3, (batch, 10)), _logits(4, (batch, 10))
  hard = jnp.float32(1.7)  # The task's loss: constant in this test.

  def total(s):
    return distillation.objective(hard, s, jnp.asarray(teacher), jnp.ones(batch), alpha,
                                  temperature)[0]
  grad = jax.grad(total)(jnp.asarray(student))
  expected = alpha * temperature * (_softmax(np.float64(student) / temperature)
                                    - _softmax(np.float64(teacher) / temperature)) / batch
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
  # And nothing reaches the teacher's logits.
  teacher_grad = jax.grad(lambda t: distillation.objective(
      hard, jnp.asarray(student), t, jnp.ones(batch), alpha, temperature)[0])(
          jnp.asarray(teacher))
  np.testing.assert_array_equal(teacher_grad, 0.0)


def test_padding_positions_do_not_count():
  student, teacher = _logits(5, (3, 6, 12)), _logits(6, (3, 6, 12))
  weights = np.ones((3, 6), np.float32)
  weights[1, 4:] = 0
  weights[2] = 0
  _, _, soft = distillation.objective(jnp.float32(0), jnp.asarray(student), jnp.asarray(teacher),
                                      jnp.asarray(weights), 1.0, 2.0)
  per_position = _numpy_soft(student, teacher, 2.0)
  np.testing.assert_allclose(soft, per_position[weights > 0].mean(), rtol=1e-5)


@pytest.mark.slow  # Seconds of compiles: the fast tier stays under 3 minutes.
def test_alpha_zero_is_exactly_the_task_loss(devices):
  """The task's loss from distillation_outputs is `loss`'s, and alpha=0 trains on it alone."""
  exp = build_experiment(tiny_config(), devices[:1])
  batch = jax.tree.map(jnp.asarray, host_batches(exp, 1)[0])
  model = exp.template.build_model(nnx.Rngs(0))
  teacher = exp.template.build_model(nnx.Rngs(1))
  key = jax.random.key(0)
  task_loss, task_metrics = exp.task.loss(model, batch, nnx.Rngs(dropout=key))
  out = exp.task.distillation_outputs(model, batch, nnx.Rngs(dropout=key), teacher)
  assert float(out.loss) == float(task_loss)
  assert out.student_logits.shape == out.teacher_logits.shape == (batch['label'].shape[0], 10)
  total, _, soft = distillation.objective(out.loss, out.student_logits, out.teacher_logits,
                                          out.weights, 0.0, 4.0)
  assert float(soft) > 0 and float(total) == float(task_loss)
  np.testing.assert_allclose(out.batch_metrics.compute()['loss'],
                             task_metrics.compute()['loss'], rtol=1e-6)


def test_metric_collection_keeps_the_task_fields():
  from tasks.classification import ClassificationMetrics
  base = ClassificationMetrics.single_from_model_output(
      loss=jnp.array([1.0, 3.0]), accuracy=jnp.array([1.0, 0.0]))
  merged = distillation.with_terms(base, jnp.array([0.5, 1.5]), jnp.array([1.0, 0.0]),
                                   jnp.float32(2.0), jnp.float32(0.7))
  merged = merged.merge(merged)
  values = merged.compute()
  assert values['loss'] == 2.0 and values['accuracy'] == 0.5
  assert values['distill_soft'] == 0.5  # The padded position does not count.
  assert values['distill_hard'] == 2.0 and values['distill_total'] == pytest.approx(0.7)


# --- a teacher run and its students ---

def _student(teacher_workdir, **overrides):
  c = tiny_config()
  c.model.features = (4, 8)
  c.model.dense_features = 16
  c.model.dropout_rate = 0.0
  c.distillation.teacher_workdir = teacher_workdir
  c.distillation.temperature = 2.0
  c.distillation.alpha = 0.7
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def cnn_teacher(tmp_path_factory, devices):
  """A tiny_config run, 40 steps, as a teacher."""
  workdir = str(tmp_path_factory.mktemp('teacher'))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


@pytest.mark.slow  # Two full tiny runs.
def test_distilled_student_trains_and_leaves_the_teacher_alone(cnn_teacher, tmp_path):
  teacher_dir, teacher_summary = cnn_teacher
  with open(os.path.join(teacher_dir, run_config.CONFIG_FILE)) as f:
    assert json.load(f)['model']['features'] == [8, 16]  # Every run saves its config.
  before = latest_params(teacher_dir)
  workdir = str(tmp_path / 'student')
  summary = train.train_and_evaluate(_student(teacher_dir), workdir)
  scalars = run_log.read_scalars(workdir)
  for tag in ('train_distill_soft', 'train_distill_hard', 'train_distill_total', 'train_loss'):
    assert len(scalars[tag][1]) == 4, tag
  soft, hard, total = (np.asarray(scalars[f'train_distill_{t}'][1])
                       for t in ('soft', 'hard', 'total'))
  np.testing.assert_allclose(total, 0.7 * soft + 0.3 * hard, rtol=1e-5)
  assert total[-1] < 0.6 * total[0] and soft[-1] < soft[0]
  assert summary['final_eval']['accuracy'] > 0.5
  assert set(summary['final_eval']) == {'accuracy', 'loss'}  # The student's own metrics.
  # The teacher's workdir is as it was, and the student carried its exact values.
  after = latest_params(teacher_dir)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  from loop.checkpoint import Checkpointer
  reader = Checkpointer(workdir, reading=True)
  try:
    carried = reader.read_host(reader.latest_step())['teacher']['params']
  finally:
    reader.close()
  jax.tree.map(np.testing.assert_array_equal, before, carried)
  # The teacher's forward counts in the step's FLOPs.
  alone = build_experiment(_student(''), jax.devices()[:1]).train_step_flops()
  assert summary['train_step_flops'] > alone


@pytest.mark.slow  # Three tiny runs.
def test_resumed_distillation_matches_uninterrupted(cnn_teacher, tmp_path):
  teacher_dir, _ = cnn_teacher
  config = _student(teacher_dir, num_train_steps=20, checkpoint_every_steps=10,
                    eval_every_steps=10)
  straight, resumed = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
  train.train_and_evaluate(config, straight)
  assert train.train_and_evaluate(config, resumed, stop_at_step=10)['steps'] == 10
  assert train.train_and_evaluate(config, resumed)['steps'] == 20
  jax.tree.map(np.testing.assert_array_equal, latest_params(straight), latest_params(resumed))


def _assert_same_by_path(got, expected):
  """Equal leaves by 'a/0/kernel' path (checkpoints give list indices as string keys)."""
  def by_path(tree):
    return {path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, expected = by_path(got), by_path(expected)
  assert got.keys() == expected.keys()
  for name in got:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow  # Compiles the distilled step on one device and on 8.
@pytest.mark.parametrize('layout', ['fsdp4x2', 'pmap8'])
def test_sharded_distillation_matches_one_device(layout, cnn_teacher, devices):
  teacher_dir, _ = cnn_teacher
  _, one_state, one = run_steps(_student(teacher_dir), devices[:1], num_steps=4)
  sharded_config = _student(teacher_dir)
  if layout == 'fsdp4x2':
    sharded_config.mesh.data, sharded_config.mesh.fsdp = 2, 4
  else:  # pmap: a replica of student and teacher per device.
    sharded_config.parallel.strategy = 'pmap'
  exp, state, many = run_steps(sharded_config, devices, num_steps=4)
  for key in ('loss', 'distill_soft', 'distill_hard', 'distill_total'):
    np.testing.assert_allclose([m[key] for m, _ in many], [m[key] for m, _ in one], rtol=1e-5)
  state = exp.strategy.checkpoint_view(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.device_get(state.params), jax.device_get(one_state.params))
  if layout == 'fsdp4x2':  # The teacher's parameters really are sharded over fsdp.
    specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.teacher['params'])]
    assert any('fsdp' in spec for spec in specs)
  # ... and unchanged by training.
  _assert_same_by_path(jax.device_get(state.teacher['params']), latest_params(teacher_dir))


@pytest.mark.slow  # Trains a tiny GPT teacher, then a 1-layer student.
def test_gpt_student_learns_from_per_token_logits(tmp_path_factory, devices):
  teacher_dir = str(tmp_path_factory.mktemp('gpt_teacher'))
  teacher_config = tiny_gpt_config()
  teacher_config.num_train_steps = 30
  teacher_config.eval_every_steps = teacher_config.checkpoint_every_steps = 30
  train.train_and_evaluate(teacher_config, teacher_dir)
  student = tiny_gpt_config()
  student.model.num_layers = 1
  student.gradient.accumulation_steps = 2  # The teacher also runs inside the micro-batch scan.
  student.distillation.teacher_workdir = teacher_dir
  student.distillation.temperature = 2.0
  exp, state, outputs = run_steps(student, devices[:1], num_steps=12)
  totals = [m['distill_total'] for m, _ in outputs]
  assert all(np.isfinite(totals)) and np.mean(totals[-3:]) < np.mean(totals[:3])
  # One batch's soft term against NumPy, from the teacher's and student's logits.
  batch = jax.tree.map(jnp.asarray, host_batches(exp, 1)[0])
  values = jax.device_get(state.teacher)
  teacher_model = exp.teacher.template.merge(values['params'], values['model_state'])
  model = exp.template.merge(jax.device_get(state.params), jax.device_get(state.model_state))
  out = exp.task.distillation_outputs(model, batch, nnx.Rngs(dropout=jax.random.key(0)),
                                      teacher_model)
  assert out.student_logits.shape == out.teacher_logits.shape
  assert out.student_logits.shape[:2] == batch['tokens'][:, 1:].shape
  _, _, soft = distillation.objective(out.loss, out.student_logits, out.teacher_logits,
                                      out.weights, 0.9, 2.0)
  weights = np.asarray(out.weights)
  expected = _numpy_soft(np.asarray(out.student_logits), np.asarray(out.teacher_logits), 2.0)
  np.testing.assert_allclose(soft, (expected * weights).sum() / weights.sum(), rtol=1e-4)


# --- bad input: one line at start-up, nothing written ---

@pytest.mark.parametrize('key,value,match', [
    ('distillation.alpha', 1.5, r'config\.distillation\.alpha=1\.5'),
    ('distillation.alpha', -0.1, r'config\.distillation\.alpha=-0\.1'),
    ('distillation.temperature', 0.0, r'config\.distillation\.temperature=0\.0'),
    ('distillation.temperature', -2.0, r'config\.distillation\.temperature=-2\.0'),
])
def test_bad_numbers_are_one_line_errors(key, value, match, tmp_path):
  config = _student(str(tmp_path), **{key: value})
  workdir = tmp_path / 'run'
  with pytest.raises(KilnError, match=match) as error:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(error.value) and not workdir.exists()


def _fake_teacher(folder, **changes):
  """A workdir holding only a config.json (a copy of tiny_config with `changes`)."""
  config = tiny_config()
  for key, value in changes.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  os.makedirs(folder, exist_ok=True)
  run_config.save(config, str(folder))
  return str(folder)


def _assert_fails_before_writing(config, tmp_path, match):
  workdir = tmp_path / 'student'
  with pytest.raises(KilnError, match=match) as error:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(error.value) and not workdir.exists()
  assert 'distillation' in str(error.value)


def test_teacher_workdir_without_config_is_an_error(tmp_path):
  (tmp_path / 'empty').mkdir()
  _assert_fails_before_writing(_student(str(tmp_path / 'empty')), tmp_path, 'no config.json')
  _assert_fails_before_writing(_student(str(tmp_path / 'missing')), tmp_path, 'no config.json')


def test_teacher_workdir_without_checkpoint_is_an_error(tmp_path):
  teacher = _fake_teacher(tmp_path / 'teacher')
  _assert_fails_before_writing(_student(teacher), tmp_path, 'no checkpoint')


def test_teacher_of_another_task_is_an_error(tmp_path):
  teacher = _fake_teacher(tmp_path / 'teacher', task='causal_lm')
  _assert_fails_before_writing(_student(teacher), tmp_path, "task 'causal_lm'")


def test_teacher_with_other_inputs_is_an_error(tmp_path):
  teacher = _fake_teacher(tmp_path / 'teacher', **{'augment.mean': (0.5,), 'augment.std': (0.2,)})
  _assert_fails_before_writing(_student(teacher), tmp_path, r'config\.augment\.mean')


def _source(**fields):
  return types.SimpleNamespace(source=types.SimpleNamespace(**fields))


def test_teacher_with_other_outputs_is_an_error():
  shape = (8, 8, 1)
  teacher_lib._check_outputs(_source(num_classes=10, image_shape=shape),
                             _source(num_classes=10, image_shape=shape))
  with pytest.raises(KilnError, match='num_classes=5, this run 10'):
    teacher_lib._check_outputs(_source(num_classes=10, image_shape=shape),
                               _source(num_classes=5, image_shape=shape))
  with pytest.raises(KilnError, match='image_shape'):
    teacher_lib._check_outputs(_source(num_classes=10, image_shape=shape),
                               _source(num_classes=10, image_shape=(28, 28, 1)))
  chars = types.SimpleNamespace(vocab_size=70, chars='abc')
  other = types.SimpleNamespace(vocab_size=70, chars='abd')
  with pytest.raises(KilnError, match='another vocabulary'):
    teacher_lib._check_outputs(_source(tokenizer=chars, seq_len=32),
                               _source(tokenizer=other, seq_len=32))
  with pytest.raises(KilnError, match='seq_len=64'):
    teacher_lib._check_outputs(_source(tokenizer=chars, seq_len=64),
                               _source(tokenizer=chars, seq_len=32))


def test_task_without_distillation_is_an_error(tmp_path):
  from configs import speech_ctc_lstm
  config = speech_ctc_lstm.get_config()
  config.distillation.teacher_workdir = str(tmp_path)
  with pytest.raises(KilnError, match="task 'speech_ctc' does not support distillation"):
    teacher_lib.load(config, create_task(config))


@pytest.mark.slow  # Trains a tiny speech-digits teacher on real recordings, then a student.
def test_speech_digits_student_distils(tmp_path_factory, devices):
  from configs import speech_digits

  def tiny(steps, dim, layers):
    c = speech_digits.get_config()
    c.model.model_dim, c.model.num_layers, c.model.num_heads = dim, layers, 2
    c.model.subsample_channels = 8
    c.batch_size, c.eval_batch_size = 32, 64
    c.num_train_steps = steps
    c.schedule.warmup_steps = 2
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
    return c
  teacher_dir = str(tmp_path_factory.mktemp('speech_teacher'))
  train.train_and_evaluate(tiny(10, 32, 1), teacher_dir)
  student = tiny(10, 16, 1)
  student.distillation.teacher_workdir = teacher_dir
  exp, state, outputs = run_steps(student, devices[:1], num_steps=3)
  assert exp.teacher.task.source is exp.task.source  # Same data: shared, not reloaded.
  for metrics, _ in outputs:
    assert np.isfinite(metrics['distill_total']) and metrics['distill_soft'] > 0
    np.testing.assert_allclose(metrics['distill_total'], 0.9 * metrics['distill_soft']
                               + 0.1 * metrics['distill_hard'], rtol=1e-5)
