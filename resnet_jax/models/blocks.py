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

from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

ModuleDef = Any

# He et al. (2015) initialisation as torchvision applies it: N(0, 2 / fan_out), untruncated.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nn.Conv):
    """Bias-free conv with torch-style symmetric padding k // 2 and He (fan_out) init.

    Explicit padding matters: "SAME" pads stride-2 convs asymmetrically, which shifts every
    downsampled feature map by one pixel against the published (Torch/Caffe) models. The convolution
    itself is flax's field ``conv_general_dilated`` (default: `lax.conv_general_dilated`).
    """

    use_bias: bool = False
    kernel_init: Callable = he_normal_fan_out


# Batch norm as torch's BatchNorm2d: flax's momentum weighs the old statistics (torch's momentum 0.1).
BatchNorm = partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)
# Keras' ResNets (keras.applications) normalise with epsilon 1.001e-5.
KerasBatchNorm = partial(BatchNorm, epsilon=1.001e-5)


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
    inner_width: int | None = None  # channels between a basic branch's convs (None: ``width``; channel pruning)
    bare_conv: ModuleDef | None = None  # the last conv of a pre-activation branch, which no norm follows (None: conv)

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
        inner = self.inner_width or self.width
        y = self.conv(**conv_args(inner, 3, self.strides, feature_group_count=self.groups), name="conv1")(x)
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
        return (branch.bare_conv or branch.conv)(**conv_kwargs, **init, name=f"conv{index}")(y)
    y = branch.conv(**conv_kwargs, name=f"conv{index}")(y)
    scale_init = nn.initializers.zeros if zero else nn.initializers.ones
    return branch.norm(scale_init=scale_init, name=f"bn{index}")(y)


def _maybe_squeeze_excite(branch: nn.Module, y: jax.Array) -> jax.Array:
    if branch.se_reduction is None:
        return y
    return SqueezeExcite(branch.se_reduction, dtype=y.dtype, name="se")(y)


class PadShortcut(nn.Module):
    """Shortcut "A" (He et al. 2015): subsample by the stride and zero-pad the new channels. No parameters.

    The input's channels stay first; the added channels are zeros, so the map P is an identity
    embedding followed by subsampling.
    """

    features: int
    strides: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # A strided slice, not x[:, ::s, ::s]: with a symbolic batch size (exported models) indexing becomes a gather.
        x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.strides, self.strides, 1))
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))


class ProjectionShortcut(nn.Module):
    """Shortcuts "B" and "C": a strided 1x1 conv, followed by BN in post-activation blocks."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    preact: bool = False
    bare_conv: ModuleDef | None = None  # the conv when no norm follows it (pre-activation; None: conv)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = (self.bare_conv or self.conv) if self.preact else self.conv
        x = conv(**conv_args(self.features, 1, self.strides), name="conv")(x)
        return x if self.preact else self.norm(name="bn")(x)


class ResidualBlock(nn.Module):
    """One block: ``branch`` (a `BasicBranch`/`BottleneckBranch` partial) joined to a shortcut.

    ``shortcut`` is "A", "B" or "C" (He et al. 2015), or "B_subsample": a projection where the width changes and
    the input subsampled by the stride where only the size does (Keras' ResNetV2). ``skip_connection=False``
    drops the shortcut (the plain networks of the degradation experiments). With ``mutable=["intermediates"]`` the
    block sows its ``input``, the ``branch_output`` F, the shortcut's value ``skip`` (blocks with a
    skip connection) and its ``output``: y = relu(skip + branch_output), or skip + branch_output if
    preact. (A sown value cannot share the name of the submodule ``branch``.)

    ``drop_path_rate`` > 0 with ``deterministic=False`` is stochastic depth (`drop_path`): the sown
    ``branch_output`` is then the branch as dropped and rescaled, the one added to the skip.
    """

    branch: ModuleDef
    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "B"
    preact: bool = False
    skip_connection: bool = True
    drop_path_rate: float = 0.0
    deterministic: bool = True  # False in training: the branch is dropped at drop_path_rate
    bare_conv: ModuleDef | None = None  # the conv of a pre-activation projection, which no norm follows (None: conv)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        self.sow("intermediates", "input", x)
        branch_input = nn.relu(self.norm(name="preact_bn")(x)) if self.preact else x
        f = self.branch(name="branch")(branch_input)
        if self.drop_path_rate > 0 and not self.deterministic:
            f = drop_path(f, self.drop_path_rate, self.make_rng(DROP_PATH_RNG))
        self.sow("intermediates", "branch_output", f)
        y = f
        if self.skip_connection:
            shortcut = self._shortcut(x, branch_input)
            self.sow("intermediates", "skip", shortcut)
            y = y + shortcut
        if not self.preact:
            y = nn.relu(y)
        self.sow("intermediates", "output", y)
        return y

    def _shortcut(self, x: jax.Array, preactivated: jax.Array) -> jax.Array:
        widens = x.shape[-1] != self.features
        reshapes = self.strides != 1 or widens
        projects = {"A": False, "B": reshapes, "B_subsample": widens, "C": True}[self.shortcut]
        if projects:
            projection = ProjectionShortcut(
                self.features, self.strides, self.conv, self.norm, self.preact, self.bare_conv, name="shortcut"
            )
            return projection(preactivated)
        if reshapes:
            return PadShortcut(self.features, self.strides, name="shortcut")(x)
        return x


DROP_PATH_RNG = "drop_path"  # the rng stream of stochastic depth: apply(..., rngs={DROP_PATH_RNG: key})


def drop_path(branch: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): each example's residual branch dropped with probability ``rate``
    and, where kept, scaled by 1 / (1 - rate), so that its expectation is the branch itself.

    Huang et al. keep the branch as it is in training and scale it by the survival probability at test
    time; scaling the kept branches in training instead ("inverted", as timm's DropPath does) computes
    the same expectation and leaves the test-time model exactly the model without stochastic depth: a
    checkpoint evaluates, exports, folds BN and is analysed with no knowledge of its training rate.
    """
    keep = 1.0 - rate
    kept = jax.random.bernoulli(key, keep, (branch.shape[0],) + (1,) * (branch.ndim - 1))
    return jnp.where(kept, branch / jnp.asarray(keep, branch.dtype), jnp.zeros((), branch.dtype))
