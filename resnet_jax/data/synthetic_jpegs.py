"""``imagenet_synthetic``: an ImageNet-shaped data set of synthetic JPEGs, for measuring the JPEG input pipeline
(and feeding an end-to-end benchmark) where ImageNet is not at hand.

What makes a JPEG pipeline slow is the files, not what they show: their pixel count (decoding and resizing) and
their compressed bytes per pixel (entropy decoding). So the images copy ImageNet's shapes (most are Flickr's
"medium" size, 500 pixels on the long side at 4:3 or 3:2, landscape three times in four; the rest larger or
squarer) and its bytes (about 110 KB a file at quality 90, which plain noise would far exceed and smooth fields
undercut), with content that has edges, gradients and grain. The labels carry nothing to learn.

One call writes every split twice, from the same JPEG bytes:

- ``DATA_DIR/imagenet_synthetic/1.0.0/``: a tfds data set (TFRecords of JPEG bytes, ``image`` and ``label`` as
  ``imagenet2012`` has them), which ``load_source("imagenet_synthetic", split, DATA_DIR)`` streams through the
  ImageNet pipeline (`resnet_jax.data.imagenet`);
- ``DATA_DIR/imagenet_synthetic_images/SPLIT/cNNNN/*.JPEG``: the same files as a class-per-folder tree, which
  torchvision's ``ImageFolder`` reads (class folders sort in label order).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from resnet_jax.data.imagenet import StreamSource, load_imagenet
from resnet_jax.extras import require

NAME = "imagenet_synthetic"
VERSION = "1.0.0"
FOLDERS = f"{NAME}_images"
SPLITS = {"train": 3_000, "validation": 1_000}  # images per split, unless told otherwise
NUM_CLASSES = 1000
QUALITY = 90
GRAIN_TILE = 1024  # side of the grain pattern images take their noise from; no image is larger
_GRAIN_STRENGTH = 18.0  # sets the bytes per pixel (about 0.55 at quality 90)


@dataclasses.dataclass(frozen=True)
class JpegSpec:
    """One image of a split: its file (relative to the folder tree), label, size and the seed of its content."""

    path: Path
    label: int
    height: int
    width: int
    seed: tuple[int, ...]


def is_prepared(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds the data set, both forms (they are moved in place together when complete)."""
    data_dir = Path(data_dir).expanduser()
    return (data_dir / NAME / VERSION / "dataset_info.json").is_file() and (data_dir / FOLDERS).is_dir()


