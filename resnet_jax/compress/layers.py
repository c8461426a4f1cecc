"""The convolutions a compressed model is built with, passed to `resnet_jax.models.ResNet` as its ``conv``.

`QuantizedConv` holds an int8 kernel with one scale per output channel and the calibrated scale of its input.
Its arithmetic is "int8" (int8 operands, int32 accumulation through ``preferred_element_type``: the integer
convolution XLA runs on the CPU) or "float" (the same int8 values convolved in float32, for a backend without
integer convolutions). The two agree: every product and partial sum is an integer far below 2**24, exact in
float32, and both scale the sum once. `FakeQuantConv` trains float weights through the same rounding
(quantization-aware fine-tuning). `CalibratingConv` is the float conv that records its inputs for calibration.
`FactorizedConv` is a conv whose kernel `resnet_jax.compress.lowrank` factorised: a k-filter conv of the original
size and stride, then a 1x1 conv to the output channels, each a `Conv` of its own (so that parameter and
multiply-add counts see both).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from resnet_jax.compress.numerics import channel_scales, dequantize, fake_quant, quantize
from resnet_jax.models.blocks import Conv, ModuleDef

ARITHMETICS = ("int8", "float")
CALIBRATION_INPUT = "conv_input"  # the name under "intermediates" of the inputs `CalibratingConv` records


class QuantizedConv(Conv):
    """A bias-free conv of int8 ``kernel`` (scales ``kernel_scale``, one per output channel) on its input
    quantized with the one scale ``input_scale``; the output is float, the int32 sum times both scales."""

    arithmetic: str = "int8"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"arithmetic={self.arithmetic!r}; choose one of {ARITHMETICS}.")
        in_features = inputs.shape[-1] // self.feature_group_count
        shape = (*self.kernel_size, in_features, self.features)
        kernel = self.param("kernel", nn.initializers.zeros, shape, jnp.int8)
        kernel_scale = self.param("kernel_scale", nn.initializers.ones, (self.features,), jnp.float32)
        input_scale = self.param("input_scale", nn.initializers.ones, (), jnp.float32)
        x = quantize(inputs.astype(jnp.float32), input_scale)
        convolve = partial(
            lax.conv_general_dilated,
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count,
        )
        if self.arithmetic == "int8":
            sums = convolve(x, kernel, preferred_element_type=jnp.int32)
        else:
            sums = convolve(x.astype(jnp.float32), kernel.astype(jnp.float32))
        return dequantize(sums, input_scale * kernel_scale).astype(self.dtype or jnp.float32)


class FakeQuantConv(Conv):
    """A float conv that rounds its input (with its calibrated scale, found by module path in ``input_scales``) and
    its kernel (per output channel) to their int8 grids in the forward pass, with straight-through gradients:
    quantization-aware training of the weights that `QuantizedConv` will hold."""

    input_scales: tuple[tuple[str, float], ...] = ()

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        in_features = inputs.shape[-1] // self.feature_group_count
        shape = (*self.kernel_size, in_features, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        input_scale = jnp.float32(dict(self.input_scales)["/".join(self.scope.path)])
        return lax.conv_general_dilated(
            fake_quant(inputs.astype(jnp.float32), input_scale),
            fake_quant(kernel.astype(jnp.float32), lax.stop_gradient(channel_scales(kernel))),
            window_strides=self.strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count,
        ).astype(self.dtype or jnp.float32)


class CalibratingConv(Conv):
    """`Conv` that also records its input under "intermediates" (`CALIBRATION_INPUT`)."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        self.sow("intermediates", CALIBRATION_INPUT, inputs)
        return super().__call__(inputs)


class FactorizedConv(nn.Module):
    """A conv factorised where ``ranks`` (pairs of a module path joined by "/" and its rank k) names it: a
    k-filter conv ("basis") then a 1x1 conv ("combine"); elsewhere one whole conv ("full"). ``conv`` is the conv
    module they are made of."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    feature_group_count: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    ranks: tuple[tuple[str, int], ...] = ()
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        conv = partial(self.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        rank = dict(self.ranks).get("/".join(self.scope.path))
        layout = dict(kernel_size=self.kernel_size, strides=self.strides, padding=self.padding)
        if rank is None:
            return conv(self.features, feature_group_count=self.feature_group_count, name="full", **layout)(inputs)
        basis = conv(rank, name="basis", **layout)(inputs)
        return conv(self.features, kernel_size=(1, 1), name="combine")(basis)


def compressed_conv(config: ml_collections.ConfigDict, conv: ModuleDef) -> ModuleDef:
    """The conv of a run of ``config``: a quantized run's (``config.quantize``, written by ``resnet-jax quantize``),
    a factorised run's (``config.lowrank``, by ``resnet-jax lowrank``) or else ``conv``, the one the run would
    compute with uncompressed."""
    settings = config.get("quantize")
    if settings is not None and settings.arithmetic == "fake":  # quantization-aware fine-tuning
        return partial(FakeQuantConv, input_scales=tuple((path, float(s)) for path, s in settings.input_scales))
    if settings is not None:
        return partial(QuantizedConv, arithmetic=settings.arithmetic)
    if config.get("lowrank") is not None:
        return partial(FactorizedConv, ranks=tuple((path, int(rank)) for path, rank in config.lowrank.ranks), conv=conv)
    return conv
