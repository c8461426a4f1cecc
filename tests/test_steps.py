"""The train and eval steps are one function of (state, batch) under every transform, with either conv; and the
batch-parts step (`resnet_jax.cpu.batch_parts`) is the mean of its parts' steps. The pmap variants run on fake
CPU devices in tests/test_scale.py (a process of this suite has one device)."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from convs import CONVS

from resnet_jax.data import BatchSettings, load_source
from resnet_jax.models import create_model
from resnet_jax.train.steps import (
    PMAP_AXIS,
    apply_mean_gradients,
    compile_steps,
    create_train_state,
    eval_step,
    make_mesh,
    step_gradients,
    train_step,
)

IMAGE_SHAPE = (12, 12, 3)


def state_and_batch(conv, size: int = 8):
    """A resnet8 train state (SGD with momentum) computing with ``conv``, and a labelled batch of ``size``."""
    source = load_source("synthetic", "train", num_examples=32, image_shape=IMAGE_SHAPE, num_classes=10)
    batch = next(source.train_batches(BatchSettings(size, seed=0)))
    state = create_train_state(create_model("resnet8", conv=conv), optax.sgd(0.1, 0.9), IMAGE_SHAPE, seed=0)
    return state, {k: jnp.asarray(v) for k, v in batch.items()}


def only_arrays(state):
    """What a step changes: parameters, optimizer state, statistics and step count (not the functions)."""
    return state.step, state.params, state.opt_state, state.batch_stats


class StepsUnderTransforms(chex.TestCase):
    # Not without jit: the step always runs compiled, and op by op the CPU conv is among the slowest default tests.
    @chex.variants(with_jit=True, with_pmap=True)
    @parameterized.named_parameters(*((label.replace(" ", "_"), conv) for label, conv in CONVS.items()))
    def test_train_step_is_that_of_the_plain_model_under_jit(self, conv):
        plain_state, batch = state_and_batch(CONVS["plain conv"])
        expected = jax.jit(train_step)(plain_state, batch)
        state, _ = state_and_batch(conv)
        pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP  # every device holds the batch: means change nothing
        step = partial(train_step, axis_name=PMAP_AXIS) if pmap else train_step
        new_state, metrics = self.variant(step, axis_name=PMAP_AXIS)(state, batch)
        chex.assert_trees_all_close(only_arrays(new_state), only_arrays(expected[0]), rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics, expected[1], rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.named_parameters(*((label.replace(" ", "_"), conv) for label, conv in CONVS.items()))
    def test_eval_step_sums_every_real_example_under_each_transform(self, conv):
        state, batch = state_and_batch(conv)
        mask = jnp.asarray([1.0] * 6 + [0.0] * 2)  # the last two rows pad the batch
        pmap = self.variant.type == chex.ChexVariantType.WITH_PMAP
        sums = self.variant(partial(eval_step, axis_name=PMAP_AXIS) if pmap else eval_step, axis_name=PMAP_AXIS)(
            state, batch | {"mask": mask}
        )
        logits, _ = state.apply_fn(
            {"params": state.params, "batch_stats": state.batch_stats}, batch["image"][:6], train=False
        )
        devices = jax.device_count() if pmap else 1  # psum over devices that each hold the batch
        correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"][:6])
        chex.assert_trees_all_close(
            (sums["count"], sums["correct"]), (6.0 * devices, correct * devices), rtol=0, atol=0
        )


@pytest.mark.parametrize("conv", list(CONVS.values()), ids=list(CONVS))
def test_batch_parts_step_applies_the_mean_of_its_parts_gradients(conv):
    state, batch = state_and_batch(conv)
    parts = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(2)]
    expected = apply_mean_gradients(state, [jax.jit(step_gradients)(state, part) for part in parts])
    whole = jax.jit(train_step)(state, batch)[0]  # one batch norm over all 8 images: another step
    steps = compile_steps(make_mesh(jax.devices()[:1]), parallelism="batch_parts", batch_parts=2)
    new_state, metrics = steps.train(steps.put_state(state), steps.put_batch(jax.device_get(batch)))  # donates
    chex.assert_trees_all_close(only_arrays(new_state), only_arrays(expected[0]), rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(metrics, expected[1], rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(new_state.params["head"]["kernel"] - whole.params["head"]["kernel"])).max() > 1e-6
