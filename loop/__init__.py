"""The training loop: experiment, state, jitted steps, checkpoints, early stopping, the run."""
