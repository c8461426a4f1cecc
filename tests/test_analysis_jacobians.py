"""Block Jacobians: the identity of each block form, the estimators against exact values, the chain rule, the CLI."""

from __future__ import annotations

import csv
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from convs import CONVS, with_either_conv
from idx_files import idx_folder_fixture

from resnet_jax.analysis.blocks import block_parts, capture_blocks
from resnet_jax.analysis.common import single_threaded_blas
from resnet_jax.analysis.jacobians import (
    BlockJacobians,
    block_chain_product,
    deflate,
    end_to_end_jvp,
    end_to_end_singular_values,
    exact_block_report,
    hutchinson_frobenius,
    lanczos,
    lanczos_singular_values,
    pad_indices,
)
from resnet_jax.cli import main
from resnet_jax.models import create_model

JACOBIANS = BlockJacobians()  # the defaults (30 Lanczos steps, 64 probes, top 3); its programs serve all tests

# Small models and 8x8 inputs: every block Jacobian is at most 1,024 x 1,024.
MODELS = {
    "post-activation, pad": ("resnet8", {}),
    "post-activation, projection": ("resnet8", {"shortcut": "B"}),
    "pre-activation, pad": ("preact_resnet8", {}),
    "pre-activation, projection": ("preact_resnet8", {"shortcut": "B"}),
    "plain": ("plain8", {}),
}


def images(count: int = 2, size: int = 8) -> jax.Array:
    """Smooth image-like inputs (a random field, blurred), so that ReLU masks are neither empty nor full."""
    noise = jax.random.normal(jax.random.key(7), (count, size + 2, size + 2, 1))
    return sum(noise[:, i : i + size, j : j + size] for i in range(3) for j in range(3)) / 3


@pytest.fixture(scope="module", params=[f"{kind} / {conv}" for kind in MODELS for conv in CONVS])
def captured(request):
    """A model of `MODELS` with a conv of `CONVS` ("post-activation, pad / cpu conv"), and its captured blocks."""
    kind, conv = request.param.split(" / ")
    name, overrides = MODELS[kind]
    model = create_model(name, conv=CONVS[conv], **overrides)
    x = images()
    variables = model.init(jax.random.key(0), x, train=False)
    variables = _trained_statistics(model, variables, x)
    return model, variables, capture_blocks(model, variables, x)


def _trained_statistics(model, variables, x):
    """Running statistics moved most of the way to those of ``x`` (as training does), so that BN in inference
    mode is a real affine map and about half of each ReLU mask is on."""
    update = jax.jit(lambda v: {**v, **model.apply(v, x, train=True, mutable=["batch_stats"])[1]})
    for _ in range(20):
        variables = update(variables)
    return variables


def explicit_pad(input_shape, output_shape, stride):
    """P as a dense matrix, entry by entry: output (i, j, c) copies input (stride*i, stride*j, c) for c < C_in."""
    (h, w, c_in), (ho, wo, c_out) = input_shape, output_shape
    p = np.zeros((ho * wo * c_out, h * w * c_in))
    for i in range(ho):
        for j in range(wo):
            for c in range(c_in):
                p[(i * wo + j) * c_out + c, (stride * i * w + stride * j) * c_in + c] = 1.0
    return p


def explicit_projection(block):
    """W_s of a post-activation projection from its parameters: strided 1x1 conv, then BN's scale / sqrt(var + eps)."""
    params, stats = block.variables["params"]["shortcut"], block.variables["batch_stats"]["shortcut"]
    kernel = np.asarray(params["conv"]["kernel"][0, 0])  # (C_in, C_out)
    scale = np.asarray(params["bn"]["scale"]) / np.sqrt(np.asarray(stats["bn"]["var"]) + 1e-5)
    (h, w, c_in), (ho, wo, c_out) = block.info.input_shape, block.info.output_shape
    stride = h // ho
    matrix = np.zeros((ho * wo * c_out, h * w * c_in))
    for i in range(ho):
        for j in range(wo):
            rows = (i * wo + j) * c_out + np.arange(c_out)
            cols = (stride * i * w + stride * j) * c_in + np.arange(c_in)
            matrix[np.ix_(rows, cols)] = (kernel * scale).T
    return matrix


