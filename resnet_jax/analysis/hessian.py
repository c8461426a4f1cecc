"""Curvature of the loss: the Hessian's extreme eigenvalues, its trace and its eigenvalue density.

H is the Hessian of the mean cross-entropy of one fixed batch with respect to all parameters (flattened to
one vector of n entries), with BN in inference mode: with running statistics every example's loss depends
on its own image only, and H is the curvature of the function the net computes at test time (with batch
statistics it would be that of a function of the whole batch, which changes with the batch). The running
statistics stay fixed. Weight decay is not part of the loss: an L2 term (wd / 2) ||theta||^2 adds wd to
the curvature along the decayed parameters. H is never formed: `LossHessian` computes H v by forward-over-
reverse differentiation (the JVP of the gradient), about the cost of one forward and backward pass more than
a gradient, in one compiled program per model and batch shape that every estimator below reuses.

- Extreme eigenvalues: Lanczos (Lanczos 1950) with full reorthogonalisation. Its Ritz values converge
  first at both ends of the spectrum: the largest eigenvalues and the most negative one.
- Trace: Hutchinson's estimator tr(H) = E[v^T H v] over Rademacher probes v (Hutchinson 1989), with the
  probes deflated by the Lanczos basis Q and tr(Q^T H Q) counted exactly (as in Hutch++): the few large
  outlier eigenvalues of a net's Hessian would otherwise dominate the estimator's variance.
- Density: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Lin, Saad & Yang 2016). m Lanczos
  steps from a random unit vector q give a Gauss quadrature of the spectral measure sum_i (q . u_i)^2
  delta(lambda_i), whose expectation is the eigenvalue density of H: nodes the Ritz values, weights the
  squared first components of the eigenvectors of the tridiagonal matrix. Averaged over a few starts and
  broadened by a Gaussian, it is a smooth density whose first 2m - 1 moments are those of H for each start.
- |lambda_min| / lambda_max: how much negative curvature there is against the sharpest direction (Li et al.
  2018 map it over their loss surfaces; Ghorbani et al. follow the negative mass along training).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from resnet_jax.analysis.common import ModelSnapshot, line_styles, pyplot, save_figure, write_csv, write_json
from resnet_jax.train.steps import cross_entropy

# A Lanczos vector that keeps less than this share of its norm after orthogonalisation against the earlier ones
# is round-off: the Krylov space holds (to float32 precision) an invariant subspace, and the iteration stops.
BREAKDOWN = 1e-4
DENSITY_POINTS = 1000


# --- H v ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossHessian:
    """H v for the mean cross-entropy of one fixed batch (BN in inference mode) as a function of all parameters,
    on flat vectors of `size` entries; build it with `loss_hessian`."""

    model: nn.Module
    variables: dict[str, Any]
    images: jax.Array  # (chunks, chunk_size, H, W, C): the batch, in chunks evaluated one after the other
    labels: jax.Array  # (chunks, chunk_size)
    size: int  # n, the number of parameters

    def matvec(self, vector: jax.Array) -> jax.Array:
        """H v for a flat vector v of `size` float32 entries (the parameters' order of ``ravel_pytree``): the mean
        over chunks of each chunk's H v, one call of the compiled program per chunk. (A loop over the chunks
        inside the program, ``lax.map``, made XLA:CPU's forward-over-reverse product several times slower, even
        over a single chunk.)"""
        products = [
            _hessian_vector_product(self.model, self.variables, images, labels, vector)
            for images, labels in zip(self.images, self.labels, strict=True)
        ]
        return sum(products[1:], products[0]) / len(products)


def loss_hessian(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    labels: jax.Array,
    chunk_size: int | None = None,
) -> LossHessian:
    """The `LossHessian` of ``model`` with ``variables`` on the batch (``images``, ``labels``); ``chunk_size``
    images at a time (all at once by default): the mean over equal chunks of each chunk's mean loss is the
    batch's mean loss, and the memory of one H v is that of its chunk."""
    count = len(images)
    chunk_size = chunk_size or count
    if not 1 <= chunk_size <= count or count % chunk_size:
        raise ValueError(f"chunk_size={chunk_size} must divide the {count} images of the batch.")
    size = ravel_pytree(variables["params"])[0].size
    chunks = (count // chunk_size, chunk_size)
    return LossHessian(model, variables, images.reshape(*chunks, *images.shape[1:]), labels.reshape(chunks), int(size))


@partial(jax.jit, static_argnums=0)
def _hessian_vector_product(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, labels: jax.Array, vector: jax.Array
) -> jax.Array:
    flat, unravel = ravel_pytree(variables["params"])

    def loss(theta: jax.Array) -> jax.Array:
        logits, _ = model.apply({**variables, "params": unravel(theta)}, images, train=False)
        return cross_entropy(logits, labels).mean()

    return jax.jvp(jax.grad(loss), (flat,), (vector.astype(flat.dtype),))[1]


# --- Lanczos --------------------------------------------------------------------------------------------------


class Lanczos(NamedTuple):
    """What m steps of `lanczos` learn about a symmetric H from one starting vector q."""

    values: np.ndarray  # (m,) Ritz values, ascending: the eigenvalues of the tridiagonal T = Q^T H Q
    weights: np.ndarray  # (m,) squared first components of T's eigenvectors: the quadrature weights, sum 1
    basis: jax.Array  # (steps, n) orthonormal rows q_0 = q, q_1, ...; zero rows after an early stop
    trace: float  # tr(Q^T H Q): the part of tr(H) in the span of the basis


def lanczos(matvec: Callable[[jax.Array], jax.Array], start: jax.Array, steps: int) -> Lanczos:
    """``steps`` Lanczos steps on the symmetric map ``matvec`` from ``start`` (n,), every new vector
    orthogonalised (twice) against all earlier ones, so that the Ritz values are those of an orthonormal basis
    even in float32. Stops early where the Krylov space is invariant (see BREAKDOWN)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: take at least one Lanczos step.")
    basis = jnp.zeros((steps, start.size), jnp.float32)
    q = (start / jnp.linalg.norm(start)).astype(jnp.float32)
    alphas: list[float] = []
    betas: list[float] = []
    for i in range(steps):
        basis, alpha, w, kept = _lanczos_step(basis, i, q, matvec(q))
        alphas.append(float(alpha))
        beta = float(jnp.linalg.norm(w))
        if i == steps - 1 or float(kept) < BREAKDOWN:
            break
        betas.append(beta)
        q = w / beta
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    values, vectors = np.linalg.eigh(tridiagonal)
    return Lanczos(values, vectors[0] ** 2, basis, float(np.sum(alphas)))


@partial(jax.jit, donate_argnums=0)
def _lanczos_step(
    basis: jax.Array, index: int, q: jax.Array, hq: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Store q as row ``index``; alpha = q . Hq; Hq orthogonalised twice against every row (q and the earlier
    ones: the three-term recurrence and the reorthogonalisation in one); the share of its norm that is left."""
    basis = jax.lax.dynamic_update_index_in_dim(basis, q, index, 0)
    w = hq
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    kept = jnp.linalg.norm(w) / jnp.maximum(jnp.linalg.norm(hq), jnp.finfo(jnp.float32).tiny)
    return basis, q @ hq, w, kept


# --- estimators -----------------------------------------------------------------------------------------------


def hutchinson_trace(
    matvec: Callable[[jax.Array], jax.Array], size: int, probes: int, key: jax.Array, krylov: Lanczos | None = None
) -> tuple[float, float]:
    """tr(H) and its standard error from ``probes`` Rademacher probes v: the mean of v^T H v; with a `Lanczos`
    run, the probes deflated by its basis Q and tr(Q^T H Q) added, which is unbiased still."""
    if probes < 2:
        raise ValueError(f"probes={probes}: use at least 2 Hutchinson probes (the standard error needs two).")
    samples = []
    for probe_key in jax.random.split(key, probes):
        v = jax.random.rademacher(probe_key, (size,), jnp.float32)
        if krylov is not None:
            v = _deflate(krylov.basis, v)
        samples.append(float(v @ matvec(v)))
    captured = krylov.trace if krylov is not None else 0.0
    return captured + float(np.mean(samples)), float(np.std(samples, ddof=1) / np.sqrt(probes))


@jax.jit
def _deflate(basis: jax.Array, v: jax.Array) -> jax.Array:
    return v - basis.T @ (basis @ v)


def spectral_density(
    nodes: Sequence[np.ndarray], weights: Sequence[np.ndarray], sigma: float, points: int = DENSITY_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """The eigenvalue density of stochastic Lanczos quadrature on a grid: the mean over runs of
    sum_k w_k N(t; theta_k, sigma^2), with the ``nodes`` theta and ``weights`` w of each `Lanczos` run, over the
    nodes' range and 5 sigma either side (so that it integrates to 1 on the grid). Returns (grid, density)."""
    if sigma <= 0:
        raise ValueError(f"sigma={sigma}: the Gaussian broadening must be positive.")
    theta = np.concatenate(nodes)
    w = np.concatenate(weights) / len(weights)
    grid = np.linspace(theta.min() - 5 * sigma, theta.max() + 5 * sigma, points)
    gaussians = np.exp(-0.5 * ((grid[:, None] - theta[None, :]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    return grid, gaussians @ w


def spectrum(
    hessian: LossHessian, *, steps: int = 30, runs: int = 2, probes: int = 20, top_k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Top eigenvalues, extremes, trace and quadrature of one `LossHessian`: ``runs`` Lanczos runs of ``steps``
    from Gaussian starts (the first one's Ritz values give the top eigenvalues and deflate the ``probes``
    Hutchinson probes); runs * steps + probes products H v in all."""
    check_settings(steps, runs, probes, top_k)
    if steps > hessian.size:
        raise ValueError(f"steps={steps} for a Hessian of size {hessian.size}: take at most {hessian.size}.")
    start_key, probe_key = jax.random.split(jax.random.key(seed))
    starts = jax.random.normal(start_key, (runs, hessian.size), jnp.float32)
    krylov = [lanczos(hessian.matvec, start, steps) for start in starts]
    trace, error = hutchinson_trace(hessian.matvec, hessian.size, probes, probe_key, krylov[0])
    largest = max(run.values[-1] for run in krylov)
    smallest = min(run.values[0] for run in krylov)
    return {
        "parameters": hessian.size,
        "top_eigenvalues": krylov[0].values[::-1][:top_k],
        "lambda_max": float(largest),
        "lambda_min": float(smallest),
        # |lambda_min| / lambda_max; 0 when the Ritz values show no negative curvature
        "negative_ratio": float(max(-smallest, 0.0) / largest) if largest > 0 else None,
        "trace": trace,
        "trace_stderr": error,
        "lanczos_steps": [len(run.values) for run in krylov],  # fewer than steps: an invariant Krylov space
        "nodes": [run.values for run in krylov],
        "weights": [run.weights for run in krylov],
    }


def check_settings(steps: int, runs: int, probes: int, top_k: int) -> None:
    """Refuse settings the estimators cannot use, before anything compiles."""
    if not 1 <= top_k <= steps:
        raise ValueError(f"top_k={top_k} must be between 1 and the number of Lanczos steps, steps={steps}.")
    if runs < 1:
        raise ValueError(f"runs={runs}: the density needs at least one Lanczos run.")
    if probes < 2:
        raise ValueError(f"probes={probes}: use at least 2 Hutchinson probes (the standard error needs two).")


# --- the analysis ---------------------------------------------------------------------------------------------

SUMMARY_KEYS = ("lambda_max", "lambda_min", "negative_ratio", "trace", "trace_stderr")


def analyze_hessian(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    out: str | Path,
    *,
    steps: int = 30,
    runs: int = 2,
    probes: int = 20,
    top_k: int = 5,
    seed: int = 0,
    chunk_size: int | None = None,
    broadening: float = 0.01,
) -> dict[str, Any]:
    """`spectrum` of every snapshot's loss Hessian on one batch (the same starts and probes for all), its density
    broadened by ``broadening`` times the widest spectral range of all snapshots (one sigma, so that densities
    compare); writes hessian.json, hessian.csv, hessian_density.png and hessian_top.png to ``out``."""
    check_settings(steps, runs, probes, top_k)  # before anything compiles
    if broadening <= 0:
        raise ValueError(f"broadening={broadening}: the density's Gaussian width must be positive.")
    out = Path(out)
    reports = []
    for snapshot in snapshots:
        began = time.perf_counter()
        hessian = loss_hessian(snapshot.model, snapshot.variables, images, labels, chunk_size)
        found = spectrum(hessian, steps=steps, runs=runs, probes=probes, top_k=top_k, seed=seed)
        reports.append({**snapshot.report_fields(), **found, "seconds": time.perf_counter() - began})
    sigma = broadening * max(max(r["lambda_max"] - r["lambda_min"] for r in reports), np.finfo(np.float32).eps)
    for report in reports:
        report["density_grid"], report["density"] = spectral_density(report["nodes"], report["weights"], sigma)
    result = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "loss": "mean cross-entropy of one fixed batch, BN in inference mode, no weight decay",
            "hessian_vector_product": "forward-over-reverse (jvp of grad), all parameters flattened",
            **{"lanczos_steps": steps, "lanczos_runs": runs, "hutchinson_probes": probes, "top_k": top_k},
            "seed": seed,
            "density": f"stochastic Lanczos quadrature, Gaussian sigma {sigma:.4g} (broadening {broadening} of the "
            "widest spectral range)",
        },
        "summary": [{"label": r["label"], **{key: r[key] for key in SUMMARY_KEYS}} for r in reports],
        "runs": reports,
    }
    files = [
        write_json(out / "hessian.json", result),
        write_csv(out / "hessian.csv", result["summary"]),
        plot_density(reports, out / "hessian_density.png"),
        plot_top_eigenvalues(reports, out / "hessian_top.png"),
    ]
    return {**result, "files": [str(path) for path in files]}


def plot_density(reports: list[dict[str, Any]], path: Path) -> Path:
    """The eigenvalue densities on a log scale (Ghorbani et al. 2019, Fig. 1), one curve per snapshot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for report, style in zip(reports, line_styles(reports), strict=True):
        floor = report["density"].max() * 1e-8  # the Gaussians' tails underflow far from every node
        ax.plot(report["density_grid"], np.maximum(report["density"], floor), **style)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue of the loss Hessian")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, "Hessian eigenvalue density (stochastic Lanczos quadrature)")


def plot_top_eigenvalues(reports: list[dict[str, Any]], path: Path) -> Path:
    """The top eigenvalues by rank (left) and |lambda_min| / lambda_max (right), one colour per model."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for index, (report, style) in enumerate(zip(reports, line_styles(reports), strict=True)):
        top = report["top_eigenvalues"]
        axes[0].plot(np.arange(1, len(top) + 1), top, ".-", **style)
        axes[1].bar(index, report["negative_ratio"] or 0.0, color=style["color"], alpha=style["alpha"])
    axes[0].set_xlabel("rank")
    axes[0].set_ylabel("eigenvalue")
    axes[0].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xticks(range(len(reports)), [r["label"] for r in reports], rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("|lambda_min| / lambda_max")
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "Top Hessian eigenvalues (Lanczos) and negative curvature")
