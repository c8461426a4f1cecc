"""Paths of residual networks: the exact binomial counts, the gated backward pass against autodiff by other
routes, one compiled program for every path length, the summary numbers, the CLI."""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
from fractions import Fraction

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import make_idx_folder
from smooth_images import smooth_images

from resnet_jax.analysis.common import init_snapshot
from resnet_jax.analysis.paths import (
    PathGradients,
    analyze_paths,
    effective_range,
    gated_loss,
    input_gradient,
    path_counts,
    path_probabilities,
    sample_gates,
    scaled_norms,
    summarize_lengths,
)
from resnet_jax.cli import main
from resnet_jax.models import create_model
from resnet_jax.models.blocks import Branch, ResidualBlock
from resnet_jax.train.steps import cross_entropy

# post-activation with shortcut "A" (identity and pad skips), pre-activation with projections
MODELS = {"resnet8": ("resnet8", {}), "preact_resnet8 B": ("preact_resnet8", {"shortcut": "B"})}


def test_path_lengths_follow_the_binomial_distribution_exactly():
    assert path_counts(9) == [1, 9, 36, 84, 126, 126, 84, 36, 9, 1]  # resnet20
    assert path_counts(27)[13] == 20_058_300  # resnet56
    assert path_counts(54)[27] == 1_946_939_425_648_112  # resnet110
    assert path_counts(54)[5] == 3_162_510
    for n in (9, 27, 54, 1000):
        assert sum(path_counts(n)) == 2**n
    assert path_probabilities(9).tolist() == [c / 512 for c in (1, 9, 36, 84, 126, 126, 84, 36, 9, 1)]
    assert path_probabilities(27)[13] == 0.1494459807872772216796875  # exact: 20058300 / 2**27
    assert path_probabilities(54)[27] == pytest.approx(0.1080768488952506, rel=1e-15)
    assert path_probabilities(54)[5] == pytest.approx(1.755545708803652e-10, rel=1e-15)
    for n, k in ((27, 13), (54, 27), (54, 5)):  # each the exact ratio, rounded once
        assert path_probabilities(n)[k] == float(Fraction(path_counts(n)[k], 2**n))
    # thousands of blocks: no overflow, and the mode is Stirling's sqrt(2 / (pi n)) (1 - 1 / (4n))
    many = path_probabilities(2000)
    assert many.sum() == pytest.approx(1.0, rel=1e-12)
    assert many[1000] == pytest.approx(math.sqrt(2 / (math.pi * 2000)) * (1 - 1 / 8000), rel=1e-6)


@functools.cache
def _setup(key: str, count: int = 4):
    name, overrides = MODELS[key]
    model = create_model(name, **overrides)
    images = smooth_images(count)
    return model, model.init(jax.random.key(0), images, train=False), images, jnp.arange(count) % 10


def _loss(model, variables, images, labels):
    logits, _ = model.apply(variables, images, train=False)
    return cross_entropy(logits, labels).mean()


# one program per model and shape for all the gate values of the tests
ordinary_gradient = jax.jit(jax.grad(_loss, argnums=2), static_argnums=0)
gated_gradient = jax.jit(input_gradient, static_argnums=0)


def _path(through_branch) -> jax.Array:
    return jnp.array([(1.0, 0.0) if b else (0.0, 1.0) for b in through_branch])


@pytest.mark.parametrize("key", list(MODELS))
def test_open_gates_give_the_ordinary_gradient_and_no_gate_changes_the_forward_pass(key):
    model, variables, images, labels = _setup(key)
    expected = ordinary_gradient(model, variables, images, labels)
    gated = gated_gradient(model, variables, images, labels, jnp.ones((3, 2)))
    np.testing.assert_allclose(gated, expected, rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(expected).max()) > 0
    gates = jnp.asarray(np.random.default_rng(1).random((3, 2)))
    assert float(gated_loss(model, variables, images, labels, gates)) == float(_loss(model, variables, images, labels))


