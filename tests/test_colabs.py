"""The Colab notebooks: each runs top to bottom, headless, in the smoke setting, and is committed without outputs."""

from pathlib import Path

import nbclient
import nbformat
import pytest

COLABS = Path(__file__).resolve().parent.parent / "colabs"
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


# The analysis notebooks that repeat what tests/test_analysis_paths.py and test_analysis_landscape.py check run
# with the slow tests, to keep the default run under 15 minutes on 2 cores.
SLOW_NOTEBOOKS = ("03_ensembles", "04_loss_landscape")


@pytest.mark.parametrize(
    "path",
    [pytest.param(path, marks=pytest.mark.slow) if path.stem in SLOW_NOTEBOOKS else path for path in NOTEBOOKS],
    ids=lambda path: path.stem,
)
def test_notebook_runs_headless_in_the_smoke_setting(path, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_SMOKE", "1")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert images, f"{path.name} showed no plot"
