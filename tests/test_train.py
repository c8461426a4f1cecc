"""Optimisation recipes, config handling, checkpoints and the training loop, run for real on small data."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from idx_files import idx_folder_fixture

from resnet_jax.analysis.common import ProgressLine
from resnet_jax.cli import main
from resnet_jax.data import BatchSettings, load_source
from resnet_jax.train.checkpoint import DIGEST, Checkpoints, state_digest
from resnet_jax.train.config import REQUIRED_KEYS, load_config, read_saved_config
from resnet_jax.train.loop import Callback, evaluate, next_stop, train_and_evaluate
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.reporting import MetricsLog, Progress, read_metrics
from resnet_jax.train.runs import build_model
from resnet_jax.train.steps import TrainState, compile_steps, create_train_state, make_mesh

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def small_config(data_dir: Path, **changes):
    config = load_config(REPO / "configs" / "default.py")
    config.model = "resnet8"
    config.data_dir = str(data_dir)
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.update(changes)
    return config


CHANGED_BY_SMALL_CONFIG = ("model", "data_dir", "batch_size", "eval_batch_size", "num_train_steps", "log_every_steps")
CHANGED_BY_SMALL_CONFIG += ("eval_every_steps", "checkpoint_every_steps", "compilation_cache_dir")


# Fashion-MNIST-shaped IDX files: 64 training images and a prime number (17) of test images.
idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)


def params_of(workdir: Path, step: int | None = None):
    return Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False).read_state(step)["params"]


# --- the train state ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_state_starts_from_the_models_own_initialisation_compiled_once(dtype, caplog):
    from resnet_jax.models import create_model

    shape = (13, 11, 3)  # no other test's: op by op, the dummy forward pass would compile every layer here

    def compiled_while_creating(seed: int) -> tuple[TrainState, list[str]]:
        caplog.clear()
        model = create_model("resnet8", num_classes=10, dtype=dtype)  # equal models, so one compiled init
        with jax.log_compiles(), caplog.at_level(logging.WARNING):
            state = create_train_state(model, optax.sgd(0.1, momentum=0.9), shape, seed=seed)
        return state, [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("Compiling ")]

    state, first = compiled_while_creating(3)
    assert first.count("jit(_model_init)") == 1 and "jit(conv_general_dilated)" not in first
    assert "jit(_model_init)" not in compiled_while_creating(4)[1]
    model = create_model("resnet8", num_classes=10, dtype=dtype)
    variables = model.init(jax.random.key(3), jnp.zeros((1, *shape)), train=False)
    chex.assert_trees_all_close(state.params, variables["params"], rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(state.batch_stats, variables["batch_stats"], rtol=1e-6, atol=1e-7)
    assert int(state.step) == 0 and state.apply_fn.__self__ == model
    assert (state.loss_scale is not None) == (dtype == "float16")


def test_a_model_with_list_fields_still_initialises():
    from resnet_jax.models import create_model

    model = create_model("resnet8", num_classes=10, stage_widths=[16, 32, 64])  # unhashable: no cache key
    state = create_train_state(model, optax.sgd(0.1), (16, 16, 3), seed=0)
    assert state.params["head"]["kernel"].shape == (64, 10)


# --- schedules and optimizer -------------------------------------------------------------------


def recipe(**changes):
    config = load_config(REPO / "configs" / "default.py")
    config.update(changes)
    return config


def test_he_cifar_step_schedule_divides_by_ten_at_32k_and_48k():
    config = recipe(lr_schedule="step", learning_rate=0.1, lr_boundaries_steps=(32_000, 48_000), num_train_steps=64_000)
    schedule = learning_rate_schedule(config, steps_per_epoch=391)
    rates = [float(schedule(s)) for s in (0, 31_999, 32_000, 47_999, 48_000, 63_999)]
    np.testing.assert_allclose(rates, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_imagenet_epoch_schedule_with_warmup_and_linear_scaling():
    config = recipe(
        lr_schedule="step",
        learning_rate=0.1,
        batch_size=1024,
        scale_learning_rate_by_batch=True,
        lr_boundaries_epochs=(30, 60, 80),
        warmup_steps=500,
        num_train_steps=90 * 1000,
    )
    schedule = learning_rate_schedule(config, steps_per_epoch=1000)
    assert float(schedule(0)) == 0.0
    assert float(schedule(250)) == pytest.approx(0.2)
    assert float(schedule(500)) == pytest.approx(0.4)  # 0.1 * 1024 / 256
    assert float(schedule(29_999)) == pytest.approx(0.4)
    assert float(schedule(30_000)) == pytest.approx(0.04)
    assert float(schedule(60_000)) == pytest.approx(0.004)
    assert float(schedule(80_000)) == pytest.approx(0.0004)


def test_cosine_schedule_decays_to_zero():
    schedule = learning_rate_schedule(recipe(lr_schedule="cosine", learning_rate=0.2, num_train_steps=100), 10)
    assert float(schedule(0)) == pytest.approx(0.2)
    assert float(schedule(50)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_is_coupled_l2_and_can_skip_bn_and_bias():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.full((2, 2), 0.5), "bias": jnp.full((2,), 0.5)}
    for exclude, bias_step in ((False, -0.1 * (0.5 + 0.01 * 2.0)), (True, -0.1 * 0.5)):
        config = recipe(lr_schedule="constant", learning_rate=0.1, momentum=0.0, weight_decay=0.01)
        config.weight_decay_exclude_bn_and_bias = exclude
        tx = create_optimizer(config, learning_rate_schedule(config, 1))
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["kernel"], -0.1 * (0.5 + 0.01 * 2.0), rtol=1e-6)
        np.testing.assert_allclose(updates["bias"], bias_step, rtol=1e-6)


def test_gradient_clipping_and_nesterov():
    config = recipe(lr_schedule="constant", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=1.0, nesterov=True)
    tx = create_optimizer(config, learning_rate_schedule(config, 1))
    params = {"w": jnp.zeros(4)}
    updates, _ = tx.update({"w": jnp.full(4, 10.0)}, tx.init(params), params)
    # clipped to norm 1 (each 0.5); Nesterov applies g + momentum * (momentum buffer = g)
    np.testing.assert_allclose(updates["w"], -(0.5 + 0.9 * 0.5), rtol=1e-6)
    assert optax.tree.norm(updates) > 1.0


# --- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_has_the_required_keys_and_documents_its_command(path):
    config = load_config(path)
    assert all(key in config for key in REQUIRED_KEYS)
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if path.name != "default.py" and not path.name.startswith("_"):  # shared recipes are not experiments
        assert f"resnet-jax train --config configs/{path.name}" in doc
        assert "Expected" in doc


def test_overrides_parse_types_and_nested_keys():
    config = load_config(
        REPO / "configs" / "default.py",
        [
            "--config.learning_rate=1",
            "--config.augment=false",
            "--config.lr_boundaries_steps=(10, 20)",
            "--config.model=resnet56",
            "--config.model_overrides.zero_init_residual=true",
        ],
    )
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.augment is False
    assert config.lr_boundaries_steps == (10, 20)
    assert config.model == "resnet56"
    assert config.model_overrides.zero_init_residual is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.learnig_rate=0.1", r"Unknown config key 'learnig_rate'. Did you mean 'learning_rate'"),
        ("--config.model_overrides.zero_init=1", r"'model_overrides.zero_init'.*Did you mean"),
        ("--config.augment=maybe", r"true or false"),
        ("--config.batch_size", r"KEY=VALUE"),
    ],
)
def test_bad_overrides_are_explained(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "configs" / "default.py", [override])


def test_a_config_saved_with_old_names_reads_in_todays():
    saved = load_config(REPO / "configs" / "default.py").to_dict()
    saved |= {"parallelism": "threads", "threads": saved.pop("batch_parts"), "model_overrides": {"residual": False}}
    config = read_saved_config(saved)
    assert (config.parallelism, config.batch_parts, "threads" in config) == ("batch_parts", 2, False)
    assert config.model_overrides.to_dict() == {"skip_connections": False}


def test_cli_rejects_an_unknown_key_before_training(tmp_path, capsys):
    code = main(["train", "--config", "configs/default.py", "--workdir", str(tmp_path), "--config.bach_size=4"])
    assert code == 2
    assert "Did you mean 'batch_size'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- the training loop -------------------------------------------------------------------------


def test_train_and_evaluate_writes_checkpoints_metrics_and_plots(idx_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    metrics = train_and_evaluate(small_config(idx_dir, keep_checkpoints=1), workdir).metrics
    out = capsys.readouterr().out
    assert f"final test_accuracy={metrics['accuracy']:.4f}" in out
    assert "created the train state in" in out and "compiled the train step" in out and "img/s" in out
    records = read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["split"] == "test"] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (workdir / "curves.png").stat().st_size > 10_000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) in ([3, 6], [6])
    # 17 test images: an accuracy of k/17 proves that no example was dropped or counted twice
    assert round(metrics["accuracy"] * 17, 4) == round(metrics["accuracy"] * 17)
    assert evaluate(workdir) == pytest.approx(metrics)


def test_restart_resumes_from_the_checkpoint_and_matches_an_uninterrupted_run(idx_dir, tmp_path, capsys):
    config = small_config(idx_dir, lr_schedule="constant", eval_every_steps=100)
    train_and_evaluate(config, tmp_path / "straight")
    config.num_train_steps = 3
    train_and_evaluate(config, tmp_path / "resumed")
    config.num_train_steps = 6
    train_and_evaluate(config, tmp_path / "resumed")
    assert "resumed from step 3" in capsys.readouterr().out
    chex.assert_trees_all_equal(params_of(tmp_path / "straight"), params_of(tmp_path / "resumed"))


def test_data_on_device_trains_the_host_pipelines_run_bit_for_bit_several_steps_a_call(idx_dir, tmp_path, capsys):
    settings = {"lr_schedule": "constant", "log_every_steps": 3, "eval_every_steps": 6}
    train_and_evaluate(small_config(idx_dir, **settings), tmp_path / "host")
    train_and_evaluate(small_config(idx_dir, **settings, num_train_steps=3), tmp_path / "switched")
    on_device = small_config(idx_dir, **settings, data_on_device=True, steps_per_call=3)
    train_and_evaluate(on_device, tmp_path / "switched")  # resumed at step 3 on the device, 3 steps in one call
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and "data on the device, 3 step(s) per call" in out
    chex.assert_trees_all_equal(params_of(tmp_path / "host"), params_of(tmp_path / "switched"))
    losses = {
        run: [(r["step"], r["loss"]) for r in read_metrics(tmp_path / run) if r["split"] == "train"]
        for run in ("host", "switched")
    }
    assert losses["switched"] == losses["host"] and [step for step, _ in losses["host"]] == [3, 6]


@pytest.mark.parametrize(
    ("changes", "streamed", "message"),
    [
        ({"steps_per_call": 0}, False, "steps_per_call=0: give the train steps per compiled call"),
        ({"steps_per_call": 3}, False, "add --config.data_on_device=True"),
        ({"data_on_device": True, "mixup_alpha": 0.2}, False, "this run has: mixup_alpha"),
        ({"data_on_device": True}, True, "this run has: tiny is streamed"),
        ({"image_size": 64}, True, "tiny crops its images to their size itself"),
        ({"crop_padding": -4}, False, "crop_padding=-4"),
    ],
)
def test_feed_settings_that_cannot_train_are_refused_before_anything_compiles(changes, streamed, message):
    from resnet_jax.data import StreamSource, synthetic
    from resnet_jax.train.runs import check_config, check_feed

    config = small_config(Path("."), **changes)
    source = StreamSource("tiny", "train", None, 64, 10, (8, 8, 3), (0.5,) * 3, (0.25,) * 3) if streamed else None
    with pytest.raises(ValueError, match=message):
        check_config(config)
        check_feed(config, source or synthetic(64, (8, 8, 3)))


def test_calls_of_several_steps_stop_where_the_loop_logs_evaluates_checkpoints_or_ends():
    config = small_config(Path("."), log_every_steps=50, eval_every_steps=500, checkpoint_every_steps=200)
    assert [next_stop(step, 1234, config) for step in (0, 49, 50, 190, 1199, 1200)] == [50, 50, 100, 200, 1200, 1234]


def test_a_resumed_run_forgets_the_metrics_logged_after_its_checkpoint(tmp_path):
    interrupted = MetricsLog(tmp_path)
    for step in (2, 4, 6):  # killed at step 7; the last checkpoint was step 4
        interrupted.write(step, "train", {"loss": 1.0 / step})
    interrupted.close()
    resumed = MetricsLog(tmp_path, start_step=4)
    resumed.write(6, "train", {"loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(2, 0.5), (4, 0.25), (6, 0.5)]
    MetricsLog(tmp_path, start_step=6).close()  # nothing after the checkpoint: the file is left as it is
    assert len(read_metrics(tmp_path)) == 3


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_lines_rewrite_themselves_on_a_terminal_and_keep_only_what_must_stay():
    """A training line and an analysis line on one terminal: each update replaces the line before it, and only
    the messages and the end of a measurement are left standing."""
    terminal = Terminal()
    progress = Progress(total_steps=10, start_step=0, batch_size=8, stream=terminal)
    progress.compiled(1.5)
    progress.update(5, {"loss": 0.5})
    analysis = ProgressLine("paths resnet8", 4, "measurements", stream=terminal)
    analysis.update(2)
    analysis.update(4)
    progress.message("done")
    writes = terminal.getvalue().split("\r\033[K")
    assert writes == [
        "",
        "compiled the train step in 1.5s\n",
        "step 5/10 | loss 0.5000",
        "paths resnet8: 2/4 measurements",
        "paths resnet8: 4/4 measurements\n",
        "done\n",
    ]


def test_progress_rate_and_eta_survive_one_long_interval():
    """A paused job (or an evaluation) makes one interval long; the rate and ETA shown after it stay those of
    training, and a lasting change of speed shows once it is most of the recent intervals."""
    now = [0.0]
    log = io.StringIO()
    progress = Progress(total_steps=1000, start_step=0, batch_size=10, stream=log, clock=lambda: now[0])
    progress.start_timing(0)
    for step, seconds in [(10, 1.0), (20, 1.0), (30, 3600.0), (40, 1.0)]:
        now[0] += seconds
        progress.update(step, {})
    lines = log.getvalue().splitlines()
    assert lines[1] == "step 20/1000 | 100 img/s | ETA 1m38s"
    assert lines[2].endswith("| 100 img/s | ETA 1m37s")  # the hour-long interval is an outlier, not the rate
    assert lines[3] == "step 40/1000 | 100 img/s | ETA 1m36s"
    for step in (50, 60, 70):  # training now runs at half the speed
        now[0] += 2.0
        progress.update(step, {})
    assert log.getvalue().splitlines()[-1] == "step 70/1000 | 50 img/s | ETA 3m06s"


@pytest.mark.slow  # over 20 s on 2 cores
def test_stop_at_test_accuracy_stops_at_the_first_evaluation_reaching_it_and_a_rerun_trains_no_further(
    idx_dir, tmp_path, capsys
):
    config = small_config(idx_dir, num_train_steps=12, eval_every_steps=2, checkpoint_every_steps=100)
    train_and_evaluate(config, tmp_path / "straight")
    accuracies = {r["step"]: r["accuracy"] for r in read_metrics(tmp_path / "straight") if r["split"] == "test"}
    target = max(accuracy for step, accuracy in accuracies.items() if step < 12)
    stop = min(step for step, accuracy in accuracies.items() if accuracy >= target)

    workdir = tmp_path / "timed"
    config.stop_at_test_accuracy = target
    capsys.readouterr()
    metrics = train_and_evaluate(config, workdir).metrics
    out = capsys.readouterr().out
    assert metrics["accuracy"] == accuracies[stop] >= target
    assert f"reached test accuracy {accuracies[stop]:.4f} >= {target} at step {stop} " in out
    records = read_metrics(workdir)
    assert max(r["step"] for r in records) == stop
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    assert checkpoints.latest_step() == stop
    assert checkpoints.read_meta(stop)["reached"] == {"test_accuracy": accuracies[stop], "step": stop} | {
        "elapsed_s": pytest.approx([r for r in records if r["split"] == "test"][-1]["elapsed_s"], abs=1.0)
    }

    train_and_evaluate(config, workdir)  # the same command again: reports the stop, trains nothing
    out = capsys.readouterr().out
    assert f"reached test accuracy {accuracies[stop]:.4f}" in out and "compiled the train step" not in out
    assert checkpoints.latest_step() == stop

    config.stop_at_test_accuracy = 0.0  # no target: goes on to the end, as if never stopped
    train_and_evaluate(config, workdir)
    resumed = read_metrics(workdir)
    assert min(r["elapsed_s"] for r in resumed if r["step"] > stop) > max(elapsed)  # the clock goes on
    chex.assert_trees_all_equal(params_of(tmp_path / "straight"), params_of(workdir))


@pytest.mark.parametrize("target", [-0.1, 94.0])
def test_a_target_accuracy_that_is_not_a_fraction_is_refused_before_anything_runs(idx_dir, tmp_path, target):
    with pytest.raises(ValueError, match=r"stop_at_test_accuracy=.* is not an accuracy: give a fraction"):
        train_and_evaluate(small_config(idx_dir, stop_at_test_accuracy=target), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # over 20 s on 2 cores
def test_a_compilation_cache_lets_a_second_run_load_every_program_instead_of_compiling_it(idx_dir, tmp_path):
    from jax.experimental.compilation_cache import compilation_cache

    cache = tmp_path / "xla_cache"
    config = small_config(idx_dir, num_train_steps=2, compilation_cache_dir=str(cache))

    def steps_cached() -> set[str]:  # the train and eval steps (smaller programs may hit JAX's in-memory cache)
        return {path.name for path in cache.glob("jit_*_step-*-cache")}

    jax.jit(lambda x: x + 1)(1.0)  # JAX decides at a process's first compile whether to use the cache
    try:
        train_and_evaluate(config, tmp_path / "first")
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
    first = steps_cached()
    assert {name.split("-")[0] for name in first} == {"jit_train_step", "jit_eval_step"}

    overrides = [f"--config.{key}={value}" for key, value in config.items() if key in CHANGED_BY_SMALL_CONFIG]
    command = [sys.executable, "-m", "resnet_jax.cli", "train", "--config", "configs/default.py", *overrides]
    env = os.environ | {"JAX_LOG_COMPILES": "1", "JAX_EXPLAIN_CACHE_MISSES": "1"}  # log each hit and miss
    second = [*command, "--workdir", str(tmp_path / "second")]
    result = subprocess.run(second, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for step in ("jit_train_step", "jit_eval_step"):  # a new process, the same steps: loaded, not compiled
        assert f"Persistent compilation cache hit for '{step}'" in result.stderr
        assert f"PERSISTENT COMPILATION CACHE MISS for '{step}'" not in result.stderr
    assert steps_cached() == first


def test_a_workdir_of_another_model_is_refused(idx_dir, tmp_path):
    train_and_evaluate(small_config(idx_dir, num_train_steps=3), tmp_path)
    with pytest.raises(ValueError, match=r"holds a run of resnet8.*choose another --workdir"):
        train_and_evaluate(small_config(idx_dir, model="resnet14", num_train_steps=6), tmp_path)


class Watcher(Callback):
    """Records what the hooks see; stops the run at the evaluation of ``stop_at``, if given."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.evaluations: list[tuple[int, int, float]] = []  # (step, the state's step, test accuracy)
        self.stop_at = stop_at

    def on_train_step(self, step: int, metrics: dict) -> None:
        assert step not in self.losses
        self.losses[step] = float(metrics["loss"])

    def on_evaluation(self, step: int, state: TrainState, metrics: dict[str, float]) -> bool:
        self.evaluations.append((step, int(state.step), metrics["accuracy"]))
        return step == self.stop_at


