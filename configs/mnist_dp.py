"""DP-SGD on full MNIST (Abadi et al. 2016): a GroupNorm CNN trained on Poisson-sampled
batches with per-example clipping and Gaussian noise calibrated so that the whole run
spends epsilon = 2 at delta = 1e-5 (PLD accounting; summary.json['privacy']).

55,000 training digits (the privacy unit is one of them), 5,000 held out, the official
10,000 test digits reported at the end. No augmentation: each step's gradient of an example
must come from that example alone, and DP-SGD needs no extra regularisation.
--config.privacy.target_epsilon=8 trades privacy for accuracy.
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'mnist'
  c.dataset.holdout_fraction = 1 / 12  # 5,000 of the 60,000 training digits held out.
  c.model.features = (16, 32)  # Channels of each conv stage (conv-GroupNorm-ReLU, 2x2 max-pool).
  c.model.dense_features = 32  # Small head: DP noise grows with the parameter count.
  c.model.dropout_rate = 0.0  # The clipping and noise regularise already.
  c.model.norm = 'group'  # GroupNorm: per-example statistics (BatchNorm is refused under DP).
  c.model.norm_groups = 4  # Channel groups of each GroupNorm.
  c.model.convs_per_stage = 1  # One conv per stage: per-example gradients cost ~4x less.
  c.privacy.enabled = True
  c.privacy.clip_norm = 1.0  # Per-example gradient norm bound C.
  c.privacy.target_epsilon = 2.0  # Noise multiplier calibrated so the run spends this epsilon.
  c.privacy.delta = 1e-5  # Below 1 / 55,000 training examples.
  c.batch_size = 512  # Expected Poisson sample (q = 512 / 55,000); padded to a fixed shape.
  c.num_epochs = 6.0
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.25  # On the noised mean of gradients clipped to norm 1.
  c.optimizer.sgd.momentum = 0.9
  c.schedule.name = 'cosine'
  c.schedule.warmup_steps = 50
  c.log_every_steps = 50
  c.eval_every_steps = 107  # About once an epoch.
  c.checkpoint_every_steps = 500
  c.early_stopping.metric = 'accuracy'
  return c
