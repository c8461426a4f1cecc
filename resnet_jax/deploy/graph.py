"""A model's eval-mode forward pass as one lowered program, and the ops it holds (counted the same way for any
model, before XLA's fusion)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import jax

from resnet_jax.models import ResNet

OP = re.compile(r"=\s*\"?(stablehlo\.[a-z_]+)")


def lower_forward(model: ResNet, variables: dict[str, Any], images: Any) -> jax.stages.Lowered:
    """The eval-mode logits of ``model`` on arrays shaped like ``images``, lowered (``.compile()`` runs it)."""

    def forward(variables: dict[str, Any], images: jax.Array) -> jax.Array:
        return model.apply(variables, images, train=False)[0]

    return jax.jit(forward).lower(variables, images)


def op_counts(lowered: jax.stages.Lowered) -> Counter[str]:
    """How many of each StableHLO op a lowered program holds."""
    return Counter(OP.findall(lowered.as_text()))
