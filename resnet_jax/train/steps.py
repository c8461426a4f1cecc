"""The train and eval steps, and the two ways to compile them.

The step bodies are pure functions of (state, batch), written once. `compile_steps` turns them into
- "jit": one program over a `Mesh` with the batch sharded on its "data" axis and the state
  replicated, so batch-norm statistics and gradients are those of the global batch;
- "pmap": one program per device, each normalising with its own batch statistics (the classic
  ImageNet recipe), with gradients and running statistics averaged over the "batch" axis;
- "batch_parts": one CPU device whose batch is cut into parts whose forward and backward passes run
  side by side, one host thread each, each part normalising over its own images as a pmap device
  would; one update from the averaged gradients (why: `resnet_jax.cpu.batch_parts`).
Every way the old state's buffers are donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.cpu.batch_parts import BatchParts, BatchPartsTrainStep
from resnet_jax.models.blocks import DROP_PATH_RNG
from resnet_jax.train.precision import DynamicLossScale, all_finite

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"
PMAP_AXIS = "batch"
PARALLELISM = ("jit", "pmap", "batch_parts")


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus the BN running statistics, (fp16) the loss scale, and two static
    parts of the compiled step that checkpoints do not hold: (pruning, `resnet_jax.compress.prune`) the schedule of
    a `PrunedTrainState`'s masks and (distillation, `resnet_jax.compress.distill`) the frozen teacher."""

    batch_stats: Any
    loss_scale: DynamicLossScale | None = None
    prune_schedule: Any = struct.field(pytree_node=False, default=None)
    distill: Any = struct.field(pytree_node=False, default=None)


class PrunedTrainState(TrainState):
    """A `TrainState` with the masks of its pruned conv kernels: a class of its own, so that a state without masks
    keeps the structure of the checkpoints written before pruning existed."""

    masks: Any = None


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int
) -> TrainState:
    """Initialise the model on a dummy batch of ``input_shape`` (H, W, C) images.

    float16 models get a dynamic loss scale; float32 and bfloat16 need none.
    """
    variables = initial_variables(model, jax.random.key(seed), tuple(input_shape))
    loss_scale = DynamicLossScale.create() if jnp.dtype(model.dtype) == jnp.float16 else None
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        loss_scale=loss_scale,
    )


def initial_variables(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``model.init`` on a dummy batch, compiled once per model and shape: op by op, every initializer and every
    layer of the dummy forward pass would be compiled on its own, seconds of a run's start on a GPU. (A model
    with unhashable fields, such as lists, cannot key the cache and is compiled for this call alone.)"""
    try:
        hash(model)
    except TypeError:
        return jax.jit(partial(_model_init, model), static_argnums=1)(key, input_shape)
    return _cached_model_init(model, key, input_shape)


def _model_init(model: nn.Module, key: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32), train=False)


_cached_model_init = jax.jit(_model_init, static_argnums=(0, 2))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy; ``labels`` are class ids or (mixup) soft targets."""
    if labels.ndim == logits.ndim - 1:
        labels = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def train_step(
    state: TrainState, batch: Batch, label_smoothing: float = 0.0, axis_name: str | None = None
) -> tuple[TrainState, Metrics]:
    """One SGD step on ``batch`` ({"image", "label"}; "label" may be soft mixup targets).

    Under pmap (``axis_name`` set) gradients, running statistics and metrics are averaged over the
    devices. With a loss scale, a step with non-finite gradients changes nothing but the step count
    and the scale (metrics["skipped"] says so).
    """
    grads, batch_stats, metrics = step_gradients(state, batch, label_smoothing)
    if axis_name is not None:
        grads, batch_stats, metrics = all_reduce(lax.pmean, (grads, batch_stats, metrics), axis_name)
    return apply_step_gradients(state, grads, batch_stats, metrics)


