"""Dynamic loss scaling for float16 training (bfloat16 needs none: it has float32's exponent range).

The loss is multiplied by ``scale`` before differentiation so small fp16 gradients do not flush to
zero; gradients are divided by it afterwards. A step whose gradients are not finite is skipped and
the scale halved; after ``period`` finite steps in a row the scale doubles.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


class DynamicLossScale(struct.PyTreeNode):
    scale: jax.Array
    finite_steps: jax.Array
    period: int = struct.field(pytree_node=False, default=2000)
    factor: float = struct.field(pytree_node=False, default=2.0)
    minimum: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, period: int = 2000) -> DynamicLossScale:
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32), period=period)

    def unscale(self, grads: Any) -> Any:
        return jax.tree.map(lambda g: g / self.scale.astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        """The scale for the next step, given whether this step's gradients were finite."""
        grow = self.finite_steps + 1 >= self.period
        scale = jnp.where(
            grads_finite,
            jnp.where(grow, self.scale * self.factor, self.scale),
            jnp.maximum(self.scale / self.factor, self.minimum),
        )
        finite_steps = jnp.where(grads_finite & ~grow, self.finite_steps + 1, 0)
        return self.replace(scale=scale, finite_steps=finite_steps)


def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
