"""The one interceptor of the analyses: which calls each target sees, their block depths, and rewritten results."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from smooth_images import smooth_images

from resnet_jax.analysis.blocks import capture_blocks
from resnet_jax.analysis.interception import BLOCK, BRANCH, SHORTCUT_MODULE, SKIP, Call, Target, intercept
from resnet_jax.models import create_model
from resnet_jax.models.blocks import PadShortcut, ProjectionShortcut


def _setup(name: str, **overrides):
    model = create_model(name, **overrides)
    images = smooth_images(2)
    return model, model.init(jax.random.key(0), images, train=False), images


def test_hooks_that_run_the_call_change_nothing_and_see_every_part_in_forward_order():
    model, variables, images = _setup("resnet14")
    seen: list[tuple[str, int, str]] = []

    def record(part: str):
        def hook(call: Call) -> jax.Array:
            seen.append((part, call.depth, call.path))
            return call.run()

        return hook

    with intercept({BLOCK: record("block"), BRANCH: record("branch"), SKIP: record("skip")}) as count:
        logits, _ = model.apply(variables, images, train=False)
    chex.assert_trees_all_equal(logits, model.apply(variables, images, train=False)[0])
    assert count.blocks == 6
    blocks = [(depth, path) for part, depth, path in seen if part == "block"]
    assert blocks == list(enumerate(f"stage{s}/block{b}" for s in (1, 2, 3) for b in (0, 1)))
    for part, depth, path in seen:  # a block's branch and skip carry its depth, and sit inside it
        assert path.startswith(dict(blocks)[depth]), (part, depth, path)
    assert [part for part, _, _ in seen].count("skip") == [part for part, _, _ in seen].count("branch") == 6


def test_a_zero_skip_makes_the_residual_net_its_plain_counterpart():
    """resnet8 (shortcut "A": pads) has no shortcut parameters: with every skip's value replaced by zeros it computes
    exactly what plain8 computes with the same variables."""
    model, variables, images = _setup("resnet8")
    plain = create_model("plain8")
    with intercept({SKIP: lambda call: jnp.zeros_like(call.run())}) as count:
        logits, _ = model.apply(variables, images, train=False)
    assert count.blocks == 3
    expected, _ = plain.apply(variables, images, train=False)
    chex.assert_trees_all_close(logits, expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(logits - model.apply(variables, images, train=False)[0]).max()) > 1e-4


def test_run_on_gives_the_call_another_input():
    """The first block run on a doubled input inside the model computes what that block alone computes on it."""
    model, variables, images = _setup("resnet8")
    first = capture_blocks(model, variables, images)[0]
    outputs = {}

    def doubled_input(call: Call) -> jax.Array:
        outputs[call.depth] = call.run_on(2 * call.inputs) if call.depth == 0 else call.run()
        return outputs[call.depth]

    with intercept({BLOCK: doubled_input}):
        logits, _ = model.apply(variables, images, train=False)
    expected = first.module.apply(first.variables, 2 * first.inputs)
    chex.assert_trees_all_close(outputs[0], expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(logits - model.apply(variables, images, train=False)[0]).max()) > 1e-4


@pytest.mark.parametrize(("shortcut", "module"), [("A", PadShortcut), ("B", ProjectionShortcut)])
def test_shortcut_modules_are_seen_only_where_a_block_has_one(shortcut, module):
    model, variables, images = _setup("resnet14", shortcut=shortcut)
    seen = {}

    def record(call: Call) -> jax.Array:
        seen[call.depth] = type(call.module)
        return call.run()

    with intercept({SHORTCUT_MODULE: record}):
        model.apply(variables, images, train=False)
    assert seen == {2: module, 4: module}  # the first block of stages 2 and 3 downsamples


def test_calls_before_the_first_block_have_depth_minus_one_and_the_first_target_listed_wins():
    model, variables, images = _setup("resnet8")
    convs: dict[str, int] = {}
    others: dict[str, int] = {}

    def record_in(found: dict[str, int]):
        def hook(call: Call) -> jax.Array:
            found[call.path] = call.depth
            return call.run()

        return hook

    with intercept({Target(nn.Conv): record_in(convs), Target((nn.Conv, nn.Dense)): record_in(others)}):
        model.apply(variables, images, train=False)
    assert convs["stem/conv"] == -1 and convs["stage3/block0/branch/conv2"] == 2
    assert len(convs) == 7 and others == {"head": 2}  # the head comes after the last block
