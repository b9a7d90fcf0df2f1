"""YOLO-style detector on MNIST canvases: 96x96 images holding 1-5 real MNIST digits.

Canvases (input_pipeline/canvas.py) are built from the shared MNIST test split: train
canvases from its train part's digits, eval canvases from the 15% held-out digits
(configs/mnist_cnn.py's split). The detector (models/detector.py) predicts on a 12x12
grid (stride 8) with two anchors per cell; eval reports COCO mAP@0.5 and mAP@0.5:0.95.
"""

from configs import detection


def get_config():
  c = detection.get_detection_config()
  c.task = 'detection'
  c.dataset.name = 'mnist_t10k'  # The digits' source; the canvases are built from it.
  c.dataset.holdout_fraction = 0.15
  c.model.name = 'yolo'
  c.model.anchors = ((12.0, 18.0), (24.0, 28.0))  # (w, h) px: thin digits (1s) and the rest.
  c.model.stem_width = 16  # Channels of the 3x3/2 stem conv.
  c.model.widths = (32, 64)  # Channels of the two residual stages (stride 4, then 8).
  c.model.stage_sizes = (1, 2)  # Basic blocks per stage.
  c.model.head_width = 64  # Channels of the 3x3 head conv before the predictions.
  c.detection.canvas_size = 96
  c.detection.num_train_canvases = 8000
  c.detection.num_eval_canvases = 1000
  c.batch_size = 64
  c.eval_batch_size = 200
  c.num_epochs = 12.0
  c.optimizer.learning_rate = 2e-3
  c.schedule.warmup_steps = 100
  c.early_stopping.metric = 'map50'
  c.early_stopping.mode = 'max'
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
