"""Batch parts on host threads: a train step on one CPU device whose batch is cut into parts whose programs run
side by side, one host thread each (``--config.parallelism=batch_parts``).

XLA:CPU leaves cores idle within one program (its YNNPACK convolutions run on one thread), but runs programs
called from different host threads at once, even on one device; so a batch in parts, each part's forward and
backward pass called from its own thread, trains faster than the whole batch in one program
(benchmarks/README.md). Each part normalises over its own images, as a device of pmap does, and one update
applies the mean of the parts' gradients: the step of pmap over as many devices.

The train step itself (`step_gradients`, the update) is `resnet_jax.train.steps`'; this module runs its
programs over the parts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BatchParts:
    """``count`` parts of each batch on one CPU ``device``, their programs called from the threads of ``pool``."""

    device: jax.Device
    count: int
    pool: ThreadPoolExecutor

    @classmethod
    def on(cls, devices: Sequence[jax.Device], count: int) -> BatchParts:
        """Parts on the one CPU device of ``devices``; refuses anything else before a compile."""
        if count < 1:
            raise ValueError(
                f"batch_parts={count}: give the number of batch parts to run side by side, e.g. --config.batch_parts=2."
            )
        if len(devices) != 1 or jax.process_count() != 1:
            raise ValueError(
                f"parallelism='batch_parts' splits the batch of one CPU device over host threads; this job has "
                f"{len(devices)} device(s) in {jax.process_count()} process(es): use --config.parallelism=jit or pmap."
            )
        if devices[0].platform != "cpu":
            raise ValueError(
                f"parallelism='batch_parts' is for a CPU; JAX runs on {devices[0].platform} here: use "
                "--config.parallelism=jit."
            )
        return cls(devices[0], count, ThreadPoolExecutor(count, thread_name_prefix="resnet-jax-step"))

    def split(self, local: dict[str, np.ndarray]) -> tuple[Batch, ...]:
        """The batch ``local`` as ``count`` equal parts on the device, each with its index as "part" (the train
        step draws each part's stochastic-depth masks from it)."""
        size = len(next(iter(local.values()))) // self.count
        return tuple(
            jax.device_put(
                {**{k: v[i * size : (i + 1) * size] for k, v in local.items()}, "part": np.int32(i)}, self.device
            )
            for i in range(self.count)
        )

    def run(self, program: Callable[[Any, Batch], Any], state: Any, parts: Sequence[Batch]) -> list[Any]:
        """``program(state, part)`` for every part, each called from its own thread and waited for there."""
        return list(self.pool.map(lambda part: jax.block_until_ready(program(state, part)), parts))

    def total(self, program: Callable[[Any, Batch], dict[str, Any]], state: Any, parts: Sequence[Batch]) -> dict:
        """The sums of `run`'s outputs (dicts of sums, such as an eval step's) over the parts."""
        sums = self.run(program, state, parts)
        return {k: sum(part[k] for part in sums) for k in sums[0]}


class BatchPartsTrainStep:
    """A train step over a tuple of batch parts: ``gradients(state, part)`` of every part in its own thread, then
    one ``update(state, outputs)`` of them all (the state donated)."""

    def __init__(self, parts: BatchParts, gradients: Callable, update: Callable) -> None:
        self.parts, self.gradients, self.update = parts, gradients, update

    def __call__(self, state: Any, parts: Sequence[Batch]) -> tuple[Any, Any]:
        return self.update(state, self.parts.run(self.gradients, state, parts))

    def compiled(
        self, state: Any, parts: Sequence[Batch], options: dict[str, Any] | None = None
    ) -> BatchPartsTrainStep:
        """The same step with both programs compiled ahead of time for ``state`` and ``parts`` (with the XLA
        compiler ``options``, if given)."""
        gradients = self.gradients.lower(state, parts[0]).compile(options)
        outputs = jax.eval_shape(self.gradients, state, parts[0])
        update = self.update.lower(state, [outputs] * len(parts)).compile(options)
        return BatchPartsTrainStep(self.parts, gradients, update)
