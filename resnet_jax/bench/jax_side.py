"""The JAX side: the project's own train step (`create_train_state`, `compile_steps`, `create_optimizer`),
exactly as `resnet-jax train` runs it, on one device (or, in a worker of `JaxProcesses`, as one process of a
pmap job over one device per process)."""

from __future__ import annotations

import time

import jax
import ml_collections
import optax

from resnet_jax.bench.cases import LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, Case
from resnet_jax.models import create_model
from resnet_jax.train.optim import create_optimizer
from resnet_jax.train.steps import compile_steps, create_train_state, make_mesh

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def optimizer_config() -> ml_collections.ConfigDict:
    """The optimizer keys of configs/default.py: SGD, momentum 0.9, L2 weight decay on every parameter."""
    return ml_collections.ConfigDict(
        {
            "grad_clip_norm": 0.0,
            "weight_decay": WEIGHT_DECAY,
            "weight_decay_exclude_bn_and_bias": False,
            "optimizer": "sgd",
            "momentum": MOMENTUM,
            "nesterov": False,
        }
    )


class JaxStep:
    """Times ``steps.train`` of `compile_steps` on a one-device mesh (state donated, metrics fetched each step).

    In a multi-process job: pmap over every process's device, this process feeding its rows of the batch.
    """

    framework = "jax"
    variant = "jit"

    def __init__(self, case: Case, seed: int = 0) -> None:
        model = create_model(case.model, num_classes=case.num_classes, dtype=DTYPES[case.precision])
        tx = create_optimizer(optimizer_config(), optax.constant_schedule(LEARNING_RATE))
        if jax.process_count() == 1:
            self._steps = compile_steps(make_mesh(jax.devices()[:1]))
        else:
            self._steps = compile_steps(make_mesh(), parallelism="pmap")
        self._state = self._steps.put_state(create_train_state(model, tx, case.input_shape, seed))
        images, labels = case.synthetic_batch(seed)
        share = case.batch // jax.process_count()
        rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        self._batch = self._steps.put_batch({"image": images[rows], "label": labels[rows]})
        self._train = None

    def compile(self) -> float:
        """Lower and compile the step; returns the seconds it took."""
        began = time.perf_counter()
        self._train = self._steps.train.lower(self._state, self._batch).compile()
        return time.perf_counter() - began

    def run(self, num_steps: int) -> list[float]:
        """Seconds of each of ``num_steps`` steps, each waited for."""
        times = []
        for _ in range(num_steps):
            began = time.perf_counter()
            self._state, metrics = self._train(self._state, self._batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - began)
        return times

    def peak_memory(self) -> tuple[int | None, str]:
        """The device's peak bytes in use where it reports them (GPU, TPU), else the step's XLA buffers."""
        stats = jax.local_devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
        memory = self._train.memory_analysis()
        size = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
        return int(size), "XLA buffers of the step (arguments + outputs + temporaries)"
