"""Residual networks as ensembles of paths (Veit, Wilber & Belongie 2016, arXiv 1605.06431).

A net of n residual blocks unrolls into 2**n paths from input to output: each block is passed either through
its residual branch F or through its skip, so C(n, k) paths run through k branches and path lengths follow
Binomial(n, 1/2). Every block counts, the downsampling ones included: their skip (the option-A pad or the
projection) is one step of a path like the identity is.

The gradient that paths of length k carry is measured as Veit et al. measure it. The forward pass is the
ordinary one, with BN in inference mode (running statistics: the examples of a batch stay independent and a
checkpoint is measured as it predicts). On the backward pass k random blocks pass the cotangent only through F
and the other n - k only through the skip, and the norm of the gradient of the loss at the input (the images)
is recorded. The gating is data: per block, a_l scales the cotangent that reaches the branch output F and b_l
the one that reaches the skip's value, through an identity whose VJP scales, so no forward value changes.
Gates (1, 1) everywhere give the ordinary gradient; Veit's "through F" is (1, 0), "through the skip" (0, 1).
One compiled program, vmapped over a chunk of gate vectors, serves every k and every sample.

F is the block's ``branch`` submodule and the skip is the value the block's ``_shortcut`` method returns; both
are reached by intercepting their calls (`interception`: flax wraps every method of a module, so the identity
skip, which is no submodule, can be gated too). The model is not changed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.common import (
    ModelSnapshot,
    ProgressLine,
    line_styles,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)
from resnet_jax.analysis.interception import BRANCH, SKIP, Call, intercept
from resnet_jax.train.steps import cross_entropy

# --- the distribution of path lengths ----------------------------------------------------------------------


def path_counts(n: int) -> list[int]:
    """C(n, k) for k = 0..n: how many paths pass through exactly k residual branches (exact; they sum to 2**n)."""
    if n < 0:
        raise ValueError(f"A net has a non-negative number of blocks; got n={n}.")
    return [math.comb(n, k) for k in range(n + 1)]


def path_probabilities(n: int) -> np.ndarray:
    """Binomial(n, 1/2): C(n, k) / 2**n, each the exact ratio of two integers rounded once to float64 (no
    overflow for thousands of blocks; the far tails underflow to 0 as they should)."""
    total = 1 << n
    return np.array([count / total for count in path_counts(n)])


# --- the gated backward pass -------------------------------------------------------------------------------


@jax.custom_vjp
def scale_cotangent(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x`` itself; on the backward pass, the cotangent times ``scale`` (a scalar)."""
    return x


