"""The input pipeline: IDX and tfds sources, augmentation, and batches that are deterministic, resumable and
sharded by process. Data sets are written here in their real on-disk formats, or mocked by tfds' own
``mock_data``; nothing is downloaded."""

from __future__ import annotations

import gc
import itertools
import subprocess
import sys
import threading

import chex
import jax
import ml_collections
import numpy as np
import pytest
from idx_files import make_idx_folder, write_idx

from resnet_jax.data import (
    ArraySource,
    BatchSettings,
    StreamSource,
    load_idx_folder,
    load_run_source,
    load_source,
    load_tfds_arrays,
    measure_input_throughput,
    mixup,
    normalize,
    one_hot,
    random_crop_flip,
    random_erasing,
    read_idx,
    run_normalisation,
    steps_per_epoch,
    synthetic,
    train_draws,
)
from resnet_jax.data.augment import apply_crop_flip, sample_erasing
from resnet_jax.data.device import DeviceImages
from resnet_jax.data.pipeline import prefetch
from resnet_jax.data.sources import FASHION_MNIST_DIR
from resnet_jax.faults import CorruptDataError


def take(batches, n: int) -> list[dict]:
    return list(itertools.islice(batches, n))


def indexed_source(n: int, shape: tuple[int, int, int] = (8, 8, 3)) -> ArraySource:
    """Example i has label i, so batches tell which examples they hold."""
    images = np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8)
    channels = shape[-1]
    return ArraySource(images, np.arange(n, dtype=np.int32), n, "indexed", (0.5,) * channels, (0.25,) * channels)


# --- IDX files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_idx_folder_reads_both_splits(tmp_path, compressed):
    arrays = make_idx_folder(tmp_path, compressed)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        source = load_idx_folder(tmp_path, split)
        images, labels = arrays[prefix]
        assert source.images.shape == (len(images), 28, 28, 1)
        np.testing.assert_array_equal(source.images[..., 0], images)
        np.testing.assert_array_equal(source.labels, labels)
        assert source.labels.dtype == np.int32
        assert source.num_classes == 10 and source.name == "fashion_mnist" and len(source.class_names) == 10


def test_idx_split_slicing(tmp_path):
    arrays = make_idx_folder(tmp_path, compressed=True)
    head, tail = load_idx_folder(tmp_path, "train[:20]"), load_idx_folder(tmp_path, "train[20:]")
    np.testing.assert_array_equal(np.concatenate([head.images, tail.images])[..., 0], arrays["train"][0])
    with pytest.raises(ValueError, match=r"train.*test"):
        load_idx_folder(tmp_path, "validation")
    with pytest.raises(ValueError, match="Bad split"):
        load_idx_folder(tmp_path, "train[:10%]")


