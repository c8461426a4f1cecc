"""Whole training epochs with the data set resident on the device, JAX against PyTorch.

A CIFAR-sized step is short enough on a GPU that feeding it from the host can cost more than the step. Here
both frameworks copy the uint8 images to the device once and make every batch there (the examples of a
permutation per epoch, pad-4 random crop, flip, normalisation), so an epoch's time is the training alone:
for JAX the project's train step fed by `DeviceFeed`, as `resnet-jax train --config.data_on_device=True`
trains (the host draws the examples and crops, a few KB per step), for PyTorch the same model, optimizer
and augmentation in torch ops. Epochs are timed in turn, like the step rows, and the ratio is PyTorch's
epoch time over JAX's."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import optax

from resnet_jax import data
from resnet_jax.bench.cases import LEARNING_RATE, Case
from resnet_jax.bench.harness import Runner, Settings, compile_runners
from resnet_jax.bench.inputs import CIFAR_SHAPE
from resnet_jax.bench.jax_side import DTYPES, optimizer_config
from resnet_jax.bench.torch_side import TorchStep
from resnet_jax.cpu.conv import model_conv
from resnet_jax.cpu.processes import available_cores
from resnet_jax.models import create_model
from resnet_jax.train.feed import DeviceFeed
from resnet_jax.train.optim import create_optimizer
from resnet_jax.train.steps import compile_steps, create_train_state, make_mesh


class EpochRunner(Runner, Protocol):
    """One framework's whole epochs of one model (`JaxEpoch`, `TorchEpoch`)."""

    def run_epoch(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class EpochRow:
    """One runner's epochs of one model: compile (and first step) seconds, then the seconds of each epoch."""

    case: Case
    images: int
    framework: str
    variant: str
    compile_seconds: float
    epoch_seconds: list[float]

    @property
    def seconds(self) -> float:
        return statistics.median(self.epoch_seconds)

    @property
    def name(self) -> str:
        return f"{self.framework} {self.variant}"

    @property
    def label(self) -> str:
        return epoch_label(self.case, self.images)


def epoch_label(case: Case, images: int) -> str:
    """What a model's epoch rows and progress lines begin with."""
    return f"{case.model} epoch of {images:,} CIFAR-shaped images on the device, batch {case.batch} {case.precision}"


def epoch_ratio(row: EpochRow, other: EpochRow) -> float:
    """How many times faster ``row`` ran than ``other`` (JAX than torch, or a further JAX row than the first):
    the median over rounds of ``other``'s epoch time over ``row``'s in the same round."""
    pairs = zip(row.epoch_seconds, other.epoch_seconds, strict=True)
    return statistics.median(theirs / mine for mine, theirs in pairs)


class JaxEpoch:
    """The project's train step on batches made on the device, as `resnet-jax train --config.data_on_device=True`
    trains (`DeviceFeed`): one compiled call per step, or with ``scan_steps`` > 1 that many steps per call
    (the steps left over at an epoch's end go one by one)."""

    framework = "jax"

    def __init__(self, case: Case, source: data.ArraySource, seed: int = 0, scan_steps: int = 1) -> None:
        conv = model_conv(jax.default_backend(), "jit", 1, len(available_cores()))
        model = create_model(case.model, num_classes=source.num_classes, dtype=DTYPES[case.precision], conv=conv)
        tx = create_optimizer(optimizer_config(), optax.constant_schedule(LEARNING_RATE))
        mesh = make_mesh(jax.devices()[:1])
        self._state = compile_steps(mesh).put_state(create_train_state(model, tx, source.image_shape, seed))
        self._feed = DeviceFeed(mesh, source, data.BatchSettings(case.batch, seed=seed), steps_per_call=scan_steps)
        self._steps_per_epoch = data.steps_per_epoch(source.num_examples, case.batch)
        self.variant = "jit" if scan_steps == 1 else f"jit, {scan_steps} steps per call"

    def compile(self) -> float:
        """Compile the call(s) and take a first step; returns the seconds."""
        began = time.perf_counter()
        self._feed.compile(self._state)
        self._state, metrics = self._feed(self._state, 1)
        jax.block_until_ready(metrics)
        return time.perf_counter() - began

    def run_epoch(self) -> float:
        """Seconds of one epoch's steps, dispatched call after call and waited for at the end."""
        began = time.perf_counter()
        done = 0
        while done < self._steps_per_epoch:
            count = self._feed.steps_in_call(done, self._steps_per_epoch)
            self._state, metrics = self._feed(self._state, count)
            done += count
        jax.block_until_ready((self._state, metrics))
        return time.perf_counter() - began


class TorchEpoch:
    """`TorchStep`'s model, optimizer and precision, over batches that torch makes on its device."""

    framework = "torch"

    def __init__(self, case: Case, source: data.ArraySource, variant: str, seed: int = 0, pad: int = 4) -> None:
        self._step = TorchStep(case, variant, seed)
        self.variant = variant
        torch = self._torch = self._step.torch
        device = self._step.device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._pad = pad
        padded = torch.nn.functional.pad(torch.from_numpy(source.images), (0, 0) + (self._pad, self._pad) * 2)
        self._images = padded.to(device)  # (N, H + 2 pad, W + 2 pad, C) uint8
        self._labels = torch.from_numpy(source.labels).long().to(device)
        self._mean = torch.tensor(source.mean, dtype=torch.float32, device=device) * 255
        self._std = torch.tensor(source.std, dtype=torch.float32, device=device) * 255
        self._height, self._width = source.image_shape[:2]
        self._batch = case.batch
        self._steps_per_epoch = data.steps_per_epoch(source.num_examples, case.batch)

    def make_batch(self, index: Any) -> Any:
        """NCHW float images of the examples ``index``: random crops of the padded images, half of them flipped,
        normalised, in the memory format of the torch variant."""
        torch, size = self._torch, len(index)
        offsets = torch.randint(0, 2 * self._pad + 1, (size, 2), generator=self._generator, device=index.device)
        rows = offsets[:, :1] + torch.arange(self._height, device=index.device)
        cols = offsets[:, 1:] + torch.arange(self._width, device=index.device)
        crops = self._images[index[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        flipped = torch.rand(size, generator=self._generator, device=index.device) < 0.5
        crops = torch.where(flipped[:, None, None, None], crops.flip(2), crops)
        images = ((crops.float() - self._mean) / self._std).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        return self._step.in_memory_format(images)

    def compile(self) -> float:
        """One step (where torch.compile compiles); returns its seconds."""
        began = time.perf_counter()
        index = self._torch.arange(self._batch, device=self._labels.device)
        self._step.step(self.make_batch(index), self._labels[index])
        self._step.synchronize()
        return time.perf_counter() - began

    def run_epoch(self) -> float:
        """Seconds of one epoch: a fresh permutation, every full batch of it, waited for at the end."""
        torch = self._torch
        began = time.perf_counter()
        order = torch.randperm(len(self._labels), generator=self._generator, device=self._labels.device)
        for step in range(self._steps_per_epoch):
            index = order[step * self._batch : (step + 1) * self._batch]
            self._step.step(self.make_batch(index), self._labels[index])
        self._step.synchronize()
        return time.perf_counter() - began


def bench_epochs(
    models: Sequence[str],
    batch: int,
    precision: str,
    images: int,
    settings: Settings,
    torch_variants: Sequence[str] = (),
    report: Any = lambda rows: None,
    scan_steps: int = 0,
    say: Callable[[str], None] = lambda line: None,
) -> list[EpochRow]:
    """Each model's epochs over ``images`` (at least ``batch``) synthetic CIFAR-shaped images: compile, one
    untimed epoch, then ``settings.repeats`` rounds of one epoch per runner in turn. ``scan_steps`` > 1 adds a
    JAX row that runs that many steps per compiled call. ``say`` hears each stage as it begins."""
    source = data.synthetic(num_examples=images, image_shape=CIFAR_SHAPE, seed=0)
    rows = []
    for model in models:
        case = Case(model, CIFAR_SHAPE[0], batch, precision, num_classes=source.num_classes)
        runners: list[EpochRunner] = [JaxEpoch(case, source)]
        if scan_steps > 1:
            runners.append(JaxEpoch(case, source, scan_steps=scan_steps))
        runners += [TorchEpoch(case, source, variant) for variant in torch_variants]
        label = epoch_label(case, images)
        compile_seconds = compile_runners(label, runners, say)
        for runner in runners:
            runner.run_epoch()
        say(f"{label}: timing {settings.repeats} round(s) of an epoch of each")
        seconds: list[list[float]] = [[] for _ in runners]
        for _ in range(settings.repeats):
            for runner, times in zip(runners, seconds, strict=True):
                times.append(runner.run_epoch())
        model_rows = [
            EpochRow(case, images, runner.framework, runner.variant, compiled, times)
            for runner, compiled, times in zip(runners, compile_seconds, seconds, strict=True)
        ]
        report(model_rows)
        rows += model_rows
    return rows
