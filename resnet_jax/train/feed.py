"""Where the train step's batches come from, and how many steps one call runs.

- `HostFeed`: the host pipeline's batches (`Source.train_batches`), one compiled step per call: every data set
  and every parallelism.
- `DeviceFeed`: an in-memory data set copied to the accelerators once (`DeviceImages`), each batch made
  inside the compiled step from the host's `BatchDraws`, and ``steps_per_call`` steps per call (`lax.scan`
  over the batch maker and the step). On a GPU a CIFAR-sized step is shorter than the host takes to make
  its batch or to launch its kernels one call at a time (benchmarks/README.md).

Both give the same batches for the same seed and step, so a run can switch between them when it resumes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import jax
import ml_collections
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from resnet_jax import data
from resnet_jax.data.device import DeviceImages
from resnet_jax.train.runs import batch_settings
from resnet_jax.train.steps import DATA_AXIS, Metrics, Steps, TrainState, train_step


def create_feed(
    config: ml_collections.ConfigDict, source: data.Source, steps: Steps, mesh: Mesh, start_step: int = 0
) -> HostFeed | DeviceFeed:
    """The batches of ``config`` from ``start_step`` on: from the host pipeline, or made on the devices of ``mesh``
    (``data_on_device``; `runs.check_feed` says whether it can)."""
    settings = batch_settings(config)
    if not config.data_on_device:
        return HostFeed(steps, source.train_batches(settings, start_step))
    return DeviceFeed(
        mesh,
        source,
        settings,
        start_step,
        steps_per_call=config.steps_per_call,
        label_smoothing=config.label_smoothing,
    )


class HostFeed:
    """`Steps.train` on batches from the host pipeline, one step per call."""

    steps_per_call = 1

    def __init__(self, steps: Steps, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self._steps, self._batches = steps, batches
        self._train = steps.train
        self._first: object | None = None

    def compile(self, state: TrainState) -> float:
        """Compile the step for the first batch, which the first call then trains on; returns the seconds."""
        self._first = self._steps.put_batch(next(self._batches))
        began = time.perf_counter()
        self._train = self._steps.compile_train(state, self._first)
        return time.perf_counter() - began

    def steps_in_call(self, step: int, stop: int) -> int:
        return 1

    def __call__(self, state: TrainState, count: int) -> tuple[TrainState, Metrics]:
        """The next step (``count`` is 1); its metrics."""
        batch = self._first if self._first is not None else self._steps.put_batch(next(self._batches))
        self._first = None
        return self._train(state, batch)


class DeviceFeed:
    """Training on batches made on the devices of ``mesh`` (jit: the state replicated, each batch sharded on the
    "data" axis) from ``source`` copied there once: the batches of ``settings`` (crop and flip alone) from
    ``start_step`` on, ``steps_per_call`` steps a call."""

    def __init__(
        self,
        mesh: Mesh,
        source: data.ArraySource,
        settings: data.BatchSettings,
        start_step: int = 0,
        *,
        steps_per_call: int = 1,
        label_smoothing: float = 0.0,
    ) -> None:
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self.images = DeviceImages(source, settings.applied_padding, self._replicated)
        self._draws = data.train_draws(source.num_examples, settings, start_step)
        self.steps_per_call = steps_per_call
        self._batch_size = settings.batch_size
        body = partial(
            self._train_steps,
            batch_sharding=NamedSharding(mesh, PartitionSpec(DATA_AXIS)),
            label_smoothing=label_smoothing,
            # XLA:CPU leaves the convolutions of a loop body to a naive loop, no YNNPACK and no Eigen canonical
            # layout (a 3x3 kernel gradient 50x slower, jax-ml/jax#12868), so there the steps are unrolled.
            unroll=mesh.devices.flat[0].platform == "cpu",
        )
        replicated = self._replicated
        self._train = jax.jit(body, in_shardings=replicated, out_shardings=replicated, donate_argnums=0)
        self.compiled: dict[int, Any] = {}  # steps per call -> its compiled program

    def _train_steps(
        self,
        state: TrainState,
        images: jax.Array,
        labels: jax.Array,
        draws: data.BatchDraws,
        batch_sharding: NamedSharding,
        label_smoothing: float,
        unroll: bool,
    ) -> tuple[TrainState, Metrics]:
        def step(state: TrainState, draws: data.BatchDraws) -> tuple[TrainState, Metrics]:
            batch = lax.with_sharding_constraint(self.images.batch(images, labels, draws), batch_sharding)
            return train_step(state, batch, label_smoothing)

        if draws.index.shape[0] == 1:  # no loop (whose convolutions XLA:CPU would leave to its naive emitter)
            state, metrics = step(state, jax.tree.map(lambda x: x[0], draws))
            return state, jax.tree.map(lambda x: x[None], metrics)
        return lax.scan(step, state, draws, unroll=unroll)

    def compile(self, state: TrainState, options: dict[str, Any] | None = None) -> float:
        """Compile the call of ``steps_per_call`` steps (with the XLA compiler ``options``, if given); returns the
        seconds. (A call of one step, which only a stop that ``steps_per_call`` does not divide needs, compiles
        when first made, if ever: most runs never make one.)"""
        began = time.perf_counter()
        count = self.steps_per_call

        def drawn(*shape: int, dtype: type = np.int32) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((count, self._batch_size, *shape), dtype, sharding=self._replicated)

        draws = data.BatchDraws(drawn(), drawn(2), drawn(dtype=np.bool_))
        lowered = self._train.lower(state, self.images.images, self.images.labels, draws)
        self.compiled[count] = lowered.compile(options)
        return time.perf_counter() - began

    def steps_in_call(self, step: int, stop: int) -> int:
        """How many steps the call at ``step`` runs: ``steps_per_call``, or 1 where fewer are left before ``stop``."""
        return self.steps_per_call if stop - step >= self.steps_per_call else 1

    def __call__(self, state: TrainState, count: int) -> tuple[TrainState, Metrics]:
        """The next ``count`` steps (1 or ``steps_per_call``) in one call; metrics with a leading axis of steps."""
        drawn = [next(self._draws) for _ in range(count)]
        stacked = data.BatchDraws(
            np.stack([d.index for d in drawn]).astype(np.int32),
            np.stack([d.offsets for d in drawn]).astype(np.int32),
            np.stack([d.flips for d in drawn]),
        )
        draws = jax.tree.map(partial(jax.make_array_from_process_local_data, self._replicated), stacked)
        train = self.compiled.get(count, self._train)
        return train(state, self.images.images, self.images.labels, draws)
