"""The ImageNet JPEG pipeline on a tiny `imagenet_synthetic` set: the data set's two layouts, the training and
evaluation batches (shape, dtype, range, determinism), the crops against decoding whole images with PIL, and one
measurement of the JPEG bench per library."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import BatchSettings, load_source
from resnet_jax.data.augment import CHANNEL_STATS
from resnet_jax.data.synthetic_jpegs import FOLDERS, NAME, image_size, prepare_synthetic_jpegs

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

CLASSES = 4


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> str:
    """8 training and 8 validation JPEGs at a fifth of ImageNet's sides (about 100 x 75 pixels)."""
    folder = tmp_path_factory.mktemp("jpegs")
    prepare_synthetic_jpegs(folder, {"train": 8, "validation": 8}, num_classes=CLASSES, scale=0.2)
    return str(folder)


def files(jpeg_dir: str, split: str) -> list[Path]:
    return sorted((Path(jpeg_dir) / FOLDERS / split).glob("c*/*.JPEG"))


def test_records_hold_the_folder_trees_bytes(jpeg_dir):
    for split in ("train", "validation"):
        paths = files(jpeg_dir, split)
        assert len(paths) == 8 and {p.parent.name for p in paths} == {f"c{label:04d}" for label in range(CLASSES)}
        records = tfds.builder(NAME, data_dir=jpeg_dir).as_dataset(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )
        stored = {bytes(r["image"]): int(r["label"]) for r in tfds.as_numpy(records)}
        assert stored == {p.read_bytes(): int(p.parent.name[1:]) for p in paths}
    sides = [max(Image.open(p).size) for p in files(jpeg_dir, "train")]
    assert all(80 <= side <= 160 for side in sides)


def test_sizes_follow_imagenets():
    rng = np.random.default_rng(0)
    sizes = np.array([image_size(rng) for _ in range(2000)])
    short, long = sizes.min(1), sizes.max(1)
    assert 300 <= np.median(short) <= 400 and np.median(long) == 500
    assert 0.65 <= np.mean(sizes[:, 1] > sizes[:, 0]) <= 0.85  # mostly landscape


def test_train_batches_shape_range_and_seed(jpeg_dir):
    source = load_source(NAME, "train", jpeg_dir, download=False)
    assert source.num_examples == 8 and source.num_classes == CLASSES

    def two(seed: int) -> list[dict[str, np.ndarray]]:
        batches = source.train_batches(BatchSettings(4, seed=seed))
        return [next(batches) for _ in range(2)]

    first, again, other = two(0), two(0), two(1)
    image = first[0]["image"]
    assert image.shape == (4, 224, 224, 3) and image.dtype == np.float32
    assert first[0]["label"].dtype == np.int32 and set(first[0]["label"]) <= set(range(CLASSES))
    mean, std = (np.array(v) * 255 for v in CHANNEL_STATS["imagenet2012"])
    low, high = (0 - mean) / std, (255 - mean) / std
    assert (image >= low - 1e-4).all() and (image <= high + 1e-4).all() and image.std() > 0.1
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(first[0]["image"], other[0]["image"])


def pil_resize(image: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float32)


def test_training_crop_decodes_only_its_window(jpeg_dir):
    from resnet_jax.data.imagenet import crop_window, random_resized_crop

    for i, path in enumerate(files(jpeg_dir, "train")[:4]):
        data = path.read_bytes()
        seed = tf.constant([7, i], tf.int64)
        crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))[0]
        top, left, height, width = crop_window(data, crop_seed).numpy()
        full = Image.open(io.BytesIO(data))
        assert top >= 0 and top + height <= full.height and left >= 0 and left + width <= full.width
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05 or (height, width) == (full.height, full.width)
        # Reference: PIL decodes the whole file, the same box is cut out and resized as the pipeline resizes.
        box = np.asarray(full.convert("RGB"))[top : top + height, left : left + width]
        reference = tf.image.resize(box, (64, 64), method="bilinear").numpy()
        crop = random_resized_crop(data, seed, image_size=64, flip=False).numpy()
        assert np.abs(crop - reference).mean() < 1 and np.abs(crop - reference).max() < 16
        flips = {random_resized_crop(data, seed, image_size=64, flip=True).numpy().tobytes() for _ in range(2)}
        assert len(flips) == 1  # a pure function of the seed


def test_eval_view_matches_resize_then_centre_crop(jpeg_dir):
    from resnet_jax.data.imagenet import resize_center_crop

    for path in files(jpeg_dir, "validation")[:4]:
        full = Image.open(path)
        scale = 256 / min(full.size)
        width, height = round(full.width * scale), round(full.height * scale)
        top, left = (height - 224) // 2, (width - 224) // 2
        reference = pil_resize(full, width, height)[top : top + 224, left : left + 224]
        view = resize_center_crop(path.read_bytes()).numpy()
        assert view.shape == (224, 224, 3) and view.dtype == np.float32
        assert np.abs(view - reference).mean() < 1.5  # PIL's resampling and TF's


def test_eval_batches_cover_the_split_once(jpeg_dir):
    batches = list(load_source(NAME, "validation", jpeg_dir).eval_batches(BatchSettings(3)))
    assert [b["mask"].sum() for b in batches] == [3, 3, 2]
    assert {b["image"].shape for b in batches} == {(3, 224, 224, 3)}


def test_unwritten_set_says_how_to_write_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="resnet-jax download imagenet_synthetic"):
        load_source(NAME, "train", str(tmp_path), download=False)


@pytest.mark.parametrize("library", [pytest.param("tf.data", marks=pytest.mark.slow), "torchvision"])
def test_jpeg_bench_measures_each_library(jpeg_dir, library):
    from resnet_jax.bench.jpeg_inputs import JpegJob, JpegRow, run_job, table

    job = JpegJob(library, "train", (0,), jpeg_dir, batch=4, batches=2, warmup=1)
    rate = run_job(job)
    assert rate > 0
    assert "| train | 1 | tf.data |" in table(
        [JpegRow("tf.data", "train", 1, [rate]), JpegRow("torchvision", "train", 1, [1.0])]
    )


@pytest.mark.slow
def test_gpu_script_runs_its_commands_at_toy_sizes(tmp_path):
    """benchmarks/gpu/imagenet_resnet50.sh with DRY=1: every command and option of the GPU run, on this CPU."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = os.environ | {
        "DRY": "1",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "results"),
        "DATA": str(tmp_path / "jpegs"),
        "PYTHONPATH": str(root),
    }
    script = root / "benchmarks" / "gpu" / "imagenet_resnet50.sh"
    done = subprocess.run(["bash", str(script)], cwd=root, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all parts done" in done.stdout and "img/s" in done.stdout
    assert len(list((tmp_path / "results").glob("*.json"))) == 3
