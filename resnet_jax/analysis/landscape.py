"""Loss landscapes (Li et al. 2018): the loss on a line and a plane through the weights, residual against plain.

Two random directions d1, d2 in parameter space, each filter-normalised: for every tensor of rank > 1
(conv kernels HWIO, dense kernels (in, out): in Flax the filter is the LAST axis) a Gaussian draw is
rescaled filter by filter to the Frobenius norm of the same filter of the weights. BN makes the scale
of a filter arbitrary; normalising per filter makes a step of 1 mean the same for every layer and every
net, so that surfaces of different nets compare. Rank-1 tensors (biases, BN scale and offset) get
direction zero (Li et al.'s "ignore biases and BN"), and the BN running statistics stay the weights'.
L(theta + a d1 + b d2), mean cross-entropy with BN in inference mode and no augmentation, is evaluated
on one fixed batch of real images at every point of an odd grid over [-1, 1]^2 (the weights at its
centre; the 1-D curve is its b = 0 row) by ONE compiled program: lax.map over the points, one point per
step by default, called on 64 points at a time so that a grid of hours shows its progress. Vectorising a
chunk of points (vmap over the weights) turns every conv into a grouped conv, which costs XLA:CPU several
times the compute of a loop over the points, so chunks > 1 are for accelerators, where they may pay.

Two numbers per surface, both defined on any grid:
- basin_fraction: share of the plane's grid where the loss is below chance, log(classes), i.e. where
  the net still beats uniform guessing: how wide the basin around the weights is.
- nonconvex_fraction: share of the interior grid points where the Hessian of the 2-D surface (central
  differences) has a markedly negative eigenvalue, lambda_min < 0 with |lambda_min| > 5% of the larger
  magnitude: the 2-D counterpart of Li et al.'s |lambda_min / lambda_max| maps. Non-convexity in a
  plane implies non-convexity of the loss; convexity in a plane does not imply the converse.
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
from resnet_jax.train.steps import cross_entropy

NONCONVEX_RATIO = 0.05  # |lambda_min| / max |lambda| above which a negative curvature counts
CLIP_LOSS = 10.0  # the plots draw larger losses at this value (Li et al. contour up to 10)


def filter_norms(tensor: jax.Array) -> jax.Array:
    """The Frobenius norm of every filter (slice along the last axis), shaped to broadcast against ``tensor``."""
    return jnp.sqrt(jnp.sum(jnp.square(tensor), axis=tuple(range(tensor.ndim - 1)), keepdims=True))


def filter_normalized_direction(params: Any, key: jax.Array) -> Any:
    """A random direction shaped like ``params``: Gaussian, each filter of a tensor of rank > 1 rescaled to the
    norm of the same filter of the weights; rank-1 tensors (biases, BN scale and offset) zero."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [_direction(w, k) for w, k in zip(leaves, keys, strict=True)])


def _direction(weights: jax.Array, key: jax.Array) -> jax.Array:
    if weights.ndim <= 1:
        return jnp.zeros_like(weights)
    draw = jax.random.normal(key, weights.shape, weights.dtype)
    return draw * filter_norms(weights) / filter_norms(draw)


@jax.jit
def random_directions(params: Any, seed: int) -> tuple[Any, Any]:
    """The two directions (d1, d2) of the plane, drawn from ``seed`` (compiled: one small program per
    parameter structure instead of one per tensor shape)."""
    first, second = jax.random.split(jax.random.key(seed))
    return filter_normalized_direction(params, first), filter_normalized_direction(params, second)


def grid_axis(resolution: int) -> np.ndarray:
    """``resolution`` evenly spaced steps over [-1, 1]; odd, so that 0 (the weights themselves) is one of them."""
    if resolution < 3 or resolution % 2 == 0:
        raise ValueError(
            f"resolution={resolution}: use an odd number >= 3 (e.g. 21, steps of 0.1), so that the weights "
            "(0, 0) are a grid point."
        )
    return np.linspace(-1.0, 1.0, resolution)


# Points per call of the compiled grid program (rounded up to whole chunks): each call is one progress update,
# and every call has the same shape, so one program serves the whole grid.
POINTS_PER_CALL = 64


