"""Magnitude pruning: the schedule, masks in the train step, in checkpoints and after a resume."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from idx_files import idx_folder_fixture
from test_train import small_config

from resnet_jax.compress.prune import PruneSchedule, magnitude_masks, prunable, prune_schedule, sparsity
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.loop import Callback, train_and_evaluate
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, check_config, new_train_state
from resnet_jax.train.steps import train_step

idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)
PRUNE = {"sparsity": 0.8, "begin_step": 0, "end_step": 6, "frequency": 2}


def test_the_schedule_is_zhu_and_guptas_cubic_ramp():
    schedule = PruneSchedule(sparsity=0.9, begin_step=100, end_step=500, frequency=100)
    assert [bool(schedule.updates_at(n)) for n in (0, 100, 150, 200, 500, 600)] == [0, 1, 0, 1, 1, 0]
    assert float(schedule.target(100)) == 0.0 and float(schedule.target(500)) == pytest.approx(0.9)
    assert float(schedule.target(300)) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule.sparsity_after(350) == pytest.approx(0.9 * (1 - 0.5**3))  # the update at 300 holds until 400
    assert schedule.sparsity_after(10_000) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "change, message",
    [({"sparsity": 1.0}, "sparsity=1.0"), ({"sparsity": -0.5}, "sparsity=-0.5"), ({"end_step": 7}, "end_step=7")],
)
def test_bad_pruning_settings_fail_before_anything_builds(idx_dir, change, message):
    config = small_config(idx_dir)
    config.prune.update({**PRUNE, **change})
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_magnitude_masks_prune_exactly_the_smallest_weights_even_among_ties():
    params = {"a": {"kernel": jnp.array([0.0, 0.0, 0.0, 3.0, -1.0, 2.0]).reshape(1, 1, 2, 3)}}
    masks = magnitude_masks(params, prunable(params), jnp.float32(0.5))
    chex.assert_trees_all_equal(masks["a/kernel"].ravel(), jnp.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    masks = magnitude_masks(params, prunable(params), jnp.float32(2 / 6))  # two of the three zeros
    assert int(masks["a/kernel"].sum()) == 4


def test_the_masked_fraction_follows_the_schedule_and_masked_weights_stay_zero(idx_dir):
    config = small_config(idx_dir)
    config.prune.update(PRUNE)
    schedule = prune_schedule(config)
    model = build_model(config, 10)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=8))
    state = new_train_state(config, model, tx, (28, 28, 1))
    kernels = sum(x.size for x in jax.tree.leaves(state.masks))
    step = jax.jit(train_step)
    rng = np.random.default_rng(0)
    for n in range(1, 9):
        batch = {"image": rng.standard_normal((8, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 8)}
        state, _ = step(state, batch)
        pruned = int(sum(jnp.sum(m == 0) for m in jax.tree.leaves(state.masks)))
        assert pruned == math.floor(np.float32(schedule.sparsity_after(n)) * kernels), n
        assert sparsity(state.params) == pytest.approx(pruned / kernels)
        if n == 6:
            final_masks = state.masks
    chex.assert_trees_all_equal(state.masks, final_masks)  # no update after end_step; the zeros stay zero


def test_a_state_that_prunes_nothing_restores_checkpoints_written_before_pruning_existed(idx_dir):
    config = small_config(idx_dir)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=8))
    state = new_train_state(config, build_model(config, 10), tx, (28, 28, 1))
    assert set(serialization.to_state_dict(state)) == {"step", "params", "opt_state", "batch_stats", "loss_scale"}


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_step(self, step: int, metrics: dict) -> bool:
        return step == self.step


@pytest.mark.slow  # over 30 s on 2 cores
def test_a_resumed_run_keeps_its_masks_and_matches_an_uninterrupted_one(idx_dir, tmp_path, capsys):
    config = small_config(idx_dir, lr_schedule="constant", eval_every_steps=100)
    config.prune.update({**PRUNE, "end_step": 4})
    train_and_evaluate(config, tmp_path / "straight")
    train_and_evaluate(config, tmp_path / "resumed", callbacks=[StopAt(3)])
    stopped = Checkpoints(tmp_path / "resumed", every_steps=1, keep_latest=1, async_save=False).read_state(3)
    assert set(stopped["masks"]) == set(prunable(stopped["params"]))
    train_and_evaluate(config, tmp_path / "resumed")
    assert "resumed from step 3" in capsys.readouterr().out
    straight, resumed = (
        Checkpoints(tmp_path / run, every_steps=1, keep_latest=1, async_save=False).read_state(6)
        for run in ("straight", "resumed")
    )
    chex.assert_trees_all_equal(straight["masks"], resumed["masks"])
    chex.assert_trees_all_equal(straight["params"], resumed["params"])
    assert sparsity(resumed["params"]) == pytest.approx(0.8, abs=1e-3)
