"""Loading data sets: small ones whole into memory (`ArraySource`), ImageNet as a stream (`StreamSource`).

The in-memory path (IDX files, synthetic data) imports no TensorFlow; tfds data sets import it
only when loaded. Missing data sets are downloaded where they load (`download.py` for the IDX files,
tfds' ``download_and_prepare`` for the others), unless ``download=False``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax.data import synthetic_jpegs
from resnet_jax.data.arrays import ArraySource
from resnet_jax.data.augment import CHANNEL_STATS
from resnet_jax.data.download import (
    DATA_DIR_VARIABLE,
    DownloadError,
    default_folder,
    fetch_files,
    file_url,
    unreachable,
)
from resnet_jax.data.imagenet import StreamSource, load_imagenet
from resnet_jax.extras import require
from resnet_jax.faults import CorruptDataError

# Where the Debian package `dataset-fashion-mnist` puts the four IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_DATASETS = ("fashion_mnist", "mnist")
TFDS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "imagenet2012", "imagenet_synthetic", "synthetic")


def load_source(
    dataset: str, split: str = "train", data_dir: str | None = None, download: bool = True, **synthetic_args: Any
) -> ArraySource | StreamSource:
    """The ``split`` of ``dataset`` ("train", "test" or a slice such as "train[:45000]").

    fashion_mnist and mnist are read from their IDX files (`idx_folder` says where, and downloads missing ones),
    or through tfds from a ``data_dir`` where tfds prepared them; cifar10 and cifar100 through tfds, prepared on
    first use; imagenet2012 through tfds, prepared by hand; imagenet_synthetic (ImageNet-shaped JPEGs) through the
    same pipeline, written on first use (`synthetic_jpegs`). ``download=False`` fails instead of downloading.
    ``synthetic_args`` go to ``synthetic`` (num_examples, image_shape, num_classes, seed).
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
    if synthetic_args and dataset != "synthetic":
        raise ValueError(f"{', '.join(synthetic_args)} only apply to the synthetic dataset, not {dataset}.")
    if dataset == "synthetic":
        base, rows = parse_split(split)
        seed = synthetic_args.pop("seed", 0)
        return _take(synthetic(**synthetic_args, seed=(seed, zlib.crc32(base.encode()))), rows)
    if data_dir and not Path(data_dir).is_dir() and (dataset == "imagenet2012" or not download):
        raise FileNotFoundError(
            f"data_dir {data_dir} is not a folder: give the folder that holds {dataset}"
            + ("." if dataset == "imagenet2012" else ", or allow downloading into it (--config.download=true).")
        )
    if dataset == "imagenet2012":
        return load_imagenet(split, data_dir)
    if dataset == synthetic_jpegs.NAME:
        return synthetic_jpegs.load_synthetic_jpegs(split, data_dir, download)
    if dataset in IDX_DATASETS and not (data_dir and _holds_tfds(Path(data_dir), dataset)):
        return load_idx_folder(idx_folder(dataset, split, data_dir, download), split, name=dataset)
    return load_tfds_arrays(dataset, split, data_dir, download)


def run_normalisation(config: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel ``(mean, std)``, in [0, 1] pixel units, that a run of ``config`` normalises its images with
    when the config sets them (``input_mean`` and ``input_std``; converted Keras weights bring theirs), or None:
    the data set's statistics. Checked, so that a bad pair fails before anything loads."""
    mean, std = tuple(config.get("input_mean", ())), tuple(config.get("input_std", ()))
    if not mean and not std:
        return None
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean + std)
    if not numbers or len(mean) != len(std) or not mean or min(std) <= 0:
        raise ValueError(
            f"input_mean={mean} and input_std={std} must be finite numbers, one per image channel each, std > 0 "
            "(e.g. --config.input_mean='(0.5,)' --config.input_std='(0.5,)'); leave both empty for the data set's "
            "statistics."
        )
    return tuple(map(float, mean)), tuple(map(float, std))


def load_run_source(config: Any, split: str) -> ArraySource | StreamSource:
    """The ``split`` of the data set of a run of ``config`` (its ``dataset``, ``data_dir`` and ``download``),
    normalised as that run's model takes its images (`run_normalisation`). Everything that feeds a run's model
    reads its data through here, so training, evaluation, export and compression agree on the input."""
    source = load_source(config.dataset, split, config.data_dir, config.get("download", True))
    normalisation = run_normalisation(config)
    if normalisation is None:
        return source
    mean, std = normalisation
    if len(mean) != source.image_shape[-1]:
        raise ValueError(
            f"input_mean and input_std have {len(mean)} channels, but {config.dataset} images have "
            f"{source.image_shape[-1]}: give one value per channel, or leave both empty for the data set's statistics."
        )
    return dataclasses.replace(source, mean=mean, std=std)


