"""Loss landscapes: filter-normalised directions, grid values against direct evaluations, one compile per grid."""

from __future__ import annotations

import csv
import io
import json
import math
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import make_idx_folder

from resnet_jax.analysis.common import ModelSnapshot, ProgressLine
from resnet_jax.analysis.landscape import (
    basin_fraction,
    filter_normalized_direction,
    grid_metrics,
    landscape,
    nonconvex_fraction,
    random_directions,
)
from resnet_jax.cli import main
from resnet_jax.models import create_model
from resnet_jax.train.steps import cross_entropy


@pytest.fixture(scope="module")
def snapshot() -> ModelSnapshot:
    """resnet8 on 8x8 inputs with running statistics moved away from their initial (0, 1): evaluating with batch
    statistics, or with reset ones, would give other numbers."""
    model = create_model("resnet8")
    images = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
    variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), images)
    update = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
    for _ in range(3):
        _, updates = update(variables, 3 * images + 1)
        variables = {**variables, **updates}
    return ModelSnapshot("resnet8", model, variables)


@pytest.fixture(scope="module")
def batch() -> tuple[jax.Array, jax.Array]:
    return jax.random.normal(jax.random.key(2), (6, 8, 8, 1)), jnp.arange(6) % 10


def eval_loss(snapshot: ModelSnapshot, params, images, labels) -> tuple[float, float]:
    """The ordinary inference-mode loss and accuracy, one model.apply, no vmap."""
    logits, _ = snapshot.model.apply({**snapshot.variables, "params": params}, images, train=False)
    return float(cross_entropy(logits, labels).mean()), float(jnp.mean(jnp.argmax(logits, -1) == labels))


def per_filter(x: np.ndarray) -> np.ndarray:
    """Frobenius norm of each slice along the last axis."""
    return np.linalg.norm(x.reshape(-1, x.shape[-1]), axis=0)


def test_directions_have_the_weights_filter_norms_and_ignore_rank_one_tensors(snapshot):
    params = snapshot.variables["params"]
    direction = filter_normalized_direction(params, jax.random.key(7))
    other = filter_normalized_direction(params, jax.random.key(8))
    chex.assert_trees_all_equal_shapes_and_dtypes(direction, params)  # no batch_stats: they stay as they are
    ranks = []
    paths = jax.tree_util.tree_leaves_with_path(params)
    leaves = zip(paths, jax.tree.leaves(direction), jax.tree.leaves(other), strict=True)
    for (path, w), d, e in leaves:
        w, d, e = np.asarray(w), np.asarray(d), np.asarray(e)
        ranks.append(w.ndim)
        if w.ndim == 1:
            assert np.all(d == 0), jax.tree_util.keystr(path)
            continue
        np.testing.assert_allclose(per_filter(d), per_filter(w), rtol=1e-5, err_msg=jax.tree_util.keystr(path))
        assert not np.allclose(d, e) and not np.allclose(np.abs(d), np.abs(w))  # random, not the weights
    assert ranks.count(4) == 7 and ranks.count(2) == 1  # the convs (HWIO) and the head (in, out)
    assert ranks.count(1) > 8  # BN scales and offsets, the head's bias


def test_the_centre_of_the_grid_is_the_ordinary_eval_loss(snapshot, batch):
    images, labels = batch
    report = landscape(snapshot, images, labels, resolution=3, seed=0)
    loss, accuracy = eval_loss(snapshot, snapshot.variables["params"], images, labels)
    assert report["center_loss"] == pytest.approx(loss, rel=1e-5)
    assert report["center_accuracy"] == accuracy
    np.testing.assert_array_equal(report["loss_1d"], report["loss"][:, 1])  # the curve is the b = 0 row


def test_every_grid_point_is_a_direct_evaluation_at_theta_plus_a_d1_plus_b_d2(snapshot, batch):
    images, labels = batch
    report = landscape(snapshot, images, labels, resolution=3, seed=4)
    first, second = random_directions(snapshot.variables["params"], 4)

    def moved(a: float, b: float):
        return jax.tree.map(lambda w, u, v: w + a * u + b * v, snapshot.variables["params"], first, second)

    values = set()
    for i, a in enumerate(report["axis"]):
        for j, b in enumerate(report["axis"]):
            loss, accuracy = eval_loss(snapshot, moved(a, b), images, labels)
            assert report["loss"][i, j] == pytest.approx(loss, rel=1e-4), (a, b)
            assert report["accuracy"][i, j] == accuracy
            values.add(round(loss, 4))
    assert len(values) == 9  # every point differs: a transposed or shifted grid would fail above
    assert report["max_loss"] == pytest.approx(max(report["loss"].ravel()))


