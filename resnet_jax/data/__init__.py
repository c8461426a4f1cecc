"""Input pipelines: deterministic, resumable at any step, and sharded by process for multi-host training.

``load_source(dataset, split)`` gives a `Source`: an `ArraySource` held in memory or a `StreamSource` read by
tf.data. Either makes this process's training and evaluation batches for a `BatchSettings`
(``source.train_batches(settings, start_step)``, ``source.eval_batches(settings)``); `device.DeviceImages` makes
the same training batches on the accelerator, from `train_draws`. The in-memory data sets (IDX files, synthetic)
never import TensorFlow.
"""

from resnet_jax.data.arrays import ArraySource
from resnet_jax.data.augment import CHANNEL_STATS, mixup, normalize, one_hot, random_crop_flip, random_erasing
from resnet_jax.data.imagenet import StreamSource
from resnet_jax.data.pipeline import (
    Batch,
    BatchDraws,
    BatchSettings,
    Source,
    local_batch_size,
    measure_input_throughput,
    steps_per_epoch,
    train_draws,
)
from resnet_jax.data.sources import (
    DATASETS,
    load_idx_folder,
    load_run_source,
    load_source,
    load_tfds_arrays,
    read_idx,
    run_normalisation,
    synthetic,
)

__all__ = [
    "CHANNEL_STATS",
    "DATASETS",
    "ArraySource",
    "Batch",
    "BatchDraws",
    "BatchSettings",
    "Source",
    "StreamSource",
    "load_idx_folder",
    "load_run_source",
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
    "run_normalisation",
    "steps_per_epoch",
    "synthetic",
    "train_draws",
]
