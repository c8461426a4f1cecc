"""`analyze all`: every analysis into one folder and one page that shows all of their plots and tables."""

from __future__ import annotations

from pathlib import Path

import pytest
from idx_files import idx_folder_fixture

from resnet_jax.analysis.tools import TOOLS
from resnet_jax.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY_TOOLS = {  # each tool's smallest useful settings on 20 test images
    "jacobian": "--examples 2 --iterations 4 --probes 4 --exact-size 4",
    "gradflow": "--examples 8",
    "paths": "--examples 8 --samples 2 --batch-size 4 --split test",
    "lesion": "--examples 20 --draws 1",
    "landscape": "--examples 8 --resolution 3 --split test",
    "cka": "--examples 8 --batch-size 4",
    "features": "--examples 2 --top 1",
    "hessian": "--examples 4 --steps 3 --runs 1 --probes 2 --top-k 1 --split test",
}
TINY_DEGRADATION = {
    "depths": "(8,14)",
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_train_steps": 2,
    "log_every_steps": 1,
    "eval_every_steps": 2,
    "checkpoint_every_steps": 2,
    "warmup_steps": 0,
}


idx_dir = idx_folder_fixture(num_train=80, num_test=20)


def all_command(idx_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "analyze",
        "all",
        "--model",
        "resnet8",
        "--model",
        "plain8",
        "--data-dir",
        str(idx_dir),
        "--out",
        str(out),
        "--degradation-config",
        str(REPO / "configs" / "degradation_fashion_mnist.py"),
        *(f"--tool-args={tool}={options}" for tool, options in TINY_TOOLS.items()),
        *(f"--config.{key}={value}" for key, value in {**TINY_DEGRADATION, "data_dir": idx_dir}.items()),
        *extra,
    ]


@pytest.mark.slow  # every analysis again, each tested on its own in the default run
def test_all_writes_every_analysis_and_one_page_that_shows_them(idx_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(all_command(idx_dir, out)) == 0
    printed = capsys.readouterr().out
    names = [tool.name for tool in TOOLS if tool.name != "trajectory"]  # it follows runs: given none, left out
    assert names == [
        "jacobian",
        "gradflow",
        "cka",
        "features",
        "paths",
        "lesion",
        "hessian",
        "landscape",
        "degradation",
    ]
    assert [f"[{i}/9] analyze {name}" in printed for i, name in enumerate(names, 1)] == [True] * 9
    assert "analyze trajectory: left out" in printed
    page, markdown = (out / "index.html").read_text(), (out / "index.md").read_text()
    for tool in names:
        images = sorted((out / tool).glob("*.png"))
        assert images, f"{tool} drew nothing"
        for image in images:  # every plot of every analysis is on both pages, by a path relative to the page
            assert f"src='{tool}/{image.name}'" in page
            assert f"]({tool}/{image.name})" in markdown
    titles = ("Block Jacobians", "Gradient flow", "CKA", "Feature maps", "Paths", "Lesions", "Hessian spectrum")
    for title in (*titles, "Loss landscape", "Degradation"):
        assert f"<h2>{title}" in page and f"## {title}" in markdown
    assert "resnet8 init" in markdown and "plain8 init" in markdown  # the snapshots' rows in the tables
    assert "| plain8 init | 0 |" not in markdown  # plain nets get no paths row: they have no skips
    assert (out / "degradation" / "runs" / "resnet14" / "metrics.jsonl").is_file()


@pytest.mark.slow  # over 30 s on 2 cores
def test_skip_leaves_an_analysis_out(idx_dir, tmp_path, capsys):
    out = tmp_path / "report"
    others = ("jacobian", "cka", "features", "paths", "lesion", "hessian", "landscape", "degradation")
    assert main(all_command(idx_dir, out, *(f"--skip={tool}" for tool in others))) == 0
    printed = capsys.readouterr().out
    assert "[1/1] analyze gradflow" in printed
    assert "analyze trajectory: left out, it follows training runs" in printed  # given models, no runs
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["gradflow"]
    assert "## Gradient flow" in (out / "index.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tool-args=degradation=--config x"], "the degradation runs take --config.KEY=VALUE"),
        (["--config.depths=(8,10)"], "not of the form 6n+2"),
    ],
)
def test_bad_settings_fail_before_any_analysis_runs(idx_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "report"
    assert main(all_command(idx_dir, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_option_of_one_tool_is_refused_before_any_analysis_runs(idx_dir, tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        main(all_command(idx_dir, out, "--tool-args=paths=--bogus 5"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus 5" in capsys.readouterr().err
    assert not out.exists()