def idx_folder(dataset: str, split: str = "train", data_dir: str | None = None, download: bool = True) -> Path:
    """The folder holding the IDX files of ``split`` of fashion_mnist or mnist; missing files are downloaded first.

    It is ``data_dir`` when given. Otherwise it is the default folder (`download.default_folder`), unless that
    lacks the files, ``RESNET_JAX_DATA_DIR`` is unset and Debian's dataset-fashion-mnist holds them.
    """
    base, _ = parse_split(split)
    if dataset not in IDX_DATASETS or base not in IDX_FILES:
        raise ValueError(f"IDX data sets are {', '.join(IDX_DATASETS)} with splits {', '.join(IDX_FILES)}.")
    stems = IDX_FILES[base]
    folder = Path(data_dir) if data_dir else default_folder(dataset)
    system_wide = data_dir is None and dataset == "fashion_mnist" and not os.environ.get(DATA_DIR_VARIABLE)
    if system_wide and not _holds_idx(folder, stems) and _holds_idx(FASHION_MNIST_DIR, stems):
        return FASHION_MNIST_DIR
    missing = [f"{stem}.gz" for stem in stems if _idx_path(folder, stem) is None]
    if not missing:
        return folder
    debian = f" Or `sudo apt-get install dataset-fashion-mnist` (read from {FASHION_MNIST_DIR})." if system_wide else ""
    if not download:
        urls = ", ".join(file_url(dataset, name) for name in missing)
        raise FileNotFoundError(
            f"{dataset} {base} needs {', '.join(missing)} in {folder}, and downloading is off (download=False): "
            f"allow it (--config.download=true), or fetch {urls} into {folder}.{debian}"
        )
    try:
        fetch_files(dataset, missing, folder)
    except DownloadError as error:
        raise DownloadError(f"{error}{debian}") from None
    return folder


def download_dataset(dataset: str, data_dir: str | None = None) -> str:
    """Download every split of ``dataset`` ahead of use (into ``data_dir`` or the default place); where it is."""
    if dataset in IDX_DATASETS:
        folder = Path(data_dir) if data_dir else default_folder(dataset)
        names = [f"{stem}.gz" for stems in IDX_FILES.values() for stem in stems if _idx_path(folder, stem) is None]
        fetch_files(dataset, names, folder)
        return str(folder)
    if dataset in TFDS_DATASETS:
        return prepare_tfds(require("tensorflow_datasets").builder(dataset, data_dir=data_dir), data_dir, True)
    if dataset == "imagenet2012":
        load_imagenet("train", data_dir)  # when it is not prepared: how to prepare it by hand (it cannot download)
        return data_dir or "~/tensorflow_datasets"
    if dataset == synthetic_jpegs.NAME:
        return str(synthetic_jpegs.load_synthetic_jpegs("train", data_dir).data_dir)
    downloadable = ", ".join(name for name in DATASETS if name != "synthetic")
    raise ValueError(f"Cannot download {dataset!r}; the data sets to download are {downloadable}.")


def parse_split(split: str) -> tuple[str, slice]:
    """ "train" -> ("train", [:]); "train[:45000]" -> ("train", [:45000]) (the He et al. 45k/5k validation split)."""
    match = re.fullmatch(r"(\w+)(?:\[(-?\d*):(-?\d*)\])?", split)
    if not match:
        raise ValueError(
            f"Bad split {split!r}: use a name such as 'train' or 'test', optionally sliced: 'train[:45000]'."
        )
    name, start, stop = match.groups()
    return name, slice(int(start) if start else None, int(stop) if stop else None)