def grid_metrics(
    model: nn.Module,
    variables: dict[str, Any],
    directions: tuple[Any, Any],
    points: np.ndarray,
    images: jax.Array,
    labels: jax.Array,
    chunk: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean cross-entropy and accuracy (BN in inference mode) at theta + a d1 + b d2 for every row (a, b) of
    ``points``, ``chunk`` points at a time, by one compiled program; ``progress`` hears how many points are done."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: evaluate at least one grid point at a time.")
    count = len(points)
    chunk = min(chunk, count)
    per_call = min(-(-POINTS_PER_CALL // chunk), -(-count // chunk)) * chunk
    # The points are padded to whole calls: a remainder would trace (and compile) the model a second time.
    padded = np.concatenate([points, np.repeat(points[-1:], -count % per_call, axis=0)]).astype(np.float32)
    losses, accuracies = [], []
    for start in range(0, len(padded), per_call):
        part = padded[start : start + per_call]
        loss, accuracy = _grid_metrics(model, chunk, variables, directions, part, images, labels)
        losses.append(np.asarray(loss))
        accuracies.append(np.asarray(accuracy))
        if progress is not None:
            progress(min(start + per_call, count))
    return np.concatenate(losses)[:count], np.concatenate(accuracies)[:count]


@partial(jax.jit, static_argnums=(0, 1))
def _grid_metrics(
    model: nn.Module,
    chunk: int,
    variables: dict[str, Any],
    directions: tuple[Any, Any],
    points: jax.Array,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    first, second = directions

    def metrics_at(point: jax.Array) -> tuple[jax.Array, jax.Array]:
        a, b = point[0], point[1]
        params = jax.tree.map(lambda w, u, v: w + a * u + b * v, variables["params"], first, second)
        logits, _ = model.apply({**variables, "params": params}, images, train=False)
        return cross_entropy(logits, labels).mean(), jnp.mean(jnp.argmax(logits, -1) == labels)

    return jax.lax.map(metrics_at, points, batch_size=chunk)


def basin_fraction(loss: np.ndarray, num_classes: int) -> float:
    """Share of the grid where the loss is below that of uniform guessing, log(num_classes)."""
    return float(np.mean(loss < math.log(num_classes)))


def nonconvex_fraction(loss: np.ndarray, step: float) -> float:
    """Share of the interior points of the 2-D grid ``loss[i, j]`` (spacing ``step``) where the central-difference
    Hessian has a negative eigenvalue larger than NONCONVEX_RATIO of its largest magnitude."""
    centre = loss[1:-1, 1:-1]
    aa = (loss[2:, 1:-1] - 2 * centre + loss[:-2, 1:-1]) / step**2
    bb = (loss[1:-1, 2:] - 2 * centre + loss[1:-1, :-2]) / step**2
    ab = (loss[2:, 2:] - loss[2:, :-2] - loss[:-2, 2:] + loss[:-2, :-2]) / (4 * step**2)
    mean, radius = (aa + bb) / 2, np.sqrt(((aa - bb) / 2) ** 2 + ab**2)
    low, high = mean - radius, mean + radius
    largest = np.maximum(np.abs(low), np.abs(high))
    return float(np.mean((low < 0) & (np.abs(low) > NONCONVEX_RATIO * largest)))


def landscape(
    snapshot: ModelSnapshot, images: jax.Array, labels: jax.Array, resolution: int = 21, seed: int = 0, chunk: int = 1
) -> dict[str, Any]:
    """The 2-D grid of loss and accuracy of one snapshot, its 1-D curve (the b = 0 row) and its summary numbers."""
    axis = grid_axis(resolution)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    points = np.stack([a.ravel(), b.ravel()], axis=-1)
    began = time.perf_counter()
    directions = random_directions(snapshot.variables["params"], seed)
    line = ProgressLine(f"landscape {snapshot.label}", len(points), "points")
    loss, accuracy = grid_metrics(
        snapshot.model, snapshot.variables, directions, points, images, labels, chunk, line.update
    )
    seconds = time.perf_counter() - began
    loss, accuracy = loss.reshape(resolution, resolution), accuracy.reshape(resolution, resolution)
    middle = resolution // 2
    return {
        **snapshot.report_fields(),
        "center_loss": float(loss[middle, middle]),
        "center_accuracy": float(accuracy[middle, middle]),
        "min_loss": float(loss.min()),
        "max_loss": float(loss.max()),
        "basin_fraction": basin_fraction(loss, snapshot.model.num_classes),
        "nonconvex_fraction": nonconvex_fraction(loss, float(axis[1] - axis[0])),
        "seconds": seconds,
        "axis": axis,
        "loss_1d": loss[:, middle],
        "accuracy_1d": accuracy[:, middle],
        "loss": loss,  # loss[i, j] at (axis[i], axis[j])
        "accuracy": accuracy,
    }


SUMMARY_KEYS = ("center_loss", "center_accuracy", "max_loss", "basin_fraction", "nonconvex_fraction")


def analyze_landscape(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    out: str | Path,
    *,
    resolution: int = 21,
    seed: int = 0,
    chunk: int = 1,
) -> dict[str, Any]:
    """`landscape` of every snapshot along the same seed's directions; writes landscape.json, landscape.csv,
    landscape_1d.png, landscape_contour.png and landscape_surface.png to ``out`` and returns the JSON's content
    with the files written."""
    grid_axis(resolution)  # a bad grid fails before anything compiles
    out = Path(out)
    runs = [landscape(snapshot, images, labels, resolution, seed, chunk) for snapshot in snapshots]
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "resolution": resolution,
            "seed": seed,
            "directions": "Gaussian, filter-normalised (last axis); rank-1 tensors zero; BN statistics unchanged",
            "loss": "mean cross-entropy, BN in inference mode",
            "basin_fraction": "share of the 2-D grid with loss < log(classes)",
            "nonconvex_fraction": f"share of interior points with lambda_min < 0, |lambda_min| > {NONCONVEX_RATIO} "
            "max |lambda| (central-difference Hessian of the 2-D surface)",
        },
        "summary": [{"label": run["label"], **{key: run[key] for key in SUMMARY_KEYS}} for run in runs],
        "runs": runs,
    }
    files = [
        write_json(out / "landscape.json", report),
        write_csv(out / "landscape.csv", [row for run in runs for row in _csv_rows(run)]),
        plot_curves(runs, out / "landscape_1d.png"),
        plot_contours(runs, out / "landscape_contour.png"),
        plot_surfaces(runs, out / "landscape_surface.png"),
    ]
    return {**report, "files": [str(path) for path in files]}


def _csv_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    axis = run["axis"]
    return [
        {"label": run["label"], "alpha": a, "beta": b, "loss": run["loss"][i, j], "accuracy": run["accuracy"][i, j]}
        for i, a in enumerate(axis)
        for j, b in enumerate(axis)
    ]


def plot_curves(runs: list[dict[str, Any]], path: Path) -> Path:
    """Loss (log scale) and accuracy along d1, one curve per snapshot."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run, style in zip(runs, line_styles(runs), strict=True):
        axes[0].plot(run["axis"], run["loss_1d"], ".-", **style)
        axes[1].plot(run["axis"], run["accuracy_1d"], ".-", **style)
    for ax, ylabel in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("alpha (theta + alpha d1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    return save_figure(fig, path, "Loss along a filter-normalised random direction")


def _clipped(runs: list[dict[str, Any]]) -> tuple[list[np.ndarray], np.ndarray]:
    """Every surface clipped at CLIP_LOSS, and contour levels shared by all of them."""
    surfaces = [np.minimum(run["loss"], CLIP_LOSS) for run in runs]
    low, high = min(s.min() for s in surfaces), max(s.max() for s in surfaces)
    return surfaces, np.linspace(low, max(high, low + 1e-6), 25)


def plot_contours(runs: list[dict[str, Any]], path: Path) -> Path:
    """Loss contours on the plane, one panel per snapshot side by side, on the same levels."""
    plt = pyplot()
    surfaces, levels = _clipped(runs)
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.6), squeeze=False)
    for ax, run, surface in zip(axes[0], runs, surfaces, strict=True):
        lines = ax.contour(run["axis"], run["axis"], surface.T, levels=levels, cmap="viridis", linewidths=0.8)
        ax.clabel(lines, lines.levels[::4], fontsize=6)
        ax.plot([0], [0], "r*", markersize=9, label="the weights (0, 0)")
        ax.set_title(f"{run['label']}: loss {run['center_loss']:.3f} at the centre", fontsize=9)
        ax.set_xlabel("alpha (d1)")
        ax.set_ylabel("beta (d2)")
        ax.set_aspect("equal")
    return save_figure(fig, path, f"Loss contours (same levels in every panel; clipped at {CLIP_LOSS:g})")


def plot_surfaces(runs: list[dict[str, Any]], path: Path) -> Path:
    """The loss surface in 3-D, one panel per snapshot side by side, on the same vertical scale."""
    plt = pyplot()
    surfaces, levels = _clipped(runs)
    fig = plt.figure(figsize=(5.5 * len(runs), 5))
    for index, (run, surface) in enumerate(zip(runs, surfaces, strict=True)):
        ax = fig.add_subplot(1, len(runs), index + 1, projection="3d")
        a, b = np.meshgrid(run["axis"], run["axis"], indexing="ij")
        ax.plot_surface(a, b, surface, cmap="viridis", vmin=levels[0], vmax=levels[-1], linewidth=0)
        ax.scatter([0], [0], [run["center_loss"]], color="red", marker="*", s=60, label="the weights (0, 0)")
        ax.set_zlim(levels[0], levels[-1])
        ax.set_title(run["label"], fontsize=9)
        ax.set_xlabel("alpha (d1)")
        ax.set_ylabel("beta (d2)")
        ax.set_zlabel("loss")
    return save_figure(fig, path, f"Loss surface (clipped at {CLIP_LOSS:g})")