def prepare_synthetic_jpegs(
    data_dir: str | Path,
    splits: dict[str, int] | None = None,
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
    workers: int | None = None,
    scale: float = 1.0,
) -> Path:
    """Write the data set into ``data_dir`` (see the module) with ``splits`` images per split (default `SPLITS`),
    on ``workers`` threads (default: this process's cores), each side ``scale`` times ImageNet's (tests use small
    images); returns the folder tree's root. The same arguments give the same files.

    Both forms are written in a temporary folder beside their place and moved in when complete, so an interrupted
    run leaves nothing that looks prepared. An existing data set is replaced.
    """
    tfds = require("tensorflow_datasets")

    splits = dict(SPLITS if splits is None else splits)
    if min(splits.values(), default=0) < num_classes:
        raise ValueError(f"Each split needs at least {num_classes} images, one per class; got {splits}.")
    if not 0 < scale <= 1:
        raise ValueError(f"scale={scale}: give a factor in (0, 1] for the images' sides.")
    data_dir = Path(data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    specs = {
        split: jpeg_specs(Path(split), count, num_classes, (seed, i), scale)
        for i, (split, count) in enumerate(splits.items())
    }
    with tempfile.TemporaryDirectory(prefix=f".{NAME}-", dir=data_dir) as temporary:
        staging = Path(temporary)
        write = functools.partial(write_jpeg, root=staging / FOLDERS, grain=grain_tile(seed))
        with concurrent.futures.ThreadPoolExecutor(workers or len(os.sched_getaffinity(0))) as pool:
            list(pool.map(write, [spec for split_specs in specs.values() for spec in split_specs]))
        tfds.dataset_builders.store_as_tfds_dataset(
            name=NAME,
            version=VERSION,
            features=_features(num_classes),
            split_datasets={split: list(_examples(staging / FOLDERS, s)) for split, s in specs.items()},
            data_dir=str(staging),
            description="ImageNet-shaped synthetic JPEGs (resnet_jax.data.synthetic_jpegs).",
        )
        for name in (NAME, FOLDERS):
            shutil.rmtree(data_dir / name, ignore_errors=True)
            (staging / name).rename(data_dir / name)
    return data_dir / FOLDERS


def class_names(num_classes: int) -> list[str]:
    """The class folders' names, which sort in label order: c0000, c0001, ..."""
    return [f"c{label:04d}" for label in range(num_classes)]


def jpeg_specs(folder: Path, count: int, num_classes: int, seed: tuple[int, ...], scale: float = 1.0) -> list[JpegSpec]:
    """The ``count`` images of one split: sizes drawn as ImageNet's fall (`image_size`), labels in turn."""
    rng = np.random.default_rng(seed)
    names = class_names(num_classes)
    specs = []
    for index in range(count):
        label = index % num_classes
        height, width = (max(8, round(side * scale)) for side in image_size(rng))
        specs.append(JpegSpec(folder / names[label] / f"{index:07d}.JPEG", label, height, width, (*seed, index)))
    return specs


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) as ImageNet's images come: 500 pixels on the long side in 70% of them, else 400-800; long
    over short side 4:3 or 3:2 in 75%, else anything from 1 to 2; landscape in 75%."""
    long_side = 500 if rng.random() < 0.7 else int(rng.integers(400, 801))
    aspect = rng.choice([4 / 3, 3 / 2]) if rng.random() < 0.75 else rng.uniform(1, 2)
    short_side = round(long_side / aspect)
    return (short_side, long_side) if rng.random() < 0.75 else (long_side, short_side)


def write_jpeg(spec: JpegSpec, root: Path, grain: np.ndarray) -> None:
    """Draw the image of ``spec`` and write it under ``root``."""
    image = synthetic_photo(np.random.default_rng(spec.seed), spec.height, spec.width, grain)
    path = root / spec.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(image))


def encode_jpeg(image: np.ndarray, quality: int = QUALITY) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 image, 4:2:0 chroma as cameras and ImageNet's files have it."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def synthetic_photo(rng: np.random.Generator, height: int, width: int, grain: np.ndarray) -> np.ndarray:
    """A (height, width, 3) uint8 image with what JPEG finds in photos: regions with sharp edges, gradients at
    every scale (octaves of noise at quarter resolution, quantised into levels, mixed into colours), and a window
    of the ``grain`` tile (`grain_tile`)."""
    from PIL import Image

    if max(height, width) > GRAIN_TILE:
        raise ValueError(f"Synthetic photos are at most {GRAIN_TILE} pixels a side; got {height}x{width}.")
    small_h, small_w = -(-height // 4), -(-width // 4)
    field = np.zeros((small_h, small_w, 3), np.float32)
    for octave in range(1, 6):  # coarser octaves weigh more, as in natural images' 1/f spectrum
        shape = (3, max(2, small_h >> octave), max(2, small_w >> octave))
        noise = rng.standard_normal(shape, dtype=np.float32) * 2.0 ** (0.8 * octave)
        for channel in range(3):
            upsampled = Image.fromarray(noise[channel], "F").resize((small_w, small_h), Image.Resampling.BILINEAR)
            field[..., channel] += np.asarray(upsampled)
    field = (field - field.mean((0, 1))) / (field.std((0, 1)) + 1e-6)
    field = np.floor(field * 2) / 2  # regions with edges between them
    mix = np.eye(3, dtype=np.float32) + 0.3 * rng.standard_normal((3, 3), dtype=np.float32)
    base = Image.fromarray(np.clip(128 + 45 * (field @ mix), 0, 255).astype(np.uint8))
    image = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    top, left = rng.integers(0, GRAIN_TILE - height + 1), rng.integers(0, GRAIN_TILE - width + 1)
    image += _GRAIN_STRENGTH * grain[top : top + height, left : left + width]
    return np.clip(image, 0, 255).astype(np.uint8)


def grain_tile(seed: int = 0) -> np.ndarray:
    """A tile of Gaussian grain that every image takes a window of: drawing fresh grain per image would cost more
    than the rest of the image."""
    return np.random.default_rng(seed).standard_normal((GRAIN_TILE, GRAIN_TILE, 3), dtype=np.float32)


def _features(num_classes: int) -> object:
    tfds = require("tensorflow_datasets")

    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=class_names(num_classes)),
        }
    )


def _examples(root: Path, specs: list[JpegSpec]) -> Iterator[tuple[int, dict[str, object]]]:
    """(key, example) pairs for tfds: the files' own bytes go into the records (a path is read, not re-encoded)."""
    for index, spec in enumerate(specs):
        yield index, {"image": root / spec.path, "label": spec.label}


def load_synthetic_jpegs(split: str = "train", data_dir: str | None = None, download: bool = True) -> StreamSource:
    """The ``split`` of the data set in ``data_dir`` (default: tfds' folder) as a `StreamSource` that the ImageNet
    pipeline reads; written there first (`SPLITS` images, a few minutes on two cores) when missing, unless
    ``download=False``."""
    folder = Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()
    if not is_prepared(folder):
        if not download:
            raise FileNotFoundError(
                f"{NAME} is not in {folder}, and writing it is off (download=False): allow it "
                f"(--config.download=true), or run `resnet-jax download {NAME} --data-dir {folder}`."
            )
        prepare_synthetic_jpegs(folder)
    return load_imagenet(split, str(folder), name=NAME)
