"""Degradation: plain and residual nets of two depths trained for real on a tiny IDX set, resumed, refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from idx_files import idx_folder_fixture

from resnet_jax.analysis.degradation import late_error, summarize
from resnet_jax.cli import main
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.reporting import read_metrics

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "degradation_fashion_mnist.py")


# 8 training images per class, 2 test images per class.
idx_dir = idx_folder_fixture(num_train=80, num_test=20)


def tiny(idx_dir: Path, out: Path, *overrides: str) -> list[str]:
    """The CLI call for depths 8 and 14, four steps each on the tiny set."""
    settings = {
        "depths": "(8,14)",
        "data_dir": str(idx_dir),
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_train_steps": 4,
        "log_every_steps": 2,
        "eval_every_steps": 2,
        "checkpoint_every_steps": 2,
        "warmup_steps": 0,
    }
    return [
        "analyze",
        "degradation",
        "--config",
        CONFIG,
        "--out",
        str(out),
        *(f"--config.{key}={value}" for key, value in settings.items()),
        *overrides,
    ]


@pytest.mark.slow  # over 30 s on 2 cores
def test_degradation_trains_each_depth_once_and_plots_its_curves(idx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(tiny(idx_dir, out)) == 0
    printed = capsys.readouterr().out
    assert printed.count("compiled the train step") == 4
    report = json.loads((out / "degradation.json").read_text())
    assert [r["model"] for r in report["runs"]] == ["plain8", "plain14", "resnet8", "resnet14"]
    for run in report["runs"]:
        workdir = out / "runs" / run["model"]
        records = read_metrics(workdir)
        assert [step for step, _ in run["train"]] == [step for step, _ in run["test"]] == [2, 4]
        final_test = next(r for r in reversed(records) if r["split"] == "test")
        assert run["final_test_error"] == pytest.approx(100 * (1 - final_test["accuracy"]))
        final_train = next(r for r in reversed(records) if r["split"] == "train")
        assert run["final_train_error"] == pytest.approx(100 * (1 - final_train["accuracy"]))
        assert run["late_train_error"] == run["final_train_error"]  # of 2 and 4, only step 4 is in the second half
        meta = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False).read_meta()
        assert meta["model"] == run["model"] and meta["step"] == 4
        assert meta["config"]["batch_size"] == 8 and meta["config"]["depths"] == [8, 14]  # one recipe for all
    summary = report["summary"]
    plain = [r["late_train_error"] for r in report["runs"][:2]]
    assert summary["plain_with_depth"] == (
        "worse" if plain[1] > plain[0] else "better" if plain[1] < plain[0] else "mixed"
    )
    assert summary["degradation_shown"] == (summary["plain_with_depth"] == "worse")
    assert summary["reproduces"] == (summary["degradation_shown"] and summary["resnet_with_depth"] == "better")
    assert summary["statement"] in printed
    assert (out / "degradation.png").stat().st_size > 10_000

    # A rerun reads the finished runs back: nothing is trained again (the depths, here reordered, are no part of
    # the recipe that a finished run must match)
    before = {run: (out / "runs" / run / "metrics.jsonl").read_text() for run in ("plain8", "resnet14")}
    assert main(tiny(idx_dir, out, "--config.depths=(14,8)")) == 0
    assert "compiled the train step" not in capsys.readouterr().out
    assert {run: (out / "runs" / run / "metrics.jsonl").read_text() for run in before} == before
    assert json.loads((out / "degradation.json").read_text())["runs"] == report["runs"]

    # Another recipe in the same folder would mix its curves with these: refused before training
    assert main(tiny(idx_dir, out, "--config.learning_rate=0.05")) == 2
    assert "differs in ['learning_rate']" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("depths", "message"), [("(8,10)", "[10] not of the form 6n+2"), ("(20,)", "compare at least two depths")]
)
def test_bad_depths_fail_before_any_training(idx_dir, tmp_path, capsys, depths, message):
    out = tmp_path / "out"
    assert main(tiny(idx_dir, out, f"--config.depths={depths}")) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_verdict_reads_the_late_training_error_of_each_family():
    assert late_error([[25, 50.0], [50, 30.0], [75, 20.0], [100, 10.0]], num_train_steps=100) == 15.0
    assert late_error([[10, 40.0]], num_train_steps=100) == 40.0  # nothing late yet: the last point

    summary = summarize(late_errors([10.0, 11.0, 12.5], [10.0, 9.0, 8.0]))
    assert summary["plain_with_depth"] == "worse" and summary["resnet_with_depth"] == "better"
    assert summary["degradation_shown"] and summary["deeper_residual_better"] and summary["reproduces"]
    assert summary["skip_gain"] == {"8": 0.0, "20": 2.0, "32": 4.5}
    assert "plain late training error 8: 10.00%, 20: 11.00%, 32: 12.50% (worse with depth)" in summary["statement"]
    assert summary["statement"].endswith("He et al.'s Fig. 6 reproduces.")
    summary = summarize(late_errors([10.0, 12.0, 11.0], [10.0, 9.0, 8.0]))
    assert summary["plain_with_depth"] == "mixed" and not summary["degradation_shown"] and not summary["reproduces"]
    assert summary["statement"].endswith("no degradation shown.")
    # Plain nets degrade, residual nets do not improve (a short schedule): the first half only
    for resnet in ([8.0, 9.0, 10.0], [8.0, 7.0, 9.0]):  # worse with depth; mixed (32 layers worse than 20)
        half = summarize(late_errors([10.0, 11.0, 12.0], resnet))
        assert half["degradation_shown"] and not half["deeper_residual_better"] and not half["reproduces"]
        assert half["statement"].endswith("plain nets degrade with depth, but deeper residual nets are not better.")


def late_errors(plain: list[float], resnet: list[float]) -> list[dict]:
    """Runs of depths 8, 20 and 32 with these late training errors."""
    runs = []
    for family, errors in (("plain", plain), ("resnet", resnet)):
        for depth, error in zip((8, 20, 32), errors, strict=True):
            runs.append({"model": f"{family}{depth}", "family": family, "depth": depth, "late_train_error": error})
            runs[-1] |= {"final_train_error": error, "final_test_error": error}
    return runs
