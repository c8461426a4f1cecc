"""The JAX side: the project's own train step (`create_train_state`, `compile_steps`, `create_optimizer`),
exactly as `resnet-jax train` runs it: for a suite row on one device (or, in a worker of `JaxProcesses`, as
one process of a pmap job over one device per process), for ``--config`` as the experiment trains."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from resnet_jax import data
from resnet_jax.bench.cases import LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, Case
from resnet_jax.cpu.batch_parts import BatchPartsTrainStep
from resnet_jax.cpu.conv import model_conv
from resnet_jax.cpu.processes import available_cores
from resnet_jax.models import create_model
from resnet_jax.train.feed import DeviceFeed, create_feed
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import batch_settings, build_model, check_config, check_feed
from resnet_jax.train.steps import Steps, TrainState, compile_steps, create_train_state, make_mesh

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
PRECISIONS_OF_DTYPES = {dtype: precision for precision, dtype in DTYPES.items()}
XlaOptions = dict[str, bool | int | float | str]  # XLA compiler options of one program, as ``.compile`` takes them


def parse_xla_options(text: str) -> XlaOptions:
    """``NAME=VALUE,NAME=VALUE`` as XLA_FLAGS spells them, without the dashes, to compiler options: XLA wants
    true/false as booleans and numbers as numbers."""
    options: XlaOptions = {}
    for item in text.split(","):
        name, equals, value = item.strip().partition("=")
        if not name or not equals:
            raise ValueError(
                f"--xla-options {text}: give NAME=VALUE pairs separated by commas, e.g. "
                "xla_gpu_deterministic_ops=true,xla_gpu_autotune_level=0."
            )
        options[name] = {"true": True, "false": False}.get(value.lower(), _number_or_text(value))
    return options


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def spell_xla_options(options: XlaOptions) -> str:
    """The options as `parse_xla_options` reads them, for a row's name."""
    spelled = {name: str(value).lower() if isinstance(value, bool) else value for name, value in options.items()}
    return ",".join(f"{name}={value}" for name, value in spelled.items())


