"""Input pipelines: deterministic, resumable at any step, and sharded by process for multi-host training.

``load_source(dataset, split)`` gives the data; ``train_batches`` and ``eval_batches`` turn it into
numpy batches for this process; `device.DeviceImages` makes the same training batches on the accelerator,
from `train_draws`. The in-memory data sets (IDX files, synthetic) never import TensorFlow.
"""

from resnet_jax.data.augment import CHANNEL_STATS, mixup, normalize, one_hot, random_crop_flip, random_erasing
from resnet_jax.data.pipeline import (
    BatchDraws,
    eval_batches,
    local_batch_size,
    measure_input_throughput,
    steps_per_epoch,
    train_batches,
    train_draws,
)
from resnet_jax.data.sources import (
    DATASETS,
    ArraySource,
    StreamSource,
    load_idx_folder,
    load_source,
    load_tfds_arrays,
    read_idx,
    synthetic,
)

__all__ = [
    "CHANNEL_STATS",
    "DATASETS",
    "ArraySource",
    "BatchDraws",
    "StreamSource",
    "eval_batches",
    "load_idx_folder",
    "load_source",
    "load_tfds_arrays",
    "local_batch_size",
    "measure_input_throughput",
    "mixup",
    "normalize",
    "one_hot",
    "random_crop_flip",
    "random_erasing",
    "read_idx",
    "steps_per_epoch",
    "synthetic",
    "train_batches",
    "train_draws",
]