def test_read_idx_validates_the_header(tmp_path):
    good = tmp_path / "good"
    write_idx(good, np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    np.testing.assert_array_equal(read_idx(good), np.arange(24).reshape(2, 3, 4))
    data = good.read_bytes()
    for name, corrupt, message in [
        ("floats", data[:2] + b"\x0d" + data[3:], "only unsigned bytes"),
        ("truncated", data[:-1], "truncated"),
        ("magic", b"\x01" + data[1:], "not an IDX file"),
    ]:
        (tmp_path / name).write_bytes(corrupt)
        with pytest.raises((ValueError, CorruptDataError), match=message):
            read_idx(tmp_path / name)


def test_missing_idx_folder_says_how_to_get_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data_dir="):
        load_idx_folder(tmp_path / "nowhere", "train")


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_files():
    train, test = load_source("fashion_mnist", "train"), load_source("fashion_mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    # The published normalisation constants are the statistics of these files.
    pixels = train.images / 255
    assert abs(pixels.mean() - train.mean[0]) < 1e-3 and abs(pixels.std() - train.std[0]) < 1e-3


def test_idx_path_does_not_import_tensorflow(tmp_path):
    make_idx_folder(tmp_path, compressed=True)
    code = (
        "import sys\n"
        "from resnet_jax.data import BatchSettings, load_source\n"
        f"source = load_source('fashion_mnist', 'train', data_dir={str(tmp_path)!r})\n"
        "next(source.train_batches(BatchSettings(8)))\n"
        "assert 'tensorflow' not in sys.modules, 'the IDX path imported tensorflow'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- Other sources -------------------------------------------------------------------------------


def test_load_source_dispatch(tmp_path):
    make_idx_folder(tmp_path, compressed=False)
    assert load_source("mnist", "test", data_dir=str(tmp_path)).name == "mnist"
    with pytest.raises(ValueError, match=r"cifar10.*synthetic"):
        load_source("svhn", "train")
    with pytest.raises(ValueError, match="only apply to the synthetic"):
        load_source("cifar10", "train", num_examples=3)


def test_a_run_that_sets_its_normalisation_is_fed_with_it_and_a_bad_one_is_refused(tmp_path):
    make_idx_folder(tmp_path, compressed=False)
    config = ml_collections.ConfigDict({"dataset": "mnist", "data_dir": str(tmp_path), "download": False})
    config.input_mean, config.input_std = (), ()
    assert run_normalisation(config) is None  # the data set's statistics
    assert load_run_source(config, "test").mean == load_source("mnist", "test", str(tmp_path)).mean
    config.input_mean, config.input_std = (0.5,), (0.25,)
    source = load_run_source(config, "test")
    assert (source.mean, source.std) == ((0.5,), (0.25,))
    np.testing.assert_array_equal(source.images, load_source("mnist", "test", str(tmp_path)).images)
    batch = next(source.eval_batches(BatchSettings(batch_size=4, eval_batch_size=4)))
    np.testing.assert_allclose(batch["image"], (source.images[:4] / 255 - 0.5) / 0.25, rtol=1e-6)

    config.input_mean, config.input_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="3 channels, but mnist images have 1"):
        load_run_source(config, "test")
    for mean, std in [((0.5,), ()), ((0.5,), (0.0,)), ((0.5,), (float("nan"),)), (("a",), (1.0,))]:
        config.input_mean, config.input_std = mean, std
        with pytest.raises(ValueError, match="one per image channel each, std > 0"):
            run_normalisation(config)


def test_synthetic_source():
    train = load_source("synthetic", "train", num_examples=20, image_shape=(5, 6, 2), num_classes=3)
    test = load_source("synthetic", "test", num_examples=20, image_shape=(5, 6, 2), num_classes=3)
    assert train.images.shape == (20, 5, 6, 2) and train.images.dtype == np.uint8
    assert train.labels.max() < 3 and train.num_classes == 3
    assert not np.array_equal(train.images, test.images)
    sliced = load_source("synthetic", "train[5:9]", num_examples=20, image_shape=(5, 6, 2), num_classes=3)
    np.testing.assert_array_equal(sliced.images, train.images[5:9])


def test_tfds_cifar10_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = load_source("cifar10", "train", data_dir=str(tmp_path))
        assert source.images.shape == (12, 32, 32, 3) and source.images.dtype == np.uint8
        assert source.labels.dtype == np.int32 and source.labels.max() < 10
        assert source.num_classes == 10 and len(source.class_names) == 10
        batch = next(source.train_batches(BatchSettings(4)))
        assert batch["image"].shape == (4, 32, 32, 3)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build cifar100 --data_dir"):
        load_tfds_arrays("cifar100", "train", data_dir=str(tmp_path), download=False)


# --- Augmentation --------------------------------------------------------------------------------


def test_crop_flip_properties():
    images = np.random.default_rng(0).integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    out = random_crop_flip(images, rng)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(random_crop_flip(images, rng, pad=0, flip=False), images)
    flipped = apply_crop_flip(images, np.zeros((64, 2), int), np.ones(64, bool), pad=0)
    np.testing.assert_array_equal(flipped, images[:, :, ::-1])
    # Offset (0, 0) of a 4-pixel padding: 4 zero rows and columns, then the top-left of the image.
    shifted = apply_crop_flip(images[:1], np.zeros((1, 2), int), np.zeros(1, bool), pad=4)
    assert not shifted[0, :4].any() and not shifted[0, :, :4].any()
    np.testing.assert_array_equal(shifted[0, 4:, 4:], images[0, :28, :28])


def test_crop_flip_matches_a_per_image_reference():
    images = np.random.default_rng(0).integers(0, 256, (200, 9, 7, 2), dtype=np.uint8)
    offsets = np.random.default_rng(1).integers(0, 7, (200, 2))
    flips = np.random.default_rng(2).random(200) < 0.5
    out = apply_crop_flip(images, offsets, flips, pad=3)
    for image, (dy, dx), flip, got in zip(images, offsets, flips, out, strict=True):
        want = np.pad(image, ((3, 3), (3, 3), (0, 0)))[dy : dy + 9, dx : dx + 7]
        np.testing.assert_array_equal(got, want[:, ::-1] if flip else want)
    assert 0 < flips.sum() < 200 and len({tuple(o) for o in offsets}) > 20


def test_normalize():
    mean, std = (0.2, 0.5, 0.8), (0.1, 0.2, 0.3)
    pixels = np.array([[[[51, 128, 204]]]], np.uint8)
    np.testing.assert_allclose(normalize(pixels, mean, std)[0, 0, 0], (pixels[0, 0, 0] / 255 - mean) / std, rtol=1e-5)
    source = synthetic(2000, (8, 8, 3), seed=0)
    out = normalize(source.images, source.mean, source.std)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0, atol=0.01)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1, atol=0.01)


