"""Low-rank factorisation: full rank reproduces the conv, truncation saves weights, a factorised run reads back."""

from __future__ import annotations

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from idx_files import idx_folder_fixture
from test_compress_quantize import save_run
from test_train import small_config

from resnet_jax.cli import main
from resnet_jax.compress.layers import FactorizedConv
from resnet_jax.compress.lowrank import energy_rank, factorize_kernel, factorized_params, plan_ranks
from resnet_jax.models import create_model
from resnet_jax.models.blocks import Conv
from resnet_jax.models.complexity import model_cost
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, load_run, new_train_state

idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)


@pytest.mark.parametrize("strides", [1, 2])
def test_full_rank_reproduces_the_conv(strides):
    layout = dict(features=16, kernel_size=(3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))
    kernel = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 8, 16)))
    x = jax.random.normal(jax.random.key(1), (2, 10, 10, 8))
    reference = Conv(**layout).apply({"params": {"kernel": kernel}}, x)
    basis, combine = factorize_kernel(kernel, rank=16)
    params = {"basis": {"kernel": basis}, "combine": {"kernel": combine}}
    factorized = FactorizedConv(**layout, ranks=(("", 16),))  # a top-level module's path is ""
    chex.assert_trees_all_close(factorized.apply({"params": params}, x), reference, atol=1e-5, rtol=1e-5)


def test_energy_picks_the_smallest_rank_that_keeps_it():
    kernel = np.zeros((1, 1, 4, 3))
    kernel[0, 0, :3, :3] = np.diag([3.0, 2.0, 1.0])  # squared singular values 9, 4, 1 of 14
    assert [energy_rank(kernel, e) for e in (0.5, 9 / 14, 0.9, 1.0)] == [1, 1, 2, 3]


def test_a_factorised_model_computes_the_original_at_full_rank_and_costs_less_truncated():
    model = create_model("resnet8", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    variables = model.init(jax.random.key(1), x, train=False)
    ranks = {
        "/".join(path[:-1]): kernel.shape[-1]
        for path, kernel in traverse_util.flatten_dict(variables["params"]).items()
        if path[-1] == "kernel" and kernel.ndim == 4 and path[0] != "stem"
    }
    factorized = model.clone(conv=partial(FactorizedConv, ranks=tuple(ranks.items())))
    params = factorized_params(variables["params"], ranks)
    logits = factorized.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)[0]
    chex.assert_trees_all_close(logits, model.apply(variables, x, train=False)[0], atol=1e-5, rtol=1e-5)
    truncated = plan_ranks(variables["params"], energy=0.5)
    assert truncated and all(rank < 64 for rank in truncated.values())
    smaller = model.clone(conv=partial(FactorizedConv, ranks=tuple(truncated.items())))
    cost, original = model_cost(smaller, (28, 28, 1)), model_cost(model, (28, 28, 1))
    assert cost.params < original.params and cost.macs < original.macs


def float_run(idx_dir, folder):
    config = small_config(idx_dir)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))
    save_run(folder, config, new_train_state(config, build_model(config, 10), tx, (28, 28, 1)))
    return folder


def test_the_lowrank_command_writes_a_factorised_run(idx_dir, tmp_path, capsys):
    out = tmp_path / "lowrank"
    args = ["lowrank", "--checkpoint", str(float_run(idx_dir, tmp_path / "float")), "--out", str(out)]
    assert main([*args, "--energy", "0.6", "--fine-tune-steps", "0"]) == 0
    assert f"into {out}" in capsys.readouterr().out
    model, state, saved = load_run(out)
    assert int(state.step) == 0 and saved.lowrank.energy == 0.6 and len(saved.lowrank.ranks) > 0
    layer = state.params
    for name in saved.lowrank.ranks[0][0].split("/"):
        layer = layer[name]
    assert set(layer) == {"basis", "combine"}
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, jnp.zeros((1, 28, 28, 1)), train=False
    )[0]
    assert jnp.isfinite(logits).all()
    assert main(args) == 2  # the folder is taken
    assert main(["lowrank", "--checkpoint", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already compressed" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint", str(out), "--out", str(tmp_path / "int8")]) == 2
    assert "is a low-rank run, whose factorised convs int8 quantization does not cover" in capsys.readouterr().err
    assert not (tmp_path / "int8").exists()


@pytest.mark.slow  # a training run
def test_a_factorised_run_fine_tunes_in_its_folder(idx_dir, tmp_path):
    out = tmp_path / "lowrank"
    args = ["lowrank", "--checkpoint", str(float_run(idx_dir, tmp_path / "float")), "--out", str(out)]
    assert main([*args, "--energy", "0.6", "--fine-tune-steps", "2"]) == 0
    _, state, saved = load_run(out)
    assert int(state.step) == 2 and saved.num_train_steps == 2
