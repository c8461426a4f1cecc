"""The Colab notebooks: each runs top to bottom, headless, in the smoke setting, and is committed without outputs.

They run as in Colab: no Debian data set (the default data folder is an empty one), Fashion-MNIST only from a
local HTTP mirror (tests/mirror.py), which each notebook downloads from by itself.
"""

import os
from pathlib import Path

import nbclient
import nbformat
import pytest
from mirror import Mirror, write_child_setup

from resnet_jax.data.download import DATA_DIR_VARIABLE, MIRROR_VARIABLE

REPO = Path(__file__).resolve().parent.parent
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def test_every_notebook_of_the_issue_is_here():
    assert [path.stem[:2] for path in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), (
        f"{path.name} holds outputs: clear them before committing (Jupyter: Edit > Clear All Outputs)."
    )


# The notebooks that repeat what the analysis and transfer tests check run with the slow tests, to keep the
# default run under 15 minutes on 2 cores; the quickstart runs in every default run.
SLOW_NOTEBOOKS = ("02_gradient_theory", "03_ensembles", "04_loss_landscape", "05_transfer_and_features")


@pytest.mark.parametrize(
    "path",
    [pytest.param(path, marks=pytest.mark.slow) if path.stem in SLOW_NOTEBOOKS else path for path in NOTEBOOKS],
    ids=lambda path: path.stem,
)
def test_notebook_runs_headless_in_the_smoke_setting(path, tmp_path, monkeypatch):
    mirror = Mirror()
    mirror.add_idx_dataset("fashion_mnist", tmp_path / "published", num_train=300, num_test=200)
    setup = write_child_setup(tmp_path / "kernel", {"fashion_mnist": mirror.published("fashion_mnist")})
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(setup), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(MIRROR_VARIABLE, mirror.url)
    monkeypatch.setenv(DATA_DIR_VARIABLE, str(tmp_path / "data"))
    monkeypatch.setenv("RESNET_JAX_SMOKE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}}
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    finally:
        mirror.close()
    downloaded = sorted(os.listdir(tmp_path / "data" / "fashion_mnist"))  # each notebook fetched what it uses
    assert downloaded and sorted(mirror.requests) == [f"/fashion_mnist/{name}" for name in downloaded]
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"{path.name} showed no plot"


def test_in_colab_without_a_source_to_install_from_the_first_cell_says_so_in_one_sentence(tmp_path):
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    # A fresh Colab runtime: google.colab loaded, resnet_jax not installed; the set-up cell, outside a checkout.
    colab = "import sys, types\nsys.modules['google.colab'] = types.ModuleType('google.colab')\n"
    colab += "sys.modules['resnet_jax'] = None"
    notebook.cells = [nbformat.v4.new_code_cell(colab), notebook.cells[2]]
    client = nbclient.NotebookClient(
        notebook, timeout=120, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    [error] = notebook.cells[1].outputs
    assert error.output_type == "error"
    assert error.traceback == [
        "SetupError: Set RESNET_JAX_SOURCE (a git URL, a wheel or a package name) in this cell and run it again."
    ]
