"""Detection: COCO mAP against hand-computed cases, NMS, GIoU, assignment, the MNIST
canvases (held-out digits only in eval), and a small detector that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import yolo_mnist_canvas
from core.errors import KilnError
from loop.experiment import build_experiment
from input_pipeline import canvas, sources
from models import create_model
from models.detector import YOLO
from monitor import flops
from tasks import detection
from tests.stepping import host_batches

NAN = float('nan')


def _map(images, thresholds=detection.COCO_IOU_THRESHOLDS[:1], mask=None):
  """mAP of `images`: list of (detections [(box, score, class)], truths [(box, class)])."""
  dmax = max(1, max(len(d) for d, _ in images))
  gmax = max(1, max(len(g) for _, g in images))
  values = {'det_boxes': np.zeros((len(images), dmax, 4)),
            'det_scores': np.zeros((len(images), dmax)),
            'det_classes': np.full((len(images), dmax), -1),
            'gt_boxes': np.zeros((len(images), gmax, 4)),
            'gt_labels': np.full((len(images), gmax), -1),
            'mask': np.ones(len(images)) if mask is None else np.asarray(mask, float)}
  for i, (dets, truths) in enumerate(images):
    for j, (box, score, cls) in enumerate(dets):
      values['det_boxes'][i, j], values['det_scores'][i, j], values['det_classes'][i, j] = (
          box, score, cls)
    for j, (box, cls) in enumerate(truths):
      values['gt_boxes'][i, j], values['gt_labels'][i, j] = box, cls
  return detection.mean_average_precision(values, thresholds)


A, B, C = (0, 0, 10, 10), (20, 20, 30, 30), (40, 0, 50, 10)
# Overlaps A with IoU 77 / 123 = 0.626 (intersection 7.7 x 10, union 200 - 77).
A_SHIFTED = (2.3, 0, 12.3, 10)


def test_perfect_detections_score_one():
  images = [([(A, 0.9, 0), (B, 0.8, 1)], [(A, 0), (B, 1)])]
  assert _map(images) == 1.0
  assert _map(images, detection.COCO_IOU_THRESHOLDS) == 1.0


def test_missed_object():
  # Class 0 has 2 objects, one found: recall reaches 0.5 at precision 1, so the recall
  # points 0, 0.01, ..., 0.50 (51 of 101) read precision 1 and the rest 0.
  images = [([(A, 0.9, 0)], [(A, 0), (B, 0)])]
  assert _map(images) == pytest.approx(51 / 101)


def test_duplicate_detection():
  # Two objects; a duplicate of the first ranks second. TP, FP, TP: recall .5, .5, 1 at
  # precision 1, 1/2, 2/3; made monotone: 1, 2/3, 2/3. Points 0..0.5 read 1 (51), the
  # 50 above 0.5 read 2/3.
  images = [([(A, 0.9, 0), (A, 0.8, 0), (B, 0.7, 0)], [(A, 0), (B, 0)])]
  assert _map(images) == pytest.approx((51 + 50 * 2 / 3) / 101)
  # A lower-ranked duplicate after every object is found costs nothing at all.
  assert _map([([(A, 0.9, 0), (A, 0.1, 0)], [(A, 0)])]) == 1.0


def test_empty_image():
  found = ([(A, 0.9, 0)], [(A, 0)])
  # An image with no objects and no detections changes nothing.
  assert _map([found, ([], [])]) == 1.0
  # A detection on an empty image that outranks the true one: FP then TP, precision
  # 0 then 1/2, monotone 1/2 everywhere up to recall 1.
  assert _map([found, ([(B, 0.95, 0)], [])]) == pytest.approx(0.5)
  # Padding images (mask 0) are not part of the eval set.
  assert _map([found, ([(B, 0.95, 0)], [])], mask=[1, 0]) == 1.0
  # No object anywhere: mAP is undefined.
  assert np.isnan(_map([([(B, 0.95, 0)], []), ([], [])]))


def test_wrong_class_and_classes_without_objects():
  # Class 1's detection lies on class 0's object: class 0 scores 0 (missed), class 1 has no
  # objects so COCO leaves it out; class 2 is perfect. Mean over classes 0 and 2.
  images = [([(A, 0.9, 1), (C, 0.8, 2)], [(A, 0), (C, 2)])]
  assert _map(images) == pytest.approx(0.5)


def test_iou_thresholds_of_map_50_95():
  # IoU 0.626 matches at thresholds 0.5, 0.55, 0.6 only: 3 of 10 thresholds score 1.
  images = [([(A_SHIFTED, 0.9, 0)], [(A, 0)])]
  assert _map(images) == 1.0
  assert _map(images, detection.COCO_IOU_THRESHOLDS) == pytest.approx(0.3)
  # The better-overlapping of two detections is the match at a strict threshold, even
  # when it ranks second: FP then TP gives 1/2.
  images = [([(A_SHIFTED, 0.9, 0), (A, 0.8, 0)], [(A, 0)])]
  assert _map(images, [0.75]) == pytest.approx(0.5)


def test_box_geometry():
  a, b = jnp.array([0., 0, 1, 1]), jnp.array([2., 0, 3, 1])
  assert float(detection.generalized_iou(a, a)) == pytest.approx(1.0)
  # Disjoint: IoU 0, hull 3, union 2 -> -(3 - 2) / 3.
  assert float(detection.generalized_iou(a, b)) == pytest.approx(-1 / 3)
  iou = detection.pairwise_iou(jnp.array([A]), jnp.array([A, A_SHIFTED, B]))
  np.testing.assert_allclose(iou, [[1.0, 77 / 123, 0.0]], atol=1e-6)


def test_nms_keeps_the_best_of_each_overlapping_group_per_class():
  boxes = jnp.array([A, A_SHIFTED, A, B, C], jnp.float32)
  scores = jnp.array([0.9, 0.8, 0.7, 0.6, 0.001])
  classes = jnp.array([0, 0, 1, 0, 0])
  out_boxes, out_scores, out_classes = detection._nms_one(
      boxes, scores, classes, iou_threshold=0.5, score_threshold=0.01, max_detections=4)
  # A_SHIFTED overlaps the better A of its class (IoU 0.63): dropped. The class-1 copy of
  # A stays. C is under the score threshold. One empty slot remains.
  np.testing.assert_allclose(out_scores, [0.9, 0.7, 0.6, 0.0])
  np.testing.assert_array_equal(out_classes, [0, 1, 0, -1])
  np.testing.assert_allclose(out_boxes[:3], np.array([A, A, B], np.float32))


@pytest.fixture(scope='module')
def tiny_model():
  """Abstract (no parameter values): geometry reads only the model's static layout."""
  return nnx.eval_shape(lambda: YOLO(
      num_classes=10, input_shape=(32, 32, 1), anchors=((6.0, 6.0), (12.0, 16.0)),
      stem_width=4, widths=(8,), stage_sizes=(1,), head_width=8, rngs=nnx.Rngs(0)))