def expected_shortcut(block, matrices):
    """S built independently of the library: I, P, W_s, or (pre-activation projection, no fixed map) J_s itself."""
    size_in, size_out = matrices["output"].shape[1], matrices["output"].shape[0]
    if block.info.kind == "identity":
        return np.eye(size_in)
    if block.info.kind == "pad":
        return explicit_pad(block.info.input_shape, block.info.output_shape, block.module.strides)
    if block.info.kind == "projection":
        return matrices["shortcut"] if block.info.preact else explicit_projection(block)
    return np.zeros((size_out, size_in))


def test_every_block_obeys_its_identity_exactly(captured):
    _, _, blocks = captured
    for block in blocks:
        matrices, deviations = JACOBIANS.exact(block)
        j, j_f = matrices["output"], matrices["branch"]
        scale = np.abs(j).max()
        values = block_parts(block, block.variables, block.inputs[:1])
        preact, kind = block.info.preact, block.info.kind
        shortcut = expected_shortcut(block, matrices)
        if kind != "plain":
            np.testing.assert_allclose(matrices["shortcut"], shortcut, atol=1e-5 * scale)
        mask = np.ones(j.shape[0])
        if not preact:
            mask = (np.asarray(values["branch"] + values.get("shortcut", 0.0)) > 0).reshape(-1)
        np.testing.assert_allclose(j, mask[:, None] * (shortcut + j_f), atol=1e-5 * scale, err_msg=block.info.name)
        assert deviations["identity"] < 1e-5, block.info.name
        assert np.isnan(deviations["shortcut"]) == (kind == "plain" or (kind == "projection" and preact))
        if not preact and kind != "plain":  # the ReLU mask matters: without D the identity fails
            assert 0.0 < mask.mean() < 1.0
            assert np.abs(j - (shortcut + j_f)).max() > 0.1 * scale


def test_pre_activation_identity_block_is_exactly_i_plus_j_f():
    model = create_model("preact_resnet8")
    x = images()
    variables = model.init(jax.random.key(0), x, train=False)
    block = capture_blocks(model, variables, x)[0]
    assert (block.info.kind, block.info.form) == ("identity", "J = I + J_F")
    matrices, _ = JACOBIANS.exact(block, example=1)
    np.testing.assert_allclose(matrices["output"] - matrices["branch"], np.eye(1024), atol=1e-6)


def test_pad_indices_are_the_subsample_and_pad_map():
    source = pad_indices((4, 6, 3), (2, 3, 5), 2)
    dense = np.zeros((2 * 3 * 5, 4 * 6 * 3))
    dense[np.flatnonzero(source >= 0), source[source >= 0]] = 1
    np.testing.assert_array_equal(dense, explicit_pad((4, 6, 3), (2, 3, 5), 2))


def known_matrices(singular: np.ndarray) -> jax.Array:
    """J = U diag(s) V^T with random orthogonal U, V: one matrix per row of ``singular``."""
    n = singular.shape[1]
    u, v = (np.linalg.qr(np.random.default_rng(i).normal(size=(len(singular), n, n)))[0] for i in (0, 1))
    return jnp.asarray(u * singular[:, None, :] @ np.swapaxes(v, 1, 2), jnp.float32)


def top_singular_values(matrices: jax.Array, steps: int, top_k: int) -> jax.Array:
    return lanczos_singular_values(
        lambda x: jnp.einsum("bij,bj->bi", matrices, x),
        lambda y: jnp.einsum("bij,bi->bj", matrices, y),
        jax.random.normal(jax.random.key(0), matrices.shape[:2]),
        steps,
        top_k,
    )


