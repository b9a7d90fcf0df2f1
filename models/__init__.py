"""Flax NNX modules only: no losses, no data, no optimizers."""

from models.registry import IMAGE_CLASSIFIERS, MODELS, create_model, register_model

__all__ = ['IMAGE_CLASSIFIERS', 'MODELS', 'create_model', 'register_model']
