"""Batch norm folded into the convolutions: an inference model with no ``batch_stats``.

In eval mode a batch norm is a per-channel affine map, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so
where it directly follows a conv it folds into that conv: the kernel's output channels scale by
``s = gamma / sqrt(var + eps)`` and the conv gains the bias ``beta - mean * s``. A norm whose input is not a
conv's output cannot fold into one: in pre-activation blocks the norm reads the sum of the block's branch and
shortcut (``preact_bn``) and the last stage's output (``final_bn``), and a ReLU stands between it and the next
conv. Those stay, as the per-channel affine map alone (`AffineNorm`), which is cheaper than a batch norm (no
statistics, square root or division at run time).

Which conv a norm follows is read off the names every block uses: ``bn`` follows ``conv`` and ``bnK`` follows
``convK`` in the same module (stem, branch, projection shortcut). A low-rank run's `FactorizedConv` is a conv of
its own convs: its norm folds into the last of them (the 1x1 "combine", or the "full" conv where the kernel was kept
whole), which is linear like any conv. A quantized run's int8 kernels are refused: a norm's scale would move them off
their integers (`resnet_jax.deploy.quantized` dequantizes them first where a format quantizes anew).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.compress.layers import FactorizedConv, FakeQuantConv, QuantizedConv
from resnet_jax.models import ResNet
from resnet_jax.models.blocks import Conv

Variables = dict[str, Any]


class AffineNorm(nn.Module):
    """A folded batch norm that no conv could absorb: ``x * scale + bias`` per channel.

    Takes the arguments `ResNet` gives its norm (``use_running_average``, ``scale_init``, ...) and ignores the
    ones that only a batch norm needs. A norm folded into its conv has no parameters: it is the identity.
    """

    use_running_average: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.has_variable("params", "scale"):
            return x
        scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def folded_model(model: ResNet) -> ResNet:
    """``model``'s architecture with biased convs and `AffineNorm` norms: what `fold_batch_norm` variables run in.

    The conv is the plain `Conv` (``lax.conv_general_dilated``), the form every exporter and runtime reads, or a
    `FactorizedConv` of such convs where ``model``'s is one. A post-activation ImageNet stem pads its max-pool with
    zeros: after its ReLU they give the same maximum as -inf, and int8 TFLite can quantize them (a -inf constant
    makes its runtime abort).
    """
    conv = partial(Conv, use_bias=True)
    if _conv_class(model) is FactorizedConv:
        conv = partial(FactorizedConv, ranks=model.conv.keywords.get("ranks", ()), conv=conv)
    zero_pad = {} if model.preact else {"stem_pool_pad_value": 0.0}
    return model.clone(conv=conv, norm=AffineNorm, **zero_pad)


def _conv_class(model: ResNet) -> type:
    """The module class of ``model``'s conv (through any `functools.partial`)."""
    conv = model.conv
    while isinstance(conv, partial):
        conv = conv.func
    return conv


def fold_batch_norm(model: ResNet, variables: Variables) -> tuple[ResNet, Variables]:
    """The inference model and variables of a trained ``model``: every batch norm folded into the conv before it
    (or, where none is, into a per-channel affine map). Its logits equal ``model``'s in eval mode.

    ``variables`` holds ``params`` and ``batch_stats``; the result holds ``params`` alone.
    """
    if issubclass(_conv_class(model), (QuantizedConv, FakeQuantConv)):
        raise ValueError(
            "This model's convs are quantized: folding a batch norm into its int8 kernels would move them off their "
            "integers. Keep its batch norm, or dequantize the kernels first (resnet_jax.deploy.quantized)."
        )
    if "batch_stats" not in variables:
        raise ValueError(
            "These variables have no batch_stats: they are folded already, or belong to a model without batch norm."
        )
    epsilon = float(model.norm(use_running_average=True).epsilon)
    params = jax.tree.map(np.asarray, jax.device_get(variables["params"]))
    stats = jax.tree.map(np.asarray, jax.device_get(variables["batch_stats"]))
    return folded_model(model), {"params": _fold_module(params, stats, epsilon)}


def _fold_module(params: dict[str, Any], stats: dict[str, Any], epsilon: float) -> dict[str, Any]:
    """One module's folded parameters: its convs absorb their norms; submodules fold recursively."""
    folded: dict[str, Any] = {}
    for name, value in params.items():
        if name in stats and "mean" in stats[name]:
            continue  # a norm: folded below
        if _is_conv(name, value):
            folded[name] = _with_bias(value)
        elif _is_factorized(name, value):
            folded[name] = {part: _with_bias(conv) for part, conv in value.items()}
        elif isinstance(value, dict) and "kernel" not in value:
            folded[name] = _fold_module(value, stats.get(name, {}), epsilon)
        else:
            folded[name] = value
    for name, norm_stats in stats.items():
        if "mean" not in norm_stats:
            continue
        scale, shift = _norm_affine(params.get(name, {}), norm_stats, epsilon)
        owner, key = _absorbing_conv(folded, params, _conv_of(name))
        if owner is not None:
            kernel, bias = owner[key]["kernel"], owner[key]["bias"]
            dtype = kernel.dtype
            owner[key] = {"kernel": (kernel * scale).astype(dtype), "bias": (bias * scale + shift).astype(dtype)}
        else:
            dtype = norm_stats["mean"].dtype
            folded[name] = {"scale": scale.astype(dtype), "bias": shift.astype(dtype)}
    return folded


def _is_conv(name: str, value: Any) -> bool:
    return name.startswith("conv") and isinstance(value, dict) and getattr(value.get("kernel"), "ndim", 0) == 4


def _is_factorized(name: str, value: Any) -> bool:
    """A `FactorizedConv`'s parameters: its "full" conv, or its "basis" and "combine" convs."""
    if not (name.startswith("conv") and isinstance(value, dict) and set(value) in ({"full"}, {"basis", "combine"})):
        return False
    return all(_is_conv("conv", part) for part in value.values())


def _absorbing_conv(folded: dict[str, Any], params: dict[str, Any], conv: str) -> tuple[dict[str, Any] | None, str]:
    """Where the norm after the conv named ``conv`` folds: the dict holding that conv's folded parameters and their
    key (for a `FactorizedConv`, its last conv), or None where no conv of that name precedes the norm."""
    if conv not in folded:
        return None, ""
    if _is_conv(conv, params[conv]):
        return folded, conv
    if _is_factorized(conv, params[conv]):
        return folded[conv], "full" if "full" in folded[conv] else "combine"
    return None, ""


def _with_bias(conv: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    kernel = conv["kernel"]
    return {"kernel": kernel, "bias": conv.get("bias", np.zeros(kernel.shape[-1], kernel.dtype))}


def _conv_of(norm_name: str) -> str:
    """The conv a norm follows in the same module: ``bn`` -> ``conv``, ``bn2`` -> ``conv2``."""
    return "conv" + norm_name.removeprefix("bn") if norm_name.startswith("bn") else ""


def _norm_affine(norm_params: dict[str, Any], stats: dict[str, Any], epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The eval-mode batch norm as ``x * scale + shift``, computed in float64 so that folding adds no error."""
    mean, var = stats["mean"].astype(np.float64), stats["var"].astype(np.float64)
    gamma = norm_params.get("scale", np.ones_like(mean)).astype(np.float64)
    beta = norm_params.get("bias", np.zeros_like(mean)).astype(np.float64)
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale
