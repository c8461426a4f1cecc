"""The packaged configs: configs/ ships with the distribution, so that a config name resolves in a checkout and in
an installed wheel alike."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from resnet_jax.train.config import CONFIGS_DIR, config_file, load_config

REPO = Path(__file__).resolve().parent.parent


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
