"""Optimisation paths: a run's weights along training in the plane that shows most of their movement, over
the loss contours in that plane (Li et al. 2018, Sect. 7, Fig. 9), and the loss on the line between two
solutions (Goodfellow, Vinyals & Saxe 2015).

Random directions (analysis/landscape.py) are almost orthogonal to the path of an optimiser in a space of
10^5 or more dimensions: the path barely moves in a random plane. Li et al. take PCA directions instead:
with theta_0 .. theta_T the checkpoints of one run (the last one final), PCA of the offsets
theta_i - theta_T (i < T; centred, as their code's sklearn PCA does) gives the two directions along which
the checkpoints spread most, and the share of the spread they explain. The path is then drawn as its
coordinates (theta_i - theta_T) . d_k, with the final weights at the origin, over the loss at
theta_T + a d1 + b d2; `in_plane` says how much of each offset the plane shows.

Loss on the plane: mean cross-entropy of one fixed batch, BN in inference mode with the final checkpoint's
running statistics at every point (the only statistics that belong to the plane's origin; a checkpoint's
own statistics would hold at its own weights only), evaluated by landscape's `grid_metrics` (one compiled
program per model). Between two solutions, parameters and running statistics are interpolated together,
(1 - alpha) v_A + alpha v_B, so that both ends are exactly the two models as they predict.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from resnet_jax.analysis.common import ModelSnapshot, line_styles, pyplot, save_figure, write_csv, write_json
from resnet_jax.analysis.landscape import CLIP_LOSS, grid_metrics
from resnet_jax.train.steps import cross_entropy

MIN_CHECKPOINTS = 4  # the final one and three before it: two PCA directions of centred offsets need three


# --- PCA of a path --------------------------------------------------------------------------------------------


def pca_directions(offsets: np.ndarray, count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` principal directions (count, n) of the rows of ``offsets`` (k, n), centred, and the
    share of their variance each explains. Signs are chosen so that the first row (the run's start) has
    non-negative coordinates: the path then always starts in the same quadrant."""
    if len(offsets) <= count:
        raise ValueError(f"{len(offsets)} offsets: PCA of centred offsets gives {count} directions from {count + 1}.")
    centred = offsets - offsets.mean(axis=0)
    _, singular, directions = np.linalg.svd(centred, full_matrices=False)
    directions = directions[:count]
    signs = np.where(directions @ offsets[0] < 0, -1.0, 1.0)
    explained = singular[:count] ** 2 / np.sum(singular**2)
    return directions * signs[:, None], explained


