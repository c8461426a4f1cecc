"""Loss Hessian: Lanczos, Hutchinson and stochastic Lanczos quadrature against exact spectra, H v against the
exact Hessian of a tiny ResNet, and one compiled program per model."""

from __future__ import annotations

import json
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import make_idx_folder
from jax.flatten_util import ravel_pytree
from smooth_images import smooth_images

from resnet_jax.analysis.common import ModelSnapshot
from resnet_jax.analysis.hessian import (
    analyze_hessian,
    hutchinson_trace,
    lanczos,
    loss_hessian,
    spectral_density,
    spectrum,
)
from resnet_jax.cli import main
from resnet_jax.models import create_model
from resnet_jax.train.steps import cross_entropy


def symmetric(eigenvalues: np.ndarray, seed: int = 0) -> np.ndarray:
    """A symmetric matrix with these eigenvalues and random eigenvectors."""
    basis, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((len(eigenvalues),) * 2))
    return (basis * eigenvalues) @ basis.T


def as_matvec(matrix: np.ndarray):
    device = jnp.asarray(matrix, jnp.float32)
    return lambda v: device @ v


# A spectrum like a net's: a few outliers over a bulk near zero, some of it negative.
SPECTRUM = np.concatenate([[50.0, 20.0, 8.0], np.linspace(-0.5, 1.0, 37)])


def test_lanczos_with_a_complete_basis_is_the_eigendecomposition():
    matrix = symmetric(SPECTRUM)
    start = jnp.asarray(np.random.default_rng(1).standard_normal(40), jnp.float32)
    run = lanczos(as_matvec(matrix), start, steps=40)
    np.testing.assert_allclose(run.values, np.sort(SPECTRUM), atol=2e-4)
    q = np.asarray(start) / np.linalg.norm(start)
    _, vectors = np.linalg.eigh(matrix)
    np.testing.assert_allclose(run.weights, (vectors.T @ q) ** 2, atol=1e-5)  # the spectral measure of q
    basis = np.asarray(run.basis)
    chex.assert_trees_all_close(basis @ basis.T, np.eye(40), atol=1e-5)
    assert run.trace == pytest.approx(SPECTRUM.sum(), rel=1e-5)


def test_a_few_lanczos_steps_find_the_outliers_and_match_the_moments_of_the_start():
    matrix = symmetric(SPECTRUM)
    start = jnp.asarray(np.random.default_rng(2).standard_normal(40), jnp.float32)
    run = lanczos(as_matvec(matrix), start, steps=8)
    assert len(run.values) == 8
    np.testing.assert_allclose(run.values[::-1][:3], [50.0, 20.0, 8.0], rtol=1e-4)
    q = np.asarray(start) / np.linalg.norm(start)
    for k in range(2 * 8):  # Gauss quadrature with m nodes is exact for moments up to 2m - 1
        expected = q @ np.linalg.matrix_power(matrix, k) @ q
        assert np.sum(run.weights * run.values**k) == pytest.approx(expected, rel=1e-3, abs=1e-4), k


def test_lanczos_stops_where_the_krylov_space_is_invariant():
    matrix = symmetric(np.repeat([3.0, -1.0, 0.5], [10, 5, 15]))  # three distinct eigenvalues
    run = lanczos(as_matvec(matrix), jnp.ones(30), steps=12)
    np.testing.assert_allclose(run.values, [-1.0, 0.5, 3.0], atol=1e-5)
    assert not np.any(np.asarray(run.basis)[3:])  # the rows after the stop stay zero
    assert run.weights.sum() == pytest.approx(1.0)


def test_hutchinson_is_unbiased_and_exact_with_a_complete_deflation():
    matrix = symmetric(SPECTRUM, seed=3)
    matvec, key = as_matvec(matrix), jax.random.key(0)
    trace, error = hutchinson_trace(matvec, 40, 400, key)
    assert abs(trace - SPECTRUM.sum()) < 4 * error and error > 0.1
    complete = lanczos(matvec, jnp.ones(40), steps=40)
    trace, error = hutchinson_trace(matvec, 40, 4, key, complete)
    assert trace == pytest.approx(SPECTRUM.sum(), rel=1e-4) and error < 1e-3
    partial_basis = lanczos(matvec, jnp.ones(40), steps=5)  # the outliers deflated: less variance
    _, deflated_error = hutchinson_trace(matvec, 40, 400, key, partial_basis)
    assert deflated_error < 0.2 * hutchinson_trace(matvec, 40, 400, key)[1]


