"""Learning-rate schedules and the optimizer of the published recipes, built from a config.

The papers' weight decay is coupled L2: wd * w is added to the gradient before momentum, which is
what ``optax.add_decayed_weights`` placed before ``optax.sgd`` does (not AdamW-style decoupling).
"""

from __future__ import annotations

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
    """Gradient clipping, coupled L2 weight decay and SGD (momentum or Nesterov) on ``schedule``."""
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay:
        mask = lambda params: decay_mask(params, config.weight_decay_exclude_bn_and_bias)  # noqa: E731
        parts.append(optax.add_decayed_weights(config.weight_decay, mask))
    if config.optimizer != "sgd":
        raise ValueError(f"optimizer={config.optimizer!r}; the published recipes use 'sgd'.")
    parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
    return optax.chain(*parts)
