"""One `ResNet` module for the whole family: ImageNet and CIFAR stems, v1/v1.5, pre-activation,
plain, wide, ResNeXt and squeeze-and-excitation variants are settings of it (see `registry`).

``model.apply(variables, images, train=...)`` returns ``(logits, features)``. ``features`` maps
"stem", one "c<l>" per stage (the stage output at stride 2**l: c2..c5 for ImageNet models,
c0..c2 for CIFAR ones) and "pre_logits" (the pooled vector the head reads).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.blocks import (
    DROP_PATH_RNG,
    BasicBranch,
    BatchNorm,
    BottleneckBranch,
    Conv,
    ModuleDef,
    ResidualBlock,
    conv_args,
)

BRANCHES = {"basic": BasicBranch, "bottleneck": BottleneckBranch}
SHORTCUTS = ("A", "B", "C", "B_subsample")
CONV_BIASES = ("none", "all", "unnormalized")  # which convs carry a bias (see `ResNet`)
DOWNSAMPLE_AT = ("first", "last")  # which block of a stage takes the stride (see `ResNet`)
STEMS = {"imagenet": 4, "cifar": 1}  # stem kind -> its stride


class Stem(nn.Module):
    """ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool. CIFAR: 3x3 conv, BN, ReLU.

    Pre-activation stems stop after the conv (and pool): the first block normalises its input.
    """

    kind: str
    width: int
    conv: ModuleDef
    norm: ModuleDef
    preact: bool = False
    bare_conv: ModuleDef | None = None  # the conv of a pre-activation stem, which no norm follows (None: conv)
    pool_pad_value: float = -jnp.inf  # what the max-pool's border is padded with (Keras pads with zeros)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        imagenet = self.kind == "imagenet"
        conv = (self.bare_conv or self.conv) if self.preact else self.conv
        x = conv(**conv_args(self.width, 7 if imagenet else 3, 2 if imagenet else 1), name="conv")(x)
        if not self.preact:
            x = nn.relu(self.norm(name="bn")(x))
        if imagenet:
            # An explicit pad and an unpadded pool: -inf is max_pool's own padding, in the form that every exporter
            # reads (jax2onnx drops a padding given to max_pool); after a ReLU, zeros (Keras) give the same maximum.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=self.pool_pad_value)
            x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2))
        return x


class Stage(nn.Module):
    """``num_blocks`` residual blocks; the first one takes the change of width, and the stride unless
    ``stride_last`` (then the last block takes it: Keras' ResNetV2).

    ``block`` is called with each block's width, stride, name and ``depth``: its place among all the
    blocks of the model (``first_block`` for this stage's first), which sets its stochastic depth.
    """

    num_blocks: int
    width: int
    strides: int
    block: ModuleDef
    first_block: int = 0
    inner_widths: Sequence[int] | None = None  # of each block's branch (None: as ``width`` says)
    stride_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        strided = self.num_blocks - 1 if self.stride_last else 0
        for i in range(self.num_blocks):
            strides = self.strides if i == strided else 1
            inner = self.inner_widths[i] if self.inner_widths else None
            x = self.block(
                width=self.width, strides=strides, depth=self.first_block + i, inner=inner, name=f"block{i}"
            )(x)
        return x


class ResNet(nn.Module):
    """A residual network (or its plain counterpart), NHWC, batch statistics in ``batch_stats``.

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" or "bottleneck".
      stage_widths: base width of each stage (bottleneck outputs are 4x wider).
      stem: "imagenet" (7x7/2 conv + max-pool, stride 4) or "cifar" (3x3 conv, stride 1).
      stem_width: channels of the stem conv.
      num_classes: outputs of the linear head.
      shortcut: "A" parameter-free subsample-and-pad, "B" projection where the shape changes,
        "C" projection everywhere, "B_subsample" projection where the width changes and subsampling where
        only the size does (Keras' ResNetV2).
      preact: pre-activation (v2) blocks, with a final BN-ReLU before pooling.
      skip_connections: False gives the plain network (same layers, no shortcuts).
      groups, width_per_group: ResNeXt cardinality and width per group; wide ResNets use
        width_per_group=128.
      stride_in_1x1: ResNet v1 (stride on the first 1x1 conv) instead of v1.5.
      se_reduction: add squeeze-and-excitation with this reduction to every block.
      zero_init_residual: start every residual branch at zero (last BN scale, or last conv in
        pre-activation branches), so each block starts as its shortcut.
      drop_path_rate: stochastic depth (Huang et al. 2016) in training: block l of L drops its residual
        branch, per example, with probability drop_path_rate * l / L (the linear rule: the last block at
        drop_path_rate, the first almost never), kept branches scaled by 1 / (1 - rate) (`blocks.drop_path`
        says why); ``apply(..., train=True)`` then needs ``rngs={"drop_path": key}``. 0: none. Plain
        nets have no branch to drop.
      dtype: computation dtype (bfloat16/float16 for mixed precision); parameters stay param_dtype.
      conv: the conv module of every layer (given features, kernel_size, strides, padding, dtype, ...): `Conv`,
        or one computing the same function another way, e.g. `resnet_jax.cpu.conv.cpu_conv` for XLA:CPU.
      norm: the normalisation of every layer (given use_running_average, dtype, param_dtype, scale_init): `BatchNorm`
        (epsilon 1e-5, as torch), or e.g. `KerasBatchNorm` (epsilon 1.001e-5, as Keras' ResNets).
      conv_bias: which convs carry a bias: "none" (every conv is followed by a norm that has one), "all"
        (Keras' ResNet v1), "unnormalized" (those no norm follows: a pre-activation net's stem, projections and
        last branch convs, as Keras' ResNetV2 has them).
      downsample_at: which block of a stage downsamples: "first" (He et al., torchvision: stages 2.. begin with
        the stride) or "last" (Keras' ResNetV2: stages 1..n-1 end with it). The outputs have the same size.
      stem_pool_pad_value: what the ImageNet stem's max-pool pads the border with: -inf (max_pool's own
        padding) or 0.0 (Keras' ZeroPadding2D; the same maximum after a ReLU, not in a pre-activation stem).
      inner_widths: the channels between the two convs of each basic block's branch, one sequence per stage with
        one width per block (a channel-pruned net, `resnet_jax.compress.channels`); None: as wide as the stage.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    stem_width: int = 64
    num_classes: int = 1000
    shortcut: str = "B"
    preact: bool = False
    skip_connections: bool = True
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False
    se_reduction: int | None = None
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm
    inner_widths: Sequence[Sequence[int]] | None = None
    conv_bias: str = "none"
    downsample_at: str = "first"
    stem_pool_pad_value: float = float("-inf")

    def __post_init__(self) -> None:
        validate_config(self)
        super().__post_init__()

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """Cumulative stride of every stage output."""
        stride, strides = STEMS[self.stem], []
        for stage_stride in self._stage_stride_factors():
            stride *= stage_stride
            strides.append(stride)
        return tuple(strides)

    @property
    def stage_features(self) -> tuple[str, ...]:
        """The ``features`` key of every stage output: "c<l>" with 2**l its stride when the first block of a stage
        downsamples (c2..c5 for ImageNet models), the same names whichever block does."""
        stride, names = STEMS[self.stem], []
        for i in range(len(self.stage_sizes)):
            stride *= 1 if i == 0 else 2
            names.append(f"c{int(math.log2(stride))}")
        return tuple(names)

    def _stage_stride_factors(self) -> list[int]:
        """How much each stage downsamples: stages 2.. by 2, or with ``downsample_at="last"`` stages 1..n-1."""
        n = len(self.stage_sizes)
        if self.downsample_at == "last":
            return [2 if i < n - 1 else 1 for i in range(n)]
        return [1 if i == 0 else 2 for i in range(n)]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        self._check_input(x, train)
        conv = partial(self.conv, dtype=self.dtype, param_dtype=self.param_dtype)
        biased = partial(conv, use_bias=True)  # adds a bias where the conv has none; a folded conv has one already
        bare_conv = conv if self.conv_bias == "none" else biased  # the convs that no norm follows
        conv = biased if self.conv_bias == "all" else conv
        norm = partial(self.norm, use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype)
        branch = partial(
            BRANCHES[self.block],
            conv=conv,
            norm=norm,
            preact=self.preact,
            groups=self.groups,
            width_per_group=self.width_per_group,
            stride_in_1x1=self.stride_in_1x1,
            se_reduction=self.se_reduction,
            zero_init_last=self.zero_init_residual,
            bare_conv=bare_conv,
        )

        blocks = sum(self.stage_sizes)

        def block(width: int, strides: int, depth: int, inner: int | None, name: str) -> ResidualBlock:
            return ResidualBlock(
                branch=partial(branch, width=width, strides=strides, inner_width=inner),
                features=width * BRANCHES[self.block].expansion,
                strides=strides,
                conv=conv,
                norm=norm,
                shortcut=self.shortcut,
                preact=self.preact,
                skip_connection=self.skip_connections,
                drop_path_rate=self.drop_path_rate * (depth + 1) / blocks,
                deterministic=not train,
                bare_conv=bare_conv,
                name=name,
            )

        x = x.astype(self.dtype)
        x = Stem(self.stem, self.stem_width, conv, norm, self.preact, bare_conv, self.stem_pool_pad_value, name="stem")(
            x
        )
        features = {"stem": x}
        factors = self._stage_stride_factors()
        stages = zip(self.stage_sizes, self.stage_widths, factors, self.stage_features, strict=True)
        last = self.downsample_at == "last"
        for i, (num_blocks, width, stride, key) in enumerate(stages):
            first = sum(self.stage_sizes[:i])
            inner = tuple(self.inner_widths[i]) if self.inner_widths else None
            x = Stage(num_blocks, width, stride, block, first, inner, last, name=f"stage{i + 1}")(x)
            features[key] = x
        if self.preact:
            x = nn.relu(norm(name="final_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        features["pre_logits"] = x
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return logits.astype(jnp.float32), features

    def _check_input(self, x: jax.Array, train: bool) -> None:
        if train and self.drop_path_rate > 0 and not self.has_rng(DROP_PATH_RNG):
            raise ValueError(
                f"drop_path_rate={self.drop_path_rate}: training drops residual branches at random; pass "
                f"rngs={{'{DROP_PATH_RNG}': key}} to apply (the train step does), or apply with train=False."
            )
        if x.ndim != 4:
            hint = " (add a channel axis: images[..., None])" if x.ndim == 3 else ""
            raise ValueError(
                f"{type(self).__name__} expects NHWC images of shape (batch, height, width, channels); "
                f"got shape {tuple(x.shape)}{hint}."
            )
        if not self.is_initializing() and self.has_variable("params", "stem"):
            # The stem conv's (first) kernel, however its conv stores it (whole, quantized or factorised).
            expected = next(k for k in jax.tree.leaves(self.variables["params"]["stem"]["conv"]) if k.ndim == 4).shape[
                2
            ]
            if x.shape[-1] != expected:
                raise ValueError(
                    f"These parameters were initialised for {expected}-channel images; got "
                    f"{x.shape[-1]} channels (input shape {tuple(x.shape)}). Initialise the model on "
                    f"images with {x.shape[-1]} channels, or convert the images to {expected}."
                )


def validate_config(model: ResNet) -> None:
    """Reject impossible settings with a message that names the valid ones."""

    def fail(message: str) -> None:
        raise ValueError(f"Invalid ResNet setting: {message}")

    if model.block not in BRANCHES:
        fail(f"block={model.block!r}; valid blocks are {sorted(BRANCHES)}.")
    if model.stem not in STEMS:
        fail(f"stem={model.stem!r}; valid stems are {sorted(STEMS)}.")
    if model.shortcut not in SHORTCUTS:
        fail(
            f"shortcut={model.shortcut!r}; valid options are 'A' (pad), 'B' (project on change), 'C' (always project), "
            "'B_subsample' (project on a change of width, subsample on a change of size only)."
        )
    if model.conv_bias not in CONV_BIASES:
        fail(f"conv_bias={model.conv_bias!r}; valid options are {', '.join(map(repr, CONV_BIASES))}.")
    if model.downsample_at not in DOWNSAMPLE_AT:
        fail(f"downsample_at={model.downsample_at!r}; valid options are {', '.join(map(repr, DOWNSAMPLE_AT))}.")
    sizes, widths = tuple(model.stage_sizes), tuple(model.stage_widths)
    if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes):
        fail(f"stage_sizes={sizes}; give one positive block count per stage, e.g. (3, 4, 6, 3).")
    if len(widths) != len(sizes):
        fail(f"{len(sizes)} stage_sizes but {len(widths)} stage_widths; give one width per stage.")
    if model.num_classes < 1:
        fail(f"num_classes={model.num_classes}; it must be at least 1.")
    if not 0.0 <= model.drop_path_rate < 1.0:
        fail(f"drop_path_rate={model.drop_path_rate}; use a probability in [0, 1), e.g. 0.1 (0: no stochastic depth).")
    if model.drop_path_rate > 0 and not model.skip_connections:
        fail(
            f"drop_path_rate={model.drop_path_rate} with skip_connections=False; stochastic depth drops residual "
            "branches down to their skip, and a plain net has no skip: its whole block would be dropped. Use 0."
        )
    if model.se_reduction is not None and model.se_reduction < 1:
        fail(f"se_reduction={model.se_reduction}; use a positive integer such as 16, or None.")
    if model.groups < 1:
        fail(f"groups={model.groups}; the cardinality must be a positive integer.")
    if model.block == "basic" and (model.width_per_group != 64 or model.stride_in_1x1):
        fail("width_per_group and stride_in_1x1 apply to bottleneck blocks only; use block='bottleneck'.")
    validate_inner_widths(model, sizes)
    branch = BRANCHES[model.block]
    for stage, width in enumerate(widths, start=1):
        grouped = branch.grouped_width(width, model.groups, model.width_per_group)
        inputs = model.stem_width if stage == 1 and model.block == "basic" else grouped
        if grouped < model.groups or grouped % model.groups or inputs % model.groups:
            fail(
                f"cardinality groups={model.groups} does not divide the {grouped} channels of stage "
                f"{stage}'s grouped convs (input {inputs}); choose groups dividing every stage width "
                f"{widths} (and the stem width {model.stem_width})."
            )


def validate_inner_widths(model: ResNet, sizes: tuple[int, ...]) -> None:
    """``inner_widths``: None, or one positive width per block of every stage (basic blocks without groups)."""
    if model.inner_widths is None:
        return
    shape = tuple(len(stage) for stage in model.inner_widths)
    widths = [w for stage in model.inner_widths for w in stage]
    if shape != sizes or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(
            f"Invalid ResNet setting: inner_widths={model.inner_widths}; give one positive width per block of each "
            f"stage ({sizes} blocks), e.g. {tuple((8,) * n for n in sizes)}."
        )
    if model.block != "basic" or model.groups != 1:
        raise ValueError(
            "Invalid ResNet setting: inner_widths applies to basic blocks without groups; this model has "
            f"block={model.block!r}, groups={model.groups}."
        )
