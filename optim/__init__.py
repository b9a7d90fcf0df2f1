"""Optax chains built from config.optimizer and config.schedule."""

from optim.factory import build_optimizer, build_schedule

__all__ = ['build_optimizer', 'build_schedule']
