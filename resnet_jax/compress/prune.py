"""Global magnitude pruning of conv kernels during training (``--config.prune.*``; Zhu & Gupta 2017).

The conv kernels of the whole model share one threshold: at each pruning step the smallest-magnitude weights, a
fraction s(n) of all conv weights, are masked to zero, where after n steps

    s(n) = sparsity * (1 - (1 - (n - begin) / (end - begin)) ** 3)    for begin <= n <= end

rises fast while the network can still recover and slowly near the end; masks are recomputed every ``frequency``
steps from ``begin_step`` to ``end_step`` (and at ``end_step``), and the steps after ``end_step`` train the pruned
network. The masks are part of the train state (`PrunedTrainState.masks`), so checkpoints keep them and a resumed run
goes on with them; the schedule (`PruneSchedule`, from the config) is static in the compiled step. After every
update the masked weights are multiplied back to zero, so they stay zero whatever the optimizer's momentum does.
Only the dense head, batch norm and biases are left whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from resnet_jax.train.steps import PrunedTrainState

Masks = dict[str, jax.Array]  # "stage1/block0/branch/conv1/kernel" -> 0/1 array shaped like the kernel
SEPARATOR = "/"


@dataclasses.dataclass(frozen=True)
class PruneSchedule:
    """Final ``sparsity`` (fraction of conv weights at zero), reached at ``end_step`` from ``begin_step``, with the
    masks recomputed every ``frequency`` steps."""

    sparsity: float
    begin_step: int
    end_step: int
    frequency: int

    def updates_at(self, steps: jax.Array | int) -> jax.Array:
        """Whether the masks are recomputed once ``steps`` steps are done."""
        inside = (steps >= self.begin_step) & (steps <= self.end_step)
        return inside & (((steps - self.begin_step) % self.frequency == 0) | (steps == self.end_step))

    def target(self, steps: jax.Array | int) -> jax.Array:
        """s(n) of the module's docstring, for ``steps`` = n done."""
        progress = jnp.clip((steps - self.begin_step) / (self.end_step - self.begin_step), 0.0, 1.0)
        return self.sparsity * (1.0 - (1.0 - progress) ** 3)

    def update(self, params: Any, masks: Masks, steps: jax.Array) -> tuple[Any, Masks]:
        """The params after an optimizer update, and the masks, once ``steps`` steps are done: new masks where the
        schedule says so, then the masked weights set to zero. (Part of the compiled train step.)"""
        names = sorted(masks)
        masks = jax.lax.cond(
            self.updates_at(steps), lambda: magnitude_masks(params, names, self.target(steps)), lambda: masks
        )
        return apply_masks(params, masks), masks

    def sparsity_after(self, steps: int) -> float:
        """The sparsity of the masks once ``steps`` steps are done: the target of the last update up to then."""
        last = max((n for n in range(min(steps, self.end_step) + 1) if self.updates_at(n)), default=None)
        return 0.0 if last is None else float(self.target(last))


def prune_schedule(config: ml_collections.ConfigDict) -> PruneSchedule | None:
    """The pruning schedule of ``config.prune`` (None: no pruning), checked before anything compiles."""
    settings = config.get("prune")
    if settings is None or not settings.sparsity:
        return None
    sparsity, begin, frequency = settings.sparsity, settings.begin_step, settings.frequency
    end = settings.end_step if settings.end_step >= 0 else (3 * config.num_train_steps) // 4
    problems = [
        f"sparsity={sparsity} (a fraction in [0, 1), e.g. 0.9)" if not 0.0 <= sparsity < 1.0 else "",
        f"begin_step={begin} (>= 0)" if begin < 0 else "",
        f"end_step={end} (after begin_step={begin}, at most num_train_steps={config.num_train_steps})"
        if not begin < end <= config.num_train_steps
        else "",
        f"frequency={frequency} (steps between mask updates, >= 1)" if frequency < 1 else "",
    ]
    if any(problems):
        raise ValueError(f"Invalid pruning settings: {'; '.join(p for p in problems if p)}.")
    return PruneSchedule(float(sparsity), begin, end, frequency)


def attach_pruning(state: Any, config: ml_collections.ConfigDict) -> Any:
    """A new train state with the masks and schedule of ``config.prune`` (unchanged when the run prunes nothing)."""
    schedule = prune_schedule(config)
    if schedule is None:
        return state
    fields = {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}
    return PrunedTrainState(**fields | {"masks": full_masks(state.params), "prune_schedule": schedule})


def prunable(params: Any) -> list[str]:
    """The names (paths joined by "/") of the conv kernels: the 4-d "kernel" leaves."""
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    return sorted(name for name, x in flat.items() if name.endswith("kernel") and jnp.ndim(x) == 4)


def full_masks(params: Any) -> Masks:
    """Masks that keep every conv weight: a new run's, before its first pruning step."""
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    return {name: jnp.ones_like(flat[name]) for name in prunable(params)}


def magnitude_masks(params: Any, names: list[str], sparsity: jax.Array) -> Masks:
    """Masks that zero the floor(``sparsity`` * N) smallest-magnitude weights among the N of the kernels ``names``,
    ties broken by position, so that the count is exact even when many weights are already zero."""
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    magnitudes = jnp.concatenate([jnp.abs(flat[name]).ravel() for name in names])
    pruned = jnp.floor(sparsity * magnitudes.size).astype(jnp.int32)
    ranks = (
        jnp.zeros(magnitudes.size, jnp.int32)
        .at[jnp.argsort(magnitudes, stable=True)]
        .set(jnp.arange(magnitudes.size, dtype=jnp.int32))
    )
    keep = (ranks >= pruned).astype(magnitudes.dtype)
    masks, start = {}, 0
    for name in names:
        size = math.prod(flat[name].shape)
        masks[name] = keep[start : start + size].reshape(flat[name].shape).astype(flat[name].dtype)
        start += size
    return masks


def apply_masks(params: Any, masks: Masks) -> Any:
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    return traverse_util.unflatten_dict({k: v * masks[k] if k in masks else v for k, v in flat.items()}, sep=SEPARATOR)


def sparsity(params: Any) -> float:
    """The fraction of conv weights that are exactly zero."""
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    kernels = [flat[name] for name in prunable(params)]
    return float(sum(jnp.sum(k == 0) for k in kernels) / sum(k.size for k in kernels))
