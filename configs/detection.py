"""Object detection on MNIST canvases (input_pipeline/canvas.py, tasks/detection.py): the
vision base (whose augment section detection must leave at its defaults) plus the canvas
layout, the loss weights and the decoding thresholds.
"""

import ml_collections

from configs import vision


def get_detection_config() -> ml_collections.ConfigDict:
  c = vision.get_vision_config()
  c.task = 'detection'
  c.dataset.name = 'mnist_t10k'  # The digits' source; the canvases are built from it.
  c.early_stopping.metric = 'map50'  # Detection has no accuracy; COCO mAP at IoU 0.5.
  c.detection = ml_collections.ConfigDict()
  c.detection.canvas_size = 96  # MNIST canvases: side of each square canvas in pixels.
  c.detection.min_objects = 1  # MNIST canvases: fewest digits on a canvas.
  c.detection.max_objects = 5  # MNIST canvases: most digits on a canvas (boxes are padded to this).
  c.detection.digit_size = (20, 44)  # MNIST canvases: side range (px) of a pasted 28x28 digit.
  c.detection.num_train_canvases = 8000  # MNIST canvases built from the train part's digits.
  c.detection.num_eval_canvases = 1000  # MNIST canvases built from the held-out digits only.
  c.detection.canvas_seed = 0  # Seed of canvas layouts (not c.seed: the data stays fixed).
  c.detection.box_weight = 5.0  # Loss weight of the box term, 1 - GIoU over assigned anchors.
  c.detection.objectness_weight = 1.0  # Loss weight of objectness BCE over every anchor.
  c.detection.class_weight = 1.0  # Loss weight of class cross-entropy over assigned anchors.
  c.detection.ignore_iou = 0.5  # Unassigned anchors overlapping an object above this: no objectness loss.
  c.detection.score_threshold = 0.01  # Decoding: detections scoring below this are dropped.
  c.detection.nms_iou = 0.5  # Decoding: per-class NMS drops boxes overlapping a better one above this.
  c.detection.max_detections = 20  # Decoding: detections kept per image after NMS.
  return c
