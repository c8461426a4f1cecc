"""The train and eval steps, and how they are compiled over a device mesh.

The step bodies are pure functions of (state, batch). `compile_steps` jit-compiles them with the
batch sharded along the mesh's "data" axis and the state replicated, so batch-norm statistics and
gradients are those of the global batch on 1 device or many, and the old state's buffers are donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus the BN running statistics."""

    batch_stats: Any


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int
) -> TrainState:
    """Initialise the model on a dummy batch of ``input_shape`` (H, W, C) images."""
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *input_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy; ``labels`` are class ids or (mixup) soft targets."""
    if labels.ndim == logits.ndim - 1:
        labels = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def train_step(state: TrainState, batch: Batch, label_smoothing: float = 0.0) -> tuple[TrainState, Metrics]:
    """One SGD step on ``batch`` ({"image", "label"}; "label" may be soft mixup targets)."""

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        (logits, _), updates = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return state, metrics


def eval_step(state: TrainState, batch: Batch) -> Metrics:
    """Sums over the real (mask == 1) examples of a padded batch, so partial batches count exactly."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = state.apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"]
    return {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over every device (of every process) with the batch on the "data" axis."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def compile_steps(
    mesh: Mesh, label_smoothing: float = 0.0
) -> tuple[Callable[[TrainState, Batch], tuple[TrainState, Metrics]], Callable[[TrainState, Batch], Metrics]]:
    """jit the steps over ``mesh``: batch sharded on "data", state replicated, old state donated."""
    batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    train = jax.jit(
        lambda state, batch: train_step(state, batch, label_smoothing),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    evaluate = jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    return train, evaluate


def shard_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> Batch:
    """Assemble the global batch from this process's rows (every process passes its own slice)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Place a pytree on every device of ``mesh``."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