def test_a_callback_sees_every_step_and_evaluation_and_the_run_returns_its_final_state(idx_dir, tmp_path):
    watcher = Watcher()
    result = train_and_evaluate(small_config(idx_dir), tmp_path, callbacks=[watcher])
    records = read_metrics(tmp_path)
    assert sorted(watcher.losses) == [1, 2, 3, 4, 5, 6]
    logged = {r["step"]: r["loss"] for r in records if r["split"] == "train"}
    assert logged[2] == pytest.approx((watcher.losses[1] + watcher.losses[2]) / 2, rel=1e-6)
    tested = [(r["step"], r["step"], r["accuracy"]) for r in records if r["split"] == "test"]
    assert watcher.evaluations == tested and [step for step, _, _ in tested] == [3, 6]
    assert int(result.state.step) == 6 and result.metrics["accuracy"] == tested[-1][2]
    chex.assert_trees_all_equal(jax.device_get(result.state.params), params_of(tmp_path))


def test_a_callback_stops_the_run_at_a_checkpoint_that_the_next_run_resumes_from(idx_dir, tmp_path, capsys):
    config = small_config(idx_dir)
    result = train_and_evaluate(config, tmp_path, callbacks=[Watcher(stop_at=3)])
    assert "a callback stopped the run after step 3" in capsys.readouterr().out
    assert int(result.state.step) == 3 and max(r["step"] for r in read_metrics(tmp_path)) == 3
    assert Checkpoints(tmp_path, every_steps=1, keep_latest=1, async_save=False).latest_step() == 3
    watcher = Watcher()
    assert int(train_and_evaluate(config, tmp_path, callbacks=[watcher]).state.step) == 6
    assert "resumed from step 3" in capsys.readouterr().out and sorted(watcher.losses) == [4, 5, 6]


