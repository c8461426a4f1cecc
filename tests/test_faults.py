"""Faults a cluster job meets, for real: SIGKILL, SIGTERM, divergence, a corrupt checkpoint, bad input."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
import torch
from idx_files import idx_folder_fixture
from PIL import Image

from resnet_jax.analysis.common import run_snapshots
from resnet_jax.cli import BAD_INPUT, CORRUPT_DATA, STORAGE_FAULT, WORKDIR_IN_USE, main, output_file
from resnet_jax.faults import CorruptDataError, StorageError
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import Callback, train_and_evaluate
from resnet_jax.train.precision import all_finite
from resnet_jax.train.workdir import LOCK_FILE, WorkdirLock

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


@pytest.mark.slow  # over 30 s on 2 cores
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


@pytest.mark.slow  # over 20 s on 2 cores
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
    assert "checkpoint 6" in caplog.text and "unreadable" in caplog.text
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
        ({"eval_every_steps": 0}, "eval_every_steps=0 is out of range: give a whole number >= 1"),
        ({"log_every_steps": 0}, "log_every_steps=0 is out of range"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps=0 is out of range"),
        ({"num_train_steps": 0}, "num_train_steps=0 is out of range"),
        ({"num_train_steps": -5}, "num_train_steps=-5 is out of range"),
        ({"num_train_steps": 2.5}, "--config.num_train_steps=2.5: expected a int value, as 2000"),
        ({"learning_rate": -0.1}, "learning_rate=-0.1 is out of range: give a number > 0"),
        ({"learning_rate": "nan"}, "learning_rate=nan is out of range"),
        ({"learning_rate": "inf"}, "learning_rate=inf is out of range"),
        ({"learning_rate": "fast"}, "--config.learning_rate=fast: expected a float value, as 0.1"),
        ({"momentum": 1.5}, "momentum=1.5 is out of range: give in [0, 1)"),
        ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is out of range"),
        ({"dtype": "float8"}, "dtype='float8' is not a training dtype: give one of float32, bfloat16, float16"),
        ({"data_dir": "/proc/no_such_folder", "download": False}, "data_dir /proc/no_such_folder is not a folder"),
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


# ---- One run per workdir, checkpoints that prove their integrity, one line for every fault (issue 31) ----


def tiny_args(idx_dir: Path, **changes) -> list[str]:
    """A run of a few steps that checkpoints every 3 and evaluates at each checkpoint."""
    settings = {"num_train_steps": 6, "checkpoint_every_steps": 3, "eval_every_steps": 3, "lr_schedule": "constant"}
    return overrides(idx_dir, **(settings | changes))


def train_command(workdir: Path, args: list[str]) -> list[str]:
    return ["train", "--config", "configs/default.py", "--workdir", str(workdir), *args]


def one_line(err: str) -> str:
    """The command's own line on stderr (absl and orbax may log above it), checked to be the only one it printed."""
    lines = [line for line in err.strip().splitlines() if line.startswith("resnet-jax ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def flip_bytes(checkpoint: Path, count: int = 41, seed: int = 0) -> Path:
    """Flip ``count`` bytes in the middle of the largest file of a checkpoint's state: the damage a disk or a copy
    does, which tensorstore reads back without complaint unless the bytes fall in a compressed chunk."""
    largest = max((p for p in (checkpoint / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    quarter = len(data) // 4
    for index in np.random.default_rng(seed).choice(2 * quarter, count, replace=False) + quarter:
        data[index] ^= 0xFF
    largest.write_bytes(bytes(data))
    return largest


def damage_silently(workdir: Path, step: int, tries: int = 20) -> None:
    """Flip bytes of checkpoint ``step`` where orbax reads them back without complaint (bytes in a compressed
    chunk make tensorstore fail instead; those are put back and others tried), and check that the digest catches
    the damage: a state that reads back with other values than were saved must never pass."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, read_only=True)
    try:
        for seed in range(tries):
            original = {p: p.read_bytes() for p in (workdir / "checkpoints" / str(step)).rglob("*") if p.is_file()}
            flip_bytes(workdir / "checkpoints" / str(step), seed=seed)
            with pytest.raises(CorruptDataError) as caught:
                checkpoints.read_state(step)
            if "does not match the digest" in str(caught.value):
                return
            assert "is unreadable" in str(caught.value)
            for path, data in original.items():
                path.write_bytes(data)
        pytest.fail(f"no damage of {tries} tried read back silently; the digest was never put to the test")
    finally:
        checkpoints.close()


@pytest.fixture(scope="module")
def finished(idx_dir, tmp_path_factory) -> Path:
    """A finished run of 6 steps with checkpoints (and test metrics) at steps 3 and 6; copy it before damaging it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_command(workdir, tiny_args(idx_dir))) == 0
    return workdir


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(LOCK_FILE))
    return tmp_path / "run"


def test_a_second_run_on_a_held_workdir_names_the_holder_and_exits_before_compiling(idx_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    hold = "import sys, time; from resnet_jax.train.workdir import WorkdirLock; lock = WorkdirLock(sys.argv[1]); "
    hold += "lock.acquire(); "
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "print('held', flush=True); time.sleep(600)", str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        began = time.perf_counter()
        assert main(train_command(workdir, tiny_args(idx_dir))) == WORKDIR_IN_USE
        line = one_line(capsys.readouterr().err)
        assert (
            f"{workdir} is in use by another run (pid {holder.pid} on " in line and "choose another --workdir" in line
        )
        assert time.perf_counter() - began < 20  # nothing was compiled
        assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, nothing is left stuck
        holder.wait()
    lock = WorkdirLock(workdir)
    lock.acquire()
    lock.release()


@pytest.mark.slow  # two whole training processes
def test_two_train_processes_on_one_workdir_one_runs_the_other_refuses(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    first = start_training(workdir, overrides(idx_dir, num_train_steps=60))
    wait_for_step(workdir, first, 1)
    second = start_training(workdir, overrides(idx_dir, num_train_steps=60))
    _, err = second.communicate(timeout=300)
    assert second.returncode == WORKDIR_IN_USE and f"(pid {first.pid} on " in one_line(err)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    steps = [record["step"] for record in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one train record a step, one test record


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_digest(idx_dir, finished, tmp_path, capsys, caplog):
    workdir = copy_run(finished, tmp_path)
    damage_silently(workdir, 6)
    # eval falls back to the newest good checkpoint with a warning, and leaves the damaged one in place.
    with caplog.at_level(logging.WARNING):
        assert main(["eval", "--workdir", str(workdir)]) == 0
    assert capsys.readouterr().out.startswith("step 3 test_accuracy=")
    assert "checkpoint 6" in caplog.text and "trying the one before it" in caplog.text
    assert [snapshot.step for snapshot in run_snapshots(workdir)] == [3]  # analyze reads runs as eval does
    # Asked for the damaged step itself, it names it and the steps to choose from.
    assert main(["eval", "--workdir", str(workdir), "--step", "6"]) == CORRUPT_DATA
    line = one_line(capsys.readouterr().err)
    assert "checkpoint 6" in line and "choose another of its steps with --step (kept: [6, 3])" in line
    # train sets it aside, resumes from the good one, and names only a checked checkpoint as the last good one.
    assert main(train_command(workdir, tiny_args(idx_dir))) == 0
    assert "resumed from step 3" in capsys.readouterr().out
    assert (workdir / "corrupt_checkpoints" / "6" / "state").is_dir()
    chex.assert_trees_all_equal(params_of(workdir, 6), params_of(finished, 6))  # trained again, bit for bit


def test_a_step_set_aside_again_gets_a_name_of_its_own(finished, tmp_path):
    workdir = copy_run(finished, tmp_path)
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=3, async_save=False)
    state, meta = checkpoints.read_state(6), checkpoints.read_meta(6)
    for copy in range(3):
        if copy:
            checkpoints.save(6, state, meta, force=True)
        flip_bytes(workdir / "checkpoints" / "6", seed=copy)
        assert checkpoints.newest_readable(checkpoints.read_state, set_aside=True)[0] == 3
    checkpoints.close()
    assert sorted(p.name for p in (workdir / "corrupt_checkpoints").iterdir()) == ["6", "6.1", "6.2"]


def test_when_every_checkpoint_is_damaged_training_stops_unless_told_to_start_over(idx_dir, finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path)
    for step in (3, 6):
        flip_bytes(workdir / "checkpoints" / str(step))
    for _ in range(2):  # the second time they are set aside already: still refused
        assert main(train_command(workdir, tiny_args(idx_dir))) == CORRUPT_DATA
        line = one_line(capsys.readouterr().err)
        assert "has no readable checkpoint, only damaged ones" in line and "start_over_if_corrupt=true" in line
    assert main(train_command(workdir, tiny_args(idx_dir, start_over_if_corrupt=True))) == 0
    assert "starting over at step 0" in capsys.readouterr().out
    chex.assert_trees_all_equal(params_of(workdir), params_of(finished))


def test_divergence_before_any_checkpoint_does_not_promise_one(idx_dir, tmp_path, capsys):
    args = tiny_args(idx_dir, learning_rate=1e30, checkpoint_every_steps=1000, eval_every_steps=1000)
    assert main(train_command(tmp_path / "run", args)) == 1
    assert "Last good checkpoint: none yet; training starts again at step 0" in one_line(capsys.readouterr().err)


class SignalAtFinalEvaluation(Callback):
    def on_evaluation(self, step, state, metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, arriving as the final evaluation ends


def test_sigterm_during_the_final_evaluation_finishes_the_run_and_a_rerun_does_not_evaluate_again(
    idx_dir, finished, tmp_path, capsys
):
    config = load_config(REPO / "configs/default.py", tiny_args(idx_dir))
    result = train_and_evaluate(config, tmp_path, callbacks=[SignalAtFinalEvaluation()])
    assert "final test_accuracy=" in capsys.readouterr().out
    records = (tmp_path / "metrics.jsonl").read_text()
    again = train_and_evaluate(config, tmp_path)
    assert again.metrics == result.metrics and (tmp_path / "metrics.jsonl").read_text() == records


def test_sigint_while_the_state_is_built_stops_with_one_line(idx_dir, tmp_path):
    workdir = tmp_path / "run"
    process = start_training(workdir, tiny_args(idx_dir))
    deadline = time.monotonic() + 120
    while not (workdir / LOCK_FILE).exists():  # taken just before the state is built
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "received before training began: nothing was trained or saved" in one_line(err)
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


def test_sigint_while_the_command_loads_jax_stops_with_one_line():
    """The `resnet-jax` entry point (resnet_jax.console) under a real Ctrl-C sent while JAX is being imported."""
    command = [sys.executable, "-c", "import sys; from resnet_jax.console import main; sys.exit(main())", "models"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while "jaxlib" not in maps.read_text():  # jaxlib's first library is mapped: the import has begun, not ended
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert err.strip() == "resnet-jax: interrupted while loading; nothing ran" and not out


def test_an_unwritable_workdir_is_one_line_with_the_storage_exit_status(idx_dir, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(train_command(blocker / "run", tiny_args(idx_dir))) == STORAGE_FAULT
    assert f"cannot write {blocker / 'run'} while creating the workdir" in one_line(capsys.readouterr().err)


@functools.cache
def can_mount_tmpfs() -> bool:
    """Whether this machine lets a process mount a tmpfs of its own (user and mount namespaces)."""
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return shutil.which("unshare") is not None and subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.slow  # a process of its own; the in-process test above takes the same path
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs user and mount namespaces for a read-only tmpfs")
def test_a_workdir_on_a_read_only_mount_is_one_line_with_the_storage_exit_status(idx_dir, tmp_path):
    mount = tmp_path / "read_only"
    mount.mkdir()
    script = 'mount -t tmpfs -o ro,size=1m tmpfs "$1" && shift && exec "$@"'
    command = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mount)]
    train = [sys.executable, "-m", "resnet_jax.cli", *train_command(mount / "run", tiny_args(idx_dir))]
    done = subprocess.run([*command, *train], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == STORAGE_FAULT, done.stderr[-3000:]
    assert "while creating the workdir (Read-only file system): it is on a read-only file system" in one_line(
        done.stderr
    )


def test_eval_of_a_workdir_that_is_no_run_creates_nothing(tmp_path, capsys):
    assert main(["eval", "--workdir", str(tmp_path / "typo" / "run")]) == BAD_INPUT
    assert "No checkpoints/ folder in" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "typo").exists()


def test_outputs_that_exist_are_kept_unless_forced(finished, tmp_path, capsys):
    out = tmp_path / "weights.pth"
    out.write_bytes(b"precious")
    assert main(["convert", "--checkpoint", str(finished), "--to-torch", str(out)]) == BAD_INPUT
    assert "exists; pass --force to overwrite it" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["convert", "--checkpoint", str(finished), "--to-torch", str(out), "--force"]) == 0
    assert set(torch.load(out, weights_only=True)) >= {"fc.weight", "conv1.weight"}
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    features = ["features", "--checkpoint", str(finished), str(image), "--size", "28", "--resize", "28"]
    assert main([*features, "--out", str(tmp_path / "maps")]) == 0  # savez adds .npz: it says so
    assert f"-> {tmp_path / 'maps.npz'}:" in capsys.readouterr().out and (tmp_path / "maps.npz").is_file()
    assert main([*features, "--out", str(tmp_path / "maps.npz")]) == BAD_INPUT
    assert "maps.npz exists; pass --force" in capsys.readouterr().err
    assert main([*features, "--out", str(tmp_path / "maps.npz"), "--force"]) == 0


def test_outputs_that_cannot_be_written_fail_before_any_work(finished, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    features = ["features", "--checkpoint", str(tmp_path / "no_run"), str(image)]  # would fail later, if reached
    assert main([*features, "--out", str(blocker / "maps.npz")]) == STORAGE_FAULT
    assert "cannot write" in capsys.readouterr().err
    args = ["convert", "--from-torch", str(image), "--model", "resnet18", "--out", str(blocker)]
    assert main(args) == BAD_INPUT
    assert "is a file; give a new folder" in capsys.readouterr().err
    with pytest.raises(StorageError, match="a part of the path is a file"):
        output_file(blocker / "x" / "weights.pth", force=False)


DISK_FULL = """
set -e
mount -t tmpfs -o size=1000k tmpfs "$1"
"$2" -m resnet_jax.cli train --config configs/default.py --workdir "$1/run" "${@:3}" > "$1.out1" 2> "$1.err1" \
  || echo $? > "$1.status1"
ls "$1/run/checkpoints" > "$1.kept"
mount -o remount,size=8m "$1"
"$2" -m resnet_jax.cli train --config configs/default.py --workdir "$1/run" "${@:3}" > "$1.out2" 2> "$1.err2"
"""


@pytest.mark.slow  # two whole training runs
@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs user and mount namespaces for a small tmpfs")
def test_a_full_disk_stops_training_at_the_failed_save_and_the_same_command_resumes(idx_dir, tmp_path):
    """A real 1000 KiB tmpfs, on which the checkpoint of step 10 fits and the one of step 20 does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    args = overrides(
        idx_dir, num_train_steps=30, checkpoint_every_steps=10, eval_every_steps=30, lr_schedule="constant"
    )
    command = ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", DISK_FULL, "full", str(disk)]
    done = subprocess.run([*command, sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "disk.status1").read_text().strip() == str(STORAGE_FAULT)
    line = one_line((tmp_path / "disk.err1").read_text())
    assert "while saving checkpoint 20 (No space left on device); a checkpoint needs about 0.6 MiB" in line
    assert "the checkpoints before it are intact" in line
    trained = [int(n) for n in re.findall(r"^step (\d+)/30", (tmp_path / "disk.out1").read_text(), re.MULTILINE)]
    assert 20 <= max(trained) < 30  # stopped at the failed save, not at the end
    kept = (tmp_path / "disk.kept").read_text().split()
    assert [name for name in kept if name.isdigit()] == ["10"]  # no partial checkpoint 20 that a restart trusts
    assert "resumed from step 10" in (tmp_path / "disk.out2").read_text()
