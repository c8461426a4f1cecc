"""The analyses that follow training runs, from the command line: a run's trajectory over its checkpoints with the
interpolation between two runs, and the Hessian along training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from idx_files import idx_folder_fixture

from resnet_jax.analysis.common import line_styles
from resnet_jax.cli import main
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import train_and_evaluate

REPO = Path(__file__).resolve().parent.parent

idx_dir = idx_folder_fixture(num_train=32, num_test=8)


@pytest.fixture(scope="module")
def runs(idx_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A 6-step resnet8 run on 8 x 8 images with checkpoints at steps 2, 4 and 6, and a copy of it: two runs of one
    model whose final weights are the same."""
    config = load_config(REPO / "configs" / "default.py")
    config.update(
        model="resnet8",
        data_dir=str(idx_dir),
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=6,
        log_every_steps=2,
        eval_every_steps=6,
        checkpoint_every_steps=2,
        keep_checkpoints=3,
        image_size=8,  # small images: a quick compile
    )
    folder = tmp_path_factory.mktemp("runs")
    train_and_evaluate(config, folder / "first")
    shutil.copytree(folder / "first", folder / "copy")
    return folder / "first", folder / "copy"


def test_trajectory_follows_each_run_and_interpolates_between_their_final_weights(runs, idx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "trajectory", *(f"--checkpoint={run}" for run in runs), "--data-dir", str(idx_dir)]
    args += ["--input-size", "8"]
    assert main([*args, "--examples", "8", "--resolution", "3", "--interpolation-points", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 run(s)" in printed and "4 checkpoints, PCA plane" in printed
    report = json.loads((out / "trajectory.json").read_text())
    first, copy = report["runs"]
    assert first["steps"] == [0, 2, 4, 6]  # the initialisation and every checkpoint, without asking
    assert first["label"] == "resnet8 step 6 (first)" and copy["label"] == "resnet8 step 6 (copy)"
    np.testing.assert_allclose(first["coordinates"], copy["coordinates"], atol=1e-5)
    (line,) = report["interpolations"]
    np.testing.assert_allclose(line["loss"], line["loss"][0], rtol=1e-5)  # the same solution at both ends
    assert line["barrier"] == pytest.approx(0.0, abs=1e-5)
    for name in ("trajectory.png", "interpolation.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_trajectory_needs_a_run(tmp_path, capsys):
    assert main(["analyze", "trajectory", "--model", "resnet8", "--out", str(tmp_path / "out")]) == 2
    assert "give --checkpoint DIR" in capsys.readouterr().err


@pytest.mark.slow  # --all-checkpoints as every analysis reads it (gradflow's test); the Hessian's own tests are quick
def test_hessian_along_training(runs, idx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "hessian", "--checkpoint", str(runs[0]), "--init", "--all-checkpoints", "--top-k", "1"]
    args += ["--data-dir", str(idx_dir), "--input-size", "8", "--examples", "4"]
    assert main([*args, "--steps", "3", "--runs", "1", "--probes", "2", "--out", str(out)]) == 0
    report = json.loads((out / "hessian.json").read_text())
    assert [row["label"] for row in report["summary"]] == [f"resnet8 step {step}" for step in (0, 2, 4, 6)]
    assert len({row["lambda_max"] for row in report["summary"]}) == 4  # training moved the curvature


def test_plot_colours_follow_runs_and_shade_each_runs_checkpoints():
    """Two runs of one model (with and without stochastic depth) must be told apart in a plot; the checkpoints of
    one run read as a progression of one colour, lighter before."""
    run_a = [{"model": "resnet56", "label": f"a {s}", "workdir": "runs/a"} for s in (100, 200)]
    run_b = [{"model": "resnet56", "label": "b 200", "workdir": "runs/b"}]
    at_init = [{"model": "plain56", "label": f"seed {s}", "workdir": None} for s in (0, 1)]
    a_early, a_late, b, init_0, init_1 = line_styles(run_a + run_b + at_init)
    assert a_early["color"] == a_late["color"] and a_early["alpha"] < a_late["alpha"] == 1.0
    assert b["color"] != a_late["color"] and b["alpha"] == 1.0
    assert init_0["color"] == init_1["color"] not in (a_late["color"], b["color"])
    assert [style["label"] for style in (a_early, b, init_1)] == ["a 100", "b 200", "seed 1"]
