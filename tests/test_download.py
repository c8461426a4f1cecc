"""Data that downloads itself, tested without the internet: MNIST and Fashion-MNIST come from a local HTTP mirror
(tests/mirror.py) whose sums are pinned in place of the publishers', and tfds prepares a small data set that it
downloads from the same mirror."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from idx_files import make_idx_folder
from mirror import Mirror, write_child_setup

from resnet_jax.cli import main
from resnet_jax.data import download, load_source, sources
from resnet_jax.data.download import DATA_DIR_VARIABLE, MIRROR_VARIABLE, DownloadError
from resnet_jax.data.sources import idx_folder, prepare_tfds, read_idx

REPO = Path(__file__).resolve().parent.parent
IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz")
IDX_NAMES += ("t10k-labels-idx1-ubyte.gz",)
# Training images over download.PROGRESS_MIN_BYTES (1,400 random 28x28 images do not compress), so they report it.
NUM_TRAIN = 1_400


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A mirror of Fashion-MNIST-shaped and MNIST-shaped IDX files, pinned and used in place of the publishers'
    (RESNET_JAX_DATA_MIRROR), with an empty default data folder (RESNET_JAX_DATA_DIR)."""
    served = Mirror()
    served.arrays = {
        dataset: served.add_idx_dataset(dataset, tmp_path / "published" / dataset, NUM_TRAIN, 40)
        for dataset in ("fashion_mnist", "mnist")
    }
    for dataset in served.arrays:
        monkeypatch.setitem(download.IDX_DOWNLOADS, dataset, served.published(dataset))
    monkeypatch.setenv(MIRROR_VARIABLE, served.url)
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path / "data"))
    yield served
    served.close()


def test_a_first_run_downloads_and_checks_and_a_second_uses_the_cache_without_the_server(mirror, tmp_path, capfd):
    train, test = load_source("fashion_mnist", "train"), load_source("fashion_mnist", "test")
    images, labels = mirror.arrays["fashion_mnist"]["train"]
    np.testing.assert_array_equal(train.images[..., 0], images)
    np.testing.assert_array_equal(train.labels, labels)
    assert test.num_examples == 40
    folder = tmp_path / "data" / "fashion_mnist"
    assert sorted(path.name for path in folder.iterdir()) == sorted(IDX_NAMES)  # no temporary file left behind
    for name in IDX_NAMES:
        pinned = download.IDX_DOWNLOADS["fashion_mnist"].file(name)
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == pinned.sha256
    err = capfd.readouterr().err
    assert f"Downloading {mirror.url}/fashion_mnist/train-images-idx3-ubyte.gz (1.1 MB) to {folder}" in err
    assert "train-images-idx3-ubyte.gz: 50% of 1.1 MB" in err and "100%" in err  # the one file over 1 MiB
    assert "train-labels-idx1-ubyte.gz: 100%" not in err
    assert sorted(mirror.requests) == sorted(f"/fashion_mnist/{name}" for name in IDX_NAMES)

    mirror.close()  # the second run needs no server
    again = load_source("fashion_mnist", "train[:10]")
    np.testing.assert_array_equal(again.images[..., 0], images[:10])
    assert "Downloading" not in capfd.readouterr().err


def test_a_corrupted_then_a_truncated_download_is_rejected_and_tried_again(mirror, tmp_path, capfd):
    path = "/mnist/train-images-idx3-ubyte.gz"
    mirror.faults[path] = ["corrupt", "truncate"]
    source = load_source("mnist", "train", str(tmp_path / "mnist"))
    np.testing.assert_array_equal(source.images[..., 0], mirror.arrays["mnist"]["train"][0])
    assert mirror.requests.count(path) == 3
    err = capfd.readouterr().err
    pinned = download.IDX_DOWNLOADS["mnist"].file("train-images-idx3-ubyte.gz")
    corrupted, truncated = (line for line in err.splitlines() if line.endswith("; trying again."))
    assert f"{path} arrived with SHA-256 " in corrupted and f", not the pinned {pinned.sha256}" in corrupted
    assert f"{path} arrived as {pinned.size // 2} bytes, not the pinned {pinned.size}" in truncated


