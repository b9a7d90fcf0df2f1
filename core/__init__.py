"""What the training loop is made of: state, steps, checkpoints, user-facing errors."""
