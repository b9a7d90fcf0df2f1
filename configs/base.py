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
  c.dataset.text_file = ''  # Text: UTF-8 file to read; '' = tiny_shakespeare's shared copy.
  c.dataset.tokenizer = 'char'  # Text: 'char', 'byte' (UTF-8) or 'sentencepiece'.
  c.dataset.vocab_size = 8192  # Text, sentencepiece only: pieces incl. the 5 special tokens.
  c.dataset.seq_len = 256  # Text: tokens per window the model sees (windows hold seq_len + 1).
  c.dataset.window_stride = 0  # Text: tokens between training windows' starts; 0 = seq_len.

  # --- Speech (tasks speech_classification / speech_ctc / speech_rnnt; input_pipeline/audio.py).
  c.audio = ml_collections.ConfigDict()
  c.audio.num_mels = 40  # Mel filter-bank channels of the log-mel features.
  c.audio.window_ms = 25.0  # Analysis window (Hann) per frame, in milliseconds.
  c.audio.hop_ms = 10.0  # Step between frames, in milliseconds.
  c.audio.max_frames = 160  # Frames per padded utterance (static shape); longer ones are cut.
  c.audio.eval_max_frames = 0  # Frames per padded eval utterance; 0 = max_frames.
  c.audio.max_label_len = 32  # Transcripts: characters per padded label sequence; longer are cut.
  c.audio.eval_max_label_len = 0  # Eval transcripts: characters per padded label; 0 = max_label_len.
  c.audio.max_digits = 5  # fsdd_connected: an utterance joins 1..max_digits recordings.
  c.audio.min_silence_ms = 50.0  # fsdd_connected: shortest silence between two digits.
  c.audio.max_silence_ms = 250.0  # fsdd_connected: longest silence between two digits.
  c.audio.num_train_utterances = 4000  # fsdd_connected: utterances built from train recordings.
  c.audio.num_eval_utterances = 600  # fsdd_connected: utterances built from test recordings.
  c.audio.freq_masks = 2  # SpecAugment: frequency masks per training utterance; 0 disables.
  c.audio.freq_width = 8  # SpecAugment: widest frequency mask, in mel channels (F).
  c.audio.time_masks = 2  # SpecAugment: time masks per training utterance; 0 disables.
  c.audio.time_width = 20  # SpecAugment: widest time mask, in frames (T).
  c.audio.time_width_fraction = 0.2  # SpecAugment: a time mask covers at most this share (p).
  c.decoding = ml_collections.ConfigDict()
  c.decoding.beam_size = 4  # Transcription eval: beam width of the beam-search figures; 0 = greedy only.
  c.decoding.max_symbols_per_frame = 3  # RNN-T greedy decoding: most labels emitted per frame.
  # --- End of speech.

  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'  # A name in models.MODELS; the other keys here go to its constructor.

  c.batch_size = 128  # Global training batch, split over all devices and hosts.
  c.eval_batch_size = 256  # Global eval batch; the last one is padded and masked, never dropped.
  c.num_epochs = 10.0  # Training length in epochs when num_train_steps is -1.
  c.num_train_steps = -1  # Training length in steps; -1 derives it from num_epochs.

  # Each field maps to one argument of an Optax piece (after '->'); rules in optim/optimizers.py.
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # sgd, adagrad, rmsprop, adam, adamw, lion or adafactor.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate (after warmup); adafactor: rho.
  c.optimizer.momentum = 0.9  # sgd: momentum -> optax.trace(decay=); 0 disables it.
  c.optimizer.nesterov = False  # sgd: Nesterov momentum -> optax.trace(nesterov=).
  c.optimizer.b1 = 0.9  # adam/adamw: first-moment decay -> optax.scale_by_adam(b1=).
  c.optimizer.b2 = 0.999  # adam/adamw: second-moment decay -> optax.scale_by_adam(b2=).
  c.optimizer.eps = 1e-8  # adam/adamw/adagrad: added to the sqrt -> scale_by_adam(eps=), delta.
  c.optimizer.rmsprop_decay = 0.9  # rmsprop: mean-square decay -> optax.scale_by_rms(decay=).
  c.optimizer.rmsprop_eps = 1e-8  # rmsprop: added inside the sqrt -> scale_by_rms(eps=).
  c.optimizer.rmsprop_centered = False  # rmsprop: divide by the std -> optax.scale_by_stddev.
  c.optimizer.rmsprop_momentum = 0.0  # rmsprop: Graves's momentum -> optax.trace(decay=); 0 off.
  c.optimizer.lion_b1 = 0.9  # lion: momentum/gradient mix inside sign() -> optax.lion(b1=).
  c.optimizer.lion_b2 = 0.99  # lion: momentum decay -> optax.lion(b2=).
  c.optimizer.adafactor_decay_rate = 0.8  # beta2_t = 1 - t^-this -> scale_by_factored_rms.
  c.optimizer.adafactor_eps = 1e-30  # eps1, added to g^2 -> scale_by_factored_rms(epsilon=).
  c.optimizer.adafactor_factored = True  # Factored 2nd moments -> scale_by_factored_rms.
  c.optimizer.adafactor_min_dim_size_to_factor = 1  # 1 factors every matrix; Optax's is 128.
  c.optimizer.adafactor_clipping_threshold = 1.0  # Update clipping d; 0 off -> clip_by_block_rms.
  c.optimizer.adafactor_multiply_by_parameter_scale = True  # Step times max(eps2, RMS(w)).
  c.optimizer.adafactor_min_parameter_scale = 1e-3  # eps2 -> scale_by_param_block_rms.
  c.optimizer.adafactor_relative_step = True  # Step rho_t = min(schedule, 1/sqrt(t)).

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'cosine'  # constant, cosine, linear, exponential, step, rsqrt or wsd.
  c.schedule.warmup_steps = 50  # Linear warmup from 0 to the peak learning rate (every schedule).
  c.schedule.warmup_epochs = -1.0  # Warmup in epochs if > 0 (overrides warmup_steps).
  c.schedule.end_learning_rate_fraction = 0.0  # cosine/linear/exponential/wsd end at this * peak.
  c.schedule.boundary_steps = ()  # step: steps at which the rate is multiplied by decay_factor.
  c.schedule.boundary_epochs = ()  # step: boundaries in epochs; non-empty overrides boundary_steps.
  c.schedule.decay_factor = 0.1  # step: factor applied at each boundary.
  c.schedule.rsqrt_timescale_steps = 0  # rsqrt: peak*sqrt(T/(T+s)) after warmup; 0: T = warmup.
  c.schedule.wsd_decay_fraction = 0.2  # wsd: final fraction of training spent decaying.
  c.schedule.wsd_decay_shape = 'linear'  # wsd: decay shape, 'linear', 'cosine' or '1-sqrt'.

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

  c.parallel = ml_collections.ConfigDict()
  c.parallel.strategy = 'jit'  # 'jit' (sharded over the mesh) or 'pmap' (pure data parallelism).
  # Logical dimension name -> mesh axis (or tuple of axes, or None); unnamed dims are replicated.
  c.parallel.rules = (
      ('embed', 'fsdp'),  # Input features of dense layers: sharded FSDP-style.
      ('mlp', 'tensor'),  # Hidden features of dense layers: tensor parallel.
      ('heads', 'tensor'),  # Attention heads: tensor parallel.
      ('vocab', 'tensor'),  # Vocabulary (embedding rows, output logits): tensor parallel.
      ('conv_in', 'fsdp'),  # Input channels of convolutions: sharded FSDP-style.
      ('conv_out', 'tensor'),  # Output channels of convolutions: tensor parallel.
  )

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # Call jax.distributed.initialize() (multi-host runs).
  c.distributed.coordinator_address = ''  # host:port of process 0; '' lets JAX detect it (TPU, SLURM).
  c.distributed.num_processes = -1  # Processes in the job; -1 lets JAX detect it.
  c.distributed.process_id = -1  # This process's index; -1 lets JAX detect it.

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint_dir = ''  # Copy matching parameters from this run's newest checkpoint; '' = random.

  c.profile = ml_collections.ConfigDict()
  c.profile.first_step = 10  # First step of the profiler trace (TensorBoard's profile tab).
  c.profile.num_steps = 0  # Steps traced from first_step; 0 disables profiling.

  # ---- Vision: host-side augmentation (classification) and detection (issue 7) ----
  c.augment = ml_collections.ConfigDict()
  c.augment.image_size = 0  # Resize/crop images to this square side; 0 keeps the source's size.
  c.augment.crop = 'none'  # Train crop: 'none', 'pad_and_crop' or 'random_resized_crop'.
  c.augment.pad = 4  # pad_and_crop: zero pixels added on each side before the random crop.
  c.augment.crop_scale = (0.08, 1.0)  # random_resized_crop: range of the crop's area fraction.
  c.augment.crop_ratio = (3 / 4, 4 / 3)  # random_resized_crop: range of width / height.
  c.augment.eval_crop_fraction = 0.875  # With image_size: eval resizes to size / this, centre-crops.
  c.augment.flip = False  # Mirror train images left-right with probability 1/2.
  c.augment.mean = ()  # Per-channel mean subtracted from every image (train and eval); () none.
  c.augment.std = ()  # Per-channel std every image is divided by; () none.
  c.augment.mixup_alpha = 0.0  # Mixup's Beta(alpha, alpha) mixing weight; 0 disables mixup.
  c.augment.cutmix_alpha = 0.0  # CutMix's Beta(alpha, alpha) kept area; 0 disables (both on: 50/50).

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

  c.backend = ml_collections.ConfigDict()
  # Kiln's compiled CPU kernels (attention, dropout bits, convolutions; backends/cpu/): 'auto'
  # uses them on a CPU backend when they build, 'xla' never (plain XLA), 'cpu' always.
  c.backend.cpu_kernels = 'auto'

  c.compilation_cache_dir = '~/.cache/kiln/jax'  # Persistent XLA compilation cache; '' disables it.
  return c