def test_a_checksum_mismatch_never_reaches_training(mirror, tmp_path, capsys):
    path = "/fashion_mnist/train-images-idx3-ubyte.gz"
    mirror.faults[path] = ["corrupt"] * download.ATTEMPTS
    workdir = tmp_path / "run"
    code = main(["train", "--config", "fashion_mnist_resnet20", "--workdir", str(workdir)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: Gave up on {mirror.url}{path} after 3 tries, keeping nothing in " in err
    assert ": the last one arrived with SHA-256 " in err
    folder = tmp_path / "data" / "fashion_mnist"
    assert not list(folder.glob("train-images*")) and not list(folder.glob(".*"))  # nothing kept, nothing left
    assert not workdir.exists() or not any(workdir.iterdir())


def test_offline_the_error_names_the_file_its_url_and_where_to_put_it(mirror, tmp_path, monkeypatch):
    unreachable = "http://127.0.0.1:1"  # nothing listens on port 1
    monkeypatch.setenv(MIRROR_VARIABLE, unreachable)
    folder = tmp_path / "data" / "mnist"
    with pytest.raises(DownloadError) as error:
        load_source("mnist", "test")
    url = f"{unreachable}/mnist/t10k-images-idx3-ubyte.gz"
    message = str(error.value)
    assert f"Could not download mnist's t10k-images-idx3-ubyte.gz to {folder}: {url} cannot be reached" in message
    assert message.endswith(f"fetch {url} elsewhere and put it at {folder / 't10k-images-idx3-ubyte.gz'}.")
    monkeypatch.setenv(MIRROR_VARIABLE, mirror.url)
    mirror.faults["/mnist/t10k-images-idx3-ubyte.gz"] = ["missing"]
    with pytest.raises(DownloadError, match=r"answered HTTP 404 Not Found\. Without network here, fetch"):
        load_source("mnist", "test")


def test_with_downloads_off_the_error_says_what_to_fetch_and_nothing_is_requested(mirror, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["train", "--config", "fashion_mnist_resnet20", "--workdir", str(workdir), "--config.download=false"])
    assert code == 2
    err = capsys.readouterr().err
    folder = tmp_path / "data" / "fashion_mnist"
    urls = (
        f"{mirror.url}/fashion_mnist/train-images-idx3-ubyte.gz, {mirror.url}/fashion_mnist/train-labels-idx1-ubyte.gz"
    )
    assert (
        f"fashion_mnist train needs train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz in {folder}, and "
        f"downloading is off (download=False): allow it (--config.download=true), or fetch {urls} into {folder}."
    ) in err
    assert mirror.requests == []


def test_without_a_data_folder_the_cache_comes_first_then_debian_s_package_then_the_download(
    mirror, tmp_path, monkeypatch, capfd
):
    """With RESNET_JAX_DATA_DIR unset: the user's cache, then Debian's dataset-fashion-mnist, then a download into
    the cache (which tells about the Debian package when it fails)."""
    monkeypatch.delenv(DATA_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "resnet-jax" / "datasets" / "fashion_mnist"
    assert download.default_folder("fashion_mnist") == cache
    debian = tmp_path / "debian"
    make_idx_folder(debian, compressed=True)
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", debian)
    assert idx_folder("fashion_mnist", "train") == debian and mirror.requests == []

    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    assert idx_folder("fashion_mnist", "train") == cache and len(mirror.requests) == 2
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", debian)
    assert idx_folder("fashion_mnist", "train") == cache  # the cache, now that it holds the files

    monkeypatch.setenv(MIRROR_VARIABLE, "http://127.0.0.1:1")
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(DownloadError, match=r"Or `sudo apt-get install dataset-fashion-mnist` \(read from "):
        load_source("fashion_mnist", "test")


def test_resnet_jax_download_fetches_every_split_ahead(mirror, tmp_path, capsys):
    folder = tmp_path / "ahead"
    assert main(["download", "mnist", "--data-dir", str(folder)]) == 0
    assert capsys.readouterr().out == f"mnist: {folder}\n"
    assert sorted(path.name for path in folder.iterdir()) == sorted(IDX_NAMES)
    assert main(["download", "mnist", "--data-dir", str(folder)]) == 0  # already there: nothing requested
    assert len(mirror.requests) == 4
    assert main(["download", "synthetic"]) == 2
    assert "Cannot download 'synthetic'; the data sets to download are fashion_mnist, mnist" in capsys.readouterr().err


def test_resnet_jax_train_whose_only_data_source_is_the_mirror_downloads_checks_and_trains(tmp_path):
    """The core install's training: a child process without TensorFlow or PyTorch importable, as in a plain
    `pip install resnet-jax`, trains on Fashion-MNIST that it downloads and checks itself."""
    served = Mirror()
    try:
        served.add_idx_dataset("fashion_mnist", tmp_path / "published", num_train=64, num_test=16)
        blocked = ("tensorflow", "tensorflow_datasets", "torch", "safetensors")
        setup = write_child_setup(tmp_path / "child", {"fashion_mnist": served.published("fashion_mnist")}, blocked)
        env = dict(os.environ, **{MIRROR_VARIABLE: served.url, DATA_DIR_VARIABLE: str(tmp_path / "data")})
        env["PYTHONPATH"] = os.pathsep.join([str(setup), str(REPO), env.get("PYTHONPATH", "")])
        overrides = ["--config.model=resnet8", "--config.num_train_steps=2", "--config.batch_size=16"]
        overrides += ["--config.eval_batch_size=16", "--config.warmup_steps=0", "--config.log_every_steps=1"]
        overrides += ["--config.eval_every_steps=2", "--config.checkpoint_every_steps=2"]
        command = [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "fashion_mnist_resnet20"]
        command += ["--workdir", str(tmp_path / "run"), *overrides]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        served.close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Downloading {served.url}/fashion_mnist/train-images-idx3-ubyte.gz" in run.stderr
    assert len(served.requests) == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["split"] == "test"
    folder = tmp_path / "data" / "fashion_mnist"
    assert read_idx(folder / "t10k-labels-idx1-ubyte.gz").shape == (16,)


# --- tfds ------------------------------------------------------------------------------------------


def tiny_builder(url: str, data_dir: Path):
    """A tfds data set whose two files tfds' own download manager fetches from ``url``."""
    import tensorflow_datasets as tfds

    files = {"images": f"{url}/mnist/t10k-images-idx3-ubyte.gz", "labels": f"{url}/mnist/t10k-labels-idx1-ubyte.gz"}

    class TinyDownloads(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        url_infos = types.MappingProxyType(dict.fromkeys(files.values()))  # as tfds' own data sets list their URLs

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(dl_manager.download(files))}

        def _generate_examples(self, paths):
            images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield i, {"image": image[..., None], "label": int(label)}

    return TinyDownloads(data_dir=str(data_dir))


def test_a_tfds_data_set_is_downloaded_and_prepared_where_it_is_missing(mirror, tmp_path, capfd):
    data_dir = tmp_path / "tfds"
    builder = tiny_builder(mirror.url, data_dir)
    with pytest.raises(FileNotFoundError, match=r"downloading is off \(download=False\): allow it"):
        prepare_tfds(builder, str(data_dir), download=False)
    assert prepare_tfds(builder, str(data_dir), download=True) == str(builder.data_dir)
    assert f"Preparing tiny_downloads with tensorflow_datasets in {data_dir}" in capfd.readouterr().err
    assert builder.is_prepared() and builder.info.splits["train"].num_examples == 40
    requests = len(mirror.requests)
    prepare_tfds(tiny_builder(mirror.url, data_dir), str(data_dir), download=False)  # prepared: nothing to do
    assert len(mirror.requests) == requests == 2


def test_a_tfds_download_that_fails_says_how_to_prepare_the_data_set_elsewhere(mirror, tmp_path):
    how = "On a machine with network run `tfds build tiny_downloads --data_dir DIR`, copy DIR to this machine and pass"
    mirror.faults["/mnist/t10k-images-idx3-ubyte.gz"] = ["missing"]
    with pytest.raises(DownloadError) as error:
        prepare_tfds(tiny_builder(mirror.url, tmp_path), str(tmp_path), download=True)
    assert f"tensorflow_datasets could not download and prepare tiny_downloads in {tmp_path}: " in str(error.value)
    assert how in str(error.value)
    # Offline, at once (tfds' downloader would retry for minutes): the server is tried before tfds starts.
    with pytest.raises(DownloadError) as error:
        prepare_tfds(tiny_builder("http://127.0.0.1:1", tmp_path), str(tmp_path), download=True)
    url = "http://127.0.0.1:1/mnist/t10k-images-idx3-ubyte.gz"
    assert f"tensorflow_datasets cannot download tiny_downloads into {tmp_path}: {url} cannot be reached" in str(
        error.value
    )
    assert how in str(error.value)


def test_mnist_prepared_by_tfds_is_read_through_tfds(tmp_path):
    import tensorflow_datasets as tfds

    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp_path / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")  # the layout that tfds leaves
    with tfds.testing.mock_data(num_examples=5):
        source = load_source("mnist", "train", str(tmp_path))
    assert source.num_examples == 5 and source.image_shape == (28, 28, 1)
    assert not list(tmp_path.glob("*.gz"))
