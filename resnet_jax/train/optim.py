"""Learning-rate schedules and the optimizer of the published recipes, built from a config.

The papers' weight decay is coupled L2: wd * w is added to the gradient before momentum, which is
what ``optax.add_decayed_weights`` placed before ``optax.sgd`` does (not AdamW-style decoupling).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import ml_collections
import optax


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate``, times batch / 256 under the linear scaling rule (Goyal et al. 2017)."""
    if config.scale_learning_rate_by_batch:
        return config.learning_rate * config.batch_size / 256
    return config.learning_rate


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Linear warm-up, then "constant", "step" or "cosine".

    Step boundaries come from ``lr_boundaries_steps`` (He et al. CIFAR: 32k, 48k) or
    ``lr_boundaries_epochs`` (ImageNet: 30, 60, 80); each divides the rate by ``1 / lr_decay_factor``.
    """
    peak, warmup, total = base_learning_rate(config), config.warmup_steps, config.num_train_steps
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total - warmup, 1))
    elif config.lr_schedule == "step":
        boundaries = list(config.lr_boundaries_steps) + [e * steps_per_epoch for e in config.lr_boundaries_epochs]
        after = optax.piecewise_constant_schedule(
            peak, {b - warmup: config.lr_decay_factor for b in sorted(boundaries) if b > warmup}
        )
    else:
        raise ValueError(f"lr_schedule={config.lr_schedule!r}; valid schedules are 'constant', 'step', 'cosine'.")
    if warmup == 0:
        return after
    start = config.warmup_start_learning_rate
    return optax.join_schedules([optax.linear_schedule(start, peak, warmup), after], [warmup])


def decay_mask(params: Any, exclude_bn_and_bias: bool) -> Any:
    """True for the parameters weight decay applies to; BN scales/offsets and biases are rank 1."""
    return jax.tree.map(lambda p: not exclude_bn_and_bias or p.ndim > 1, params)


def create_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Gradient clipping, coupled L2 weight decay and SGD (momentum or Nesterov) on ``schedule``.

    Fine-tuning (``freeze_backbone`` or ``stage_lr_multipliers``) gives each part of the model its own decay and
    SGD on a scaled schedule through ``optax.multi_transform``; a multiplier of 0 freezes its part: no update, no
    weight decay. Clipping still sees the gradient of the whole model.
    """
    if config.optimizer != "sgd":
        raise ValueError(f"optimizer={config.optimizer!r}; the published recipes use 'sgd'.")
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    rates = multiplier_set(config)
    if rates is None:
        return optax.chain(*parts, *_descent(config, schedule))
    transforms = {
        _label(rate): optax.chain(*_descent(config, _scaled(schedule, rate))) if rate else optax.set_to_zero()
        for rate in rates
    }
    return optax.chain(*parts, optax.multi_transform(transforms, partial(rate_labels, config=config)))


def multiplier_set(config: ml_collections.ConfigDict) -> set[float] | None:
    """The learning-rate multipliers that fine-tuning settings use, or None when every parameter has the full rate.

    Checks the settings, so that a bad one fails before anything is built.
    """
    freeze, stage_rates = config.get("freeze_backbone", False), tuple(config.get("stage_lr_multipliers", ()))
    if freeze and stage_rates:
        raise ValueError(
            "freeze_backbone and stage_lr_multipliers both set; choose one (freezing is multipliers of 0 for the "
            "stem and every stage)."
        )
    if any(rate < 0 for rate in stage_rates):
        raise ValueError(f"stage_lr_multipliers={stage_rates}: multipliers must be >= 0 (0 freezes a stage).")
    if freeze:
        return {0.0, 1.0}
    return {*map(float, stage_rates), 1.0} if stage_rates else None


def learning_rate_multipliers(config: ml_collections.ConfigDict, modules: Sequence[str]) -> dict[str, float]:
    """The multiplier of each top-level module of a model (``stem``, ``stage1``, ..., ``head``).

    ``freeze_backbone``: 0 for all but the head. ``stage_lr_multipliers``: one value for the stem and one per
    stage, in order (e.g. (0.1, 0.1, 0.3, 0.3, 1.0) for the four stages of resnet18). The head, and the final BN
    of a pre-activation net, keep the full rate.
    """
    if config.get("freeze_backbone", False):
        return {module: 1.0 if module == "head" else 0.0 for module in modules}
    stages = sorted((m for m in modules if m.startswith("stage") and m[5:].isdigit()), key=lambda m: int(m[5:]))
    parts = ["stem", *stages]
    stage_rates = tuple(config.get("stage_lr_multipliers", ()))
    if len(stage_rates) != len(parts):
        raise ValueError(
            f"stage_lr_multipliers has {len(stage_rates)} values; {config.model} needs {len(parts)}, one for each "
            f"of {', '.join(parts)} (the head keeps the full rate)."
        )
    rates = dict(zip(parts, map(float, stage_rates), strict=True))
    return {module: rates.get(module, 1.0) for module in modules}


def rate_labels(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Each parameter's multiplier as the ``optax.multi_transform`` label of its transform."""
    rates = learning_rate_multipliers(config, list(params))
    return {module: jax.tree.map(lambda _, m=module: _label(rates[m]), tree) for module, tree in params.items()}


def _descent(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> list[optax.GradientTransformation]:
    parts = []
    if config.weight_decay:
        mask = lambda params: decay_mask(params, config.weight_decay_exclude_bn_and_bias)  # noqa: E731
        parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    return parts


def _scaled(schedule: optax.Schedule, rate: float) -> optax.Schedule:
    return lambda step: rate * schedule(step)


def _label(rate: float) -> str:
    return f"lr x{rate!r}"
