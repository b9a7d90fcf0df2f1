"""Object detection with a YOLO-style grid detector: loss, decoding with NMS, COCO mAP.

Assignment (YOLOv2, Redmon & Farhadi 2017): each object belongs to the grid cell that
holds its centre and to the anchor whose shape (width, height) best overlaps its own.

Loss, summed per image and averaged over the batch (as YOLOv3 does):
  box_weight * sum over assigned anchors of (1 - GIoU(predicted, true box))
    (Rezatofighi et al. 2019; an IoU-based term that still has a gradient when the
    boxes do not overlap),
  objectness_weight * sum over anchors of BCE(objectness, assigned?), where unassigned
    anchors whose predicted box already overlaps an object above `ignore_iou` are left
    out (YOLOv3: they are good boxes, just not the chosen one),
  class_weight * sum over assigned anchors of softmax cross-entropy of the class.

Decoding: score = sigmoid(objectness) x the best class probability, per-class greedy
non-maximum suppression, at most `max_detections` per image.

mAP follows the COCO evaluation (pycocotools' COCOeval, bbox): per class and IoU
threshold, detections in descending score order are matched greedily, each to the
unmatched true box it overlaps most (IoU >= threshold); precision is made monotone
and read at 101 recall points 0, 0.01, ..., 1 (0 past the highest recall reached);
AP is the mean of those 101 values, averaged over classes that have at least one
true box (detections of a class with no true box count nowhere, as in COCO).
mAP@0.5 uses the 0.5 threshold, mAP@0.5:0.95 the mean over 0.5, 0.55, ..., 0.95.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax import nnx, struct

from core.errors import KilnError
from input_pipeline import augment, canvas
from tasks.base import Batch
from tasks.classification import ImageTask

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)
# Candidates (best scores first) that NMS considers per image.
_PRE_NMS_CANDIDATES = 256


# ---- Box geometry (boxes are (x0, y0, x1, y1)) ----
# box_area and pairwise_iou take NumPy arrays (host-side mAP) or JAX arrays (in the step).

def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def box_area(boxes):
  xp = _xp(boxes)
  return (xp.clip(boxes[..., 2] - boxes[..., 0], 0, None)
          * xp.clip(boxes[..., 3] - boxes[..., 1], 0, None))


def pairwise_iou(a, b):
  """IoU of every box in a [..., N, 4] with every box in b [..., M, 4] -> [..., N, M]."""
  xp = _xp(a)
  a, b = a[..., :, None, :], b[..., None, :, :]
  inter = box_area(xp.concatenate([xp.maximum(a[..., :2], b[..., :2]),
                                   xp.minimum(a[..., 2:], b[..., 2:])], -1))
  union = box_area(a) + box_area(b) - inter
  return inter / xp.maximum(union, 1e-9)


def generalized_iou(a, b):
  """GIoU of corresponding boxes a, b [..., 4]: IoU - (hull - union) / hull."""
  inter = box_area(jnp.concatenate([jnp.maximum(a[..., :2], b[..., :2]),
                                    jnp.minimum(a[..., 2:], b[..., 2:])], -1))
  union = box_area(a) + box_area(b) - inter
  hull = box_area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]),
                                   jnp.maximum(a[..., 2:], b[..., 2:])], -1))
  return inter / jnp.maximum(union, 1e-9) - (hull - union) / jnp.maximum(hull, 1e-9)


# ---- Training loss ----

def assign(model, boxes, labels):
  """Grid cell (x, y) and anchor of each true box; `valid` marks real objects."""
  stride = model.stride
  height, width = model.grid_shape
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2
  cell_x = jnp.clip(jnp.floor(centre[..., 0] / stride), 0, width - 1).astype(jnp.int32)
  cell_y = jnp.clip(jnp.floor(centre[..., 1] / stride), 0, height - 1).astype(jnp.int32)
  size = boxes[..., 2:] - boxes[..., :2]
  anchors = jnp.asarray(model.anchors, jnp.float32)
  inter = jnp.prod(jnp.minimum(size[..., None, :], anchors), -1)
  shape_iou = inter / (jnp.prod(size, -1)[..., None] + jnp.prod(anchors, -1) - inter)
  return cell_x, cell_y, jnp.argmax(shape_iou, -1), labels >= 0


def loss_terms(model, raw, boxes, labels, config):
  """Per-image (box, objectness, class) loss sums, each [B], unweighted."""
  batch = raw.shape[0]
  cell_x, cell_y, anchor, valid = assign(model, boxes, labels)
  rows = jnp.arange(batch)[:, None]
  assigned = raw[rows, cell_y, cell_x, anchor]  # [B, M, 5 + classes]
  cells = jnp.stack([cell_x, cell_y], -1).astype(jnp.float32)
  predicted = model.decode_at(assigned[..., :4], cells, anchor)
  weight = valid.astype(jnp.float32)
  box = jnp.sum(weight * (1.0 - generalized_iou(predicted, boxes)), -1)
  classes = optax.softmax_cross_entropy_with_integer_labels(assigned[..., 5:],
                                                            jnp.maximum(labels, 0))
  cls = jnp.sum(weight * classes, -1)

  target = jnp.zeros(raw.shape[:4]).at[rows, cell_y, cell_x, anchor].max(weight)
  all_boxes = jax.lax.stop_gradient(model.decode_boxes(raw))  # [B, H, W, A, 4]
  overlaps = pairwise_iou(all_boxes.reshape(batch, -1, 4), boxes)  # [B, HWA, M]
  best = jnp.max(jnp.where(valid[:, None, :], overlaps, 0.0), -1).reshape(target.shape)
  counted = jnp.where((target == 0) & (best > config.ignore_iou), 0.0, 1.0)
  objectness = optax.sigmoid_binary_cross_entropy(raw[..., 4], target)
  obj = jnp.sum(counted * objectness, axis=(1, 2, 3))
  return box, obj, cls


# ---- Decoding ----

def _nms_one(boxes, scores, classes, iou_threshold, score_threshold, max_detections):
  """Greedy per-class NMS over one image's candidates, best score first."""
  count = min(_PRE_NMS_CANDIDATES, scores.shape[0])
  scores, order = jax.lax.top_k(scores, count)
  boxes, classes = boxes[order], classes[order]
  same_class = classes[:, None] == classes[None, :]
  overlapping = (pairwise_iou(boxes, boxes) > iou_threshold) & same_class
  earlier = jnp.arange(count)[None, :] < jnp.arange(count)[:, None]

  def visit(i, keep):
    suppressed = jnp.any(keep & overlapping[i] & earlier[i])
    return keep.at[i].set((scores[i] >= score_threshold) & ~suppressed)

  keep = jax.lax.fori_loop(0, count, visit, jnp.zeros(count, bool))
  # Kept candidates first, still in score order.
  first = jnp.argsort(~keep, stable=True)[:max_detections]
  kept = keep[first]
  return (jnp.where(kept[:, None], boxes[first], 0.0), jnp.where(kept, scores[first], 0.0),
          jnp.where(kept, classes[first], -1))