def test_the_density_integrates_to_one_and_keeps_the_quadrature_moments():
    matrix = symmetric(SPECTRUM, seed=4)
    starts = np.random.default_rng(5).standard_normal((3, 40))
    runs = [lanczos(as_matvec(matrix), jnp.asarray(s, jnp.float32), steps=10) for s in starts]
    sigma = 0.3
    grid, density = spectral_density([r.values for r in runs], [r.weights for r in runs], sigma)
    step = grid[1] - grid[0]
    assert np.sum(density) * step == pytest.approx(1.0, abs=1e-3)
    first = np.mean([np.sum(r.weights * r.values) for r in runs])
    second = np.mean([np.sum(r.weights * r.values**2) for r in runs])
    assert np.sum(grid * density) * step == pytest.approx(first, rel=1e-3)
    assert np.sum(grid**2 * density) * step == pytest.approx(second + sigma**2, rel=1e-3)  # broadening adds sigma^2
    with pytest.raises(ValueError, match="positive"):
        spectral_density([runs[0].values], [runs[0].weights], 0.0)


# --- a tiny ResNet against its exact Hessian ------------------------------------------------------------------


TINY = create_model("resnet8", stage_widths=(2, 2, 2), stem_width=2)  # 292 parameters
init_tiny = jax.jit(partial(TINY.init, train=False))
update_statistics = jax.jit(partial(TINY.apply, train=True, mutable=["batch_stats"]))


def tiny_snapshot(seed: int) -> ModelSnapshot:
    """The tiny resnet8 from ``seed``, its running statistics moved off their initial (0, 1)."""
    images = smooth_images(8, size=6, seed=seed)
    variables = init_tiny(jax.random.key(seed), images)
    _, updates = update_statistics(variables, 2 * images + 0.5)
    return ModelSnapshot("resnet8", TINY, {**variables, **updates})


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelSnapshot, jax.Array, jax.Array, np.ndarray]:
    """The snapshot, a batch and the exact Hessian of its mean cross-entropy (BN in inference mode)."""
    snapshot = tiny_snapshot(0)
    images, labels = smooth_images(12, size=6, seed=7), jnp.arange(12) % 10
    flat, unravel = ravel_pytree(snapshot.variables["params"])

    def loss(theta: jax.Array) -> jax.Array:
        logits, _ = snapshot.model.apply({**snapshot.variables, "params": unravel(theta)}, images, train=False)
        return cross_entropy(logits, labels).mean()

    return snapshot, images, labels, np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64)


def test_hessian_vector_products_are_the_exact_hessian_times_v(tiny):
    snapshot, images, labels, exact = tiny
    hessian = loss_hessian(snapshot.model, snapshot.variables, images, labels, chunk_size=4)
    assert hessian.size == exact.shape[0] == 292
    v = jax.random.normal(jax.random.key(3), (hessian.size,))
    np.testing.assert_allclose(hessian.matvec(v), exact @ np.asarray(v), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="must divide"):
        loss_hessian(snapshot.model, snapshot.variables, images, labels, chunk_size=5)


def test_spectrum_matches_the_exact_eigenvalues_and_trace(tiny):
    snapshot, images, labels, exact = tiny
    eigenvalues = np.linalg.eigvalsh((exact + exact.T) / 2)
    hessian = loss_hessian(snapshot.model, snapshot.variables, images, labels)
    found = spectrum(hessian, steps=60, runs=2, probes=50, top_k=3)
    np.testing.assert_allclose(found["top_eigenvalues"], eigenvalues[::-1][:3], rtol=1e-3)
    assert found["lambda_max"] == pytest.approx(eigenvalues[-1], rel=1e-4)
    assert eigenvalues[0] < 0 and found["lambda_min"] == pytest.approx(eigenvalues[0], rel=0.05)
    assert found["negative_ratio"] == pytest.approx(-eigenvalues[0] / eigenvalues[-1], rel=0.05)
    assert abs(found["trace"] - eigenvalues.sum()) < max(4 * found["trace_stderr"], 1e-3 * np.abs(eigenvalues).sum())
    n = len(eigenvalues)  # the quadrature's mean: tr(H) / n, up to the starts' randomness
    mean = np.mean([np.sum(w * t) for t, w in zip(found["nodes"], found["weights"], strict=True)])
    assert abs(mean - eigenvalues.sum() / n) < 0.25 * np.sqrt(np.sum(eigenvalues**2) / n)