def test_assignment_picks_the_centre_cell_and_best_shaped_anchor(tiny_model):
  assert tiny_model.stride == 4 and tiny_model.grid_shape == (8, 8)
  # Centres (12, 28) and (2.5, 2.5); sizes 10x14 and 5x5.
  boxes = jnp.array([[[7.0, 21.0, 17.0, 35.0], [0.0, 0.0, 5.0, 5.0]]])
  cell_x, cell_y, anchor, valid = detection.assign(tiny_model, boxes, jnp.array([[3, -1]]))
  assert (int(cell_x[0, 0]), int(cell_y[0, 0]), int(anchor[0, 0])) == (3, 7, 1)
  assert (int(cell_x[0, 1]), int(cell_y[0, 1]), int(anchor[0, 1])) == (0, 0, 0)
  assert valid.tolist() == [[True, False]]


def test_box_decoding_is_yolov5s(tiny_model):
  raw = jnp.zeros((1, 8, 8, 2, 15))  # sigmoid(0) = 1/2: centre at cell + 0.5, size = anchor.
  boxes = tiny_model.decode_boxes(raw)
  np.testing.assert_allclose(boxes[0, 2, 5, 1], [5.5 * 4 - 6, 2.5 * 4 - 8, 5.5 * 4 + 6,
                                                  2.5 * 4 + 8])


def test_detector_flops_match_xla():
  config = yolo_mnist_canvas.get_config()
  model = nnx.eval_shape(lambda: create_model(config.model, nnx.Rngs(0), num_classes=10,
                                              input_shape=(96, 96, 1)))
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  counted = flops.xla_flops(forward, state, jax.ShapeDtypeStruct((2, 96, 96, 1), jnp.float32)) / 2
  # XLA also counts BatchNorm, ReLU, residual adds and the head's bias.
  assert 0.9 < flops.forward_flops(model, (96, 96, 1)) / counted <= 1.0


# ---- MNIST canvases ----

def _canvas_config(**detection_overrides):
  config = yolo_mnist_canvas.get_config()
  config.detection.num_train_canvases = 128
  config.detection.num_eval_canvases = 64
  config.detection.update(detection_overrides)
  return config