def test_one_hot_and_mixup():
    targets = one_hot(np.array([0, 2]), 4, smoothing=0.2)
    np.testing.assert_allclose(targets, [[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]], rtol=1e-6)
    images = np.random.default_rng(0).random((16, 4, 4, 3), dtype=np.float32)
    labels = one_hot(np.arange(16) % 5, 5)
    mixed, mixed_labels = mixup(images, labels, np.random.default_rng(0), alpha=0.4)
    assert mixed.dtype == np.float32 and mixed.shape == images.shape
    np.testing.assert_allclose(mixed_labels.sum(1), 1, rtol=1e-6)
    assert mixed.min() >= images.min() and mixed.max() <= images.max()


def test_random_erasing_replaces_one_box_per_erased_image_with_noise():
    images = np.full((2000, 28, 20, 3), 7, np.uint8)  # noise is never 7 everywhere in a box
    boxes, noise = sample_erasing(np.random.default_rng(0), len(images), images.shape[1:], probability=0.5)
    erased = random_erasing(images, np.random.default_rng(0), probability=0.5)
    top, left, height, width = boxes.T
    assert abs((height > 0).mean() - 0.5) < 0.05  # the probability
    assert np.array_equal(height > 0, width > 0)
    area = height * width / (28 * 20)
    assert area[height > 0].min() >= 0.015 and area.max() <= 0.42  # 2% to 40% of the image, up to rounding
    aspect = height[height > 0] / width[height > 0]
    assert aspect.min() > 0.2 and aspect.max() < 5
    assert (top + height <= 28).all() and (left + width <= 20).all()
    for i in range(50):
        box = np.zeros((28, 20), bool)
        box[top[i] : top[i] + height[i], left[i] : left[i] + width[i]] = True
        np.testing.assert_array_equal(erased[i][~box], 7)  # untouched outside the box
        np.testing.assert_array_equal(erased[i][box], noise[i][box])
    assert np.array_equal(random_erasing(images, np.random.default_rng(1), probability=0.0), images)


# --- Training batches ----------------------------------------------------------------------------


PIPELINES = {
    "plain": {"augment": False},
    "augmented": {"augment": True},
    "mixup": {"augment": True, "mixup_alpha": 0.5},
    "erasing": {"augment": True, "random_erasing": 0.5},
}


