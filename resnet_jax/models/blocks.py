"""Residual blocks: a residual branch F, a shortcut, and the rule that joins them.

Every block is a `ResidualBlock` holding its branch as the submodule ``branch`` and, where the
shortcut has layers or changes the shape, the submodule ``shortcut``. Keeping F and the shortcut
as separate submodules is what lets the analysis tools gate, delete or differentiate either part
(through ``nn.intercept_methods``) without a second copy of the model code.

Post-activation (He et al. 2015):  y = relu(shortcut(x) + F(x))
Pre-activation (He et al. 2016):   a = relu(bn(x));  y = shortcut(x or a) + F(a)
Plain (no shortcut):               y = relu(F(x))  or  y = F(a)
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

ModuleDef = Any

# He et al. (2015) initialisation as torchvision applies it: N(0, 2 / fan_out), untruncated.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def materialize_on_cpu(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed once into its own buffer when compiled for CPU (elsewhere: ``x``).

    XLA:CPU fuses the cheap elementwise ops that produce a conv input (BN, ReLU, the residual add and,
    through the identity shortcuts, those of all earlier blocks of the stage) into every consumer,
    and the weight gradient of each conv transposes its input: each transpose recomputed that chain.
    Its fusion never duplicates a division, so dividing by 1.0 computed at run time (a constant would
    be folded away) makes the value a buffer of its own; x / 1.0 == x exactly. This took the CPU
    time of a ResNet-20 train step down by a quarter (benchmarks/README.md).
    """

    def divide_by_one(x: jax.Array) -> jax.Array:
        finite = jnp.isfinite(lax.stop_gradient(x.ravel()[0]))
        return x / (1 + 0 * finite.astype(x.dtype))  # 1.0 for any x, unknown to the compiler

    return lax.platform_dependent(x, cpu=divide_by_one, default=lambda x: x)


# Images per kernel-gradient convolution on CPU (`conv_general_dilated`): measured fastest of 2-32.
KERNEL_GRAD_CHUNK = 8
# XLA:CPU runs a convolution with at most this many input and output features on Eigen, with more on YNNPACK.
EIGEN_MAX_FEATURES = 16
NHWC = ("NHWC", "HWIO", "NHWC")
CONV_SIGNATURE = inspect.signature(lax.conv_general_dilated)


_programs_at_once = contextvars.ContextVar("programs_at_once", default=1)


@contextlib.contextmanager
def programs_at_once(count: int) -> Iterator[None]:
    """Trace programs that will run ``count`` at a time on this thread's cores (the batch parts of
    parallelism "threads"), so that each gets the convolutions of its share of the cores."""
    token = _programs_at_once.set(count)
    try:
        yield
    finally:
        _programs_at_once.reset(token)


def cores_per_program() -> float:
    """The cores a program traced here will have: this thread's (its affinity on Linux, where `--cpu-processes`
    pins; else all) shared by the programs running at once (`programs_at_once`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores / _programs_at_once.get()


def column_pairs_eligible(lhs: jax.Array, rhs: jax.Array, options: inspect.BoundArguments) -> bool:
    """Whether `conv_over_column_pairs` should compute this convolution: NHWC, 3x3, stride 1, padding 1, no
    dilation or groups, an even width, few enough channels that XLA:CPU would run it on Eigen, and a program with
    one core or less (a process of `--cpu-processes`, a batch part of parallelism "threads"): with two threads
    Eigen's convolution was as fast (+2% for pairs)."""
    if cores_per_program() > 1:
        return False
    o = options.arguments
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC) if lhs.ndim == rhs.ndim == 4 else None
    return (
        nhwc is not None
        and o["dimension_numbers"] is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, o["dimension_numbers"]) == nhwc
        and rhs.shape[:2] == (3, 3)
        and max(rhs.shape[2:]) <= EIGEN_MAX_FEATURES
        and lhs.shape[2] % 2 == 0
        and tuple(o["window_strides"]) == (1, 1)
        and not isinstance(o["padding"], str)
        and tuple(map(tuple, o["padding"])) == ((1, 1), (1, 1))
        and tuple(o["lhs_dilation"] or (1, 1)) == tuple(o["rhs_dilation"] or (1, 1)) == (1, 1)
        and o["feature_group_count"] == o["batch_group_count"] == 1
    )


def column_pairs_kernel(kernel: jax.Array) -> jax.Array:
    """3x3 taps (3, 3, C, D) as a kernel over pairs of columns, (3, 2, 2C, 2D).

    Input pair k holds columns (2k-1, 2k) of the image padded by a column either side, output pair j columns
    (2j, 2j+1); input column 2k-1+a reaches output column 2j+b through tap 2(k-j)+a-b, and the blocks whose tap
    falls outside 0..2 are zero (6 of 24: 4/3 the arithmetic of the 3x3 convolution).
    """
    d, a, b = np.meshgrid(range(2), range(2), range(2), indexing="ij")
    taps = jnp.pad(kernel, ((0, 0), (1, 1), (0, 0), (0, 0)))[:, 2 * d + a - b + 1]  # (3, d, a, b, C, D)
    height, _, channels, features = kernel.shape
    return taps.transpose(0, 1, 2, 4, 3, 5).reshape(height, 2, 2 * channels, 2 * features)