def decode(model, raw, config):
  """(boxes [B, D, 4], scores [B, D], classes [B, D]) after NMS; empty slots have
  score 0 and class -1."""
  batch = raw.shape[0]
  boxes = model.decode_boxes(raw).reshape(batch, -1, 4)
  probs = jax.nn.sigmoid(raw[..., 4:5]) * jax.nn.softmax(raw[..., 5:], -1)
  probs = probs.reshape(batch, -1, probs.shape[-1])
  scores, classes = jnp.max(probs, -1), jnp.argmax(probs, -1).astype(jnp.int32)
  return jax.vmap(lambda b, s, c: _nms_one(b, s, c, config.nms_iou, config.score_threshold,
                                           config.max_detections))(boxes, scores, classes)


# ---- COCO mAP (host side, NumPy) ----

def average_precisions(det_boxes, det_scores, det_classes, gt_boxes, gt_labels,
                       iou_thresholds=COCO_IOU_THRESHOLDS) -> np.ndarray:
  """COCO AP per (IoU threshold, class) -> [T, classes]; NaN for classes without any
  true box. Per image: det_* [D], [D, 4] with class -1 for empty slots; gt_* likewise
  with label -1 for no object."""
  thresholds = np.minimum(np.asarray(iou_thresholds, np.float64), 1 - 1e-10)[:, None]
  scores, classes, hits = [], [], []  # hits: [detections, T], True for a true positive.
  for boxes, det_score, det_class, truths, labels in zip(
      det_boxes, det_scores, det_classes, gt_boxes, gt_labels):
    real = np.flatnonzero(det_class >= 0)
    order = real[np.argsort(-det_score[real], kind='mergesort')]
    iou = pairwise_iou(np.asarray(boxes[order], np.float64), np.asarray(truths, np.float64))
    # Only same-class, real true boxes can be matched.
    iou = np.where(det_class[order][:, None] == labels[None, :], iou, -1.0)
    taken = np.zeros((len(thresholds), len(labels)), bool)  # Per threshold: matched truths.
    image_hits = np.zeros((len(order), len(thresholds)), bool)
    for d in range(len(order)):
      # COCO: the best-overlapping true box not yet matched, at IoU >= threshold.
      candidates = np.where(taken, -1.0, iou[d][None, :])
      best = np.argmax(candidates, 1) if len(labels) else np.zeros(len(thresholds), int)
      if len(labels):
        matched = candidates[np.arange(len(thresholds)), best] >= thresholds[:, 0]
        taken[np.flatnonzero(matched), best[matched]] = True
        image_hits[d] = matched
    scores.append(det_score[order])
    classes.append(det_class[order])
    hits.append(image_hits)
  if not scores:  # No images.
    return np.full((len(thresholds), 0), np.nan)
  scores, classes, hits = np.concatenate(scores), np.concatenate(classes), np.concatenate(hits)
  num_classes = int(max(gt_labels.max(initial=-1), classes.max(initial=-1))) + 1
  ap = np.full((len(thresholds), num_classes), np.nan)
  for c in range(num_classes):
    num_true = int(np.sum(gt_labels == c))
    if not num_true:
      continue
    mine = np.flatnonzero(classes == c)
    if not len(mine):
      ap[:, c] = 0.0
      continue
    class_hits = hits[mine[np.argsort(-scores[mine], kind='mergesort')]]
    tp = np.cumsum(class_hits, 0)
    fp = np.cumsum(~class_hits, 0)
    recall = tp / num_true
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1], 0)[::-1]
    for t in range(len(thresholds)):
      at = np.searchsorted(recall[:, t], COCO_RECALL_POINTS, side='left')
      ap[t, c] = np.mean(np.where(at < len(mine),
                                  precision[np.minimum(at, len(mine) - 1), t], 0.0))
  return ap


