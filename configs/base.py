"""Defaults shared by every experiment; each config file starts from here."""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout and the training-data order.
  c.task = 'classification'  # Problem to solve; a name in tasks.TASKS.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'  # 'digits' (bundled), 'mnist_idx' (local IDX files) or 'tfds:<name>'.
  c.dataset.data_dir = ''  # Local sources: folder with the files; '' means $KILN_DATASETS or ../shared/datasets.
  c.dataset.tfds_data_dir = ''  # TFDS only: where prepared datasets live; '' uses TFDS's default.
  c.dataset.train_split = 'train'  # TFDS only: split to train on.
  c.dataset.eval_split = 'test'  # TFDS only: split to evaluate on.
  c.dataset.holdout_fraction = 0.2  # Local sources: fraction of examples held out for eval.
  c.dataset.split_seed = 1234  # Local sources: seed of the fixed train/held-out split (not c.seed).
  c.dataset.shuffle_buffer = 16_384  # Examples in the training shuffle buffer (per host).
  c.dataset.prefetch_batches = 2  # Batches placed on the devices ahead of the step that needs them.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'  # A name in models.MODELS; the other keys here go to its constructor.

  c.batch_size = 128  # Global training batch, split over all devices and hosts.
  c.eval_batch_size = 256  # Global eval batch; the last one is padded and masked, never dropped.
  c.num_epochs = 10.0  # Training length in epochs when num_train_steps is -1.
  c.num_train_steps = -1  # Training length in steps; -1 derives it from num_epochs.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # 'sgd' or 'adam'.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate (reached after warmup).
  c.optimizer.momentum = 0.9  # SGD momentum; 0 disables it.
  c.optimizer.nesterov = False  # SGD: use Nesterov momentum.
  c.optimizer.b1 = 0.9  # Adam: decay of the first-moment estimate.
  c.optimizer.b2 = 0.999  # Adam: decay of the second-moment estimate.
  c.optimizer.eps = 1e-8  # Adam: added to the denominator for stability.

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'warmup_cosine'  # 'constant' or 'warmup_cosine'.
  c.schedule.warmup_steps = 50  # Linear warmup from 0 to the peak learning rate.
  c.schedule.end_learning_rate_fraction = 0.0  # Cosine ends at this fraction of the peak.

  c.regularization = ml_collections.ConfigDict()
  c.regularization.l1 = 0.0  # Adds l1 * sum|w| over included parameters to the loss.
  c.regularization.l2 = 0.0  # Adds l2 * sum w^2 over included parameters to the loss.
  c.regularization.weight_decay = 0.0  # Decoupled decay, w -= lr * weight_decay * w (AdamW-style).
  c.regularization.exclude = r'bias$|scale$|norm|embed'  # Regex on 'a/b/kernel' paths exempt from all three.

  c.gradient = ml_collections.ConfigDict()
  c.gradient.clip_global_norm = 0.0  # Rescale gradients whose global norm exceeds this; 0 disables.
  c.gradient.clip_value = 0.0  # Clip each gradient value to [-v, v]; 0 disables.
  c.gradient.accumulation_steps = 1  # Micro-batches per step; the batch is split k ways in the step.

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0  # Keep an exponential moving average of parameters; 0 disables.
  c.ema.use_for_eval = True  # Evaluate with the EMA parameters when the EMA is on.

  c.log_every_steps = 50  # Train metrics are written every this many steps.
  c.eval_every_steps = 200  # Eval (and early stopping) every this many steps, and at the end.
  c.checkpoint_every_steps = 500  # Orbax checkpoint every this many steps, and at the end.
  c.keep_checkpoints = 2  # Newest checkpoints kept on disk.

  c.early_stopping = ml_collections.ConfigDict()
  c.early_stopping.metric = 'accuracy'  # Eval metric watched for early stopping.
  c.early_stopping.mode = 'max'  # 'max' if a larger metric is better, 'min' otherwise.
  c.early_stopping.patience = 0  # Evals without improvement before stopping; 0 never stops.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Devices on the data-parallel axis; -1 takes all that remain.
  c.mesh.fsdp = 1  # Devices over which batches (and, later, parameters) are sharded FSDP-style.
  c.mesh.tensor = 1  # Devices for tensor parallelism within layers.

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # Call jax.distributed.initialize() (multi-host runs).
  c.distributed.coordinator_address = ''  # host:port of process 0; '' lets JAX detect it (TPU, SLURM).
  c.distributed.num_processes = -1  # Processes in the job; -1 lets JAX detect it.
  c.distributed.process_id = -1  # This process's index; -1 lets JAX detect it.

  c.compilation_cache_dir = '~/.cache/kiln/jax'  # Persistent XLA compilation cache; '' disables it.
  return c
