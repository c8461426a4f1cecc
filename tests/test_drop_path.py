"""Stochastic depth (``drop_path_rate``): nothing changes at rate 0; in training each example's branch is dropped at
its block's rate and the kept ones rescaled; evaluation is deterministic; plain nets refuse it; and the train
step supplies its masks under jit, pmap and batch parts."""

from __future__ import annotations

from functools import partial

import chex
import jax
import numpy as np
import optax
import pytest
from smooth_images import smooth_images

from resnet_jax.analysis.cka import SOWN_BRANCH, sown_blocks
from resnet_jax.analysis.interception import BRANCH, intercept
from resnet_jax.models import create_model
from resnet_jax.train.steps import (
    compile_steps,
    create_train_state,
    initial_variables,
    make_mesh,
)

IMAGES = smooth_images(256, size=8, seed=3)  # (256, 8, 8, 1)


def variables_of(model):
    return initial_variables(model, jax.random.key(0), (8, 8, 1))


def train_apply(model, variables, images, key):
    """A training forward pass (compiled) with its sown block values and, by interception, every branch as it was
    before any drop."""

    def forward(variables, images, key):
        raw = []

        def record(call):
            raw.append(call.run())
            return raw[-1]

        with intercept({BRANCH: record}):
            (logits, _), state = model.apply(
                variables, images, train=True, mutable=["batch_stats", "intermediates"], rngs={"drop_path": key}
            )
        return logits, [values for _, values in sown_blocks(state["intermediates"])], raw

    return jax.jit(forward)(variables, images, key)


def test_rate_zero_is_the_model_without_stochastic_depth():
    without, zero = create_model("resnet8"), create_model("resnet8", drop_path_rate=0.0)
    variables = variables_of(without)
    chex.assert_trees_all_equal(variables, variables_of(zero))
    train = partial(without.apply, train=True, mutable=["batch_stats"])
    expected = jax.jit(train)(variables, IMAGES[:8])
    given = jax.jit(partial(train, rngs={"drop_path": jax.random.key(5)}))(variables, IMAGES[:8])
    chex.assert_trees_all_equal(given, expected)


def test_each_example_drops_each_branch_at_its_blocks_rate_and_kept_branches_are_rescaled():
    model = create_model("resnet14", drop_path_rate=0.6)  # 6 blocks: block l drops at 0.6 * l / 6
    variables = variables_of(model)
    _, blocks, raw = train_apply(model, variables, IMAGES, jax.random.key(7))
    assert len(blocks) == len(raw) == 6
    dropped_share = []
    for depth, (values, branch) in enumerate(zip(blocks, raw, strict=True), start=1):
        rate = 0.6 * depth / 6
        added = np.asarray(values[SOWN_BRANCH]).reshape(256, -1)
        kept = np.any(added != 0, axis=1)  # a dropped example's branch adds exactly nothing
        expected = np.asarray(branch).reshape(256, -1)[kept] / (1 - rate)
        np.testing.assert_allclose(added[kept], expected, rtol=1e-5, atol=1e-6)
        # 256 Bernoulli draws: within 4 standard deviations of the block's rate
        assert abs(np.mean(~kept) - rate) < 4 * np.sqrt(rate * (1 - rate) / 256), (depth, np.mean(~kept))
        dropped_share.append(np.mean(~kept))
    assert np.mean(dropped_share[3:]) > np.mean(dropped_share[:3])  # the linear rule: deeper blocks drop more
    _, again, _ = train_apply(model, variables, IMAGES, jax.random.key(8))  # another key: other examples
    assert any(not np.array_equal(a[SOWN_BRANCH] != 0, b[SOWN_BRANCH] != 0) for a, b in zip(blocks, again, strict=True))


def test_evaluation_is_deterministic_and_the_whole_model():
    model = create_model("resnet8", drop_path_rate=0.9)
    variables = variables_of(model)
    evaluate = jax.jit(lambda variables, key: model.apply(variables, IMAGES[:8], train=False, rngs={"drop_path": key}))
    expected, _ = jax.jit(partial(create_model("resnet8").apply, train=False))(variables, IMAGES[:8])
    for key in (1, 2):
        chex.assert_trees_all_equal(evaluate(variables, jax.random.key(key))[0], expected)


def test_training_without_a_key_and_bad_rates_are_refused():
    model = create_model("resnet8", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="pass rngs=\\{'drop_path': key\\}"):  # before anything runs
        model.apply({}, IMAGES[:2], train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="a plain net has no skip"):
        create_model("plain8", drop_path_rate=0.1)
    with pytest.raises(ValueError, match=r"drop_path_rate=1\.0; use a probability"):
        create_model("resnet8", drop_path_rate=1.0)
    create_model("plain8", drop_path_rate=0.0)  # no stochastic depth: a plain net is fine


def state_and_batch(rate: float):
    """A resnet8 state and a batch of 8 whose two halves are the same 4 images."""
    model = create_model("resnet8", drop_path_rate=rate)
    state = create_train_state(model, optax.sgd(0.1), (8, 8, 1), seed=0)
    half = {"image": np.asarray(IMAGES[:4]), "label": np.arange(4, dtype=np.int32)}
    return state, {k: np.concatenate([v, v]) for k, v in half.items()}


def test_batch_parts_draw_their_own_masks():
    state, batch = state_and_batch(0.5)
    steps = compile_steps(make_mesh(jax.devices()[:1]), parallelism="batch_parts", batch_parts=2)
    parts = steps.put_batch(batch)
    assert [int(part["part"]) for part in parts] == [0, 1]
    gradients = steps.train.gradients  # the step's own compiled `step_gradients`
    losses = [float(gradients(state, part)[2]["loss"]) for part in parts]
    assert losses[0] != losses[1]  # the same images, other masks
    assert float(gradients(state, {**parts[1], "part": parts[0]["part"]})[2]["loss"]) == losses[0]
    new_state, metrics = steps.train(steps.put_state(state), parts)
    assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-6) and int(new_state.step) == 1


def test_every_step_draws_new_masks_and_pmap_draws_those_of_jit():
    _, batch = state_and_batch(0.5)
    losses, params = {}, {}
    for parallelism, first_steps in (("jit", (0, 1)), ("pmap", (0,))):  # one device: pmap's part is jit's batch
        steps = compile_steps(make_mesh(), parallelism=parallelism)
        for step in first_steps:
            state = steps.put_state(state_and_batch(0.5)[0].replace(step=step))  # a fresh one: the step donates it
            new_state, metrics = steps.train(state, steps.put_batch(batch))
            losses[parallelism, step] = float(np.asarray(steps.to_host(metrics)["loss"]))
            params[parallelism, step] = steps.to_host(new_state.params)
    assert losses["jit", 0] != losses["jit", 1]  # the same weights and images: the masks are the step's
    assert losses["pmap", 0] == pytest.approx(losses["jit", 0], rel=1e-5)
    chex.assert_trees_all_close(params["pmap", 0], params["jit", 0], rtol=1e-5, atol=1e-6)
