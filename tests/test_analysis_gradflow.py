"""Gradient flow: the norms against direct autodiff and softmax algebra, and one curve per checkpoint from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from idx_files import make_idx_folder

from resnet_jax.analysis.common import init_snapshot, run_snapshots
from resnet_jax.analysis.gradflow import gradient_norms
from resnet_jax.cli import main
from resnet_jax.models import create_model
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.steps import cross_entropy

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["resnet8", "plain8", "preact_resnet8"])
def test_gradient_norms_are_those_of_the_training_loss(name):
    model = create_model(name)
    images = jax.random.normal(jax.random.key(1), (6, 8, 8, 1))
    labels = jax.numpy.arange(6) % 10
    variables = model.init(jax.random.key(0), images, train=False)
    norms = gradient_norms(model, variables, images, labels)

    def loss_fn(params):
        (logits, _), _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    assert norms["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert [b["name"] for b in norms["blocks"]] == ["stage1/block0", "stage2/block0", "stage3/block0"]
    layers = {layer["name"]: layer for layer in norms["layers"]}
    assert list(layers)[::7] == ["stem/conv", "head"]
    assert len(layers) == 8  # the stem, two convs per block (shortcut "A" has no layers), the head
    for path, layer in layers.items():
        tree = grads
        for key in path.split("/"):
            tree = tree[key]
        expected = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(tree)))
        assert layer["param_grad"] == pytest.approx(expected, rel=1e-4), path
    # dL/dlogits of the mean cross-entropy is (softmax - one_hot) / batch
    softmax_minus_target = jax.nn.softmax(logits) - jax.nn.one_hot(labels, 10)
    assert layers["head"]["output_grad"] == pytest.approx(float(np.linalg.norm(softmax_minus_target)) / 6, rel=1e-4)
    assert all(b["output_grad"] > 0 and b["param_grad"] > 0 for b in norms["blocks"])


@pytest.mark.slow  # over 30 s on 2 cores
def test_gradflow_draws_one_curve_per_checkpoint_from_initialisation(tmp_path, capsys):
    data = tmp_path / "idx"
    data.mkdir()
    make_idx_folder(data, compressed=False, num_train=32, num_test=8)
    config = load_config(REPO / "configs" / "default.py")
    config.update(
        model="resnet8",
        data_dir=str(data),
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=4,
        log_every_steps=2,
        eval_every_steps=2,
        checkpoint_every_steps=2,
    )
    run = tmp_path / "run"
    train_and_evaluate(config, run)
    out = tmp_path / "out"
    args = ["analyze", "gradflow", "--checkpoint", str(run), "--init", "--all-checkpoints", "--examples", "8"]
    assert main([*args, "--out", str(out)]) == 0
    assert "3 curve(s)" in capsys.readouterr().out
    report = json.loads((out / "gradflow.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["resnet8 step 0", "resnet8 step 2", "resnet8 step 4"]
    assert len({r["loss"] for r in report["runs"]}) == 3  # training moved the parameters
    assert (out / "gradflow.png").stat().st_size > 10_000
    # step 0 is the run's own initialisation: the one `resnet-jax train` started from
    initial = run_snapshots(run, init=True)[0]
    fresh = init_snapshot("resnet8", (28, 28, 1), seed=config.seed)
    chex.assert_trees_all_equal(initial.variables, fresh.variables)


def test_a_model_with_stochastic_depth_is_measured_whole():
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    labels = jax.numpy.arange(4)
    model = create_model("resnet8")
    variables = model.init(jax.random.key(0), images, train=False)
    whole = gradient_norms(model, variables, images, labels)
    assert gradient_norms(create_model("resnet8", drop_path_rate=0.5), variables, images, labels) == whole