@pytest.mark.parametrize("options", PIPELINES.values(), ids=PIPELINES.keys())
def test_train_batches_are_deterministic(options):
    source = synthetic(100, (8, 8, 3), seed=0)
    first = take(source.train_batches(BatchSettings(16, seed=3, **options)), 8)
    chex.assert_trees_all_equal(first, take(source.train_batches(BatchSettings(16, seed=3, **options)), 8))
    other = take(source.train_batches(BatchSettings(16, seed=4, **options)), 8)
    assert not np.array_equal(first[0]["image"], other[0]["image"])
    assert first[0]["image"].dtype == np.float32 and first[0]["image"].shape == (16, 8, 8, 3)


@pytest.mark.parametrize("options", PIPELINES.values(), ids=PIPELINES.keys())
def test_resume_reproduces_the_run_exactly(options):
    source = synthetic(100, (8, 8, 3), seed=0)  # 6 steps an epoch: the tail crosses two epoch boundaries
    settings = BatchSettings(16, seed=7, **options)
    run = take(source.train_batches(settings), 20)
    for k in (1, 6, 9):
        chex.assert_trees_all_equal(run[k:], take(source.train_batches(settings, start_step=k), 20 - k))


@pytest.mark.parametrize(
    "options",
    [{"augment": True}, {"augment": False}, {"crop_padding": 0}, {"crop_padding": 2, "random_flip": False}],
    ids=["augmented", "plain", "flip only", "crop only"],
)
def test_batches_made_on_the_device_are_the_host_pipelines_bit_for_bit(options):
    source = synthetic(50, (8, 6, 3), seed=0)  # 3 steps an epoch: steps 2 to 8 cross two epoch boundaries
    settings = BatchSettings(16, seed=5, **options)
    host = take(source.train_batches(settings, start_step=2), 6)
    draws = list(itertools.islice(train_draws(50, settings, start_step=2), 6))
    on_device = DeviceImages(source, pad=settings.applied_padding)
    make = jax.jit(on_device.batch)
    made = [jax.device_get(make(on_device.images, on_device.labels, d)) for d in draws]
    chex.assert_trees_all_equal(host, made)
    assert made[0]["image"].dtype == np.float32 and made[0]["label"].dtype == np.int32


def test_random_erasing_in_the_pipeline_erases_every_image_on_top_of_crop_and_flip():
    source = synthetic(100, (8, 8, 3), seed=0)
    plain, erased = (take(source.train_batches(BatchSettings(16, seed=2, random_erasing=p)), 2) for p in (0.0, 1.0))
    changed = (plain[1]["image"] != erased[1]["image"]).any(-1)  # (16, 8, 8): pixels the box covers
    assert changed.any((1, 2)).all()
    assert changed.mean() < 0.5
    np.testing.assert_array_equal(plain[1]["label"], erased[1]["label"])


def test_epochs_cover_the_data_without_repeats():
    source = indexed_source(100)
    labels = [b["label"] for b in take(source.train_batches(BatchSettings(16, augment=False)), 12)]
    assert steps_per_epoch(100, 16) == 6
    for epoch in (labels[:6], labels[6:]):
        seen = np.concatenate(epoch)
        assert len(np.unique(seen)) == 96
    assert not np.array_equal(labels[0], labels[6])  # a fresh order each epoch


@pytest.mark.parametrize("options", PIPELINES.values(), ids=PIPELINES.keys())
def test_process_slices_make_up_the_global_batch(options):
    source = synthetic(100, (8, 8, 3), seed=0)
    whole = take(source.train_batches(BatchSettings(16, seed=1, **options)), 7)
    parts = [
        take(source.train_batches(BatchSettings(16, seed=1, process_index=p, process_count=2, **options)), 7)
        for p in range(2)
    ]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts, strict=True)]
    assert parts[0][0]["image"].shape[0] == 8
    chex.assert_trees_all_equal(whole, joined)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"crop_padding": -1}, "crop_padding=-1"),
        ({"random_erasing": 1.5}, "fraction of images to erase"),
        ({"mixup_alpha": -0.2}, "Beta distribution"),
        ({"image_size": 0}, "positive number of pixels"),
        ({"process_index": 2, "process_count": 2}, "not one of the 2 processes"),
        ({"eval_batch_size": 5, "process_count": 2}, "multiple of the process count"),
    ],
)
def test_batch_settings_refuse_what_no_pipeline_can_draw(change, message):
    with pytest.raises(ValueError, match=message):
        BatchSettings(16, **change)
    assert BatchSettings(16).eval_batch_size == 16 and BatchSettings(16, augment=False).applied_padding == 0