def step_gradients(state: TrainState, batch: Batch, label_smoothing: float = 0.0) -> tuple[Any, Any, Metrics]:
    """The first half of `train_step`: gradients (loss-scaled, if the state has a scale), the batch's
    running statistics and the step's metrics, before any averaging over devices or batch parts."""
    scale = state.loss_scale
    rngs = {DROP_PATH_RNG: drop_path_key(state.step, batch.get("part", 0))}  # unused by models without it

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        (logits, _), updates = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"], rngs=rngs)
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        if state.distill is not None:  # the teacher's soft targets mixed in
            loss = state.distill.loss(loss, logits, batch["image"])
        scaled = loss if scale is None else loss * scale.scale
        return scaled, (loss, logits, updates["batch_stats"])

    grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    return grads, batch_stats, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def drop_path_key(step: jax.Array, part: jax.Array | int) -> jax.Array:
    """The key of a step's stochastic-depth masks (`resnet_jax.models.blocks.drop_path`) for one part of the
    batch: a function of the step, so that a resumed run draws the masks it would have drawn, and of the part
    (``batch["part"]``: the pmap device or batch part that holds these examples, which `compile_steps`'
    ``put_batch`` sets), so that no two parts draw the same masks. (The run's seed, which sets its
    initialisation and data order, is not in it: the masks of two seeds' step t fall on other examples.)"""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(0), step), part)


def apply_step_gradients(
    state: TrainState, grads: Any, batch_stats: Any, metrics: Metrics
) -> tuple[TrainState, Metrics]:
    """The second half of `train_step`: the update from (averaged) `step_gradients`."""
    scale = state.loss_scale
    if scale is None:
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    else:
        grads = scale.unscale(grads)
        finite = all_finite(grads)
        updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = updated.replace(
            params=jax.tree.map(keep, updated.params, state.params),
            opt_state=jax.tree.map(keep, updated.opt_state, state.opt_state),
            batch_stats=jax.tree.map(keep, updated.batch_stats, state.batch_stats),
            loss_scale=scale.adjust(finite),
        )
        metrics = metrics | {"loss_scale": scale.scale, "skipped": (~finite).astype(jnp.float32)}
    if state.prune_schedule is not None:  # new masks where the schedule says so; masked weights back to zero
        params, masks = state.prune_schedule.update(new_state.params, state.masks, new_state.step)
        new_state = new_state.replace(params=params, masks=masks)
    # The loss is that of the parameters before the update: a checkpoint needs the updated ones finite too.
    skipped = metrics.get("skipped", 0.0) > 0
    finite_step = (jnp.isfinite(metrics["loss"]) | skipped) & all_finite(new_state.params)
    return new_state, metrics | {"finite": finite_step.astype(jnp.float32)}