def _scale_forward(x: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, scale


def _scale_backward(scale: jax.Array, cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
    return scale.astype(cotangent.dtype) * cotangent, jnp.zeros_like(scale)


scale_cotangent.defvjp(_scale_forward, _scale_backward)


def gated_loss(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, labels: jax.Array, gates: jax.Array
) -> jax.Array:
    """The mean cross-entropy of ``images`` (BN in inference mode), unchanged; on the backward pass, the
    cotangent reaching block l's branch output is scaled by gates[l, 0] and the one reaching its skip by
    gates[l, 1]. ``gates`` is (blocks, 2), blocks in forward order."""

    def gate_branch(call: Call) -> jax.Array:
        return scale_cotangent(call.run(), gates[call.depth, 0])

    def gate_skip(call: Call) -> jax.Array:
        return scale_cotangent(call.run(), gates[call.depth, 1])

    with intercept({BRANCH: gate_branch, SKIP: gate_skip}) as count:
        logits, _ = model.apply(variables, images, train=False)
    if count.blocks != gates.shape[0]:
        raise ValueError(f"{gates.shape[0]} gate pairs for a model of {count.blocks} blocks; give one per block.")
    return cross_entropy(logits, labels).mean()


def input_gradient(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, labels: jax.Array, gates: jax.Array
) -> jax.Array:
    """dL/d images with the backward pass gated per block (see `gated_loss`)."""
    return jax.grad(lambda x: gated_loss(model, variables, x, labels, gates))(images)


def scaled_norms(values: jax.Array) -> jax.Array:
    """The Frobenius norm of each ``values[i]``, scaled by its largest entry first. Long paths carry gradients
    of 1e-20 and less, whose squares underflow float32 (below about 1e-38) and would read as 0."""
    flat = values.reshape(values.shape[0], -1)
    largest = jnp.max(jnp.abs(flat), axis=1, keepdims=True)
    scale = jnp.where(largest > 0, largest, 1.0)
    return scale[:, 0] * jnp.sqrt(jnp.sum(jnp.square(flat / scale), axis=1))


class PathGradients:
    """||dL/d images|| (Frobenius over the batch) for any number of gate vectors, ``chunk`` at a time.

    One program, compiled once per model and input shape: the gate vectors of a chunk are vmapped over; the
    forward pass does not depend on them and runs once per chunk. ``traces`` counts the compilations.
    """

    def __init__(self, model: nn.Module, chunk: int = 32) -> None:
        if not getattr(model, "skip_connections", True):
            raise ValueError(
                f"{type(model).__name__} with skip_connections=False is a plain net: without skips it is a single "
                "path, so it has no paths analysis. Analyse a residual model (e.g. resnet20 rather than plain20)."
            )
        self.model, self.chunk = model, chunk
        self.traces = 0
        self._program = jax.jit(self._norms)

    def _norms(self, variables: dict[str, Any], images: jax.Array, labels: jax.Array, gates: jax.Array) -> jax.Array:
        self.traces += 1
        gradients = jax.vmap(partial(input_gradient, self.model, variables, images, labels))(gates)
        return scaled_norms(gradients)

    def __call__(
        self,
        variables: dict[str, Any],
        images: jax.Array,
        labels: jax.Array,
        gates: np.ndarray,
        batch_size: int,
        rng: np.random.Generator,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """The gradient norm for each gate vector of ``gates`` (S, blocks, 2); each chunk measures on its own
        random batch of ``batch_size`` of the ``images`` (the last chunk is padded with repeats). ``progress``
        hears how many are measured after each chunk."""
        norms = np.empty(len(gates))
        for start in range(0, len(gates), self.chunk):
            part = gates[start : start + self.chunk]
            padded = np.concatenate([part, np.repeat(part[-1:], self.chunk - len(part), axis=0)])
            batch = np.sort(rng.choice(len(images), batch_size, replace=False))
            result = self._program(variables, images[batch], labels[batch], jnp.asarray(padded, jnp.float32))
            norms[start : start + len(part)] = np.asarray(result)[: len(part)]
            if progress is not None:
                progress(start + len(part))
        return norms


def sample_gates(n: int, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` gate vectors for each path length k = 0..n, shuffled together: k blocks drawn at random pass
    only through F (1, 0), the others only through the skip (0, 1). Returns gates (S, n, 2) and lengths (S,)."""
    lengths = np.repeat(np.arange(n + 1), samples)
    through_branch = rng.random((len(lengths), n)).argsort(axis=1) < lengths[:, None]  # k random blocks per row
    gates = np.stack([through_branch, ~through_branch], axis=-1).astype(np.float32)
    order = rng.permutation(len(lengths))  # every batch then serves every length alike
    return gates[order], lengths[order]


# --- what the measurements say -----------------------------------------------------------------------------


def effective_range(shares: np.ndarray, fraction: float = 0.9) -> tuple[int, int]:
    """The central path lengths [lo, hi] that carry at least ``fraction`` of the gradient: the lengths below lo
    and those above hi each hold at most (1 - fraction) / 2 of it."""
    tail, slack = (1.0 - fraction) / 2, 1e-12  # slack: round-off in the cumulative sums
    cumulative = np.cumsum(shares) / np.sum(shares)
    lo = int(np.searchsorted(cumulative, tail + slack, side="right"))
    hi = int(np.searchsorted(cumulative, 1.0 - tail - slack, side="left"))
    return lo, min(hi, len(shares) - 1)


def summarize_lengths(n: int, lengths: np.ndarray, norms: np.ndarray, fraction: float) -> dict[str, Any]:
    """Per path length: the count and probability of paths, E||g_k|| and its spread, the contribution
    C(n, k) E||g_k|| (as log10 and as a share of the total); the effective range, the expected length under
    that weighting, and the factor by which one more branch on a path scales the gradient (fit of log E||g_k||)."""
    counts, probabilities = path_counts(n), path_probabilities(n)
    means = np.array([norms[lengths == k].mean() for k in range(n + 1)])
    with np.errstate(divide="ignore"):  # a gradient that underflowed to 0 carries no share
        log_means = np.log(means)
    log_contribution = np.array([math.log(c) for c in counts]) + log_means  # C(n, k) overflows float64 at n ~ 1030
    shares = np.exp(log_contribution - log_contribution.max())
    shares /= shares.sum()
    measured = means > 0
    rows = [
        {
            "length": k,
            "paths": counts[k],
            "probability": float(probabilities[k]),
            "samples": int(np.sum(lengths == k)),
            "grad_mean": float(means[k]),
            "grad_std": float(norms[lengths == k].std()),
            "log10_contribution": float(log_contribution[k] / math.log(10)) if measured[k] else None,
            "share": float(shares[k]),
        }
        for k in range(n + 1)
    ]
    fit = np.flatnonzero(measured)
    slope = np.polyfit(fit, log_means[fit], 1)[0] if len(fit) > 1 else np.nan
    lo, hi = effective_range(shares, fraction)
    return {
        "lengths": rows,
        "effective_range": [lo, hi],
        "fraction": fraction,
        "expected_length": float(np.dot(np.arange(n + 1), shares)),
        "mean_path_length": n / 2,
        "paths_in_range": float(np.sum(probabilities[lo : hi + 1])),  # the share of all 2**n paths it holds
        "gain_per_branch": float(np.exp(slope)),
    }


# --- the whole analysis and its files ----------------------------------------------------------------------


def check_path_settings(samples: int, batch_size: int, images: int, chunk: int, fraction: float) -> None:
    """Reject impossible settings, naming the option to change, before any data is loaded or compiled."""
    if samples < 1:
        raise ValueError(f"samples={samples} (--samples): take at least one measurement per path length.")
    if not 1 <= batch_size <= images:
        raise ValueError(
            f"batch_size={batch_size} (--batch-size): choose between 1 and the {images} images (--examples)."
        )
    if chunk < 1:
        raise ValueError(f"chunk={chunk} (--chunk): measure at least one gate vector per call.")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} (--fraction): the share of the gradient must be in (0, 1].")


SUMMARY_KEYS = ("blocks", "effective_range", "expected_length", "mean_path_length", "paths_in_range", "gain_per_branch")


def snapshot_paths(
    snapshot: ModelSnapshot,
    measure: Callable[..., np.ndarray],
    images: jax.Array,
    labels: jax.Array,
    samples: int,
    fraction: float,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One snapshot's part of `analyze_paths`: ``samples`` gate vectors per path length, their gradient norms by
    ``measure`` (a `PathGradients` with its batch size and random batches set), and what they say."""
    began = time.perf_counter()
    n = _count_blocks(snapshot.model, snapshot.variables, images)
    gates, lengths = sample_gates(n, samples, rng)
    line = ProgressLine(f"paths {snapshot.label}", len(gates), "measurements")
    norms = measure(snapshot.variables, images, labels, gates, progress=line.update)
    return {
        **snapshot.report_fields(),
        "blocks": n,
        **summarize_lengths(n, lengths, norms, fraction),
        "seconds": time.perf_counter() - began,
    }


def analyze_paths(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    out: str | Path,
    *,
    samples: int = 1000,
    batch_size: int = 32,
    chunk: int = 32,
    fraction: float = 0.9,
    seed: int = 0,
) -> dict[str, Any]:
    """Path-length distribution and gradient by path length of every residual snapshot (plain ones are listed
    under ``skipped``): ``samples`` measurements per length, each on a random batch of ``batch_size`` of the
    ``images``. Writes paths.json, paths.csv and paths.png to ``out`` and returns the JSON's content."""
    check_path_settings(samples, batch_size, len(images), chunk, fraction)
    residual = [s for s in snapshots if getattr(s.model, "skip_connections", True)]
    skipped = [s for s in snapshots if not getattr(s.model, "skip_connections", True)]
    if not residual:
        raise ValueError("Only plain nets given: they have no skips, hence no paths. Add a residual model.")
    out = Path(out)
    reports = []
    programs: dict[nn.Module, PathGradients] = {}
    for index, snapshot in enumerate(residual):
        if snapshot.model not in programs:  # checkpoints of one model share its program
            programs[snapshot.model] = PathGradients(snapshot.model, chunk)
        rng = np.random.default_rng([seed, index])
        measure = partial(programs[snapshot.model], batch_size=batch_size, rng=rng)
        reports.append(snapshot_paths(snapshot, measure, images, labels, samples, fraction, rng))
    files = [out / "paths.json", out / "paths.csv", out / "paths.png"]
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "images": len(images),
            "batch_size": batch_size,
            "samples_per_length": samples,
            "fraction": fraction,
            "seed": seed,
            "forward": "BN in inference mode (running statistics)",
            "gradient": "||dL/d images||, Frobenius over the batch, L = mean cross-entropy",
        },
        "summary": {r["label"]: {key: r[key] for key in SUMMARY_KEYS} for r in reports},
        "skipped": {s.label: "plain net: no skips, no paths" for s in skipped},
        "models": reports,
        "files": [str(path) for path in files],
    }
    write_json(files[0], report)
    write_csv(files[1], [{"model": r["label"], **row} for r in reports for row in r["lengths"]])
    plot_paths(reports, files[2])
    return report


def _count_blocks(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> int:
    """The number of residual blocks the model calls (shapes only: nothing is computed)."""
    with intercept({}) as count:
        jax.eval_shape(partial(model.apply, train=False), variables, images[:1])
    return count.blocks


def plot_paths(reports: list[dict[str, Any]], path: Path) -> Path:
    """(a) the distribution of path lengths, (b) E||g_k|| against k (log), (c) the share of the gradient that
    paths of each length carry, C(n, k) E||g_k|| normalised, with the effective range shaded (Veit et al. Fig. 6)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for report, style in zip(reports, line_styles(reports), strict=True):
        rows = report["lengths"]
        k = [row["length"] for row in rows]
        axes[0].plot(k, [row["probability"] for row in rows], ".-", **style)
        axes[1].plot(k, [row["grad_mean"] for row in rows], ".-", **style)
        axes[2].plot(k, [row["share"] for row in rows], ".-", **style)
        lo, hi = report["effective_range"]
        axes[2].axvspan(lo - 0.5, hi + 0.5, color=style["color"], alpha=0.12)
    titles = (
        "(a) distribution of path lengths",
        "(b) gradient magnitude of one path, E||g_k||",
        f"(c) share of the gradient, C(n,k) E||g_k||; {reports[0]['fraction']:.0%} range shaded",
    )
    for ax, title, ylabel in zip(axes, titles, ("fraction of paths", "||dL/d input||", "share"), strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("path length k (residual branches passed)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    axes[1].set_yscale("log")
    return save_figure(fig, path, "Residual networks as ensembles of paths: gradient by path length")