@pytest.fixture(scope='module')
def canvases():
  return canvas.build(_canvas_config())


def test_canvases_use_held_out_digits_only_for_eval(canvases):
  train, eval_, _ = canvases
  config = _canvas_config()
  train_idx, eval_idx = sources.holdout_split(10_000, config.dataset.holdout_fraction,
                                              config.dataset.split_seed)
  train_digits, eval_digits = train.digits[train.digits >= 0], eval_.digits[eval_.digits >= 0]
  assert np.isin(train_digits, train_idx).all() and np.isin(eval_digits, eval_idx).all()
  _, labels = sources._read_mnist_idx(sources.mnist_idx_dir(''))
  np.testing.assert_array_equal(eval_.labels[eval_.digits >= 0], labels[eval_digits])


def test_canvas_layout(canvases):
  train, _, _ = canvases
  config = _canvas_config().detection
  counts = (train.labels >= 0).sum(1)
  assert counts.min() >= config.min_objects and counts.max() == config.max_objects
  assert (train.labels[:, :1] >= 0).all()  # Objects first, padding after.
  for image, boxes, labels in zip(train.images, train.boxes, train.labels):
    boxes = boxes[labels >= 0]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= config.canvas_size).all()
    sizes = boxes[:, 2:] - boxes[:, :2]
    assert (sizes > 1).all() and (sizes <= config.digit_size[1]).all()
    iou = detection.pairwise_iou(boxes, boxes)
    assert np.allclose(iou - np.eye(len(boxes)), 0)  # No two digits overlap.
    # All ink lies in the boxes (1 px of resampling blur aside) and each box holds ink.
    inside = np.zeros_like(image, bool)
    for x0, y0, x1, y1 in boxes:
      x0, y0, x1, y1 = int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))
      assert image[y0:y1, x0:x1].max() > 128
      inside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
    assert image[~inside].max(initial=0) == 0


def test_canvases_are_fixed_by_their_seed(canvases):
  again, _, _ = canvas.build(_canvas_config())
  np.testing.assert_array_equal(again.images, canvases[0].images)
  other, _, _ = canvas.build(_canvas_config(canvas_seed=1))
  assert not np.array_equal(other.images, canvases[0].images)


def test_bad_detection_settings_are_one_line_errors():
  with pytest.raises(KilnError, match='cannot be spread'):
    canvas.build(_canvas_config(max_objects=30))
  with pytest.raises(KilnError, match='digit_size'):
    canvas.build(_canvas_config(digit_size=(20, 200)))
  config = _canvas_config()
  config.dataset.name = 'digits'
  with pytest.raises(KilnError, match="dataset.name='mnist_t10k'"):
    canvas.build(config)
  config = _canvas_config()
  config.parallel.strategy = 'pmap'
  with pytest.raises(KilnError, match="strategy='jit'"):
    build_experiment(config)
  config = _canvas_config()
  config.augment.flip = True
  with pytest.raises(KilnError, match='config.augment applies to classification'):
    build_experiment(config)


# ---- Training ----

@pytest.mark.slow  # 60 training steps on 8 devices and a full eval.
def test_detector_learns_on_8_devices(devices):
  """A small detector on 8 data-parallel devices: the loss falls and the eval pass
  (padded, masked, with mAP over the gathered detections) runs."""
  config = _canvas_config()
  config.detection.canvas_size = 64
  config.detection.digit_size = (16, 28)
  config.detection.max_objects = 3
  config.model.anchors = ((10.0, 14.0), (18.0, 20.0))
  config.model.widths, config.model.stage_sizes = (16, 32), (1, 1)
  config.model.stem_width = config.model.head_width = 16
  config.batch_size, config.eval_batch_size = 32, 48  # 64 eval canvases: one padded batch.
  config.num_train_steps = 60
  config.optimizer.learning_rate = 3e-3
  config.schedule.warmup_steps = 5
  exp = build_experiment(config, devices)
  state, shardings = exp.create_state()
  train_step, losses = exp.train_step(shardings), []
  for batch in host_batches(exp, 60):
    state, batch_metrics, _ = train_step(state, exp.strategy.place(batch))
    losses.append(float(batch_metrics.compute()['loss']))
  # ~20 -> ~11 in 60 steps (objectness and boxes first; classes take longer).
  assert np.mean(losses[-5:]) < 0.65 * np.mean(losses[:5])
  metrics = exp.evaluate(exp.eval_step(shardings), state).compute()
  assert set(metrics) == {'loss', 'map50', 'map'}
  assert 0.0 <= metrics['map'] <= metrics['map50'] <= 1.0 and np.isfinite(metrics['loss'])