def test_the_loops_verbs_called_one_by_one_train_as_train_and_evaluate_does(idx_dir, tmp_path):
    from resnet_jax.train.feed import create_feed
    from resnet_jax.train.loop import evaluate_state, initial_state, prepare_run, save_checkpoint
    from resnet_jax.train.runs import run_meta

    config = small_config(idx_dir, num_train_steps=2)
    whole = train_and_evaluate(config, tmp_path / "whole")
    run = prepare_run(config, tmp_path / "verbs")
    state, start = initial_state(run)
    feed = create_feed(config, run.train_source, run.steps, run.mesh, start.step)
    for _ in range(2):
        state, _ = feed(state, 1)
    test_metrics = evaluate_state(run.steps, state, run.test_source, run.batches)
    save_checkpoint(run, 2, state, run_meta(config, 2), test_metrics["accuracy"])
    run.checkpoints.close()
    assert start.step == 0 and test_metrics == whole.metrics
    chex.assert_trees_all_equal(params_of(tmp_path / "verbs"), params_of(tmp_path / "whole"))


def import_graph(package: Path) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports, counting imports inside functions and under
    TYPE_CHECKING: anything that could close a cycle."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                }
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def test_data_and_train_import_no_cycle_even_inside_functions():
    graph = import_graph(REPO / "resnet_jax")

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for module in graph[todo.pop()] - seen:
                seen.add(module)
                todo.append(module)
        return seen

    ours = [m for m in graph if m.startswith(("resnet_jax.data", "resnet_jax.train", "resnet_jax.inference"))]
    assert len(ours) > 10
    assert [m for m in ours if m in reachable(m)] == []


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
    checkpoints = Checkpoints(tmp_path, every_steps=1, keep_latest=2, async_save=False)

    def save(checkpoints, step, accuracy):  # None: a checkpoint between evaluations
        metrics = None if accuracy is None else {"test_accuracy": accuracy}
        checkpoints.save(step, {"w": np.full(3, step, np.float32)}, {"step": step}, metrics)

    def kept():
        return sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())

    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.6), (4, None), (5, 0.65)]:
        save(checkpoints, step, accuracy)
    checkpoints.close()
    assert kept() == [2, 4, 5]
    reopened = Checkpoints(tmp_path, every_steps=1, keep_latest=2, async_save=False)
    assert reopened.best_step() == 2  # the ranking survives a restart
    state, meta = reopened.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    assert meta == {"step": 5, DIGEST: state_digest(state)} and float(state["w"][0]) == 5.0  # checked on restore
    for step in (6, 7):
        save(reopened, step, 0.1)
    reopened.close()
    assert kept() == [2, 6, 7]


