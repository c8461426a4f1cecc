"""Every model by name: ``create_model("resnet50")``, ``create_model("wrn28_10", num_classes=100)``.

Each preset is one line. The CIFAR families also take any valid depth by name (resnet74 is
6*12+2 layers; wrn34_2 is a WRN of depth 6*5+4 and width factor 2).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import jax.numpy as jnp

from resnet_jax.models.blocks import KerasBatchNorm
from resnet_jax.models.resnet import ResNet

# ImageNet models: torchvision layout (v1.5), shortcut "B", 1000 classes.
ImageNetResNet = partial(ResNet, stem="imagenet", stage_widths=(64, 128, 256, 512), shortcut="B", num_classes=1000)
ResNet18 = partial(ImageNetResNet, stage_sizes=(2, 2, 2, 2), block="basic")
ResNet34 = partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block="basic")
ResNet50 = partial(ImageNetResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck")
ResNet101 = partial(ImageNetResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck")
ResNet152 = partial(ImageNetResNet, stage_sizes=(3, 8, 36, 3), block="bottleneck")

# CIFAR models of He et al. (2015): 16/32/64 widths, shortcut "A", 10 classes.
CifarResNet = partial(ResNet, stem="cifar", stem_width=16, stage_widths=(16, 32, 64), shortcut="A", num_classes=10)

IMAGENET_DEPTHS = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101, 152: ResNet152}
BOTTLENECK_DEPTHS = (50, 101, 152)


def imagenet_resnet(depth: int, **settings: Any) -> Callable[..., ResNet]:
    """ResNet-18..152 with extra settings (preact, groups, width_per_group, se_reduction, ...)."""
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}; got {depth}.")
    return partial(IMAGENET_DEPTHS[depth], **settings)


def keras_resnet(depth: int, v2: bool = False) -> Callable[..., ResNet]:
    """The ResNets of ``keras.applications`` (``resnet_jax.models.keras_weights`` reads their weights), exactly.

    v1 (ResNet50/101/152): the stride on the first 1x1 conv, a bias on every conv, BN epsilon 1.001e-5, a zero-padded
    stem pool. V2 (ResNet50V2/...): pre-activation; biases only on the convs that no norm follows; each stage but
    the last downsamples in its last block (the 3x3 conv), whose shortcut subsamples; the stem pool pads zeros
    onto the conv's un-normalised output, so the pad value matters here.
    """
    keras = dict(norm=KerasBatchNorm, stem_pool_pad_value=0.0)
    if not v2:
        return imagenet_resnet(depth, stride_in_1x1=True, conv_bias="all", **keras)
    return imagenet_resnet(
        depth, preact=True, conv_bias="unnormalized", downsample_at="last", shortcut="B_subsample", **keras
    )


def cifar_resnet(depth: int, *, skip_connections: bool = True, preact: bool = False) -> Callable[..., ResNet]:
    """He et al. (2015) CIFAR ResNet (or plain net) with 6n+2 layers of basic blocks."""
    n = _blocks_per_stage(depth, 6, 2, "CIFAR ResNet", "20, 32, 44, 56, 110, 1202")
    return partial(CifarResNet, stage_sizes=(n,) * 3, block="basic", skip_connections=skip_connections, preact=preact)


def cifar_preact_bottleneck(depth: int) -> Callable[..., ResNet]:
    """He et al. (2016) pre-activation bottleneck ResNet with 9n+2 layers (164, 1001)."""
    n = _blocks_per_stage(depth, 9, 2, "pre-activation bottleneck ResNet", "164, 1001")
    return partial(CifarResNet, stage_sizes=(n,) * 3, block="bottleneck", preact=True, shortcut="B")


def wide_resnet(depth: int, widen: int) -> Callable[..., ResNet]:
    """Zagoruyko & Komodakis (2016) WRN-d-k: pre-activation basic blocks, 6n+4 layers, widths 16k/32k/64k."""
    n = _blocks_per_stage(depth, 6, 4, "WRN", "16, 28, 40")
    if widen < 1:
        raise ValueError(f"WRN width factor must be a positive integer; got {widen}.")
    widths = (16 * widen, 32 * widen, 64 * widen)
    return partial(CifarResNet, stage_sizes=(n,) * 3, stage_widths=widths, block="basic", preact=True, shortcut="B")


def cifar_resnext(cardinality: int, group_width: int) -> Callable[..., ResNet]:
    """Xie et al. (2017) ResNeXt-29 (3 stages of 3 bottlenecks, outputs 256/512/1024) Cx(d)d."""
    return partial(
        CifarResNet,
        stage_sizes=(3, 3, 3),
        stage_widths=(64, 128, 256),
        stem_width=64,
        block="bottleneck",
        shortcut="B",
        groups=cardinality,
        width_per_group=group_width,
    )


def _blocks_per_stage(depth: int, per_block: int, extra: int, family: str, examples: str) -> int:
    n, remainder = divmod(depth - extra, per_block)
    if remainder or n < 1:
        raise ValueError(
            f"{family} depth must be {per_block}n+{extra} with n >= 1 (for example {examples}); got {depth}."
        )
    return n


MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "resnet101": ResNet101,
    "resnet152": ResNet152,
    **{f"resnet{d}_v1": imagenet_resnet(d, stride_in_1x1=True) for d in BOTTLENECK_DEPTHS},
    **{f"resnet{d}_keras": keras_resnet(d) for d in BOTTLENECK_DEPTHS},
    **{f"resnet{d}v2_keras": keras_resnet(d, v2=True) for d in BOTTLENECK_DEPTHS},
    "wide_resnet50_2": imagenet_resnet(50, width_per_group=128),
    "wide_resnet101_2": imagenet_resnet(101, width_per_group=128),
    "resnext50_32x4d": imagenet_resnet(50, groups=32, width_per_group=4),
    "resnext101_32x8d": imagenet_resnet(101, groups=32, width_per_group=8),
    "se_resnet50": imagenet_resnet(50, se_reduction=16),
    **{f"preact_resnet{d}": imagenet_resnet(d, preact=True) for d in IMAGENET_DEPTHS},
    "plain18": imagenet_resnet(18, skip_connections=False),
    "plain34": imagenet_resnet(34, skip_connections=False),
    **{f"resnet{d}": cifar_resnet(d) for d in (20, 32, 44, 56, 110, 1202)},
    **{f"plain{d}": cifar_resnet(d, skip_connections=False) for d in (20, 32, 44, 56, 110)},
    "preact_resnet110": cifar_resnet(110, preact=True),
    "preact_resnet164": cifar_preact_bottleneck(164),
    "preact_resnet1001": cifar_preact_bottleneck(1001),
    "wrn16_8": wide_resnet(16, 8),
    "wrn28_10": wide_resnet(28, 10),
    "wrn40_4": wide_resnet(40, 4),
    "resnext29_8x64d": cifar_resnext(8, 64),
    "resnext29_16x64d": cifar_resnext(16, 64),
}

# Names beyond the presets: any valid depth of the CIFAR families.
FAMILIES: list[tuple[re.Pattern[str], Callable[..., Callable[..., ResNet]], str]] = [
    (re.compile(r"resnet(\d+)"), lambda d: cifar_resnet(int(d)), "resnet<6n+2>"),
    (re.compile(r"plain(\d+)"), lambda d: cifar_resnet(int(d), skip_connections=False), "plain<6n+2>"),
    (re.compile(r"preact_resnet(\d+)"), lambda d: _cifar_preact(int(d)), "preact_resnet<6n+2 or 9n+2 >= 164>"),
    (re.compile(r"wrn(\d+)_(\d+)"), lambda d, k: wide_resnet(int(d), int(k)), "wrn<6n+4>_<k>"),
    (re.compile(r"resnext29_(\d+)x(\d+)d"), lambda c, d: cifar_resnext(int(c), int(d)), "resnext29_<C>x<d>d"),
]


def _cifar_preact(depth: int) -> Callable[..., ResNet]:
    """He et al. (2016) use bottlenecks for their deep CIFAR nets (164, 1001) and basic blocks below."""
    if depth >= 164 and (depth - 2) % 9 == 0:
        return cifar_preact_bottleneck(depth)
    return cifar_resnet(depth, preact=True)


def list_models() -> list[str]:
    """The named presets; the CIFAR families also accept other depths (see `create_model`)."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> ResNet:
    """Build a model by name; ``overrides`` set any `ResNet` attribute (dtype, shortcut, ...).

    Unknown names, impossible depths and invalid settings raise ValueError before anything runs.
    """
    factory = _resolve(name.lower())
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if isinstance(overrides.get("dtype"), str):
        overrides["dtype"] = jnp.dtype(overrides["dtype"])
    unknown = sorted(set(overrides) - _settable_fields())
    if unknown:
        raise ValueError(
            f"Unknown setting(s) {unknown} for model {name!r}; valid settings: {sorted(_settable_fields())}."
        )
    return factory(**overrides)


def _resolve(name: str) -> Callable[..., ResNet]:
    if name in MODELS:
        return MODELS[name]
    for pattern, build, _ in FAMILIES:
        match = pattern.fullmatch(name)
        if match:
            return build(*match.groups())
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    families = ", ".join(form for _, _, form in FAMILIES)
    raise ValueError(
        f"Unknown model {name!r}.{hint} Named models: {', '.join(list_models())}. Other depths by name: {families}."
    )


def _settable_fields() -> set[str]:
    return {f for f in ResNet.__dataclass_fields__ if f not in ("parent", "name")}
