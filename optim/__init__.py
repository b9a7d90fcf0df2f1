"""Optax chains built from config.optimizer and config.schedule."""

from optim.factory import OPTIMIZERS, SCHEDULES, build_optimizer, build_schedule

__all__ = ['OPTIMIZERS', 'SCHEDULES', 'build_optimizer', 'build_schedule']
