"""Small image-like test inputs shared by the analysis tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def smooth_images(count: int, size: int = 8, seed: int = 3) -> jax.Array:
    """A blurred random field (count, size, size, 1), so that ReLU masks are neither empty nor full."""
    noise = np.random.default_rng(seed).standard_normal((count, size + 2, size + 2, 1), np.float32)
    return jnp.asarray(sum(noise[:, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3)
