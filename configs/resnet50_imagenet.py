"""ResNet-50 v1.5 on ImageNet (ILSVRC-2012) through TFDS, for real users on accelerators.

The recipe of Goyal et al. 2017 ("ImageNet in 1 hour") as the Flax ImageNet example
runs it: SGD with Nesterov momentum 0.9, learning rate 0.1 per 256 images with a
5-epoch linear warmup then cosine decay, weight decay 1e-4 (BatchNorm and biases
exempt), 90 epochs, zero-initialised last BatchNorm scale in each block, Inception
random-resized crops and flips at 224x224, eval on the 224 centre crop of a 256 resize.
Expect about 76-77% top-1 on the validation split.

TFDS needs the ILSVRC-2012 archives downloaded by hand (see TFDS's imagenet2012 page),
then `tfds.builder('imagenet2012').download_and_prepare()`; point
--config.dataset.tfds_data_dir at the prepared data. Scale batch_size and the learning
rate together (0.1 x batch / 256).
"""

from configs import vision


def get_config():
  c = vision.get_vision_config()
  c.dataset.name = 'tfds:imagenet2012'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.shuffle_buffer = 16_384
  c.augment.image_size = 224
  c.augment.crop = 'random_resized_crop'
  c.augment.flip = True
  c.augment.mean = (0.485, 0.456, 0.406)  # ImageNet channel means of [0, 1] pixels.
  c.augment.std = (0.229, 0.224, 0.225)  # ImageNet channel standard deviations.
  c.model.name = 'resnet50'
  c.model.stem = 'imagenet'  # 7x7/2 conv + 3x3/2 max-pool.
  c.model.zero_init_last_bn = True  # Each block starts as the identity (Goyal et al.).
  c.model.dtype = 'bfloat16'  # Compute dtype; parameters and logits stay float32.
  c.batch_size = 1024
  c.eval_batch_size = 1000  # 50,000 validation images in 50 batches.
  c.num_epochs = 90.0
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.4  # 0.1 x 1024 / 256.
  c.optimizer.sgd.momentum = 0.9
  c.optimizer.sgd.nesterov = True
  # PyTorch-style (coupled) weight decay 1e-4: the gradient of l2 * w^2 is 2 * l2 * w, and it
  # flows through the momentum like the reference's; BatchNorm and biases are exempt.
  c.regularization.l2 = 5e-5
  c.schedule.name = 'cosine'
  c.schedule.warmup_epochs = 5.0
  c.log_every_steps = 100
  c.eval_every_steps = 1251  # About once an epoch at batch 1024.
  c.checkpoint_every_steps = 1251
  return c
