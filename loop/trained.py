"""A trained model back from a run's workdir, ready to call eagerly (notebooks, sampling)."""

from absl import logging
from flax import nnx

from loop import experiment as experiment_lib
from loop.checkpoint import Checkpointer
from core.errors import KilnError


def load_model(config, workdir: str, exp: experiment_lib.Experiment | None = None
               ) -> tuple[nnx.Module, experiment_lib.Experiment, int]:
  """(model with the newest checkpoint's parameters, the experiment `config` builds, step).
  A LoRA run's model is the plain one with its adapters merged (compress.lora.merge).

  `config` must be the one the run trained with: it rebuilds the data (and so the
  model's sizes, e.g. the vocabulary) and the state layout. The EMA parameters are used
  when the run kept them and evaluated with them. `exp` reuses an experiment already built.
  """
  exp = exp or experiment_lib.build_experiment(config)
  checkpointer = Checkpointer(workdir, keep=1)
  try:
    step = checkpointer.latest_step()
    if step is None:
      raise KilnError(f"no checkpoint in '{workdir}/checkpoints': train there first with "
                      'train.py (or train_and_evaluate)')
    state, shardings = exp.create_state()
    state, _ = checkpointer.restore(step, exp.strategy.checkpoint_view(state),
                                    exp.strategy.restore_shardings(shardings))
  finally:
    checkpointer.close()
  use_ema = state.ema_params is not None and config.ema.use_for_eval
  params = state.ema_params if use_ema else state.params
  if exp.lora is not None:  # LoRA: adapters folded into plain kernels (the model without LoRA).
    params = exp.lora.merge(params, state.lora)
  logging.info('Loaded step %d from %s', step, workdir)
  return exp.template.merge(params, state.model_state), exp, step