MULTI_DEVICE = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from resnet_jax.data import BatchSettings, load_source
    from resnet_jax.models import create_model
    from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
    from resnet_jax.train.config import load_config
    from resnet_jax.train.steps import compile_steps, create_train_state, make_mesh
    from resnet_jax.train.runs import check_batch_sizes
    from resnet_jax.train.feed import DeviceFeed

    config = load_config("configs/default.py")
    source = load_source("synthetic", "train", num_examples=64, image_shape=(16, 16, 3), num_classes=10)
    results = {}
    for devices in (jax.devices()[:1], jax.devices()):
        steps = compile_steps(make_mesh(devices))
        tx = create_optimizer(config, learning_rate_schedule(config, 4))
        state = steps.put_state(create_train_state(create_model("resnet8"), tx, (16, 16, 3), seed=0))
        batches = source.train_batches(BatchSettings(16))
        for _ in range(3):
            state, metrics = steps.train(state, steps.put_batch(next(batches)))
        results[len(devices)] = jax.device_get(state.params)
    # The same steps on batches made on the eight devices, three steps in one call.
    feed = DeviceFeed(make_mesh(), source, BatchSettings(16), steps_per_call=3)
    state = steps.put_state(create_train_state(create_model("resnet8"), tx, (16, 16, 3), seed=0))
    feed.compile(state)
    state, metrics = feed(state, 3)
    one, eight, on_device = results[1], results[8], jax.device_get(state.params)
    gap = lambda x, y: max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    error, device_error = gap(one, eight), gap(eight, on_device)
    scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(one))
    config.batch_size = 12
    try:
        check_batch_sizes(config)
        message = ""
    except ValueError as e:
        message = str(e)
    report = {"devices": jax.device_count(), "error": error, "device_error": device_error, "scale": scale}
    print(json.dumps(report | {"message": message}))
    """
)


def test_eight_devices_train_like_one_device_on_the_same_global_batch():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["error"] <= 1e-5 * report["scale"]  # BN statistics and gradients are those of the global batch
    assert report["device_error"] <= 1e-6 * report["scale"]  # each device makes its rows of the same batches
    assert "batch_size=12 does not divide over 8 devices" in report["message"]


@pytest.mark.slow  # over 20 s on 2 cores
def test_bfloat16_training_keeps_float32_parameters_and_statistics():
    config = load_config(REPO / "configs" / "default.py", ["--config.dtype=bfloat16", "--config.model=resnet8"])
    source = load_source("synthetic", "train", num_examples=32, image_shape=(16, 16, 3), num_classes=10)
    steps = compile_steps(make_mesh())
    tx = create_optimizer(config, learning_rate_schedule(config, 4))
    state = steps.put_state(create_train_state(build_model(config, 10), tx, (16, 16, 3), seed=0))
    batch = next(source.train_batches(BatchSettings(16)))
    before = jax.device_get(state.batch_stats)  # the step donates (deletes) the old state
    new_state, metrics = steps.train(state, steps.put_batch(batch))
    assert {x.dtype for x in jax.tree.leaves((new_state.params, new_state.batch_stats))} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, new_state.batch_stats)
    assert all(jax.tree.leaves(moved))
    logits, features = new_state.apply_fn(
        {"params": new_state.params, "batch_stats": new_state.batch_stats}, batch["image"], train=False
    )
    assert features["c2"].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
