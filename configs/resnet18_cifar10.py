"""ResNet-18 on CIFAR-10 through TFDS (`tfds:cifar10`; needs internet once to prepare).

The usual CIFAR ResNet-18 recipe (e.g. kuangliu/pytorch-cifar): 'cifar' stem (3x3/1
conv, no max-pool), pad-4-and-crop plus flips, per-channel normalisation, SGD with
Nesterov momentum, learning rate 0.1 with cosine decay over 200 epochs, weight decay
5e-4. Expect about 95% test accuracy; on 2 CPU cores (~100 images/s) it is a GPU job.
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'tfds:cifar10'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.augment.crop = 'pad_and_crop'
  c.augment.pad = 4
  c.augment.flip = True
  c.augment.mean = (0.4914, 0.4822, 0.4465)  # CIFAR-10 training-set channel means.
  c.augment.std = (0.2470, 0.2435, 0.2616)  # CIFAR-10 training-set channel stds.
  c.model.name = 'resnet18'
  c.model.stem = 'cifar'  # 3x3/1 stem conv, no max-pool: 32x32 stays 32x32 into stage 1.
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 200.0
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  c.optimizer.sgd.momentum = 0.9
  c.optimizer.sgd.nesterov = True
  c.regularization.l2 = 2.5e-4  # PyTorch-style (coupled) weight decay 5e-4 = 2 * l2.
  c.schedule.name = 'cosine'
  c.schedule.warmup_epochs = 1.0
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  return c
