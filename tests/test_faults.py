"""Faults a cluster job meets, for real: SIGKILL, SIGTERM, divergence, a corrupt checkpoint, bad input."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import pytest
from idx_files import idx_folder_fixture

from resnet_jax.cli import main
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.precision import all_finite

REPO = Path(__file__).resolve().parent.parent
STEPS = 300


idx_dir = idx_folder_fixture(num_train=96, num_test=17)


def overrides(idx_dir: Path, **changes) -> list[str]:
    settings = {
        "model": "resnet8",
        "data_dir": str(idx_dir),
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_train_steps": STEPS,
        "log_every_steps": 1,
        "eval_every_steps": 10_000,
        "checkpoint_every_steps": 25,
        "lr_schedule": "cosine",
        **changes,
    }
    return [f"--config.{k}={v}" for k, v in settings.items()]


def params_of(workdir: Path, step: int | None = None):
    return Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False).read_state(step)["params"]


def start_training(workdir: Path, args: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "configs/default.py", "--workdir"]
    return subprocess.Popen(
        [*command, str(workdir), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_step(workdir: Path, process: subprocess.Popen, step: int, timeout: float = 300) -> int:
    """Block until the run has logged ``step``; return the last logged step."""
    deadline = time.monotonic() + timeout
    metrics = workdir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return json.loads(lines[-1])["step"]
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise TimeoutError(f"the run did not reach step {step}")


@pytest.fixture(scope="module")
def uninterrupted(idx_dir, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", "--config", "configs/default.py", "--workdir", str(workdir), *overrides(idx_dir)]) == 0
    return workdir


def test_sigkill_mid_training_then_restart_ends_bit_identical(idx_dir, uninterrupted, tmp_path):
    workdir = tmp_path / "killed"
    process = start_training(workdir, overrides(idx_dir))
    killed_at = wait_for_step(workdir, process, 110)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert killed_at < STEPS
    restarted = start_training(workdir, overrides(idx_dir))
    out, err = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, err[-3000:]
    assert "resumed from step" in out
    chex.assert_trees_all_equal(params_of(workdir), params_of(uninterrupted))


def test_sigterm_finishes_the_step_checkpoints_and_exits_cleanly(idx_dir, uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    process = start_training(workdir, overrides(idx_dir))
    wait_for_step(workdir, process, 60)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    stopped = int(err.split("stopped after step ")[1].split(" ")[0])
    assert Checkpoints(workdir, every_steps=1, keep_latest=1).latest_step() == stopped
    resumed = start_training(workdir, overrides(idx_dir))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in out
    chex.assert_trees_all_equal(params_of(workdir), params_of(uninterrupted))


def test_divergence_stops_with_the_step_and_an_intact_last_good_checkpoint(idx_dir, tmp_path):
    config = load_config(
        REPO / "configs/default.py",
        overrides(idx_dir, learning_rate=1e30, checkpoint_every_steps=1, num_train_steps=50, lr_schedule="constant"),
    )
    with pytest.raises(FloatingPointError, match=r"diverged at step (\d+).*Last good checkpoint: step (\d+)") as error:
        train_and_evaluate(config, tmp_path)
    message = str(error.value)
    failed = int(message.split("diverged at step ")[1].split(":")[0])
    good = int(message.split("Last good checkpoint: step ")[1].split(" ")[0])
    assert good == failed - 1
    assert bool(all_finite(params_of(tmp_path, good)))


def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_previous_one_restored(idx_dir, tmp_path, caplog, capsys):
    args = dict(num_train_steps=6, checkpoint_every_steps=3, lr_schedule="constant")
    train_and_evaluate(load_config(REPO / "configs/default.py", overrides(idx_dir, **args)), tmp_path)
    for path in (tmp_path / "checkpoints" / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 7)
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        args["num_train_steps"] = 9
        train_and_evaluate(load_config(REPO / "configs/default.py", overrides(idx_dir, **args)), tmp_path)
    assert "Checkpoint 6" in caplog.text and "unreadable" in caplog.text
    assert "resumed from step 3" in capsys.readouterr().out
    assert (tmp_path / "corrupt_checkpoints" / "6" / "state").is_dir()  # set aside, not deleted
    assert Checkpoints(tmp_path, every_steps=1, keep_latest=1).latest_step() == 9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "resnet_19"}, "Unknown model 'resnet_19'"),
        ({"model": "resnet21"}, "6n+2"),
        ({"dataset": "cifar11"}, "Unknown dataset 'cifar11'"),
        ({"batch_size": 0}, "batch"),
        ({"dataset": "mnist", "download": False}, "downloading is off (download=False)"),
        ({"parallelism": "pjit"}, "parallelism='pjit'"),
        ({"parallelism": "batch_parts", "batch_parts": 0}, "batch_parts=0"),
        ({"parallelism": "threads"}, "parallelism 'threads' is now called 'batch_parts'"),
        ({"threads": 2}, "Unknown config key 'threads'. It is now called 'batch_parts'."),
        ({"parallelism": "batch_parts", "batch_size": 127}, "(1 processes) and 2 batch parts; use a multiple of 2"),
        ({"steps_per_call": 4}, "steps on batches made on the device: add --config.data_on_device=True"),
        ({"data_on_device": True, "parallelism": "pmap"}, "this run has: parallelism='pmap' (use jit)"),
        (
            {"data_on_device": True, "random_erasing": 0.5, "mixup_alpha": 0.2},
            "this run has: random_erasing, mixup_alpha",
        ),
    ],
)
def test_bad_input_fails_before_compiling_with_one_clear_message(idx_dir, tmp_path, capsys, change, message):
    args = overrides(tmp_path if change.get("dataset") == "mnist" else idx_dir, **change)
    began = time.perf_counter()
    code = main(["train", "--config", "configs/default.py", "--workdir", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert time.perf_counter() - began < 20  # nothing was compiled


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cpu-processes", "2"], "needs --config.parallelism=pmap"),
        (["--cpu-processes", "999", "--config.parallelism=pmap"], "choose 1.."),
        (["--cpu-processes", "2", "--config.parallelism=pmap", "--config.batch_size=7"], "batch_size=7 does not split"),
        (
            ["--cpu-processes", "2", "--config.parallelism=pmap", "--config.distributed.coordinator_address=h:1"],
            "makes its own job",
        ),
    ],
)
def test_cpu_processes_refuse_what_they_cannot_run_before_starting_any(idx_dir, tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    code = main(["train", "--config", "configs/default.py", "--workdir", str(workdir), *overrides(idx_dir), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not workdir.exists()


@pytest.mark.slow  # run with the slow tests to keep the default run under 15 minutes
def test_sigterm_to_cpu_processes_checkpoints_every_process_and_resumes(idx_dir, tmp_path):
    workdir = tmp_path / "two_processes"
    args = ["--cpu-processes", "2", "--config.parallelism=pmap"]
    process = start_training(workdir, [*args, *overrides(idx_dir)])
    wait_for_step(workdir, process, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "2 cpu device(s) in 2 process(es), pmap" in out
    assert "Traceback" not in err
    stopped = {int(part.split(" ")[0]) for part in err.split("stopped after step ")[1:]}
    assert len(stopped) == 1, err  # both processes stopped after the same step
    stopped = stopped.pop()
    assert Checkpoints(workdir, every_steps=1, keep_latest=1).latest_step() == stopped
    resumed = start_training(workdir, [*args, *overrides(idx_dir, num_train_steps=stopped + 2)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed from step {stopped}" in out and "final test_accuracy" in out
