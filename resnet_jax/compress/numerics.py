"""Symmetric int8 quantization of arrays, and the calibration of an activation's range.

A value x with scale s is stored as q = clip(round(x / s), -127, 127): symmetric (no zero point, so that a product
of two quantized values needs no correction terms) and without -128 (so that -q is representable too). Weights get
one scale per output channel, the largest |w| of the channel over 127; an activation gets one scale per layer,
fixed from calibration images, as a static int8 model needs it before it sees its inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127
CALIBRATIONS = ("minmax", "percentile", "mse")
TINY = 1e-12  # the scale of an all-zero channel: any positive value dequantizes its zeros exactly


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` as int8 multiples of ``scale`` (broadcast against ``x``), clipped to [-127, 127]."""
    return jnp.clip(jnp.round(x / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale


def channel_scales(kernel: jax.Array) -> jax.Array:
    """One scale per output channel (the last axis): the channel's largest magnitude maps to 127."""
    absmax = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
    return jnp.maximum(absmax, TINY) / INT8_MAX


def fake_quant(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` rounded to its int8 grid in float, with a straight-through gradient (the identity's): what training
    with quantization in the loop differentiates."""
    return x + jax.lax.stop_gradient(dequantize(quantize(x, scale), scale) - x)


def calibrated_absmax(magnitudes: np.ndarray, method: str, percentile: float = 99.99) -> float:
    """The clipping range of an activation from a sample of its ``magnitudes`` (|x|, flat), by ``method``:

    - "minmax": the largest magnitude (nothing clipped; one outlier coarsens every step);
    - "percentile": that ``percentile`` of the magnitudes (clips the rarest outliers);
    - "mse": the range, among 100 fractions of the largest, whose int8 rounding of the sample has the least mean
      squared error (clipping traded against rounding).
    """
    magnitudes = np.asarray(magnitudes, np.float64).ravel()
    largest = float(magnitudes.max(initial=0.0))
    if largest == 0.0 or method == "minmax":
        return largest
    if method == "percentile":
        return float(np.percentile(magnitudes, percentile))
    if method == "mse":
        candidates = largest * np.linspace(0.01, 1.0, 100)
        errors = [_rounding_error(magnitudes, c / INT8_MAX) for c in candidates]
        return float(candidates[int(np.argmin(errors))])
    raise ValueError(f"calibration={method!r}; choose one of {CALIBRATIONS}.")


def _rounding_error(magnitudes: np.ndarray, scale: float) -> float:
    rounded = np.clip(np.round(magnitudes / scale), 0, INT8_MAX) * scale
    return float(np.mean((magnitudes - rounded) ** 2))
