"""Scale, for real: pmap against jit on 8 CPU devices, batch parts on host threads against pmap, fp16 loss
scaling, and two processes over gloo."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import make_idx_folder

from resnet_jax.cpu.processes import PIN_THEN_EXEC, core_groups
from resnet_jax.data import BatchSettings, load_source
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.config import load_config
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.precision import DynamicLossScale
from resnet_jax.train.runs import build_model
from resnet_jax.train.steps import compile_steps, create_train_state, make_mesh

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, devices: int = 8) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PMAP_AGAINST_JIT = """
    import json, chex, jax, numpy as np
    from resnet_jax.cpu.conv import model_conv
    from resnet_jax.cpu.processes import available_cores
    from resnet_jax.data import BatchSettings, load_source
    from resnet_jax.models import create_model
    from resnet_jax.train.config import load_config
    from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
    from resnet_jax.train.steps import compile_steps, create_train_state, make_mesh

    config = load_config("configs/default.py")
    source = load_source("synthetic", "train", num_examples=64, image_shape=(16, 16, 3), num_classes=10)
    batch = next(source.train_batches(BatchSettings(2)))
    tiled = {k: np.concatenate([v] * 8) for k, v in batch.items()}  # every device gets the same 2 images
    distinct = next(source.train_batches(BatchSettings(16, seed=1)))

    collectives = {}

    def train(parallelism, devices, batches, batch_parts=2):
        steps = compile_steps(make_mesh(devices), parallelism=parallelism, batch_parts=batch_parts)
        tx = create_optimizer(config, learning_rate_schedule(config, 4))
        conv = model_conv("cpu", parallelism, batch_parts, len(available_cores()))  # as training builds it
        state = steps.put_state(create_train_state(create_model("resnet8", conv=conv), tx, (16, 16, 3), seed=0))
        compiled = steps.compile_train(state, steps.put_batch(batches[0]))
        if parallelism != "batch_parts":
            collectives[parallelism] = compiled.as_text().count(" all-reduce(")
        for b in batches:
            state, _ = compiled(state, steps.put_batch(b))
        return steps.to_host(state)

    jit_one = train("jit", jax.devices()[:1], [batch, batch])
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(jit_one.params))
    # 8 devices holding the same images: per-device BN and averaged gradients equal one device.
    pmap_tiled = train("pmap", jax.devices(), [tiled, tiled])
    chex.assert_trees_all_close(pmap_tiled.params, jit_one.params, rtol=0, atol=1e-5 * scale)
    chex.assert_trees_all_close(pmap_tiled.batch_stats, jit_one.batch_stats, rtol=0, atol=1e-5)
    # 8 batch parts on host threads of one device: the step of pmap over 8 devices (BN per part, averaged
    # gradients and statistics), to the summation order.
    parts = train("batch_parts", jax.devices()[:1], [distinct, distinct], batch_parts=8)
    pmap_twice = train("pmap", jax.devices(), [distinct, distinct])
    chex.assert_trees_all_close(parts.params, pmap_twice.params, rtol=0, atol=1e-5 * scale)
    chex.assert_trees_all_close(parts.batch_stats, pmap_twice.batch_stats, rtol=0, atol=1e-5)
    chex.assert_trees_all_close(parts.opt_state, pmap_twice.opt_state, rtol=0, atol=1e-4)
    jit_global = train("jit", jax.devices(), [distinct])
    pmap_local = train("pmap", jax.devices(), [distinct])
    gaps = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), jit_global.params, pmap_local.params)
    print(json.dumps({"per_device_vs_global_bn": max(jax.tree.leaves(gaps)), "pmap_all_reduces": collectives["pmap"]}))
"""


@pytest.mark.slow  # over 30 s on 2 cores
def test_pmap_shares_the_step_body_and_normalises_per_device():
    report = run_python(PMAP_AGAINST_JIT)  # checks pmap against jit and batch parts against pmap itself
    # Different images per device: per-device BN statistics give a different step than global BN.
    assert report["per_device_vs_global_bn"] > 1e-4
    # Gradients, statistics and metrics cross devices in one all-reduce (gloo pays milliseconds per call).
    assert report["pmap_all_reduces"] == 1


@pytest.mark.slow  # over 30 s on 2 cores
def test_the_pmap_variants_of_the_step_and_model_tests_pass_on_two_devices():
    """chex's pmap variants (tests/test_steps.py, tests/test_models.py) skip in a process with one device: here
    they run on two fake CPU devices."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    tests = ["tests/test_steps.py", "tests/test_models.py", "-k", "with_pmap", "-p", "no:cacheprovider"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *tests], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"\b6 passed\b", result.stdout) and "skipped" not in result.stdout, result.stdout[-3000:]


