"""The light install and the packaged configs: the core install (no TensorFlow, no PyTorch) loads IDX data, and
each missing extra says in one line which `pip install` to run; configs/ ships with the distribution, so that a
config name resolves in a checkout and in an installed wheel alike."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from idx_files import make_idx_folder

from resnet_jax.cli import main
from resnet_jax.data import load_idx_folder, load_source
from resnet_jax.extras import MissingExtraError, require
from resnet_jax.train.config import CONFIGS_DIR, config_file, load_config

REPO = Path(__file__).resolve().parent.parent


# --- extras ----------------------------------------------------------------------------------------


def test_require_names_the_extra_of_a_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if not installed
    with pytest.raises(
        MissingExtraError, match=r"^safetensors is not installed, .*: pip install 'resnet-jax\[torch\]'$"
    ):
        require("safetensors.numpy")
    with pytest.raises(ValueError, match="not an optional dependency"):
        require("numpy")


def test_without_the_tfds_extra_cifar_and_imagenet_say_what_to_install(tmp_path, monkeypatch, capsys):
    for module in ("tensorflow", "tensorflow_datasets"):
        monkeypatch.setitem(sys.modules, module, None)
    message = (
        "tensorflow_datasets is not installed, and the tfds data sets (CIFAR-10, CIFAR-100, ImageNet) need it: "
        "pip install 'resnet-jax[tfds]'"
    )
    with pytest.raises(MissingExtraError, match=re.escape(message)):
        load_source("imagenet2012", "train", str(tmp_path))
    assert main(["train", "--config", "cifar10_resnet20", "--workdir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"resnet-jax train: error: {message}"]


@pytest.mark.parametrize(("module", "suffix"), [("torch", ".pth"), ("safetensors", ".safetensors")])
def test_without_the_torch_extra_convert_says_what_to_install(module, suffix, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)
    weights = tmp_path / f"weights{suffix}"
    weights.write_bytes(b"\0")
    code = main(["convert", "--from-torch", str(weights), "--model", "resnet18", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"resnet-jax convert: error: {module} is not installed, and PyTorch weight files (resnet-jax convert)"
        f"{' and the PyTorch rows of resnet-jax bench' if module == 'torch' else ''} need it: "
        "pip install 'resnet-jax[torch]'"
    ]


def test_without_the_torch_extra_bench_vs_torch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "resnet_jax.bench.torch_models", raising=False)  # imported afresh
    assert main(["bench", "--model", "resnet8", "--batch", "2", "--vs-torch", "--no-input"]) == 2
    assert capsys.readouterr().err.endswith("need it: pip install 'resnet-jax[torch]'\n")


def test_the_idx_files_load_without_the_extras(tmp_path, monkeypatch):
    for module in ("tensorflow", "tensorflow_datasets", "torch", "safetensors"):
        monkeypatch.setitem(sys.modules, module, None)
    make_idx_folder(tmp_path, compressed=True)
    assert load_idx_folder(tmp_path, "test").num_examples == 17


# --- configs by name -------------------------------------------------------------------------------


def test_a_config_name_is_the_packaged_file_from_any_folder(tmp_path, monkeypatch):
    assert CONFIGS_DIR == REPO / "configs"
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert config_file("fashion_mnist_resnet20") == REPO / "configs" / "fashion_mnist_resnet20.py"
    assert config_file("configs/default.py") == REPO / "configs" / "default.py"  # the README's spelling
    assert (
        load_config("fashion_mnist_resnet20").to_dict()
        == load_config(REPO / "configs" / "fashion_mnist_resnet20.py").to_dict()
    )
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.py").write_text("def get_config():\n    return {}\n")
    assert config_file("configs/default.py") == Path("configs/default.py")  # a file that is there comes first
    with pytest.raises(FileNotFoundError, match=r"No config file 'fashion_mnist_resnet2'\. .*: cifar100_preact"):
        config_file("fashion_mnist_resnet2")
    with pytest.raises(FileNotFoundError, match=r"No config file 'elsewhere/default\.py'"):
        config_file("elsewhere/default.py")


def test_the_wheel_ships_the_configs_and_a_name_resolves_in_the_installed_package(tmp_path):
    """Built and installed (without dependencies: this interpreter's serve) as a user would, outside a checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("resnet_jax", "configs"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)], check=True, timeout=300
    )
    [wheel] = tmp_path.glob("resnet_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("configs/")) == sorted(
        f"configs/{p.name}" for p in CONFIGS_DIR.glob("*.py")
    )
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    code = (
        "from resnet_jax.train.config import config_file, load_config\n"
        "print(config_file('fashion_mnist_resnet20'))\n"
        "print(load_config('fashion_mnist_resnet20', ['--config.num_train_steps=7']).num_train_steps)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(site / "configs" / "fashion_mnist_resnet20.py"), "7"]
    script = subprocess.run(  # the wheel's `resnet-jax` command, through its entry point
        [sys.executable, str(site / "bin" / "resnet-jax"), "models"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert script.returncode == 0 and "resnet50" in script.stdout.split(), script.stderr