def test_batch_size_errors_say_what_to_change():
    source = synthetic(10, (4, 4, 1))
    with pytest.raises(ValueError, match="multiple of the process count"):
        BatchSettings(9, process_count=2)
    with pytest.raises(ValueError, match="larger than the 10 training examples"):
        source.train_batches(BatchSettings(16))


# --- Evaluation batches --------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once_with_padding(process_count):
    source = indexed_source(101)  # prime: the last batch is partial
    streams = [
        list(source.eval_batches(BatchSettings(16, process_index=p, process_count=process_count)))
        for p in range(process_count)
    ]
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == 7  # lockstep across processes
    batches = [b for s in streams for b in s]
    assert {b["image"].shape for b in batches} == {(16 // process_count, 8, 8, 3)}
    assert sum(b["mask"].sum() for b in batches) == 101
    real = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(np.sort(real), np.arange(101))
    for b in batches:
        assert not b["image"][b["mask"] == 0].any()
        np.testing.assert_array_equal(
            b["image"][b["mask"] == 1], normalize(source.images[b["label"][b["mask"] == 1]], source.mean, source.std)
        )


# --- Prefetching and throughput ------------------------------------------------------------------


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "resnet_jax-prefetch"]


def test_prefetch_thread_stops_when_the_iterator_is_dropped():
    before = set(prefetch_threads())
    batches = synthetic(64, (4, 4, 1)).train_batches(BatchSettings(8))
    next(batches)
    (thread,) = set(prefetch_threads()) - before
    del batches
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_prefetch_passes_errors_on():
    def make(step: int) -> int:
        if step == 3:
            raise RuntimeError("bad step")
        return step

    items = prefetch(make, range(10), ahead=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="bad step"):
        next(items)
    assert list(prefetch(make, range(3), ahead=2)) == [0, 1, 2]


def test_measure_input_throughput():
    batches = synthetic(256, (32, 32, 3)).train_batches(BatchSettings(32))
    assert measure_input_throughput(batches, 5) > 0


# --- ImageNet (tf.data) --------------------------------------------------------------------------


def jpeg(image: np.ndarray) -> object:
    import tensorflow as tf

    return tf.io.encode_jpeg(image, quality=100)


def test_random_resized_crop():
    import tensorflow as tf

    from resnet_jax.data.imagenet import random_resized_crop

    encoded = jpeg(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    crops = [random_resized_crop(encoded, tf.constant([0, i], tf.int64), image_size=32).numpy() for i in (0, 0, 1)]
    assert crops[0].shape == (32, 32, 3) and crops[0].dtype == np.float32
    assert crops[0].min() >= 0 and crops[0].max() <= 255
    np.testing.assert_array_equal(crops[0], crops[1])
    assert not np.array_equal(crops[0], crops[2])
    # A left-to-right ramp: flipped crops run right-to-left, and both directions occur.
    ramp = jpeg(np.broadcast_to(np.linspace(0, 255, 90).astype(np.uint8)[None, :, None], (60, 90, 3)).copy())
    slopes = [
        np.sign(np.diff(random_resized_crop(ramp, tf.constant([1, i], tf.int64), 16).numpy()[8, [0, -1], 0]))[0]
        for i in range(20)
    ]
    assert {-1.0, 1.0} <= set(slopes)


def test_resize_center_crop():
    from resnet_jax.data.imagenet import resize_center_crop

    # Shorter side already 256: no resize, just the central 224 square.
    image = np.broadcast_to(np.linspace(0, 255, 512).astype(np.uint8)[None, :, None], (256, 512, 3)).copy()
    out = resize_center_crop(jpeg(image)).numpy()
    assert out.shape == (224, 224, 3)
    np.testing.assert_allclose(out, image[16:240, 144:368], atol=2)
    # Aspect kept: a 100 x 300 image is resized to 256 x 768.
    wide = resize_center_crop(jpeg(np.zeros((100, 300, 3), np.uint8)))
    assert wide.shape == (224, 224, 3)


def test_imagenet_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        source = load_source("imagenet2012", "train", data_dir=str(tmp_path))
        assert isinstance(source, StreamSource) and source.num_examples == 6 and source.num_classes == 1000
        run = take(source.train_batches(BatchSettings(2)), 7)  # 3 steps an epoch
        assert run[0]["image"].shape == (2, 224, 224, 3) and run[0]["image"].dtype == np.float32
        assert run[0]["label"].dtype == np.int32
        for k in (3, 4):  # resume at an epoch boundary and inside an epoch
            chex.assert_trees_all_equal(run[k:], take(source.train_batches(BatchSettings(2), start_step=k), 7 - k))
        assert not np.array_equal(run[0]["image"], run[3]["image"])
        evaluation = list(load_source("imagenet2012", "validation", str(tmp_path)).eval_batches(BatchSettings(4)))
        assert [b["mask"].sum() for b in evaluation] == [4, 2]
        assert {b["image"].shape for b in evaluation} == {(4, 224, 224, 3)}


def test_unprepared_imagenet_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="downloads/manual"):
        load_source("imagenet2012", "train", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def tiny_jpeg_dir(tmp_path_factory) -> str:
    """A real prepared tfds data set of JPEGs (unlike mock_data, whose splits cannot be sharded): label = index."""
    import tensorflow_datasets as tfds

    class TinyJpegs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")
            features = tfds.features.FeaturesDict({"image": image, "label": tfds.features.ClassLabel(num_classes=23)})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(23), "validation": self._generate_examples(11)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), "label": i}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    TinyJpegs(data_dir=data_dir).download_and_prepare()
    return data_dir


