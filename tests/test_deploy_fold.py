"""Batch norm folding: the folded model computes the eval-mode logits of every block family, with fewer ops."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import create_model
from resnet_jax.compress.layers import FactorizedConv, QuantizedConv
from resnet_jax.deploy.fold import fold_batch_norm
from resnet_jax.deploy.graph import lower_forward, op_counts

ONE_BLOCK = {"stage_sizes": (1, 1, 1)}
SMALL_IMAGENET = dict(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8, num_classes=7)
# Every block family, small enough to trace in a second: (name, model, overrides).
FAMILIES = [
    ("basic_A", "resnet20", {}),
    ("basic_B", "resnet20", {"shortcut": "B", **ONE_BLOCK}),
    ("basic_C", "resnet20", {"shortcut": "C", **ONE_BLOCK}),
    ("plain", "plain20", ONE_BLOCK),
    ("bottleneck", "resnet50", SMALL_IMAGENET),
    ("bottleneck_v1", "resnet50_v1", SMALL_IMAGENET),
    ("bottleneck_A", "resnet50", {**SMALL_IMAGENET, "shortcut": "A"}),
    ("resnext", "resnext50_32x4d", {**SMALL_IMAGENET, "groups": 4, "width_per_group": 8, "stem_width": 16}),
    ("se", "se_resnet50", SMALL_IMAGENET),
    ("preact_basic", "preact_resnet110", ONE_BLOCK),
    ("preact_bottleneck", "preact_resnet50", SMALL_IMAGENET),
    ("preact_C", "preact_resnet18", {**SMALL_IMAGENET, "shortcut": "C"}),
]


def trained_variables(model, images: jax.Array, seed: int = 0) -> dict:
    """Variables whose every norm has non-trivial statistics and affine parameters, as training leaves them."""
    variables = model.init(jax.random.key(seed), images, train=False)
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables)[0]]
    perturbed = []
    for path, leaf, key in zip(paths, leaves, keys, strict=True):
        noise = jax.random.normal(key, leaf.shape, leaf.dtype)
        if "'var'" in path:
            leaf = jnp.exp(0.5 * noise)  # positive variances around 1
        elif "'mean'" in path or ("bn" in path and "'bias'" in path):
            leaf = 0.2 * noise
        elif "bn" in path and "'scale'" in path:
            leaf = 1 + 0.2 * noise
        perturbed.append(leaf)
    return jax.tree.unflatten(treedef, perturbed)


@pytest.mark.parametrize(("family", "name", "overrides"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_folded_logits_equal_eval_mode(family: str, name: str, overrides: dict) -> None:
    model = create_model(name, **overrides)
    images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    variables = trained_variables(model, images)
    folded, folded_variables = fold_batch_norm(model, variables)

    assert set(folded_variables) == {"params"}
    expected, _ = model.apply(variables, images, train=False)
    logits, _ = folded.apply(folded_variables, images, train=False)
    scale = float(jnp.max(jnp.abs(expected)))
    chex.assert_trees_all_close(logits, expected, rtol=1e-5, atol=1e-5 * scale)
    ops = sum(op_counts(lower_forward(model, variables, images)).values())
    assert sum(op_counts(lower_forward(folded, folded_variables, images)).values()) < ops


def test_only_norms_without_a_conv_before_them_remain() -> None:
    """Post-activation models keep no norm; pre-activation ones keep the norms on block inputs and the last one."""
    images = jnp.zeros((1, 32, 32, 3))
    for name, kept in (("resnet20", set()), ("preact_resnet110", {"preact_bn", "final_bn"})):
        model = create_model(name, **ONE_BLOCK)
        _, variables = fold_batch_norm(model, trained_variables(model, images))
        names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]}
        remaining = {part.strip("[']") for n in names for part in n.split("][") if "bn" in part}
        assert remaining == kept


def test_folding_twice_is_refused() -> None:
    model = create_model("resnet20")
    images = jnp.zeros((1, 32, 32, 3))
    folded, variables = fold_batch_norm(model, model.init(jax.random.key(0), images, train=False))
    with pytest.raises(ValueError, match="folded already"):
        fold_batch_norm(folded, variables)


def test_folded_model_runs_in_float32_numpy_free_of_stats() -> None:
    model = create_model("resnet20")
    images = np.ones((2, 32, 32, 3), np.float32)
    _, variables = fold_batch_norm(model, model.init(jax.random.key(0), images, train=False))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))


def test_a_low_rank_model_folds_into_its_last_conv_and_a_quantized_one_is_refused() -> None:
    """A factorised conv's norm folds into its 1x1 "combine" conv (or its "full" one); int8 kernels cannot absorb a
    norm, so folding a quantized model is refused."""
    ranks = (("stem/conv", 4), ("stage1/block0/branch/conv1", 3))  # the rest stay whole ("full")
    model = create_model("resnet20", **ONE_BLOCK, conv=partial(FactorizedConv, ranks=ranks))
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    variables = trained_variables(model, images)
    folded, folded_variables = fold_batch_norm(model, variables)

    stem = folded_variables["params"]["stem"]
    assert set(stem) == {"conv"} and set(stem["conv"]) == {"basis", "combine"}
    assert "bn" not in folded_variables["params"]["stage1"]["block0"]["branch"]
    expected, _ = model.apply(variables, images, train=False)
    logits, _ = folded.apply(folded_variables, images, train=False)
    chex.assert_trees_all_close(logits, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))))

    quantized = create_model("resnet20", **ONE_BLOCK, conv=QuantizedConv)
    with pytest.raises(ValueError, match="would move them off their integers"):
        fold_batch_norm(quantized, {})  # refused before the variables are read