def project(offsets: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The coordinates (k, 2) of ``offsets`` (k, n) along orthonormal ``directions`` (2, n), and the share of
    each offset's norm that the plane shows, ||projection|| / ||offset|| (1 for the origin)."""
    coordinates = offsets @ directions.T
    norms = np.linalg.norm(offsets, axis=1)
    shown = np.linalg.norm(coordinates, axis=1) / np.where(norms > 0, norms, 1.0)
    return coordinates, np.where(norms > 0, shown, 1.0)


def plane_axes(coordinates: np.ndarray, resolution: int, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid axes over the path's extent along each direction, widened by ``margin`` of that extent per side."""
    axes = []
    for low, high in zip(coordinates.min(axis=0), coordinates.max(axis=0), strict=True):
        extent = max(high - low, 1e-6)
        axes.append(np.linspace(low - margin * extent, high + margin * extent, resolution))
    return axes[0], axes[1]


def check_run(checkpoints: Sequence[ModelSnapshot]) -> None:
    """Refuse a path that PCA cannot span or that mixes models, before anything runs."""
    if len(checkpoints) < MIN_CHECKPOINTS:
        raise ValueError(
            f"{len(checkpoints)} checkpoint(s) of {checkpoints[0].label if checkpoints else 'a run'}: the path needs "
            f"at least {MIN_CHECKPOINTS} (the final one and three before it). Keep more while training "
            "(--config.keep_checkpoints) and analyse all of them with the initialisation (--init --all-checkpoints)."
        )
    if len({_structure(s) for s in checkpoints}) > 1:
        raise ValueError("The checkpoints of one path must be of one model; give the checkpoints of one run.")


def run_label(snapshot: ModelSnapshot) -> str:
    """The snapshot's label with its run's folder name (two seeds' runs have the same model and steps), unless
    its tag already tells it apart."""
    return f"{snapshot.workdir.name}: {snapshot.label}" if snapshot.workdir and not snapshot.tag else snapshot.label


def _structure(snapshot: ModelSnapshot) -> tuple[nn.Module, str]:
    return snapshot.model, str(jax.tree.map(np.shape, snapshot.variables))


# --- a run's path over the loss ------------------------------------------------------------------------------


class PathPlane(NamedTuple):
    """The PCA plane of one run's path."""

    directions: tuple[Any, Any]  # d1, d2 shaped like the parameters, orthonormal as flat vectors
    explained_variance: np.ndarray  # (2,) share of the offsets' variance along d1 and d2
    coordinates: np.ndarray  # (checkpoints, 2) of theta_i - theta_final; the final weights at (0, 0)
    in_plane: np.ndarray  # (checkpoints,) ||projection|| / ||theta_i - theta_final||
    distance_to_final: np.ndarray  # (checkpoints,) ||theta_i - theta_final||


def path_plane(checkpoints: Sequence[ModelSnapshot]) -> PathPlane:
    """The PCA plane of the path of one run's ``checkpoints`` (in training order, the last one final)."""
    check_run(checkpoints)
    flat, unravel = ravel_pytree(checkpoints[-1].variables["params"])
    origin = np.asarray(flat, np.float64)
    offsets = np.stack([np.asarray(ravel_pytree(s.variables["params"])[0], np.float64) for s in checkpoints]) - origin
    directions, explained = pca_directions(offsets[:-1])
    coordinates, in_plane = project(offsets, directions)
    trees = tuple(unravel(jnp.asarray(d, flat.dtype)) for d in directions)
    return PathPlane(trees, explained, coordinates, in_plane, np.linalg.norm(offsets, axis=1))


def trajectory(
    checkpoints: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    resolution: int = 15,
    margin: float = 0.25,
    chunk: int = 1,
) -> dict[str, Any]:
    """The `path_plane` of one run's ``checkpoints``, and the loss and accuracy on a ``resolution``^2 grid of
    that plane around the path."""
    plane = path_plane(checkpoints)
    final = checkpoints[-1]
    first, second = plane_axes(plane.coordinates, resolution, margin)
    a, b = np.meshgrid(first, second, indexing="ij")
    points = np.stack([a.ravel(), b.ravel()], axis=-1)
    loss, accuracy = grid_metrics(final.model, final.variables, plane.directions, points, images, labels, chunk)
    return {
        "label": run_label(final),
        "model": final.name,
        "workdir": str(final.workdir) if final.workdir else None,
        "steps": [s.step for s in checkpoints],
        **{key: getattr(plane, key) for key in ("explained_variance", "coordinates", "in_plane", "distance_to_final")},
        "axis_1": first,
        "axis_2": second,
        "loss": loss.reshape(resolution, resolution),  # loss[i, j] at (axis_1[i], axis_2[j])
        "accuracy": accuracy.reshape(resolution, resolution),
    }


# --- between two solutions ------------------------------------------------------------------------------------


def interpolation(
    first: ModelSnapshot, second: ModelSnapshot, images: jax.Array, labels: jax.Array, alphas: Sequence[float]
) -> dict[str, Any]:
    """Loss and accuracy (BN in inference mode) of (1 - alpha) v_first + alpha v_second, parameters and running
    statistics, for every alpha; and the barrier: the largest rise of the loss over the straight line between
    the two ends' losses, for alpha in [0, 1] (Frankle et al. 2020; 0 for linearly connected solutions)."""
    if _structure(first) != _structure(second):
        raise ValueError(f"{first.label} and {second.label} are different models: interpolate two of one model.")
    alphas = np.asarray(alphas, np.float32)
    loss, accuracy = _interpolation_metrics(first.model, first.variables, second.variables, alphas, images, labels)
    loss, accuracy = np.asarray(loss), np.asarray(accuracy)
    return {
        "labels": [run_label(first), run_label(second)],
        "alphas": alphas,
        "loss": loss,
        "accuracy": accuracy,
        "barrier": barrier(alphas, loss),
    }


def barrier(alphas: np.ndarray, loss: np.ndarray) -> float | None:
    """max over alpha in [0, 1] of loss(alpha) - ((1 - alpha) loss(0) + alpha loss(1)); None unless ``alphas``
    holds both ends."""
    if not (np.any(alphas == 0) and np.any(alphas == 1)):
        return None
    start, end = loss[alphas == 0][0], loss[alphas == 1][0]
    inside = (alphas >= 0) & (alphas <= 1)
    return float(np.max(loss[inside] - ((1 - alphas[inside]) * start + alphas[inside] * end)))


@partial(jax.jit, static_argnums=0)
def _interpolation_metrics(
    model: nn.Module,
    first: dict[str, Any],
    second: dict[str, Any],
    alphas: jax.Array,
    images: jax.Array,
    labels: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    def metrics_at(alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
        variables = jax.tree.map(lambda u, v: (1 - alpha) * u + alpha * v, first, second)
        logits, _ = model.apply(variables, images, train=False)
        return cross_entropy(logits, labels).mean(), jnp.mean(jnp.argmax(logits, -1) == labels)

    return jax.lax.map(metrics_at, alphas)


# --- the analysis ---------------------------------------------------------------------------------------------


def group_runs(snapshots: Sequence[ModelSnapshot]) -> list[list[ModelSnapshot]]:
    """The snapshots as runs, in the order given: those of one workdir together (by label where there is none),
    each run's checkpoints in training order."""
    runs: dict[str, list[ModelSnapshot]] = {}
    for snapshot in snapshots:
        runs.setdefault(str(snapshot.workdir) if snapshot.workdir else snapshot.label, []).append(snapshot)
    return [sorted(run, key=lambda s: s.step) for run in runs.values()]


def analyze_trajectory(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    out: str | Path,
    *,
    resolution: int = 15,
    margin: float = 0.25,
    chunk: int = 1,
    alphas: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
) -> dict[str, Any]:
    """The `trajectory` of every run among ``snapshots`` (their checkpoints, e.g. --init --all-checkpoints) and
    the `interpolation` between the final weights of every two runs of one model (e.g. two seeds); writes
    trajectory.json, trajectory.csv, trajectory.png and, with two such runs, interpolation.png to ``out``."""
    runs = group_runs(snapshots)
    for run in runs:  # a short or mixed run fails before anything compiles
        check_run(run)
    if resolution < 2 or margin < 0:
        raise ValueError(f"resolution={resolution}, margin={margin}: use a grid of 2 or more points, a margin >= 0.")
    out = Path(out)
    paths = [trajectory(run, images, labels, resolution, margin, chunk) for run in runs]
    finals = [run[-1] for run in runs]
    pairs = [(a, b) for a, b in itertools.combinations(finals, 2) if _structure(a) == _structure(b)]
    lines = [interpolation(a, b, images, labels, alphas) for a, b in pairs]
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "directions": "PCA of the centred offsets theta_i - theta_final (i < final), all parameters",
            "loss": "mean cross-entropy, BN in inference mode with the final checkpoint's running statistics",
            "interpolation": "(1 - alpha) v_A + alpha v_B of parameters and running statistics",
            **{"resolution": resolution, "margin": margin},
        },
        "runs": paths,
        "interpolations": lines,
    }
    rows = [
        {"label": path["label"], "step": step, "pc1": xy[0], "pc2": xy[1], "in_plane": shown}
        for path in paths
        for step, xy, shown in zip(path["steps"], path["coordinates"], path["in_plane"], strict=True)
    ]
    files = [write_json(out / "trajectory.json", report), write_csv(out / "trajectory.csv", rows)]
    files.append(plot_trajectories(paths, out / "trajectory.png"))
    if lines:
        files.append(plot_interpolations(lines, out / "interpolation.png"))
    return {**report, "files": [str(path) for path in files]}


def plot_trajectories(paths: list[dict[str, Any]], path: Path) -> Path:
    """Each run's path over the loss contours of its PCA plane (clipped at CLIP_LOSS), one panel per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(paths), figsize=(5.5 * len(paths), 5), squeeze=False)
    for ax, run in zip(axes[0], paths, strict=True):
        surface = np.minimum(run["loss"], CLIP_LOSS).T
        lines = ax.contour(run["axis_1"], run["axis_2"], surface, levels=20, cmap="viridis", linewidths=0.8)
        ax.clabel(lines, lines.levels[::4], fontsize=6)
        xy = run["coordinates"]
        ax.plot(xy[:, 0], xy[:, 1], "o-", color="tab:red", markersize=3, label="checkpoints (first to final)")
        for step, (x, y) in zip(run["steps"], xy, strict=True):
            ax.annotate(str(step), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.plot([0], [0], "k*", markersize=10, label="final weights")
        first, second = run["explained_variance"]
        ax.set_xlabel(f"1st PCA direction: {100 * first:.1f}% of the variance")
        ax.set_ylabel(f"2nd PCA direction: {100 * second:.1f}%")
        ax.set_title(run["label"], fontsize=9)
    return save_figure(fig, path, f"Optimisation path over the loss in its PCA plane (clipped at {CLIP_LOSS:g})")


def plot_interpolations(lines: list[dict[str, Any]], path: Path) -> Path:
    """Loss and accuracy along (1 - alpha) A + alpha B, one curve per pair of solutions."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = line_styles([{"model": name, "label": name} for name in (" vs ".join(line["labels"]) for line in lines)])
    for line, style in zip(lines, styles, strict=True):
        axes[0].plot(line["alphas"], line["loss"], ".-", **style)
        axes[1].plot(line["alphas"], line["accuracy"], ".-", **style)
    for ax, ylabel in zip(axes, ("loss", "accuracy"), strict=True):
        ax.set_xlabel("alpha: (1 - alpha) A + alpha B")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "Linear interpolation between two solutions (BN in inference mode)")