def test_the_quadrature_of_each_start_has_the_moments_of_the_exact_hessian(tiny):
    """q^T H q and q^T H^2 q for the start q: their means over starts are tr(H) / n and tr(H^2) / n."""
    snapshot, images, labels, exact = tiny
    hessian = loss_hessian(snapshot.model, snapshot.variables, images, labels)
    for seed in range(3):
        start = jax.random.normal(jax.random.key(seed), (hessian.size,))
        run = lanczos(hessian.matvec, start, steps=4)
        q = np.asarray(start, np.float64) / np.linalg.norm(start)
        assert np.sum(run.weights * run.values) == pytest.approx(q @ exact @ q, rel=1e-3)
        assert np.sum(run.weights * run.values**2) == pytest.approx(q @ exact @ exact @ q, rel=1e-3)


def test_one_compiled_program_serves_every_product_of_a_model(tiny):
    _, images, labels, _ = tiny
    images, labels = images[:6], labels[:6]  # a batch shape of this test alone: no program of it exists yet
    traced = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == "_hessian_vector_product":
            traced.append(kwargs)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        for seed in (11, 12):  # two sets of weights of one model: two checkpoints of a run
            snapshot = tiny_snapshot(seed)
            spectrum(loss_hessian(snapshot.model, snapshot.variables, images, labels), steps=5, runs=2, probes=3)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(traced) == 1  # 2 x (2 x 5 + 3) products, one trace


def test_analyze_hessian_writes_its_files_and_refuses_bad_settings_first(tmp_path):
    snapshots = [tiny_snapshot(0), tiny_snapshot(1)]
    images, labels = smooth_images(4, size=6, seed=2), jnp.arange(4)
    with pytest.raises(ValueError, match="top_k=9"):
        analyze_hessian(snapshots, images, labels, tmp_path / "bad", steps=5, top_k=9)
    assert not (tmp_path / "bad").exists()
    report = analyze_hessian(snapshots, images, labels, tmp_path / "out", steps=6, runs=2, probes=4, top_k=2)
    written = json.loads((tmp_path / "out" / "hessian.json").read_text())
    assert [s["label"] for s in written["summary"]] == ["resnet8 init", "resnet8 init"]
    for run in report["runs"]:
        grid, density = run["density_grid"], run["density"]
        assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-3)
        assert len(run["top_eigenvalues"]) == 2 and run["lambda_min"] <= run["lambda_max"]
    assert (tmp_path / "out" / "hessian.csv").read_text().count("\n") == 3
    for name in ("hessian_density.png", "hessian_top.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name


def test_analyze_hessian_compares_residual_with_plain_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "idx"
    make_idx_folder(data, compressed=False, num_train=8, num_test=4)
    out = tmp_path / "out"
    args = ["analyze", "hessian", "--model", "resnet8", "--model", "plain8", "--data-dir", str(data)]
    args += ["--examples", "4", "--input-size", "8", "--steps", "4", "--runs", "1", "--probes", "2", "--top-k", "2"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet8 init: lambda_max" in printed and "plain8 init: lambda_max" in printed
    report = json.loads((out / "hessian.json").read_text())
    assert report["settings"]["examples"] == 4 and report["settings"]["lanczos_steps"] == 4
    assert [len(run["top_eigenvalues"]) for run in report["runs"]] == [2, 2]
    assert (out / "hessian_density.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--top-k", "30"], "top_k=30"), (["--chunk-size", "3"], "--chunk-size 3 must divide"), (["--probes", "1"], "2")],
)
def test_analyze_hessian_refuses_bad_settings_before_any_work(tmp_path, capsys, options, message):
    assert main(["analyze", "hessian", "--model", "resnet8", *options, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
