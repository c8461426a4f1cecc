"""ImageNet (tfds ``imagenet2012``) streamed through tf.data (`StreamSource`): JPEG bytes are decoded and augmented
on the fly.

Deterministic and resumable like the in-memory pipeline: the shuffle of epoch e is seeded by
(seed, e), each example's crop and flip by (seed, its position in this process's stream), and
tf.data keeps the order, so ``start_step=k`` yields the batches k, k+1, ... of a run from 0 that
had the same process count, after reading (not decoding) at most one epoch of records.
TensorFlow is imported inside the functions (`extras.require`): the in-memory data sets never load it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING

from resnet_jax.data.augment import CHANNEL_STATS
from resnet_jax.data.pipeline import Batch, BatchSettings, local_batch_size
from resnet_jax.extras import require

if TYPE_CHECKING:
    import tensorflow as tf

NAME = "imagenet2012"
IMAGE_SIZE = 224
RESIZE_SIZE = 256  # evaluation: shorter side resized to this, then the central IMAGE_SIZE square


@dataclasses.dataclass(frozen=True)
class StreamSource:
    """A tfds split too large for memory (ImageNet), read and decoded by tf.data as it is consumed.

    Its training batches resume exactly only with the same process count.
    """

    name: str
    split: str
    data_dir: str | None
    num_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    in_memory = False

    def check_settings(self, settings: BatchSettings) -> None:
        """The streamed pipeline crops its images to their size itself, and has no erasing or mixup."""
        self._check_image_size(settings)
        if settings.mixup_alpha or settings.random_erasing:
            raise ValueError(
                f"mixup and random erasing are not implemented for {self.name}; set mixup_alpha=0 and random_erasing=0."
            )

    def _check_image_size(self, settings: BatchSettings) -> None:
        if settings.image_size is not None:
            raise ValueError(
                f"image_size applies to in-memory data sets; {self.name} crops its images to their size itself. "
                "Leave image_size unset."
            )

    def train_batches(self, settings: BatchSettings, start_step: int = 0) -> Iterator[Batch]:
        """Endless training batches from ``start_step`` on: Inception-style crops (with ``augment``), see
        `train_dataset`."""
        self.check_settings(settings)
        return as_numpy(train_dataset(self, settings, start_step))

    def eval_batches(self, settings: BatchSettings) -> Iterator[Batch]:
        """Every example once: each process a contiguous share of the split, padded at its end (`eval_dataset`)."""
        self._check_image_size(settings)
        return as_numpy(eval_dataset(self, settings))


def load_imagenet(split: str = "train", data_dir: str | None = None, name: str = NAME) -> StreamSource:
    """Check that the tfds split is prepared and count it; nothing is read yet. ``name`` is ``imagenet2012`` or a
    data set of its features and ImageNet's statistics (``imagenet_synthetic``, `synthetic_jpegs`)."""
    tfds = require("tensorflow_datasets")

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        records = builder.as_dataset(split=split, shuffle_files=False)
    except (AssertionError, tfds.core.registered.DatasetNotFoundError) as error:  # tfds: "not prepared"
        if name != NAME:
            raise FileNotFoundError(f"{name} is not prepared in {data_dir or '~/tensorflow_datasets'}.") from error
        raise FileNotFoundError(
            f"imagenet2012 is not prepared in {data_dir or '~/tensorflow_datasets'}. ImageNet cannot be downloaded "
            "automatically: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org, put "
            "them in DIR/downloads/manual/, run `tfds build imagenet2012 --data_dir DIR` and pass data_dir=DIR."
        ) from error
    mean, std = CHANNEL_STATS[NAME]
    return StreamSource(
        name=name,
        split=split,
        data_dir=data_dir,
        num_examples=int(records.cardinality()),
        num_classes=builder.info.features["label"].num_classes,
        image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
        mean=mean,
        std=std,
    )