def test_lanczos_and_hutchinson_recover_a_known_spectrum():
    """One matrix per example of a batch of two, with different spectra."""
    singular = np.stack([np.geomspace(5.0, 0.01, 200), np.linspace(3.0, 0.1, 200)])
    matrices = known_matrices(singular)
    np.testing.assert_allclose(top_singular_values(matrices, steps=20, top_k=3), singular[:, :3], rtol=0.02)
    frobenius = np.sqrt((singular**2).sum(1))
    probes = jax.random.rademacher(jax.random.key(1), (400, 2, 200), jnp.float32)
    np.testing.assert_allclose(hutchinson_frobenius(jnp.einsum("bij,pbj->pbi", matrices, probes)), frobenius, rtol=0.05)


def test_deflated_hutchinson_counts_the_dominant_directions_exactly():
    """Five singular values carry most of ||J||_F: plain Hutchinson with 16 probes was off by up to 16% in 20 draws;
    deflated by a 20-step Krylov basis, it is exact to round-off."""
    singular = np.r_[[10.0, 8, 6, 4, 2], np.full(195, 0.1)][None]
    matrices = known_matrices(singular)
    krylov = lanczos(
        lambda x: jnp.einsum("bij,bj->bi", matrices, x),
        lambda y: jnp.einsum("bij,bi->bj", matrices, y),
        jax.random.normal(jax.random.key(0), (1, 200)),
        20,
    )
    probes = deflate(jax.random.rademacher(jax.random.key(1), (16, 1, 200), jnp.float32), krylov.basis)
    estimate = hutchinson_frobenius(jnp.einsum("bij,pbj->pbi", matrices, probes), krylov.captured)
    np.testing.assert_allclose(estimate, np.sqrt((singular**2).sum(1)), rtol=1e-3)


def test_lanczos_stays_exact_when_the_krylov_space_runs_out():
    """More steps than dimensions (as for a block whose singular values are packed near 1): the steps after the
    space is exhausted must not invent singular values (a tridiagonal recurrence gave 11 for a norm of 1)."""
    singular = np.linspace(1.0, 0.5, 16)[None]
    top = top_singular_values(known_matrices(singular), steps=30, top_k=3)
    np.testing.assert_allclose(top, singular[:, :3], rtol=1e-4)


@pytest.mark.parametrize(
    "captured", ["post-activation, pad / plain conv", "pre-activation, projection / plain conv"], indirect=True
)
def test_estimators_agree_with_exact_values_within_five_percent(captured):
    _, _, blocks = captured
    for block in blocks:
        report = exact_block_report(block, JACOBIANS, np.random.default_rng(block.info.depth))
        errors = {k: v for k, v in report.items() if k.endswith("_error")}
        assert set(errors) == {"sv_J_error", "sv_F_error", "fro_J_error", "fro_F_error"}
        assert max(errors.values()) < 0.05, (block.info.name, errors)


def test_estimates_are_per_example_and_compiled_once_per_structure():
    model = create_model("resnet14")  # two blocks per stage; the two of stage 1 have one structure
    x = images(count=3)
    variables = model.init(jax.random.key(0), x, train=False)
    blocks = capture_blocks(model, variables, x)
    jacobians = BlockJacobians(iterations=20, probes=8, top_k=1)
    estimates = [jacobians.estimate(block, np.random.default_rng(0)) for block in blocks[:3]]
    assert len(jacobians.structures) == 2  # stage1/block0 and stage1/block1 share one program
    chex.assert_shape([estimates[1]["sv_J"], estimates[1]["fro_F"]], [(3, 1), (3,)])
    with single_threaded_blas():
        exact = [np.linalg.norm(jacobians.exact(blocks[1], e)[0]["output"].astype(float), ord=2) for e in range(3)]
    assert np.ptp(exact) > 0.02 * max(exact)  # the examples' Jacobians differ ...
    np.testing.assert_allclose(estimates[1]["sv_J"][:, 0], exact, rtol=0.01)  # ... and each gets its own


