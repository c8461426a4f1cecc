"""The ResNet family as Flax linen modules."""

from resnet_jax.models.registry import MODELS, create_model, list_models
from resnet_jax.models.resnet import ResNet

__all__ = ["MODELS", "ResNet", "create_model", "list_models"]
