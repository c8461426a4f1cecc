"""Writers for small data sets in the real IDX on-disk format (Fashion-MNIST/MNIST layout)."""

import gzip
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: two zero bytes, type 0x08 (unsigned byte), the number of dims, each dim as a
    big-endian uint32, then the data in C order."""
    data = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_folder(folder: Path, compressed: bool, num_train: int = 30, num_test: int = 17) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compressed else ""
    arrays = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


def idx_folder_fixture(num_train: int, num_test: int, compressed: bool = False):
    """A module-scoped fixture ``idx_dir``: a folder written by `make_idx_folder` with these sizes."""

    @pytest.fixture(scope="module")
    def idx_dir(tmp_path_factory) -> Path:
        folder = tmp_path_factory.mktemp("idx")
        make_idx_folder(folder, compressed=compressed, num_train=num_train, num_test=num_test)
        return folder

    return idx_dir
