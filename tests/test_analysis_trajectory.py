"""Optimisation paths: PCA directions, exact projection of a path in a plane, loss contours on that plane and
linear interpolation between two solutions."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smooth_images import smooth_images

from resnet_jax.analysis.common import ModelSnapshot
from resnet_jax.analysis.trajectory import (
    analyze_trajectory,
    group_runs,
    interpolation,
    path_plane,
    pca_directions,
    project,
    trajectory,
)
from resnet_jax.models import create_model
from resnet_jax.train.steps import cross_entropy

MODEL = create_model("resnet8")
init = jax.jit(partial(MODEL.init, train=False))
update_statistics = jax.jit(partial(MODEL.apply, train=True, mutable=["batch_stats"]))


def trained_like(seed: int) -> dict:
    """resnet8 variables from ``seed``, with running statistics off their initial (0, 1)."""
    images = smooth_images(8, seed=seed)
    variables = init(jax.random.key(seed), images)
    _, updates = update_statistics(variables, 2 * images + 1)
    return {**variables, **updates}


def planar_run(seed: int, workdir: str, steps: int = 5) -> list[ModelSnapshot]:
    """Checkpoints whose parameters move in one plane of parameter space: final + s_i u + t_i v."""
    final = trained_like(seed)
    keys = jax.random.split(jax.random.key(seed + 100), 2)
    u, v = (jax.tree.map(lambda w, k=k: 0.05 * jax.random.normal(k, w.shape), final["params"]) for k in keys)
    coefficients = [(3.0 - i, (3.0 - i) ** 2 / 3) for i in range(steps - 1)] + [(0.0, 0.0)]
    run = []
    for step, (s, t) in enumerate(coefficients):
        params = jax.tree.map(lambda w, a, b, s=s, t=t: w + s * a + t * b, final["params"], u, v)
        run.append(ModelSnapshot("resnet8", MODEL, {**final, "params": params}, 10 * step, Path(workdir)))
    return run


def eval_loss(variables: dict, images: jax.Array, labels: jax.Array) -> float:
    logits, _ = MODEL.apply(variables, images, train=False)
    return float(cross_entropy(logits, labels).mean())


def test_pca_directions_are_orthonormal_and_ordered():
    offsets = np.random.default_rng(0).standard_normal((7, 30)) * np.linspace(5, 0.1, 30)
    directions, explained = pca_directions(offsets)
    chex.assert_trees_all_close(directions @ directions.T, np.eye(2), atol=1e-12)
    assert 1 > explained[0] > explained[1] > 0 and explained.sum() < 1
    assert np.all(directions @ offsets[0] >= 0)  # the start in the first quadrant
    with pytest.raises(ValueError, match="from 3"):
        pca_directions(offsets[:2])


def test_a_path_in_a_plane_is_projected_exactly():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((50, 2)))
    offsets = rng.standard_normal((6, 2)) @ basis.T
    offsets[-1] = 0.0  # the final weights
    directions, explained = pca_directions(offsets[:-1])
    coordinates, in_plane = project(offsets, directions)
    assert explained.sum() == pytest.approx(1.0)
    chex.assert_trees_all_close(coordinates @ directions, offsets, atol=1e-12)
    chex.assert_trees_all_close(in_plane, np.ones(6), atol=1e-12)
    off_plane = offsets + 0.3 * rng.standard_normal(offsets.shape)
    assert np.all(project(off_plane, directions)[1][:-1] < 1)


@pytest.mark.slow  # over 30 s on 2 cores
def test_the_plane_of_a_planar_run_reconstructs_every_checkpoint():
    run = planar_run(0, "a")
    plane = path_plane(run)
    final = run[-1].variables["params"]
    first, second = plane.directions
    for snapshot, (a, b) in zip(run, plane.coordinates, strict=True):
        moved = jax.tree.map(lambda w, u, v, a=a, b=b: w + a * u + b * v, final, first, second)
        chex.assert_trees_all_close(moved, snapshot.variables["params"], atol=2e-5)
    chex.assert_trees_all_close(plane.in_plane, np.ones(5), atol=1e-6)
    flat = [np.concatenate([x.ravel() for x in jax.tree.leaves(d)]) for d in plane.directions]
    assert np.dot(flat[0], flat[1]) == pytest.approx(0.0, abs=1e-6) and np.linalg.norm(flat[0]) == pytest.approx(1.0)


def test_trajectory_contours_are_direct_evaluations_on_the_plane():
    run = planar_run(1, "b")
    images, labels = smooth_images(6, seed=5), jnp.arange(6)
    report = trajectory(run, images, labels, resolution=3, margin=0.1)
    plane = path_plane(run)
    final = run[-1].variables
    for i, j in ((0, 0), (1, 2), (2, 1)):
        a, b = report["axis_1"][i], report["axis_2"][j]
        params = jax.tree.map(lambda w, u, v, a=a, b=b: w + a * u + b * v, final["params"], *plane.directions)
        assert report["loss"][i, j] == pytest.approx(eval_loss({**final, "params": params}, images, labels), rel=1e-4)
    xy = report["coordinates"]
    assert report["axis_1"][0] < xy[:, 0].min() and xy[:, 0].max() < report["axis_1"][-1]  # the path inside
    assert report["steps"] == [0, 10, 20, 30, 40] and tuple(xy[-1]) == (0.0, 0.0)


def test_interpolation_ends_are_the_two_models():
    first = ModelSnapshot("resnet8", MODEL, trained_like(2))
    second = ModelSnapshot("resnet8", MODEL, trained_like(3))
    images, labels = smooth_images(6, seed=6), jnp.arange(6)
    line = interpolation(first, second, images, labels, np.linspace(0, 1, 5))
    assert line["loss"][0] == pytest.approx(eval_loss(first.variables, images, labels), rel=1e-5)
    assert line["loss"][-1] == pytest.approx(eval_loss(second.variables, images, labels), rel=1e-5)
    middle = jax.tree.map(lambda u, v: (u + v) / 2, first.variables, second.variables)
    assert line["loss"][2] == pytest.approx(eval_loss(middle, images, labels), rel=1e-4)
    chord = (line["loss"][0] + line["loss"][-1]) / 2
    assert line["barrier"] >= line["loss"][2] - chord - 1e-6 and line["barrier"] >= 0
    other = ModelSnapshot("plain8", create_model("plain8"), second.variables)
    with pytest.raises(ValueError, match="different models"):
        interpolation(first, other, images, labels, [0.0, 1.0])


def test_analyze_trajectory_groups_runs_and_interpolates_between_their_finals(tmp_path):
    runs = planar_run(4, "seed4"), planar_run(5, "seed5")
    mixed = [runs[1][2], *runs[0][::-1], *runs[1][:2], *runs[1][3:]]  # any order: grouped by workdir, then by step
    assert [[s.step for s in run] for run in group_runs(mixed)] == [[0, 10, 20, 30, 40]] * 2
    with pytest.raises(ValueError, match="at least 4"):
        analyze_trajectory(runs[0][:3], smooth_images(4), jnp.arange(4), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    images, labels = smooth_images(4, seed=7), jnp.arange(4)
    report = analyze_trajectory(mixed, images, labels, tmp_path / "out", resolution=3, alphas=(0.0, 0.5, 1.0))
    assert [Path(run["workdir"]).name for run in report["runs"]] == ["seed5", "seed4"]
    (line,) = report["interpolations"]
    assert line["labels"] == ["seed5: resnet8 step 40", "seed4: resnet8 step 40"] and line["barrier"] is not None
    written = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    assert np.asarray(written["runs"][0]["loss"]).shape == (3, 3)
    assert (tmp_path / "out" / "trajectory.csv").read_text().count("\n") == 11  # header, 2 runs x 5 checkpoints
    for name in ("trajectory.png", "interpolation.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name