def random_resized_crop(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    image_size: int = IMAGE_SIZE,
    flip: bool = True,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Inception-style training crop of a JPEG: a random box of 8-100% of the area and aspect 3/4-4/3
    (`crop_window`), resized to ``image_size`` and mirrored with probability 1/2; a pure function of ``seed``
    (shape (2,)). float32 in [0, 255].

    Only the box is decoded (``decode_and_crop_jpeg``), and it is resized bilinearly without antialiasing, as
    TensorFlow's reference ResNet preprocessing does: antialiasing (PIL's way, and the evaluation view's) costs as
    much again as decoding (benchmarks/input-pipelines.md), for a random crop that each image gives once.
    """
    tf = require("tensorflow")

    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    window = crop_window(image_bytes, crop_seed, area_range, aspect_ratio_range)
    image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
    image = tf.image.resize(image, (image_size, image_size), method="bilinear")
    return tf.image.stateless_random_flip_left_right(image, flip_seed) if flip else image


def crop_window(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """The box of `random_resized_crop` as [top, left, height, width], from the JPEG's header alone; the whole
    image when 10 tries find no box in the ranges."""
    tf = require("tensorflow")

    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(image_bytes),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def resize_center_crop(
    image_bytes: tf.Tensor, image_size: int = IMAGE_SIZE, resize_size: int = RESIZE_SIZE
) -> tf.Tensor:
    """Evaluation view of a JPEG: the central ``image_size`` square of the image with its shorter side resized to
    ``resize_size`` (aspect kept, bilinear with antialiasing). float32 in [0, 255].

    Only the square's window of the original is decoded and resampled, with the few pixels beyond it that the
    resampling reaches: the same pixels as resizing the whole image and cropping, for about half the work.
    """
    tf = require("tensorflow")

    height_width = tf.image.extract_jpeg_shape(image_bytes)[:2]
    size = tf.cast(height_width, tf.float32)
    resized = tf.cast(tf.round(size * resize_size / tf.reduce_min(size)), tf.int32)
    scale = tf.cast(resized, tf.float32) / size  # per axis, as resizing to the rounded size has it
    corner = (resized - image_size) // 2  # of the crop, in the resized image
    reach = tf.cast(tf.math.ceil(tf.maximum(1.0, 1.0 / scale)), tf.int32) + 1  # of the kernel, in source pixels
    start = tf.maximum(tf.cast(tf.cast(corner, tf.float32) / scale, tf.int32) - reach, 0)
    stop = tf.minimum(
        tf.cast(tf.math.ceil(tf.cast(corner + image_size, tf.float32) / scale), tf.int32) + reach, height_width
    )
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.concat([start, stop - start], 0), channels=3)
    image = tf.raw_ops.ScaleAndTranslate(
        images=image[None],
        size=[image_size, image_size],
        scale=scale,
        translation=tf.cast(start, tf.float32) * scale - tf.cast(corner, tf.float32),
        kernel_type="triangle",  # what tf.image.resize's antialiased bilinear runs
        antialias=True,
    )[0]
    return tf.ensure_shape(image, (image_size, image_size, 3))


def train_dataset(
    source: StreamSource, settings: BatchSettings, start_step: int = 0, shuffle_buffer: int = 16_384
) -> tf.data.Dataset:
    """Endless batches of this process's equal share of the split; epochs never mix within a batch."""
    tf = require("tensorflow")
    tfds = require("tensorflow_datasets")

    seed, process_index, process_count = settings.seed, settings.process_index, settings.process_count
    local = settings.local_batch_size
    shard = tfds.even_splits(source.split, n=process_count, drop_remainder=True)[process_index]
    records = _records(source, shard)
    num_records = int(records.cardinality())
    steps = num_records // local
    if steps == 0:
        raise ValueError(f"{source.split} has {num_records} examples per process, fewer than one batch of {local}.")
    first_epoch, first_step = divmod(start_step, steps)

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.stack([tf.constant(seed, tf.int64), e])
        shuffle_seed = tf.random.stateless_uniform([], epoch_seed, minval=None, maxval=None, dtype=tf.int64)
        shuffled = records.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        stream_start = (e * process_count + process_index) * num_records
        skip = tf.where(e == first_epoch, tf.constant(first_step * local, tf.int64), 0)
        return shuffled.take(steps * local).enumerate(stream_start).skip(skip)

    mean, std = _scale(source)

    def preprocess(position: tf.Tensor, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if settings.augment:
            position_seed = tf.stack([tf.constant(seed, tf.int64), position])
            image = random_resized_crop(example["image"], position_seed, flip=settings.random_flip)
        else:
            image = resize_center_crop(example["image"])
        return {"image": (image - mean) / std, "label": tf.cast(example["label"], tf.int32)}

    dataset = tf.data.Dataset.range(first_epoch, tf.int64.max).flat_map(epoch)
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(dataset.batch(local, drop_remainder=True))


def eval_dataset(source: StreamSource, settings: BatchSettings) -> tf.data.Dataset:
    """Every example of the split once over all processes, in batches of one shape, padding masked out.

    Every process yields the same number of batches (the multi-host eval step runs in lockstep).
    """
    tf = require("tensorflow")
    tfds = require("tensorflow_datasets")

    process_index, process_count = settings.process_index, settings.process_count
    local = local_batch_size(settings.eval_batch_size, process_count)
    shard = tfds.split_for_jax_process(source.split, process_index=process_index, process_count=process_count)
    per_process = -(-source.num_examples // process_count)
    num_batches = -(-per_process // local)
    mean, std = _scale(source)

    def preprocess(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image = (resize_center_crop(example["image"]) - mean) / std
        return {"image": image, "label": tf.cast(example["label"], tf.int32), "mask": tf.constant(1.0)}

    padding = {"image": tf.zeros(source.image_shape), "label": tf.constant(0), "mask": tf.constant(0.0)}
    dataset = _records(source, shard).map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(num_batches * local)
    return _finish(dataset.batch(local))


def as_numpy(dataset: tf.data.Dataset) -> Iterator[Batch]:
    """The batches of a tf.data pipeline as numpy dicts, like the in-memory pipeline's."""
    tfds = require("tensorflow_datasets")

    return iter(tfds.as_numpy(dataset))


def _records(source: StreamSource, split: str) -> tf.data.Dataset:
    """The undecoded examples of ``split`` in their stored order (tfds shuffled them when it prepared the data)."""
    tfds = require("tensorflow_datasets")

    builder = tfds.builder(source.name, data_dir=source.data_dir)
    return builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})


def _scale(source: StreamSource) -> tuple[tf.Tensor, tf.Tensor]:
    """Mean and std in pixel units, to normalise images in [0, 255]."""
    tf = require("tensorflow")

    return tf.constant(source.mean) * 255, tf.constant(source.std) * 255


def _finish(dataset: tf.data.Dataset) -> tf.data.Dataset:
    tf = require("tensorflow")

    options = tf.data.Options()
    options.deterministic = True
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(options)