def eval_step(state: TrainState, batch: Batch, axis_name: str | None = None) -> Metrics:
    """Sums over the real (mask == 1) examples of a padded batch, so partial batches count exactly."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = state.apply_fn(variables, batch["image"], train=False)
    mask = batch["mask"]
    sums = {
        "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return sums if axis_name is None else all_reduce(lax.psum, sums, axis_name)


def all_reduce(reduce: Callable[[jax.Array, str], jax.Array], tree: Any, axis_name: str) -> Any:
    """``reduce`` (lax.pmean, lax.psum) of a whole pytree as one collective over one flat vector.

    XLA:CPU does not combine collectives, and each one through gloo costs milliseconds, which a step across
    processes would otherwise pay once per leaf (GPUs and TPUs combine them anyway).
    """
    flat, unflatten = ravel_pytree(tree)
    return unflatten(reduce(flat, axis_name))


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over every device (of every process) with the batch on the "data" axis."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class Steps:
    """Compiled steps plus how to place their inputs and read their outputs on this process."""

    train: Callable[[TrainState, Any], tuple[TrainState, Metrics]]
    evaluate: Callable[[TrainState, Any], Metrics]
    put_batch: Callable[[dict[str, np.ndarray]], Any]  # this process's rows -> step input
    put_state: Callable[[TrainState], TrainState]
    to_host: Callable[[Any], Any]  # step output -> host numpy (one copy of replicated values)
    compile_train: Callable[..., Callable[[TrainState, Any], tuple[TrainState, Metrics]]]
    # (state, step input, XLA compiler options or None) -> ``train`` compiled ahead of time for them


def compile_steps(mesh: Mesh, label_smoothing: float = 0.0, parallelism: str = "jit", batch_parts: int = 1) -> Steps:
    """The train and eval steps compiled with jit over ``mesh``, with pmap over the local devices, or for
    ``batch_parts`` parts of the batch of ``mesh``'s one CPU device (configs/default.py's `batch_parts` says
    how many pay)."""
    if parallelism == "jit":
        batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
        replicated = NamedSharding(mesh, PartitionSpec())
        train = jax.jit(
            partial(train_step, label_smoothing=label_smoothing),
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        return Steps(
            train=train,
            evaluate=jax.jit(eval_step, in_shardings=(replicated, batch_sharding), out_shardings=replicated),
            put_batch=lambda local: shard_batch(mesh, local),
            put_state=lambda state: jax.device_put(state, replicated),
            to_host=jax.device_get,
            compile_train=lambda state, batch, options=None: train.lower(state, batch).compile(options),
        )
    if parallelism == "pmap":
        # Global arrays with one row per device of every process: what pmap's compiled program expects.
        per_device = NamedSharding(Mesh(np.asarray(jax.devices()), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))
        local_devices = jax.local_device_count()

        def put_state(state: TrainState) -> TrainState:  # one copy per device
            def stack(x: Any) -> jax.Array:
                rows = np.broadcast_to(np.asarray(x), (local_devices, *np.shape(x)))
                return jax.make_array_from_process_local_data(per_device, rows)

            return jax.tree.map(stack, state)

        def put_batch(local: dict[str, np.ndarray]) -> Batch:
            rows = {k: v.reshape(local_devices, -1, *v.shape[1:]) for k, v in local.items()}
            rows["part"] = np.arange(local_devices, dtype=np.int32) + jax.process_index() * local_devices
            return {k: jax.make_array_from_process_local_data(per_device, v) for k, v in rows.items()}

        train = jax.pmap(
            partial(train_step, label_smoothing=label_smoothing, axis_name=PMAP_AXIS),
            axis_name=PMAP_AXIS,
            donate_argnums=0,
        )
        return Steps(
            train=train,
            evaluate=jax.pmap(partial(eval_step, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS),
            put_batch=put_batch,
            put_state=put_state,
            to_host=lambda tree: jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree),
            compile_train=lambda state, batch, options=None: train.lower(state, batch).compile(options),
        )
    if parallelism == "batch_parts":
        return batch_parts_steps(mesh, label_smoothing, batch_parts)
    renamed = " (parallelism 'threads' is now called 'batch_parts')" if parallelism == "threads" else ""
    raise ValueError(f"parallelism={parallelism!r}; choose one of {PARALLELISM}{renamed}.")


def shard_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> Batch:
    """Assemble the global batch from this process's rows (every process passes its own slice)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def batch_parts_steps(mesh: Mesh, label_smoothing: float, batch_parts: int) -> Steps:
    """`compile_steps` for "batch_parts": the step input is a tuple of ``batch_parts`` parts of the batch on
    ``mesh``'s one CPU device, each part's `step_gradients` a program of its own (`resnet_jax.cpu.batch_parts`)."""
    parts = BatchParts.on(list(mesh.devices.flat), batch_parts)
    train = BatchPartsTrainStep(
        parts,
        jax.jit(partial(step_gradients, label_smoothing=label_smoothing)),
        jax.jit(apply_mean_gradients, donate_argnums=0),
    )
    evaluate = jax.jit(eval_step)
    return Steps(
        train=train,
        evaluate=partial(parts.total, evaluate),
        put_batch=parts.split,
        put_state=lambda state: jax.device_put(state, parts.device),
        to_host=jax.device_get,
        compile_train=train.compiled,
    )


def apply_mean_gradients(state: TrainState, parts: Sequence[tuple[Any, Any, Metrics]]) -> tuple[TrainState, Metrics]:
    """`apply_step_gradients` of the mean of several parts' `step_gradients` (what pmap's all-reduce averages)."""
    grads, batch_stats, metrics = jax.tree.map(lambda *xs: sum(xs) / len(xs), *parts)
    return apply_step_gradients(state, grads, batch_stats, metrics)
