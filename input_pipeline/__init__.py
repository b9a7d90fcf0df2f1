"""Host-side data: sources -> tf.data -> per-host numpy batches.

TensorFlow is only a CPU data engine here: it must never claim an accelerator
that JAX needs, so GPUs are hidden from it before any dataset is built.
"""

import tensorflow as tf

tf.config.set_visible_devices([], 'GPU')