def test_one_compilation_serves_the_whole_grid(snapshot, batch):
    images, labels = batch
    traced = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == "_grid_metrics":
            traced.append(kwargs)

    directions = random_directions(snapshot.variables["params"], 5)
    points = np.stack(np.meshgrid(np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)), -1).reshape(-1, 2)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        loss, accuracy = grid_metrics(snapshot.model, snapshot.variables, directions, points, images, labels, chunk=4)
        assert len(traced) == 1  # 25 points, padded to 7 chunks of 4: one trace, one program
        whole, _ = grid_metrics(snapshot.model, snapshot.variables, directions, points, images, labels, chunk=25)
        assert len(traced) == 2  # another chunk size is another program
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert loss.shape == accuracy.shape == (25,)
    np.testing.assert_allclose(loss, whole, rtol=1e-5)  # chunking changes nothing


def test_a_grid_of_several_calls_reports_progress_and_compiles_once(snapshot, batch):
    images, labels = batch
    directions = random_directions(snapshot.variables["params"], 5)
    points = np.stack(np.meshgrid(np.linspace(-1, 1, 9), np.linspace(-1, 1, 9)), -1).reshape(-1, 2)
    done, traced = [], []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == "_grid_metrics":
            traced.append(kwargs)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        loss, _ = grid_metrics(snapshot.model, snapshot.variables, directions, points, images, labels, 3, done.append)
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert done == [66, 81]  # 81 points in calls of 66 (64 rounded up to chunks of 3): the second one padded
    assert len(traced) == 1  # so both calls run one program
    direct, _ = grid_metrics(snapshot.model, snapshot.variables, directions, points[60:70], images, labels, 10)
    np.testing.assert_allclose(loss[60:70], direct, rtol=1e-5)  # points across the calls' border are the same


def test_progress_line_writes_a_trail_in_logs_with_an_eta():
    every = io.StringIO()
    line = ProgressLine("landscape resnet8", 40, "points", stream=every, every_s=0.0)
    for done in (10, 20, 40):
        line.update(done)
    first, second, last = every.getvalue().splitlines()
    assert first == "landscape resnet8: 10/40 points" and last == "landscape resnet8: 40/40 points"
    assert second.startswith("landscape resnet8: 20/40 points | ETA ")
    sparse = io.StringIO()
    line = ProgressLine("paths resnet8", 40, "measurements", stream=sparse, every_s=3600.0)
    for done in (10, 20, 40):
        line.update(done)
    assert sparse.getvalue().splitlines() == ["paths resnet8: 10/40 measurements", "paths resnet8: 40/40 measurements"]


def test_basin_and_nonconvexity_measures_on_known_surfaces():
    axis = np.linspace(-1, 1, 11)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    bowl, saddle, ridge = a**2 + b**2, a**2 - b**2, a**2 - 0.01 * b**2
    assert nonconvex_fraction(bowl, 0.2) == 0.0
    assert nonconvex_fraction(saddle, 0.2) == 1.0
    assert nonconvex_fraction(ridge, 0.2) == 0.0  # negative curvature of 1% of the largest: noise, not a saddle
    assert nonconvex_fraction(-bowl, 0.2) == 1.0
    steep = 2 * bowl  # from 0 to 4: below log(10) = 2.30 on part of the grid only
    assert basin_fraction(steep, num_classes=10) == pytest.approx(np.mean(steep < math.log(10)))
    assert 0 < basin_fraction(steep, num_classes=2) < basin_fraction(steep, num_classes=10) < 1


def test_analyze_landscape_writes_grids_and_plots(tmp_path, capsys):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=16, num_test=8)
    out = tmp_path / "out"
    args = ["analyze", "landscape", "--model", "resnet8", "--model", "plain8", "--data-dir", str(data)]
    args += ["--input-size", "8", "--examples", "8", "--resolution", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 landscape(s)" in printed and "resnet8 init: centre loss" in printed
    report = json.loads((out / "landscape.json").read_text())
    assert [r["label"] for r in report["summary"]] == ["resnet8 init", "plain8 init"]
    assert report["settings"] | {"examples": 8, "resolution": 3, "input_shape": [8, 8, 1]} == report["settings"]
    for run in report["runs"]:
        chex.assert_shape(np.asarray(run["loss"]), (3, 3))
        assert run["loss"][1][1] == run["center_loss"]
        assert run["min_loss"] <= run["center_loss"] <= run["max_loss"]
    with (out / "landscape.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 18 and float(rows[4]["loss"]) == pytest.approx(report["runs"][0]["center_loss"])
    for name in ("landscape_1d.png", "landscape_contour.png", "landscape_surface.png"):
        assert (out / name).stat().st_size > 10_000, name


@pytest.mark.parametrize(("option", "message"), [("--resolution=4", "odd number >= 3"), ("--chunk=0", "at least one")])
def test_analyze_landscape_refuses_a_bad_grid_before_any_work(tmp_path, capsys, option, message):
    assert main(["analyze", "landscape", "--model", "resnet8", option, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