@with_either_conv
@pytest.mark.parametrize("name", ["resnet8", "preact_resnet8", "plain8"])
def test_chain_rule_of_block_jacobians_equals_the_end_to_end_jacobian(name, conv):
    model = create_model(name, conv=conv)
    x = images()
    variables = model.init(jax.random.key(0), x, train=False)
    blocks = capture_blocks(model, variables, x)
    probes = jax.random.normal(jax.random.key(1), (3, *blocks[0].inputs.shape))
    composed = end_to_end_jvp(model, variables, x, probes)
    np.testing.assert_allclose(block_chain_product(blocks, probes), composed, rtol=1e-4, atol=1e-5)
    # the same product from the dense Jacobians of example 0, multiplied out
    product = np.eye(blocks[0].inputs[0].size)
    for block in blocks:
        product = JACOBIANS.exact(block)[0]["output"] @ product
    expected = np.asarray(composed[:, 0]).reshape(3, -1)
    np.testing.assert_allclose(np.asarray(probes[:, 0]).reshape(3, -1) @ product.T, expected, rtol=1e-4, atol=1e-5)


@with_either_conv
def test_end_to_end_singular_values_match_a_forward_mode_jacobian(conv):
    model = create_model("resnet8", conv=conv)
    x = images(count=1)
    variables = model.init(jax.random.key(0), x, train=False)
    singular = end_to_end_singular_values(model, variables, x[0])
    jacobian = jax.jit(jax.jacfwd(lambda image: model.apply(variables, image[None], train=False)[1]["pre_logits"][0]))(
        x[0]
    )
    expected = np.linalg.svd(np.asarray(jacobian, np.float64).reshape(64, -1), compute_uv=False)
    np.testing.assert_allclose(singular, expected, rtol=1e-4, atol=1e-6 * expected[0])
    chex.assert_shape(singular, (64,))
    assert np.all(np.diff(singular) <= 0)


# --- the subcommand --------------------------------------------------------------------------------


idx_dir = idx_folder_fixture(num_train=16, num_test=8)


@pytest.mark.slow  # over 30 s on 2 cores
def test_analyze_jacobian_writes_numbers_and_plots(idx_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["analyze", "jacobian", "--model", "resnet8", "--model", "plain8", "--data-dir", str(idx_dir)]
    # one 8x8 image for both the estimates and the exact Jacobians: their programs are the same ones
    args += ["--examples", "1", "--input-size", "8", "--exact-size", "8", "--iterations", "6", "--probes", "4"]
    args += ["--top-k", "2"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "jacobian resnet8 init: 3/3 blocks" in printed
    report = json.loads((out / "jacobian.json").read_text())
    assert [m["label"] for m in report["models"]] == ["resnet8 init", "plain8 init"]
    resnet, plain = report["models"]
    assert [b["form"] for b in resnet["blocks"]] == ["J = D(I + J_F)", "J = D(P + J_F)", "J = D(P + J_F)"]
    assert [b["form"] for b in plain["blocks"]] == ["J = D J_F"] * 3
    assert all(len(b["sv_J"]) == 2 and b["sv_J"][0] >= b["sv_J"][1] > 0 for b in resnet["blocks"])
    assert report["summary"]["largest_deviation"] < 1e-5
    assert set(report["summary"]["largest_deviation_by_form"]) == {"J = D(I + J_F)", "J = D(P + J_F)", "J = D J_F"}
    assert len(resnet["end_to_end"]["singular_values"]) == 64
    with (out / "jacobian_blocks.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and float(rows[0]["exact_fro_J"]) > 0
    for plot in ("jacobian_depth.png", "jacobian_spectrum.png"):
        assert (out / plot).stat().st_size > 10_000


def test_analyze_explains_bad_requests(idx_dir, tmp_path, capsys):
    assert main(["analyze", "jacobian", "--data-dir", str(idx_dir)]) == 2
    assert "give --model NAME" in capsys.readouterr().err
    assert main(["analyze", "gradflow", "--model", "resnet8", "--all-checkpoints"]) == 2
    assert "give a run" in capsys.readouterr().err
    assert main(["analyze", "gradflow", "--checkpoint", str(tmp_path)]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert main(["analyze", "jacobian", "--model", "resnet8", "--iterations", "2", "--top-k", "3"]) == 2
    assert "top_k=3 (--top-k)" in capsys.readouterr().err
