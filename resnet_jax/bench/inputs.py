"""Input-pipeline throughput: the host pipeline of training (`ArraySource.train_batches`) on Fashion-MNIST and on
CIFAR-shaped data, and the device-resident pipeline of `--config.data_on_device=True`, which keeps the whole
uint8 data set on the accelerator and gathers, crops, flips and normalises each batch there (`DeviceImages`;
no host-to-device copy of images per step)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import ml_collections

from resnet_jax import data
from resnet_jax.data.device import DeviceImages
from resnet_jax.train.runs import batch_settings

CIFAR_SHAPE = (32, 32, 3)


@dataclasses.dataclass(frozen=True)
class InputRow:
    name: str
    img_per_s: float
    batch: int
    where: str  # "host" or "device"


def device_batches(source: data.ArraySource, batch: int, seed: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Endless training batches made on the device (`DeviceImages`, pad-4 crop and flip), one compiled call each,
    each waited for so that timing counts the work and not only its dispatch."""
    images = DeviceImages(source, pad=4)
    make = jax.jit(images.batch)
    for draws in data.train_draws(source.num_examples, data.BatchSettings(batch, seed=seed)):
        yield jax.block_until_ready(make(images.images, images.labels, draws))


def input_rows(batch: int, num_batches: int, seed: int = 0) -> tuple[list[InputRow], list[str]]:
    """Images/s of each pipeline (pad-4 crop + flip, as the CIFAR recipes), and why any was skipped."""
    rows, skipped = [], []
    cifar = data.synthetic(num_examples=10 * batch, image_shape=CIFAR_SHAPE, seed=seed)
    sources = {"CIFAR-shaped 32x32x3 (synthetic)": cifar}
    try:
        # Where it is already: a benchmark downloads nothing.
        sources = {"Fashion-MNIST 28x28x1": data.load_source("fashion_mnist", "train", download=False)} | sources
    except (FileNotFoundError, ValueError) as error:
        skipped.append(f"input Fashion-MNIST: no data here ({error})")
    for name, source in sources.items():
        batches = source.train_batches(data.BatchSettings(batch, seed=seed))
        rows.append(InputRow(name, data.measure_input_throughput(batches, num_batches), batch, "host"))
    rate = data.measure_input_throughput(device_batches(cifar, batch, seed), num_batches)
    rows.append(InputRow("CIFAR-shaped 32x32x3 (synthetic), device-resident", rate, batch, "device"))
    return rows, skipped


def config_input_row(config: ml_collections.ConfigDict, source: data.Source, num_batches: int) -> InputRow:
    """Images/s of an experiment's own training pipeline: its data, batch, image size and augmentation."""
    rate = data.measure_input_throughput(source.train_batches(batch_settings(config)), num_batches)
    return InputRow(f"{config.dataset} {config.train_split} (the config's pipeline)", rate, config.batch_size, "host")
