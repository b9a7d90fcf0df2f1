"""Flax NNX modules only: no losses, no data, no optimizers."""

from models.registry import MODELS, create_model, register_model

__all__ = ['MODELS', 'create_model', 'register_model']