def mean_average_precision(values: dict, iou_thresholds) -> float:
  """COCO mAP over `iou_thresholds` from collected eval outputs (masked images
  dropped); NaN when no image has a true box."""
  keep = values['mask'] > 0
  ap = average_precisions(values['det_boxes'][keep], values['det_scores'][keep],
                          values['det_classes'][keep], values['gt_boxes'][keep],
                          values['gt_labels'][keep], iou_thresholds)
  with np.errstate(invalid='ignore'):
    per_threshold = np.nanmean(ap, axis=1) if np.any(~np.isnan(ap)) else np.full(len(ap), np.nan)
  return float(np.mean(per_threshold))


_COLLECTED = ('det_boxes', 'det_scores', 'det_classes', 'gt_boxes', 'gt_labels', 'mask')


@struct.dataclass
class MAP50(metrics.CollectingMetric.from_outputs(_COLLECTED)):
  """COCO mAP@0.5 over everything collected."""

  def compute(self):
    return mean_average_precision(super().compute(), COCO_IOU_THRESHOLDS[:1])


@struct.dataclass
class MAP(metrics.CollectingMetric.from_outputs(_COLLECTED)):
  """COCO mAP@0.5:0.95 over everything collected."""

  def compute(self):
    return mean_average_precision(super().compute(), COCO_IOU_THRESHOLDS)


@struct.dataclass
class DetectionTrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  box_loss: metrics.Average.from_output('box_loss')
  objectness_loss: metrics.Average.from_output('objectness_loss')
  class_loss: metrics.Average.from_output('class_loss')


@struct.dataclass
class DetectionMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  map50: MAP50
  map: MAP


class Detection(ImageTask):
  """Detection on MNIST canvases (input_pipeline/canvas.py) with a grid detector."""
  metrics_class = DetectionMetrics

  def load_data(self, process_index, process_count):
    if self.config.parallel.strategy != 'jit':
      raise KilnError('detection eval gathers every image\'s detections for mAP, which the '
                      "pmap strategy would sum over devices: set config.parallel.strategy='jit'")
    if augment.is_active(self.config.augment) or self.config.augment.image_size:
      raise KilnError('config.augment applies to classification; detection canvases are '
                      'already random layouts (and flips or crops would need box updates): '
                      'leave config.augment at its defaults')
    self.source = canvas.load(self.config, process_index, process_count)

  @property
  def num_train_examples(self):
    return self.source.train.num_examples

  def _weighted(self, model, raw, batch):
    c = self.config.detection
    box, obj, cls = loss_terms(model, raw, batch['boxes'], batch['labels'], c)
    total = c.box_weight * box + c.objectness_weight * obj + c.class_weight * cls
    return total, box, obj, cls

  def loss(self, model: nnx.Module, batch: Batch, rngs: nnx.Rngs):
    raw = model(batch['image'], train=True, rngs=rngs)
    total, box, obj, cls = self._weighted(model, raw, batch)
    return total.mean(), DetectionTrainMetrics.single_from_model_output(
        loss=total, box_loss=box, objectness_loss=obj, class_loss=cls)

  def evaluate(self, model: nnx.Module, batch: Batch):
    return self._score(model, model(batch['image'], train=False), batch)

  def serving(self):
    # The artifact answers the grid's raw outputs; decoding (sigmoid, anchors, NMS) is the
    # server's, with the same `decode` as eval, so no converter has to handle NMS.
    return self._image_serving(lambda model, images: {'raw': model(images, train=False)},
                               lambda model, outputs, batch: self._score(model, outputs['raw'],
                                                                         batch),
                               lambda outputs: np.argmax(outputs['raw'][..., 5:], -1),
                               metric='map50')

  def _score(self, model, raw, batch):
    total = self._weighted(model, raw, batch)[0]
    boxes, scores, classes = decode(model, raw, self.config.detection)
    return DetectionMetrics.single_from_model_output(
        loss=total, mask=batch['mask'], det_boxes=boxes, det_scores=scores,
        det_classes=classes, gt_boxes=batch['boxes'], gt_labels=batch['labels'])