def load_idx_folder(
    folder: str | Path = FASHION_MNIST_DIR, split: str = "train", name: str = "fashion_mnist"
) -> ArraySource:
    """Read a split from a folder of the four standard IDX files (plain or .gz), as MNIST and Fashion-MNIST ship."""
    folder = Path(folder)
    base, rows = parse_split(split)
    if base not in IDX_FILES:
        raise ValueError(f"IDX folders hold the splits {', '.join(IDX_FILES)}; got {split!r}.")
    image_file, label_file = (_find_idx(folder, f) for f in IDX_FILES[base])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{image_file} and {label_file} must hold N images (N, H, W) and N labels (N,); "
            f"got shapes {images.shape} and {labels.shape}."
        )
    num_classes = 10
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"{label_file} has label {labels.max()}; MNIST-style data sets have labels 0..9.")
    mean, std = CHANNEL_STATS[name] if name in CHANNEL_STATS else _stats(images[..., None])
    class_names = FASHION_MNIST_CLASSES if name == "fashion_mnist" else tuple(map(str, range(num_classes)))
    return ArraySource(
        images=images[rows, :, :, None],
        labels=labels[rows].astype(np.int32),
        num_classes=num_classes,
        name=name,
        mean=mean,
        std=std,
        class_names=class_names,
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file of unsigned bytes: magic 0x0000 0x08 NDIM, NDIM big-endian uint32 sizes, then the data."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            data = file.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise CorruptDataError(
            f"{path} is damaged ({type(error).__name__}: {error}); delete it to download it again, or fetch a new copy."
        ) from None
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path} is not an IDX file (its first two bytes must be zero).")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise ValueError(f"{path} holds IDX type 0x{dtype_code:02x}; only unsigned bytes (0x08) are image data.")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], dtype=">u4"))
    if len(shape) != ndim or len(data) - header != math.prod(shape):
        raise CorruptDataError(
            f"{path} is truncated or corrupt: its header says shape {shape}, its size disagrees; delete it to "
            "download it again, or fetch a new copy."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_tfds_arrays(
    name: str, split: str = "train", data_dir: str | None = None, download: bool = True
) -> ArraySource:
    """A tfds data set (cifar10, cifar100, mnist, fashion_mnist) read whole into memory, prepared first if needed."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"In-memory tfds data sets are {', '.join(TFDS_DATASETS)}; got {name!r}.")
    tfds = require("tensorflow_datasets")
    builder = tfds.builder(name, data_dir=data_dir)
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:  # tfds' way of saying the data set is not prepared
        dataset = None
    if dataset is None:
        prepare_tfds(builder, data_dir, download)
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    # In chunks rather than tfds' batch_size=-1, which needs split sizes that tfds' mock data lacks.
    chunks = list(tfds.as_numpy(dataset.batch(10_000)))
    images = np.concatenate([c["image"] for c in chunks])
    labels = np.concatenate([c["label"] for c in chunks]).astype(np.int32)
    label_feature = builder.info.features["label"]
    return ArraySource(
        images=images,
        labels=labels,
        num_classes=label_feature.num_classes,
        name=name,
        mean=CHANNEL_STATS[name][0],
        std=CHANNEL_STATS[name][1],
        class_names=tuple(label_feature.names),
    )


def prepare_tfds(builder: Any, data_dir: str | None, download: bool) -> str:
    """Make sure the tfds data set of ``builder`` is prepared (tfds' download_and_prepare, if ``download``).

    Returns the folder it is prepared in; raises FileNotFoundError, or `DownloadError` when tfds fails, saying
    how to prepare it on another machine.
    """
    where = data_dir or "~/tensorflow_datasets"
    by_hand = (
        f"On a machine with network run `tfds build {builder.name} --data_dir DIR`, copy DIR to this machine and "
        "pass data_dir=DIR."
    )
    if builder.is_prepared():
        return str(builder.data_dir)
    if not download:
        raise FileNotFoundError(
            f"The tfds data set {builder.name} is not prepared in {where}, and downloading is off (download=False): "
            f"allow it (--config.download=true), or prepare it by hand. {by_hand}"
        )
    urls = list(builder.url_infos or {})
    why = urls and unreachable(urls[0])
    if why:
        raise DownloadError(
            f"tensorflow_datasets cannot download {builder.name} into {where}: {urls[0]} cannot be reached ({why}). "
            f"{by_hand}"
        )
    print(f"Preparing {builder.name} with tensorflow_datasets in {where} (downloaded once)", file=sys.stderr)
    try:
        builder.download_and_prepare()
    except Exception as error:  # tfds' own errors and those of its HTTP client: no data set either way
        raise DownloadError(
            f"tensorflow_datasets could not download and prepare {builder.name} in {where}: "
            f"{type(error).__name__}: {error}. {by_hand}"
        ) from error
    return str(builder.data_dir)


def synthetic(
    num_examples: int = 10_000,
    image_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    seed: int | tuple[int, ...] = 0,
) -> ArraySource:
    """Uniform random images and labels of any shape, for benchmarks and tests (nothing to learn)."""
    rng = np.random.default_rng(seed)
    channels = image_shape[-1]
    std = math.sqrt((256**2 - 1) / 12) / 255  # of a uniform byte, in [0, 1]
    return ArraySource(
        images=rng.integers(0, 256, size=(num_examples, *image_shape), dtype=np.uint8),
        labels=rng.integers(0, num_classes, size=num_examples, dtype=np.int32),
        num_classes=num_classes,
        name="synthetic",
        mean=(0.5,) * channels,
        std=(std,) * channels,
        class_names=tuple(map(str, range(num_classes))),
    )


def _take(source: ArraySource, rows: slice) -> ArraySource:
    return dataclasses.replace(source, images=source.images[rows], labels=source.labels[rows])


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1], for IDX data sets without published constants."""
    pixels = images.reshape(-1, images.shape[-1]) / 255
    return tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist())


def _holds_idx(folder: Path, stems: tuple[str, ...]) -> bool:
    return all(_idx_path(folder, stem) is not None for stem in stems)


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``folder``, plain or gzipped, if there."""
    return next((path for path in (folder / stem, folder / f"{stem}.gz") if path.is_file()), None)


def _holds_tfds(folder: Path, dataset: str) -> bool:
    """Whether ``folder`` is a tfds data_dir with ``dataset`` prepared in it (DATASET/VERSION/dataset_info.json)."""
    return any((folder / dataset).glob("*/dataset_info.json"))


def _find_idx(folder: Path, stem: str) -> Path:
    path = _idx_path(folder, stem)
    if path is None:
        raise FileNotFoundError(
            f"No {stem} (or {stem}.gz) in {folder}. For Fashion-MNIST, `sudo apt-get install dataset-fashion-mnist` "
            f"installs the files to {FASHION_MNIST_DIR}; load_source('fashion_mnist') and load_source('mnist') "
            "download them (into data_dir=FOLDER when given)."
        )
    return path
