"""Run-wide defaults every experiment shares; a family base (vision.py, detection.py,
language.py, speech.py) extends them and each config file starts from its family's."""

import ml_collections
from ml_collections import config_dict


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds parameter init, dropout and the training-data order.
  c.task = 'classification'  # Problem to solve; a name in tasks.TASKS.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'  # A source of the task's family (its base lists them) or 'tfds:<name>'.
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

  # Global training batch, split over all devices and hosts; 'auto': the largest that fits
  # config.auto_batch's memory budget (loop/auto_batch.py), an int or the string.
  c.batch_size = config_dict.FieldReference(128, field_type=object)
  c.auto_batch = ml_collections.ConfigDict()
  c.auto_batch.limit_gb = 0.0  # batch_size='auto': GiB per device the step may peak at; 0: the device's limit.
  c.auto_batch.max_batch_size = 65536  # batch_size='auto': the search stops at this global batch.
  c.eval_batch_size = 256  # Global eval batch; the last one is padded and masked, never dropped.
  c.num_epochs = 10.0  # Training length in epochs when num_train_steps is -1.
  c.num_train_steps = -1  # Training length in steps; -1 derives it from num_epochs.

  # Hyper-parameters live under the chosen optimizer: config.optimizer.<section>.<field>, each
  # passed to one argument of its builder in optim/optimizers.py (ranges: optim/factory.py).
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # sgd, adagrad, rmsprop, adam, adamw, lion or adafactor.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate (after warmup); adafactor: rho.
  c.optimizer.lr_scaling = 'none'  # 'linear' or 'sqrt': rescale learning_rate from reference_batch_size to the run's batch.
  c.optimizer.reference_batch_size = 0  # The batch learning_rate was set for (lr_scaling's reference).
  c.optimizer.sgd = ml_collections.ConfigDict()
  c.optimizer.sgd.momentum = 0.9  # Momentum -> optax.trace(decay=); 0 disables it.
  c.optimizer.sgd.nesterov = False  # Nesterov momentum -> optax.trace(nesterov=).
  c.optimizer.adagrad = ml_collections.ConfigDict()
  c.optimizer.adagrad.eps = 1e-8  # Duchi et al.'s delta, added to sqrt(G_t).
  c.optimizer.rmsprop = ml_collections.ConfigDict()
  c.optimizer.rmsprop.decay = 0.9  # Mean-square decay -> optax.scale_by_rms(decay=).
  c.optimizer.rmsprop.eps = 1e-8  # Added inside the sqrt -> scale_by_rms(eps=).
  c.optimizer.rmsprop.centered = False  # Divide by the std -> optax.scale_by_stddev.
  c.optimizer.rmsprop.momentum = 0.0  # Graves's momentum -> optax.trace(decay=); 0 off.
  # adam and adamw share this section: the same moments; both take their decoupled decay from
  # config.regularization.weight_decay.
  c.optimizer.adam = ml_collections.ConfigDict()
  c.optimizer.adam.b1 = 0.9  # First-moment decay -> optax.scale_by_adam(b1=).
  c.optimizer.adam.b2 = 0.999  # Second-moment decay -> optax.scale_by_adam(b2=).
  c.optimizer.adam.eps = 1e-8  # Added to the sqrt -> optax.scale_by_adam(eps=).
  c.optimizer.lion = ml_collections.ConfigDict()
  c.optimizer.lion.b1 = 0.9  # Momentum/gradient mix inside sign() -> optax.lion(b1=).
  c.optimizer.lion.b2 = 0.99  # Momentum decay -> optax.lion(b2=).
  c.optimizer.adafactor = ml_collections.ConfigDict()
  c.optimizer.adafactor.decay_rate = 0.8  # beta2_t = 1 - t^-this -> scale_by_factored_rms.
  c.optimizer.adafactor.eps = 1e-30  # eps1, added to g^2 -> scale_by_factored_rms(epsilon=).
  c.optimizer.adafactor.factored = True  # Factored 2nd moments -> scale_by_factored_rms.
  c.optimizer.adafactor.min_dim_size_to_factor = 1  # 1 factors every matrix; Optax's is 128.
  c.optimizer.adafactor.clipping_threshold = 1.0  # Update clipping d; 0 off -> clip_by_block_rms.
  c.optimizer.adafactor.multiply_by_parameter_scale = True  # Step times max(eps2, RMS(w)).
  c.optimizer.adafactor.min_parameter_scale = 1e-3  # eps2 -> scale_by_param_block_rms.
  c.optimizer.adafactor.use_relative_step = True  # Step rho_t = min(schedule, 1/sqrt(t)).

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

  # --- numerics guard (loop/guard.py): a step with a non-finite or spiking loss is dropped ---
  c.guard = ml_collections.ConfigDict()
  c.guard.policy = 'skip'  # 'skip' (drop the update), 'rollback' (last checkpoint, skip batches), 'stop' or 'off'.
  c.guard.spike_zscore = 0.0  # A loss this many std devs above the window's mean is a spike; 0: non-finite only.
  c.guard.window = 50  # Recent accepted losses the spike z-score is measured against.
  c.guard.min_history = 20  # Accepted losses needed before spikes count (early losses move fast).
  c.guard.rollback_skip_batches = 0  # rollback: batches skipped beyond the offending one (PaLM: 200-500 in all).
  c.guard.rollback_lr_factor = 1.0  # rollback: learning rate multiplied by this at every rollback.
  c.guard.max_rollbacks = 5  # rollback: the event after this many rollbacks stops the run.
  c.guard.inject_nan_at_step = -1  # Drills and tests: NaN in the inputs of this step's batch (0-based); -1 never.

  # --- doctor (doctor.py): checks of data, initialisation and optimisation before a long run ---
  c.doctor = ml_collections.ConfigDict()
  c.doctor.checks = 'data,init,overfit,lr_range,memory'  # Comma-separated groups of checks to run.
  c.doctor.sample_examples = 2048  # Examples of each split the data checks read (leakage: 50x this).
  c.doctor.overfit_steps = 300  # Steps the overfit-one-batch check may take to memorise a batch.
  c.doctor.overfit_target = 0.1  # Memorised: loss below this fraction of the uniform-prediction loss.
  c.doctor.lr_range = (1e-6, 10.0)  # Learning rates the range test sweeps, low to high (log scale).
  c.doctor.lr_range_steps = 100  # Steps (successive batches) of the range test.
  c.doctor.lr_scaling = 'sqrt'  # Memory check's rate for the largest batch: 'linear' (Goyal et al., SGD) or 'sqrt' (Adam).

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

  # --- pruning (compress/pruning.py; Zhu & Gupta 2017, NVIDIA ASP) ---
  # On for method 'n_m', or 'magnitude' with target_sparsity > 0. ASP's 2:4 flow: train dense,
  # then rerun with init.checkpoint_dir=<that workdir> and method='n_m' (prunes at step 0).
  c.pruning = ml_collections.ConfigDict()
  c.pruning.method = 'magnitude'  # 'magnitude' (gradual, Zhu & Gupta 2017) or 'n_m' (N:M structured, NVIDIA ASP).
  c.pruning.target_sparsity = 0.0  # magnitude: final fraction of prunable weights set to zero, in [0, 1); 0 disables.
  c.pruning.initial_sparsity = 0.0  # magnitude: sparsity s_i at begin_step, the start of the cubic ramp.
  c.pruning.begin_step = -1  # First mask update; -1: 10% of training (magnitude), 0 (n_m).
  c.pruning.end_step = -1  # magnitude: last mask update, where the cubic ramp reaches target; -1: 75% of training.
  c.pruning.update_every = 100  # magnitude: steps between mask updates (Zhu & Gupta's delta t).
  c.pruning.scope = 'layer'  # 'layer': every prunable layer reaches the sparsity; 'global': one threshold across all.
  c.pruning.exclude = r'bias$|scale$|norm|embed'  # Regex on 'a/b/kernel' paths never pruned (vectors never are).
  c.pruning.n = 2  # n_m: weights kept in every group of m consecutive input weights.
  c.pruning.m = 4  # n_m: group size along a kernel's input rows; must divide every prunable layer's.

  # --- distillation (compress/distillation.py; Hinton et al. 2015) ---
  c.distillation = ml_collections.ConfigDict()
  c.distillation.teacher_workdir = ''  # Workdir of a finished run whose model teaches this one; '' disables.
  c.distillation.alpha = 0.9  # Weight of the soft (teacher) term; 1 - alpha weighs the hard-label loss.
  c.distillation.temperature = 4.0  # T: both softmaxes at T, the soft term scaled by T^2.

  # --- low-rank factoring (compress/low_rank.py; truncated SVD of init.checkpoint_dir's kernels) ---
  c.low_rank = ml_collections.ConfigDict()
  c.low_rank.energy = 0.0  # Factor each eligible Dense/Conv kernel keeping this fraction of its squared singular values; 0 off.
  c.low_rank.rank_ratio = 0.0  # Or: rank = ceil(rank_ratio * min(rows, cols)); 0 off (set one of the two).
  c.low_rank.include = r''  # Regex of 'a/b/kernel' paths eligible for factoring ('' = every Dense and Conv kernel).
  c.low_rank.exclude = r'classifier|head'  # Regex of kernel paths never factored (output layers).

  # --- LoRA (compress/lora.py; Hu et al. 2021): frozen base from init.checkpoint_dir ---
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # LoRA rank r; 0 disables LoRA.
  c.lora.alpha = 16.0  # Adapter scale is alpha / r (Hu et al. 2021).
  c.lora.targets = r'attn/qkv|attn/out|mlp/fc1|mlp/fc2'  # Regex of kernel paths that get adapters.
  c.lora.trainable = r'classifier'  # Regex of base parameters that still train (new heads); everything else frozen.

  # --- quantisation-aware training (compress/quantize.py; qwix fake quant, straight-through gradients) ---
  c.quantization = ml_collections.ConfigDict()
  c.quantization.mode = 'none'  # 'none', or 'int8': train and evaluate with int8 fake-quant weights (per channel) and activations (calibrated scales).
  c.quantization.exclude = r'bias$|scale$|norm|embed'  # Regex on 'a/b/kernel' paths whose layers stay float.

  # --- differential privacy (trust/training/privacy.py; DP-SGD, Abadi et al. 2016) ---
  # Batches are Poisson samples with q = batch_size / train examples, padded to a fixed shape.
  c.privacy = ml_collections.ConfigDict()
  c.privacy.enabled = False  # Train with DP-SGD: per-example clipping, Gaussian noise, Poisson-sampled batches.
  c.privacy.clip_norm = 1.0  # C: each example's gradient is scaled down to L2 norm <= C (its influence bound).
  c.privacy.noise_multiplier = 1.1  # sigma: noise std is sigma * C on each step's summed gradient; target_epsilon > 0 overrides.
  c.privacy.target_epsilon = 0.0  # > 0: calibrate noise_multiplier before training so the whole run spends this epsilon.
  c.privacy.delta = 1e-5  # delta of the (epsilon, delta) guarantee; must be below 1 / train examples.
  c.privacy.accountant = 'pld'  # 'pld' (tighter) or 'rdp': the accountant epsilon is reported and calibrated with.
  c.privacy.max_batch_size = -1  # Rows Poisson samples are padded to; -1: the size a sample exceeds with probability <= delta per run.

  # --- robustness (trust/training/adversarial.py): attacks on [0, 1] pixels, inside the jitted steps ---
  c.adversarial = ml_collections.ConfigDict()
  c.adversarial.eval = False  # Also report robust_<metric> at every eval: the metrics on PGD/FGSM inputs.
  c.adversarial.train = 'none'  # 'none', 'pgd' (Madry et al. 2018), 'fgsm_rs' (Wong et al. 2020) or 'n_fgsm' (de Jorge et al. 2022): train on attacked inputs.
  c.adversarial.norm = 'linf'  # Threat model: 'linf' or 'l2' ball around each input.
  c.adversarial.epsilon = 0.3  # Radius of the ball, in pixel units ([0, 1] images); MNIST's standard is 0.3 (linf).
  c.adversarial.eval_steps = 40  # PGD steps of the eval attack (1 with eval_step_size = epsilon and no random start is FGSM).
  c.adversarial.eval_step_size = 0.01  # Step of the eval attack (Madry's MNIST: 0.01 for 40-100 steps).
  c.adversarial.restarts = 1  # Random restarts of the eval attack; each example keeps its worst.
  c.adversarial.random_start = True  # Start each attack at a uniform point of the ball (else at the input).
  c.adversarial.train_steps = 7  # pgd training: steps per batch (fgsm_rs and n_fgsm always take 1).
  c.adversarial.train_step_size = -1.0  # Training step; -1: 2.5 epsilon / train_steps (pgd), 1.25 epsilon (fgsm_rs), epsilon (n_fgsm).
  c.adversarial.train_noise = 2.0  # n_fgsm: the start is uniform within train_noise * epsilon, so inputs reach (train_noise + 1) epsilon.
  c.adversarial.epsilon_warmup_steps = 0  # Training: epsilon (with its step and noise) grows linearly from 0 over these first steps.

  # --- fairness (tasks/fairness.py, trust/training/fairness.py): groups at eval and in the loss ---
  # Sagawa et al. 2020: Group DRO helps unseen data only with strong L2 (regularization.l2 or
  # weight_decay) or early stopping on worst_group_accuracy; otherwise every group's training
  # loss reaches zero and it trains as ERM does.
  c.fairness = ml_collections.ConfigDict()
  c.fairness.group = ''  # Feature that groups examples (FSDD: speaker, accent, gender; classification: label or a TFDS ClassLabel); '' off.
  c.fairness.mitigation = 'none'  # 'none', 'reweight' (inverse group frequency) or 'group_dro' (Sagawa et al. 2020).
  c.fairness.dro_step_size = 0.01  # Group DRO's eta: q_g <- q_g exp(eta loss_g) every step; larger reacts faster.
  c.fairness.dro_adjustment = 0.0  # Group DRO's C: q sees loss_g + C / sqrt(n_g), favouring small groups that generalise worse.

  # --- export (export.py): each artifact is checked against the JAX model on held-out data ---
  c.export = ml_collections.ConfigDict()
  c.export.calibration_batches = 8  # Training batches that calibrate int8 activation ranges.
  c.export.max_eval_examples = 0  # Held-out examples each artifact is scored on; 0 = the whole split.
  c.export.latency_runs = 100  # Single-example calls timed for the latency p50/p99.
  # Lowest share of held-out examples (tokens, anchors) whose predicted label matches JAX's.
  c.export.min_agreement = ml_collections.ConfigDict({
      'jax': 1.0, 'saved_model': 0.999, 'tflite': 0.999, 'onnx': 0.999, 'tflite_fp16': 0.99,
      'tflite_dynamic': 0.97, 'tflite_int8': 0.95, 'jax_int8': 0.97, 'jax_int8_dynamic': 0.97,
      'jax_int8_static': 0.95, 'jax_bf16': 0.98, 'jax_fp16': 0.99})

  c.profile = ml_collections.ConfigDict()
  c.profile.first_step = 10  # First step of the profiler trace (TensorBoard's profile tab).
  c.profile.num_steps = 0  # Steps traced from first_step; 0 disables profiling.

  c.backend = ml_collections.ConfigDict()
  # Kiln's compiled CPU kernels (attention, dropout bits, convolutions; backends/cpu/): 'auto'
  # uses them on a CPU backend when they build, 'xla' never (plain XLA), 'cpu' always.
  c.backend.cpu_kernels = 'auto'

  c.compilation_cache_dir = '~/.cache/kiln/jax'  # Persistent XLA compilation cache; '' disables it.
  return c