@pytest.mark.parametrize("key", list(MODELS))
def test_the_gradients_of_all_paths_add_up_to_the_gradient(key):
    """The backward pass is linear in each block's gates: summed over the 2**n choices of branch or skip per
    block, the path gradients give back the ordinary one; the paths themselves differ."""
    model, variables, images, labels = _setup(key)
    paths = [
        gated_gradient(model, variables, images, labels, _path(branch))
        for branch in itertools.product((True, False), repeat=3)
    ]
    expected = ordinary_gradient(model, variables, images, labels)
    np.testing.assert_allclose(sum(paths), expected, rtol=1e-4, atol=1e-6 * float(jnp.abs(expected).max()))
    norms = [float(jnp.linalg.norm(p)) for p in paths]
    assert min(norms) > 0 and max(norms) > 1.01 * min(norms)


def _reference_path_gradient(model, variables, images, labels, through_branch):
    """The gradient of one path by another route (post-activation blocks, whose branch reads the block input):
    stop_gradient on the branch output of a block the path skips; for a block it passes through F, the block
    gets its input behind stop_gradient (so its skip carries nothing back) while the branch reads the live input.
    """

    def loss(x):
        position, live = [-1], {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if isinstance(module, ResidualBlock):
                position[0] += 1
                live["input"] = args[0]
                cut = through_branch[position[0]]
                return next_fun(jax.lax.stop_gradient(args[0]) if cut else args[0], **kwargs)
            if isinstance(module, Branch):
                if through_branch[position[0]]:
                    return next_fun(live["input"], **kwargs)
                return jax.lax.stop_gradient(next_fun(*args, **kwargs))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            logits, _ = model.apply(variables, x, train=False)
        return cross_entropy(logits, labels).mean()

    return jax.grad(loss)(images)


@pytest.mark.parametrize("through_branch", list(itertools.product((False, True), repeat=3)))
def test_each_path_gradient_matches_stop_gradient_autodiff(through_branch):
    """k = 0 (skips only: the option-A pads and the identity), k = n (branches only) and every mix between."""
    model, variables, images, labels = _setup("resnet8")
    gated = gated_gradient(model, variables, images, labels, _path(through_branch))
    expected = _reference_path_gradient(model, variables, images, labels, through_branch)
    np.testing.assert_allclose(gated, expected, rtol=1e-5, atol=1e-6 * float(jnp.abs(expected).max()))
    assert float(jnp.abs(expected).max()) > 0


def test_one_compiled_program_serves_every_path_length_and_sample():
    model, variables, images, labels = _setup("resnet8", count=6)
    program = PathGradients(model, chunk=4)
    gates, lengths = sample_gates(3, samples=2, rng=np.random.default_rng(0))  # 8 vectors: two chunks
    norms = program(variables, images, labels, gates, batch_size=6, rng=np.random.default_rng(1))
    ones = program(variables, images, labels, np.ones((1, 3, 2), np.float32), 6, np.random.default_rng(2))
    assert program.traces == 1
    assert ones[0] == pytest.approx(float(jnp.linalg.norm(ordinary_gradient(model, variables, images, labels))), 1e-5)
    for row, length, norm in zip(gates, lengths, norms, strict=True):
        expected = gated_gradient(model, variables, images, labels, jnp.asarray(row))
        assert norm == pytest.approx(float(jnp.linalg.norm(expected)), rel=1e-5), length


def test_gradient_norms_survive_magnitudes_whose_squares_underflow_float32():
    """A path through 25 branches of a trained resnet110 carries about 1e-21: squared, that is below float32's
    range, and a plain sum of squares reads 0."""
    values = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    expected = np.linalg.norm(values.astype(np.float64).reshape(3, -1), axis=1)
    scales = np.array([1.0, 1e-21, 1e-30], np.float32)[:, None, None]
    tiny = jnp.asarray(values * scales)
    assert float(jnp.sqrt(jnp.sum(jnp.square(tiny[1])))) == 0.0  # what the scaling is for
    np.testing.assert_allclose(np.asarray(scaled_norms(tiny)), expected * scales[:, 0, 0], rtol=1e-5)
    assert np.asarray(scaled_norms(jnp.zeros((2, 3)))).tolist() == [0.0, 0.0]


def test_sampled_gates_pass_exactly_k_branches_and_the_other_skips():
    gates, lengths = sample_gates(9, samples=50, rng=np.random.default_rng(0))
    chex.assert_shape(gates, (500, 9, 2))
    assert np.bincount(lengths).tolist() == [50] * 10
    assert np.array_equal(gates[:, :, 0].sum(axis=1), lengths)
    assert np.array_equal(gates[:, :, 0] + gates[:, :, 1], np.ones((500, 9)))
    chosen = gates[lengths == 1, :, 0].argmax(axis=1)
    assert len(set(chosen.tolist())) == 9  # every block gets drawn
    assert len(set(lengths[:10].tolist())) > 3  # lengths are shuffled together


def test_effective_range_is_the_central_share():
    shares = np.array([0.02, 0.03, 0.2, 0.5, 0.2, 0.05])
    assert effective_range(shares, 0.9) == (2, 4)
    assert effective_range(shares, 1.0) == (0, 5)
    assert effective_range(shares * 7, 0.5) == (3, 3)  # unnormalised shares; the tails hold 0.25 each
    assert effective_range(np.array([0.0, 1.0, 0.0]), 0.9) == (1, 1)


@pytest.mark.parametrize("n, gain", [(54, 0.1), (1100, 0.7)])
def test_geometric_path_gradients_give_a_binomial_weighting(n, gain):
    """E||g_k|| = c gain^k weights lengths by C(n, k) gain^k: Binomial(n, gain / (1 + gain)), even where
    C(n, k) itself overflows float64 (n = 1100)."""
    lengths = np.repeat(np.arange(n + 1), 2)
    norms = 3.0 * gain ** lengths.astype(np.float64)
    summary = summarize_lengths(n, lengths, norms, fraction=0.9)
    p = gain / (1 + gain)
    assert summary["expected_length"] == pytest.approx(n * p, rel=1e-9)
    assert summary["gain_per_branch"] == pytest.approx(gain, rel=1e-9)
    assert summary["mean_path_length"] == n / 2
    lo, hi = summary["effective_range"]
    assert lo < n * p < hi < n / 2
    assert sum(row["share"] for row in summary["lengths"][lo : hi + 1]) >= 0.9
    assert summary["lengths"][0]["paths"] == 1 and summary["lengths"][1]["samples"] == 2


def test_plain_nets_have_no_paths(tmp_path):
    with pytest.raises(ValueError, match="plain net"):
        PathGradients(create_model("plain8"))
    snapshot = init_snapshot("plain8", (8, 8, 1))
    with pytest.raises(ValueError, match="Only plain nets"):
        analyze_paths([snapshot], jnp.zeros((4, 8, 8, 1)), jnp.zeros(4, int), tmp_path, batch_size=4)


@pytest.mark.slow  # over 30 s on 2 cores
def test_analyze_paths_writes_numbers_and_plots(tmp_path, capsys):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=8, num_test=8)
    out = tmp_path / "out"
    args = ["analyze", "paths", "--model", "resnet8", "--model", "plain8", "--data-dir", str(data)]
    args += ["--examples", "8", "--input-size", "8", "--samples", "3", "--batch-size", "4", "--chunk", "8"]
    assert main([*args, "--out", str(out)]) == 0
    assert "resnet8 init: 90% of the gradient" in capsys.readouterr().out
    report = json.loads((out / "paths.json").read_text())
    assert [m["label"] for m in report["models"]] == ["resnet8 init"]
    assert report["skipped"] == {"plain8 init": "plain net: no skips, no paths"}
    (resnet,) = report["models"]
    assert [row["paths"] for row in resnet["lengths"]] == [1, 3, 3, 1]
    assert [row["samples"] for row in resnet["lengths"]] == [3] * 4
    assert all(row["grad_mean"] > 0 for row in resnet["lengths"])
    assert sum(row["share"] for row in resnet["lengths"]) == pytest.approx(1.0)
    lo, hi = report["summary"]["resnet8 init"]["effective_range"]
    assert 0 <= lo <= hi <= 3
    assert sorted(report["files"]) == sorted(str(out / f) for f in ("paths.json", "paths.csv", "paths.png"))
    with (out / "paths.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (out / "paths.png").stat().st_size > 10_000


def test_analyze_paths_explains_bad_settings(capsys):
    assert main(["analyze", "paths", "--model", "resnet8", "--samples", "0"]) == 2
    assert "(--samples)" in capsys.readouterr().err
    assert main(["analyze", "paths", "--model", "resnet8", "--examples", "8", "--batch-size", "16"]) == 2
    assert "the 8 images (--examples)" in capsys.readouterr().err
    assert main(["analyze", "paths", "--model", "resnet8", "--fraction", "1.5"]) == 2
    assert "(--fraction)" in capsys.readouterr().err