def conv_over_column_pairs(lhs: jax.Array, rhs: jax.Array, precision: Any = None) -> jax.Array:
    """A 3x3, stride-1, padding-1 NHWC convolution computed over pairs of columns with twice the channels.

    XLA:CPU runs convolutions of at most 16 channels on Eigen at about half the speed YNNPACK reaches on wider
    ones (benchmarks/README.md); as pairs, the 16-channel convs of a CIFAR ResNet's first stage run on YNNPACK.
    Pairing columns is a free reshape in NHWC. Values change only by summation order.
    """
    batch, height, width, channels = lhs.shape
    pairs = jnp.pad(lhs, ((0, 0), (0, 0), (1, 1), (0, 0))).reshape(batch, height, width // 2 + 1, 2 * channels)
    kernel = column_pairs_kernel(rhs)
    out = lax.conv_general_dilated(pairs, kernel, (1, 1), ((1, 1), (0, 0)), dimension_numbers=NHWC, precision=precision)
    return out.reshape(batch, height, width, rhs.shape[-1])


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated`, made for XLA:CPU: ``lhs`` is a buffer of its own (`materialize_on_cpu`),
    the kernel's gradient is a sum over convolutions of `KERNEL_GRAD_CHUNK` images at a time, and the
    forward pass of a narrow 3x3 convolution runs over pairs of columns (`conv_over_column_pairs`).

    XLA:CPU computes a kernel gradient as one convolution whose "kernel" is the whole output gradient;
    over a batch of 128 CIFAR images that runs at about half the speed of the same work done 8
    images at a time, which stays in cache (benchmarks/README.md). The values are unchanged up to
    summation order, and elsewhere than on a CPU the convolution and its gradients are XLA's own.
    It is a `jax.custom_jvp`, so forward mode (the Jacobian analysis) works too.
    """

    def conv(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

    options = CONV_SIGNATURE.bind(lhs, rhs, *args, **kwargs)
    options.apply_defaults()
    forward = conv
    if column_pairs_eligible(lhs, rhs, options):
        pairs = partial(conv_over_column_pairs, precision=options.arguments["precision"])
        forward = partial(lax.platform_dependent, cpu=pairs, default=conv)

    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, options.arguments["dimension_numbers"])
    lhs_batch, out_batch = numbers.lhs_spec[0], numbers.out_spec[0]

    def kernel_tangent_in_chunks(lhs: jax.Array, rhs_dot: jax.Array) -> jax.Array:
        size = lhs.shape[lhs_batch]
        chunks = [
            conv(lax.slice_in_dim(lhs, start, min(start + KERNEL_GRAD_CHUNK, size), axis=lhs_batch), rhs_dot)
            for start in range(0, size, KERNEL_GRAD_CHUNK)
        ]
        return lax.concatenate(chunks, out_batch)

    @jax.custom_jvp
    def convolve(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return forward(lhs, rhs)

    @partial(convolve.defjvp, symbolic_zeros=True)
    def convolve_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> tuple[jax.Array, jax.Array]:
        (lhs, rhs), (lhs_dot, rhs_dot) = primals, tangents
        out = forward(lhs, rhs)
        terms = []
        if not isinstance(lhs_dot, SymbolicZero):
            terms.append(conv(lhs_dot, rhs))
        if not isinstance(rhs_dot, SymbolicZero):
            # Linear in rhs_dot, so reverse mode transposes each chunk into one chunk's kernel gradient.
            terms.append(lax.platform_dependent(lhs, rhs_dot, cpu=kernel_tangent_in_chunks, default=conv))
        tangent = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)
        return out, tangent

    return convolve(materialize_on_cpu(lhs), rhs)


class Conv(nn.Conv):
    """Bias-free conv with torch-style symmetric padding k // 2 and He (fan_out) init.

    Explicit padding matters: "SAME" pads stride-2 convs asymmetrically, which shifts every
    downsampled feature map by one pixel against the published (Torch/Caffe) models.
    """

    use_bias: bool = False
    kernel_init: Callable = he_normal_fan_out
    conv_general_dilated: Callable = conv_general_dilated


def conv_args(features: int, kernel: int, strides: int = 1, **kwargs: Any) -> dict[str, Any]:
    """Arguments of a square `Conv` with padding kernel // 2."""
    pad = kernel // 2
    return dict(
        features=features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=((pad, pad), (pad, pad)),
        **kwargs,
    )


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): channel gates from globally pooled features."""

    reduction: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        dense = partial(nn.Dense, dtype=self.dtype)
        s = jnp.mean(x, axis=(1, 2))
        s = nn.relu(dense(max(channels // self.reduction, 1), name="reduce")(s))
        s = nn.sigmoid(dense(channels, name="expand")(s))
        return x * s[:, None, None, :].astype(x.dtype)


class Branch(nn.Module):
    """What every residual function is configured with (set by `ResNet`; see its attributes)."""

    width: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    preact: bool = False
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    se_reduction: int | None = None
    zero_init_last: bool = False

    expansion: ClassVar[int] = 1


class BasicBranch(Branch):
    """Residual function of the basic block: two 3x3 convs.

    Post-activation: conv-BN-ReLU-conv-BN. Pre-activation: conv-BN-ReLU-conv (the block applies
    the leading BN-ReLU, shared with a projection shortcut).
    """

    expansion: ClassVar[int] = 1

    @staticmethod
    def grouped_width(width: int, groups: int, width_per_group: int) -> int:
        """Channels of the grouped 3x3 conv (only the plain width for basic blocks)."""
        return width

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(**conv_args(self.width, 3, self.strides, feature_group_count=self.groups), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = _last_layer(self, y, conv_args(self.width, 3, feature_group_count=self.groups), index=2)
        return _maybe_squeeze_excite(self, y)


class BottleneckBranch(Branch):
    """Residual function of the bottleneck: 1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand.

    The stride sits on the 3x3 conv (ResNet v1.5, torchvision) unless ``stride_in_1x1`` (v1, the
    original paper). The grouped width follows torchvision: int(width * width_per_group / 64) * groups.
    """

    expansion: ClassVar[int] = 4

    @staticmethod
    def grouped_width(width: int, groups: int, width_per_group: int) -> int:
        """Channels of the grouped 3x3 conv."""
        return int(width * width_per_group / 64) * groups

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.grouped_width(self.width, self.groups, self.width_per_group)
        s1, s3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
        y = self.conv(**conv_args(inner, 1, s1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(**conv_args(inner, 3, s3, feature_group_count=self.groups), name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = _last_layer(self, y, conv_args(self.width * self.expansion, 1), index=3)
        return _maybe_squeeze_excite(self, y)


def _last_layer(branch: nn.Module, y: jax.Array, conv_kwargs: dict[str, Any], index: int) -> jax.Array:
    """The branch's last conv (+ BN when post-activation); zero-initialised on request.

    Zero-init (Goyal et al. 2017) sets the last BN scale to 0, or for pre-activation branches,
    which end in a conv, the last conv kernel, so every block starts as the identity.
    """
    zero = branch.zero_init_last
    if branch.preact:
        init = {"kernel_init": nn.initializers.zeros} if zero else {}
        return branch.conv(**conv_kwargs, **init, name=f"conv{index}")(y)
    y = branch.conv(**conv_kwargs, name=f"conv{index}")(y)
    scale_init = nn.initializers.zeros if zero else nn.initializers.ones
    return branch.norm(scale_init=scale_init, name=f"bn{index}")(y)


def _maybe_squeeze_excite(branch: nn.Module, y: jax.Array) -> jax.Array:
    if branch.se_reduction is None:
        return y
    return SqueezeExcite(branch.se_reduction, dtype=y.dtype, name="se")(y)


class PadShortcut(nn.Module):
    """Option A (He et al. 2015): subsample by the stride and zero-pad the new channels. No parameters.

    The input's channels stay first; the added channels are zeros, so the map P is an identity
    embedding followed by subsampling.
    """

    features: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x[:, :: self.strides, :: self.strides, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))


class ProjectionShortcut(nn.Module):
    """Options B and C: a strided 1x1 conv, followed by BN in post-activation blocks."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    preact: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(**conv_args(self.features, 1, self.strides), name="conv")(x)
        return x if self.preact else self.norm(name="bn")(x)


class ResidualBlock(nn.Module):
    """One block: ``branch`` (a `BasicBranch`/`BottleneckBranch` partial) joined to a shortcut.

    ``shortcut`` is "A", "B" or "C" (He et al. 2015); ``residual=False`` drops the shortcut
    (the plain networks of the degradation experiments). With ``mutable=["intermediates"]`` the
    block sows its ``input``, the branch output ``residual``, the shortcut's value ``skip`` (residual
    blocks) and its ``output``: y = relu(skip + residual), or skip + residual if preact.
    """

    branch: ModuleDef
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "B"
    preact: bool = False
    residual: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self.sow("intermediates", "input", x)
        branch_input = nn.relu(self.norm(name="preact_bn")(x)) if self.preact else x
        f = self.branch(name="branch")(branch_input)
        self.sow("intermediates", "residual", f)
        y = f
        if self.residual:
            shortcut = self._shortcut(x, branch_input)
            self.sow("intermediates", "skip", shortcut)
            y = y + shortcut
        if not self.preact:
            y = nn.relu(y)
        self.sow("intermediates", "output", y)
        return y

    def _shortcut(self, x: jax.Array, preactivated: jax.Array) -> jax.Array:
        reshapes = self.strides != 1 or x.shape[-1] != self.features
        if self.shortcut == "C" or (reshapes and self.shortcut == "B"):
            projection = ProjectionShortcut(
                self.features, self.strides, self.conv, self.norm, self.preact, name="shortcut"
            )
            return projection(preactivated)
        if reshapes:
            return PadShortcut(self.features, self.strides, name="shortcut")(x)
        return x