def check_xla_options(rows: Sequence[XlaOptions]) -> None:
    """Refuse an option XLA does not know, or a value it cannot read, by compiling an empty program with each
    row's options (milliseconds) before any step compiles (minutes on a GPU)."""
    for options in rows:
        try:
            jax.jit(lambda: 0).lower().compile(options)
        except jax.errors.JaxRuntimeError as error:
            reason = str(error).removeprefix("INVALID_ARGUMENT: ")
            raise ValueError(
                f"--xla-options {spell_xla_options(options)}: {reason}. The names are XLA's debug options, as "
                "XLA_FLAGS takes them (without the dashes)."
            ) from None


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
    """Times ``steps.train`` of `compile_steps` (state donated, metrics fetched each step) on one batch.

    `of_case`: a suite row on one device (in a multi-process job: pmap over every process's device, this
    process feeding its rows of the batch). `of_config`: an experiment's step as training runs it.
    """

    framework = "jax"

    def __init__(
        self,
        case: Case,
        steps: Steps,
        state: TrainState,
        batch: dict[str, Any],
        variant: str,
        xla_options: XlaOptions | None = None,
    ) -> None:
        self.case, self.variant = case, with_options(variant, xla_options)
        self._steps, self._xla_options = steps, xla_options
        self._state = steps.put_state(state)
        self._batch = steps.put_batch(batch)
        self._train = None

    @classmethod
    def of_case(cls, case: Case, seed: int = 0, batch_parts: int = 0, xla_options: XlaOptions | None = None) -> JaxStep:
        """A suite row: the bench's optimizer (`optimizer_config`) on a synthetic batch; ``batch_parts`` > 0 times
        parallelism "batch_parts" (on one CPU device) instead of jit; ``xla_options`` compile it with those
        options."""
        parallelism = "pmap" if jax.process_count() > 1 else "batch_parts" if batch_parts else "jit"
        conv = model_conv(jax.default_backend(), parallelism, batch_parts, len(available_cores()))
        model = create_model(case.model, num_classes=case.num_classes, dtype=DTYPES[case.precision], conv=conv)
        tx = create_optimizer(optimizer_config(), optax.constant_schedule(LEARNING_RATE))
        devices = jax.devices() if parallelism == "pmap" else jax.devices()[:1]
        steps = compile_steps(make_mesh(devices), parallelism=parallelism, batch_parts=batch_parts)
        images, labels = case.synthetic_batch(seed)
        share = case.batch // jax.process_count()
        rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
        state = create_train_state(model, tx, case.input_shape, seed)
        variant = f"batch_parts ({batch_parts})" if batch_parts else parallelism
        return cls(case, steps, state, {"image": images[rows], "label": labels[rows]}, variant, xla_options)

    @classmethod
    def of_config(
        cls,
        config: ml_collections.ConfigDict,
        source: data.Source,
        xla_options: XlaOptions | None = None,
    ) -> JaxStep | DeviceFeedStep:
        """An experiment's own step, as `resnet-jax train --config` builds it (model overrides, optimizer and
        schedule, label smoothing, parallelism, every device), on the first batch of its input pipeline; with
        ``data_on_device``, its calls of ``steps_per_call`` steps on batches made on the devices; compiled with
        ``xla_options``, if given."""
        check_config(config)
        check_feed(config, source)
        if config.dtype not in PRECISIONS_OF_DTYPES:
            raise ValueError(f"dtype={config.dtype!r}: bench times {' and '.join(PRECISIONS_OF_DTYPES)} steps.")
        batch = None if config.data_on_device else next(source.train_batches(batch_settings(config)))
        height, width, channels = source.image_shape if batch is None else batch["image"].shape[1:]
        if height != width:
            raise ValueError(f"{config.dataset} images are {height}x{width}; set --config.image_size=N to time a size.")
        case = Case(
            config.model, height, config.batch_size, PRECISIONS_OF_DTYPES[config.dtype], channels, source.num_classes
        )
        schedule = learning_rate_schedule(config, data.steps_per_epoch(source.num_examples, config.batch_size))
        tx = create_optimizer(config, schedule)
        state = create_train_state(build_model(config, source.num_classes), tx, case.input_shape, config.seed)
        mesh = make_mesh()
        steps = compile_steps(mesh, config.label_smoothing, config.parallelism, config.batch_parts)
        if batch is None:
            variant = f"jit, data on the device, {config.steps_per_call} step(s) per call"
            feed = create_feed(config, source, steps, mesh, 0)
            return DeviceFeedStep(case, feed, steps.put_state(state), variant, xla_options)
        return cls(case, steps, state, batch, config.parallelism, xla_options)

    def compile(self) -> float:
        """Lower and compile the step; returns the seconds it took."""
        began = time.perf_counter()
        self._train = self._steps.compile_train(self._state, self._batch, self._xla_options)
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
        if peak := device_peak_memory():
            return peak
        if isinstance(self._train, BatchPartsTrainStep):
            parts = len(self._batch) * xla_buffer_bytes(self._train.gradients)
            return parts + xla_buffer_bytes(self._train.update), "XLA buffers of the parts' programs and the update"
        return xla_buffer_bytes(self._train), "XLA buffers of the step (arguments + outputs + temporaries)"


class DeviceFeedStep:
    """Times the calls of a `DeviceFeed` (``steps_per_call`` steps each, batches made on the devices, metrics
    fetched each call); a step's time is its call's over the steps it ran."""

    framework = "jax"

    def __init__(
        self, case: Case, feed: DeviceFeed, state: TrainState, variant: str, xla_options: XlaOptions | None = None
    ) -> None:
        self.case, self.variant = case, with_options(variant, xla_options)
        self._feed, self._state, self._xla_options = feed, state, xla_options

    def compile(self) -> float:
        return self._feed.compile(self._state, self._xla_options)

    def run(self, num_steps: int) -> list[float]:
        """Seconds of each of ``num_steps`` steps (or more, to the end of the last call)."""
        times: list[float] = []
        while len(times) < num_steps:
            count = self._feed.steps_per_call
            began = time.perf_counter()
            self._state, metrics = self._feed(self._state, count)
            jax.block_until_ready(metrics)
            times += [(time.perf_counter() - began) / count] * count
        return times

    def peak_memory(self) -> tuple[int | None, str]:
        """As `JaxStep.peak_memory`, for the call of ``steps_per_call`` steps."""
        if peak := device_peak_memory():
            return peak
        call = self._feed.compiled[self._feed.steps_per_call]
        return xla_buffer_bytes(call), "XLA buffers of a call (arguments, with the data set, + outputs + temporaries)"


def with_options(variant: str, xla_options: XlaOptions | None) -> str:
    """A row's variant, naming the XLA options it was compiled with."""
    return f"{variant}, {spell_xla_options(xla_options)}" if xla_options else variant


def device_peak_memory() -> tuple[int, str] | None:
    """The device's peak bytes in use, where it reports them (GPU, TPU; a CPU does not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return (int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use") if "peak_bytes_in_use" in stats else None


def xla_buffer_bytes(compiled: Any) -> int:
    """Arguments, outputs and temporaries of a compiled program, donated arguments counted once."""
    memory = compiled.memory_analysis()
    return int(
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
