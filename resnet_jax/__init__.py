"""resnet-jax: the ResNet family in JAX/Flax, with training and gradient-theory analysis."""

from resnet_jax.models import ResNet, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ResNet", "__version__", "create_model", "list_models"]
