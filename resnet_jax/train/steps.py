"""The train and eval steps, and the two ways to compile them.

The step bodies are pure functions of (state, batch), written once. `compile_steps` turns them into
- "jit": one program over a `Mesh` with the batch sharded on its "data" axis and the state
  replicated, so batch-norm statistics and gradients are those of the global batch;
- "pmap": one program per device, each normalising with its own batch statistics (the classic
  ImageNet recipe), with gradients and running statistics averaged over the "batch" axis;
- "threads": one CPU device whose batch is cut into parts, one host thread each, whose forward and
  backward passes run side by side, each part normalising over its own images as a pmap device
  would; one update from the averaged gradients. XLA:CPU leaves cores idle within one program (its
  YNNPACK convolutions run on one thread), so parts running at once train faster (benchmarks/README.md).
Every way the old state's buffers are donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax.models import blocks
from resnet_jax.train.precision import DynamicLossScale, all_finite

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
DATA_AXIS = "data"
PMAP_AXIS = "batch"
PARALLELISM = ("jit", "pmap", "threads")


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and step, plus the BN running statistics and (fp16) the loss scale."""

    batch_stats: Any
    loss_scale: DynamicLossScale | None = None


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
    running statistics and the step's metrics, before any averaging over devices or threads."""
    scale = state.loss_scale

    def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Any]]:
        variables = {"params": params, "batch_stats": state.batch_stats}
        (logits, _), updates = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        scaled = loss if scale is None else loss * scale.scale
        return scaled, (loss, logits, updates["batch_stats"])

    grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    labels = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
    return grads, batch_stats, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


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


def compile_steps(mesh: Mesh, label_smoothing: float = 0.0, parallelism: str = "jit", threads: int = 1) -> Steps:
    """The train and eval steps compiled with jit over ``mesh``, with pmap over the local devices, or for
    ``threads`` parts of the batch of ``mesh``'s one CPU device (configs/default.py's `threads` says how many
    pay)."""
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
    if parallelism == "threads":
        return threaded_steps(mesh, label_smoothing, threads)
    raise ValueError(f"parallelism={parallelism!r}; choose one of {PARALLELISM}.")


def shard_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> Batch:
    """Assemble the global batch from this process's rows (every process passes its own slice)."""
    sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def threaded_steps(mesh: Mesh, label_smoothing: float, threads: int) -> Steps:
    """`compile_steps` for "threads": the step input is a tuple of ``threads`` batch parts on the one device."""
    device = check_threads(mesh, threads)
    train = ThreadedTrainStep(
        jax.jit(partial(part_gradients, label_smoothing=label_smoothing, parts=threads)),
        jax.jit(apply_mean_gradients, donate_argnums=0),
        ThreadPoolExecutor(threads, thread_name_prefix="resnet-jax-step"),
    )
    evaluate = jax.jit(eval_step)

    def evaluate_parts(state: TrainState, parts: Sequence[Batch]) -> Metrics:
        sums = list(train.pool.map(lambda part: jax.block_until_ready(evaluate(state, part)), parts))
        return {k: sum(part[k] for part in sums) for k in sums[0]}

    def put_batch(local: dict[str, np.ndarray]) -> tuple[Batch, ...]:
        size = len(next(iter(local.values()))) // threads
        return tuple(
            jax.device_put({k: v[i * size : (i + 1) * size] for k, v in local.items()}, device) for i in range(threads)
        )

    return Steps(
        train=train,
        evaluate=evaluate_parts,
        put_batch=put_batch,
        put_state=lambda state: jax.device_put(state, device),
        to_host=jax.device_get,
        compile_train=train.compiled,
    )


def check_threads(mesh: Mesh, threads: int) -> jax.Device:
    """The one CPU device "threads" runs on; refuses anything else before a compile."""
    if threads < 1:
        raise ValueError(
            f"threads={threads}: give the number of batch parts to run side by side, e.g. --config.threads=2."
        )
    devices = list(mesh.devices.flat)
    if len(devices) != 1 or jax.process_count() != 1:
        raise ValueError(
            f"parallelism='threads' splits the batch of one CPU device over host threads; this job has {len(devices)} "
            f"device(s) in {jax.process_count()} process(es): use --config.parallelism=jit or pmap."
        )
    if devices[0].platform != "cpu":
        raise ValueError(
            f"parallelism='threads' is for a CPU; JAX runs on {devices[0].platform} here: use --config.parallelism=jit."
        )
    return devices[0]


def part_gradients(state: TrainState, batch: Batch, label_smoothing: float, parts: int) -> tuple[Any, Any, Metrics]:
    """`step_gradients` traced as one of ``parts`` programs that run at once (the models pick their convolutions
    for that share of the cores: `blocks.programs_at_once`)."""
    with blocks.programs_at_once(parts):
        return step_gradients(state, batch, label_smoothing)


def apply_mean_gradients(state: TrainState, parts: Sequence[tuple[Any, Any, Metrics]]) -> tuple[TrainState, Metrics]:
    """`apply_step_gradients` of the mean of several parts' `step_gradients` (what pmap's all-reduce averages)."""
    grads, batch_stats, metrics = jax.tree.map(lambda *xs: sum(xs) / len(xs), *parts)
    return apply_step_gradients(state, grads, batch_stats, metrics)


class ThreadedTrainStep:
    """`train_step` over a tuple of batch parts: each part's `step_gradients` in its own host thread (so that the
    programs run side by side on the CPU's cores), then one `apply_mean_gradients` (the state donated)."""

    def __init__(self, gradients: Callable, update: Callable, pool: ThreadPoolExecutor) -> None:
        self.gradients, self.update, self.pool = gradients, update, pool

    def __call__(self, state: TrainState, parts: Sequence[Batch]) -> tuple[TrainState, Metrics]:
        outputs = list(self.pool.map(lambda part: jax.block_until_ready(self.gradients(state, part)), parts))
        return self.update(state, outputs)

    def compiled(
        self, state: TrainState, parts: Sequence[Batch], options: dict[str, Any] | None = None
    ) -> ThreadedTrainStep:
        """The same step with both programs compiled ahead of time for ``state`` and ``parts`` (with the XLA
        compiler ``options``, if given)."""
        gradients = self.gradients.lower(state, parts[0]).compile(options)
        outputs = jax.eval_shape(self.gradients, state, parts[0])
        update = self.update.lower(state, [outputs] * len(parts)).compile(options)
        return ThreadedTrainStep(gradients, update, self.pool)
