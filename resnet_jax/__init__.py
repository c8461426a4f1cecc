"""resnet-jax: the ResNet family in JAX/Flax, with training and gradient-theory analysis."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ResNet", "__version__", "create_model", "list_models"]


def __getattr__(name: str) -> Any:
    # The models (and so JAX) load on first use, not with the package: `resnet-jax` imports its commands first,
    # so that a Ctrl-C while JAX loads reaches the command line's handler instead of printing a traceback.
    if name in ("ResNet", "create_model", "list_models"):
        from resnet_jax import models

        return getattr(models, name)
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