def tiny_source(data_dir: str, split: str, num_examples: int) -> StreamSource:
    return StreamSource("tiny_jpegs", split, data_dir, num_examples, 23, (224, 224, 3), (0.5,) * 3, (0.25,) * 3)


def test_streamed_training_is_sharded_by_process_and_resumable(tiny_jpeg_dir):
    source = tiny_source(tiny_jpeg_dir, "train", 23)
    runs = [take(source.train_batches(BatchSettings(4, process_index=p, process_count=2)), 7) for p in range(2)]
    first_epoch = [np.concatenate([b["label"] for b in run[:5]]) for run in runs]  # 11 examples, batches of 2
    assert all(len(np.unique(labels)) == 10 for labels in first_epoch)
    assert not set(first_epoch[0]) & set(first_epoch[1])
    resumed = source.train_batches(BatchSettings(4, process_index=1, process_count=2), start_step=3)
    chex.assert_trees_all_equal(runs[1][3:], take(resumed, 4))


@pytest.mark.parametrize("option", ["mixup_alpha", "random_erasing"])
def test_streamed_training_refuses_array_only_augmentations(tiny_jpeg_dir, option):
    with pytest.raises(ValueError, match="set mixup_alpha=0 and random_erasing=0"):
        tiny_source(tiny_jpeg_dir, "train", 23).train_batches(BatchSettings(4, **{option: 0.2}))


def test_streamed_eval_covers_every_example_once(tiny_jpeg_dir):
    source = tiny_source(tiny_jpeg_dir, "validation", 11)
    streams = [list(source.eval_batches(BatchSettings(4, process_index=p, process_count=2))) for p in range(2)]
    assert len(streams[0]) == len(streams[1]) == 3
    batches = [b for s in streams for b in s]
    real = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(np.sort(real), np.arange(11))
    assert {b["image"].shape for b in batches} == {(2, 224, 224, 3)}