def fp16_state(config, parallelism="jit"):
    source = load_source("synthetic", "train", num_examples=32, image_shape=(16, 16, 3), num_classes=10)
    steps = compile_steps(make_mesh(jax.devices()[:1]), parallelism=parallelism, batch_parts=2)
    tx = create_optimizer(config, learning_rate_schedule(config, 4))
    state = create_train_state(build_model(config, 10), tx, (16, 16, 3), seed=0)
    return steps, state, next(source.train_batches(BatchSettings(16)))


@pytest.mark.parametrize("parallelism", ["jit", "batch_parts"])
def test_float16_loss_scaling_skips_non_finite_steps_and_lowers_the_scale(parallelism):
    config = load_config(REPO / "configs/default.py", ["--config.dtype=float16", "--config.model=resnet8"])
    steps, state, batch = fp16_state(config, parallelism)
    assert state.loss_scale is not None
    overflowing = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.asarray(3e38, jnp.float32)))
    before = jax.device_get(overflowing)
    after, metrics = steps.train(steps.put_state(overflowing), steps.put_batch(batch))
    assert float(metrics["skipped"]) == 1.0 and float(metrics["finite"]) == 1.0
    assert int(after.step) == 1  # the data stream moves on
    chex.assert_trees_all_equal(before.params, jax.device_get(after.params))
    assert float(after.loss_scale.scale) == pytest.approx(1.5e38, rel=1e-6)
    after = after.replace(loss_scale=after.loss_scale.replace(scale=jnp.asarray(1024.0, jnp.float32)))
    normal, metrics = steps.train(after, steps.put_batch(batch))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert not jax.tree.all(jax.tree.map(np.array_equal, before.params, jax.device_get(normal.params)))
    assert {x.dtype for x in jax.tree.leaves(normal.params)} == {jnp.dtype("float32")}


def test_loss_scale_grows_after_a_period_of_finite_steps():
    scale = DynamicLossScale.create(initial_scale=8.0, period=3)
    for _ in range(2):
        scale = scale.adjust(jnp.asarray(True))
    assert float(scale.scale) == 8.0
    scale = scale.adjust(jnp.asarray(True))
    assert float(scale.scale) == 16.0 and int(scale.finite_steps) == 0
    scale = scale.adjust(jnp.asarray(False))
    assert float(scale.scale) == 8.0
    assert float(DynamicLossScale.create(initial_scale=1.0).adjust(jnp.asarray(False)).scale) == 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_run(data: Path) -> list[str]:
    """Six steps of resnet8 at batch 8, checkpoints at steps 3 and 6."""
    return [
        *("--config", "configs/default.py"),
        *("--config.model=resnet8", f"--config.data_dir={data}", "--config.batch_size=8"),
        *("--config.eval_batch_size=8", "--config.num_train_steps=6", "--config.checkpoint_every_steps=3"),
        *("--config.eval_every_steps=6", "--config.lr_schedule=constant"),
    ]


def params_at_step(workdir: Path, step: int = 6):
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    assert checkpoints.manager.all_steps() == [3, 6]
    return checkpoints.read_state(step)["params"]


def assert_close_relative_to_largest(a, b, tolerance: float = 1e-5) -> None:
    """``a`` within ``tolerance`` times the largest magnitude of ``b``, leaf by leaf."""
    chex.assert_trees_all_close(
        a, b, rtol=0, atol=tolerance * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(b))
    )


TRAIN = [sys.executable, "-m", "resnet_jax.cli", "train"]
CPU_ONLY = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow  # run with the slow tests to keep the default run under 15 minutes
@pytest.mark.parametrize(
    "feed", [[], ["--config.data_on_device=True", "--config.steps_per_call=3"]], ids=["host", "on device"]
)
def test_two_processes_train_like_one_process_on_the_same_global_batch(tmp_path, feed):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=64, num_test=17)
    common = small_run(data)
    address = f"127.0.0.1:{free_port()}"
    workers = [
        subprocess.Popen(
            [
                *TRAIN,
                *common,
                *feed,
                *("--workdir", str(tmp_path / "two")),
                f"--config.distributed.coordinator_address={address}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=true",
            ],
            cwd=REPO,
            env=CPU_ONLY,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    assert "2 cpu device(s) in 2 process(es)" in outputs[0][0]
    assert "final test_accuracy" in outputs[0][0]
    assert "img/s" not in outputs[1][0] and "final" not in outputs[1][0]  # only process 0 reports
    # One process with as many devices, so that each device convolves as many images: this tiny run is chaotic,
    # and the other kernels of a device with 8 images moved the parameters at step 3 by 7e-4.
    two_devices = {**CPU_ONLY, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    single = subprocess.run(
        [*TRAIN, *common, "--workdir", str(tmp_path / "one")], cwd=REPO, env=two_devices, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    # Step 3, as in the next test: by step 6 the last digits have grown.
    assert_close_relative_to_largest(params_at_step(tmp_path / "two", 3), params_at_step(tmp_path / "one", 3))


@pytest.mark.slow  # over 30 s on 2 cores
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPU cores, one per process")
def test_cpu_processes_run_pmap_as_one_process_with_as_many_devices_does(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=64, num_test=17)
    common = [*small_run(data), "--config.parallelism=pmap"]
    launched = subprocess.run(
        [*TRAIN, *common, "--workdir", str(tmp_path / "two"), "--cpu-processes", "2"],
        cwd=REPO,
        env=CPU_ONLY,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "resnet-jax: 2 processes, cores" in launched.stdout
    assert "2 cpu device(s) in 2 process(es), pmap" in launched.stdout
    assert launched.stdout.count("final test_accuracy") == 1  # process 0 reports
    two_devices = {**CPU_ONLY, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    # Pinned to one core like each launched process, so that both get the same conv (`resnet_jax.cpu.conv`).
    one_core = [sys.executable, "-c", PIN_THEN_EXEC, str(min(os.sched_getaffinity(0)))]
    single = subprocess.run(
        [*one_core, *TRAIN, *common, "--workdir", str(tmp_path / "one")],
        cwd=REPO,
        env=two_devices,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "2 cpu device(s) in 1 process(es), pmap" in single.stdout
    # Summation order through gloo moves the last digits (1e-7 at step 3); global instead of per-device BN moves
    # them by 0.1. This tiny run is chaotic: by step 6 the same orders drift apart by 1e-3 (both runs repeat
    # bit for bit), so step 3 is where equality shows.
    assert_close_relative_to_largest(params_at_step(tmp_path / "two", 3), params_at_step(tmp_path / "one", 3))


@pytest.mark.slow  # over 20 s on 2 cores
def test_batch_parts_train_as_pmap_over_as_many_devices_and_resume_and_evaluate(tmp_path):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=64, num_test=17)
    batch_parts = [*small_run(data), "--config.parallelism=batch_parts", "--config.batch_parts=2"]
    interrupted = [*batch_parts, "--config.num_train_steps=3"]
    run = lambda args, env=CPU_ONLY: subprocess.run(  # noqa: E731
        [*TRAIN, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    for args in (interrupted, batch_parts):  # three steps, then resumed from that checkpoint to six
        done = run([*args, "--workdir", str(tmp_path / "parts")])
        assert done.returncode == 0, done.stderr[-3000:]
    assert "1 cpu device(s) in 1 process(es), batch_parts (2)" in done.stdout
    assert "resumed from step 3" in done.stdout
    two_devices = {**CPU_ONLY, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    pmap = run([*small_run(data), "--config.parallelism=pmap", "--workdir", str(tmp_path / "pmap")], two_devices)
    assert pmap.returncode == 0, pmap.stderr[-3000:]
    # The same arithmetic in another order; step 3, as in the test above (this tiny run is chaotic later on).
    assert_close_relative_to_largest(params_at_step(tmp_path / "parts", 3), params_at_step(tmp_path / "pmap", 3))
    final = float(done.stdout.split("final test_accuracy=")[1].split()[0])
    # Runs saved before the names "batch_parts" existed ("threads") evaluate as they trained.
    for meta in (tmp_path / "parts" / "checkpoints").glob("*/meta/metadata"):
        saved = json.loads(meta.read_text())
        saved["config"] |= {"parallelism": "threads", "threads": saved["config"].pop("batch_parts")}
        meta.write_text(json.dumps(saved))
    evaluated = subprocess.run(
        [sys.executable, "-m", "resnet_jax.cli", "eval", "--workdir", str(tmp_path / "parts")],
        cwd=REPO,
        env=CPU_ONLY,
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"step 6 test_accuracy={final:.4f}" in evaluated.stdout


def test_core_groups_split_the_cores_evenly_and_refuse_more_processes_than_cores():
    assert core_groups([3, 0, 1, 2, 4], 2) == [[0, 1, 2], [3, 4]]
    assert core_groups([0, 1], 2) == [[0], [1]]
    assert core_groups(range(8), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    for too_many in (0, 3):
        with pytest.raises(ValueError, match=r"choose 1\.\.2 processes"):
            core_groups([0, 1], too_many)
