"""Channel pruning by BN scale: the narrower model computes what the pruned channels left, and reads back."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import idx_folder_fixture
from test_compress_lowrank import float_run

from resnet_jax.cli import main
from resnet_jax.compress.channels import kept_channels, narrowed_variables
from resnet_jax.models import create_model
from resnet_jax.models.complexity import model_cost
from resnet_jax.train.runs import load_run

idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)


def test_removing_channels_that_carry_nothing_leaves_the_logits_and_shrinks_the_model():
    model = create_model("resnet8", num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    variables = jax.device_get(model.init(jax.random.key(1), x, train=False))
    rng = np.random.default_rng(0)
    for stage, width in (("stage1", 16), ("stage2", 32), ("stage3", 64)):
        bn = variables["params"][stage]["block0"]["branch"]["bn1"]
        dead = rng.permutation(width)[: width // 2]  # half the channels output relu(0 * z + 0) = 0
        bn["scale"] = np.where(np.isin(np.arange(width), dead), 0.0, 0.5 + rng.random(width)).astype(np.float32)
        bn["bias"] = np.where(np.isin(np.arange(width), dead), 0.0, bn["bias"]).astype(np.float32)
    kept = kept_channels(variables["params"], fraction=0.5)
    assert [len(k) for k in kept.values()] == [8, 16, 32]
    narrow = model.clone(inner_widths=((8,), (16,), (32,)))
    logits = narrow.apply(narrowed_variables(variables, kept), x, train=False)[0]
    chex.assert_trees_all_close(logits, model.apply(variables, x, train=False)[0], atol=1e-5, rtol=1e-5)
    assert model_cost(narrow, (28, 28, 1)).macs < model_cost(model, (28, 28, 1)).macs
    with pytest.raises(ValueError, match="one positive width per block"):
        model.clone(inner_widths=((8,), (16,)))


def test_the_prune_channels_command_writes_a_narrower_run(idx_dir, tmp_path, capsys):
    out = tmp_path / "narrow"
    args = ["prune-channels", "--checkpoint", str(float_run(idx_dir, tmp_path / "float")), "--out", str(out)]
    assert main([*args, "--fraction", "0.5", "--fine-tune-steps", "0"]) == 0
    assert "widths" in capsys.readouterr().out
    model, state, config = load_run(out)
    widths = [w for stage in config.model_overrides.inner_widths for w in stage]
    assert sum(widths) < 16 + 32 + 64 and model.inner_widths is not None
    assert state.params["stage3"]["block0"]["branch"]["conv2"]["kernel"].shape[2] == widths[2]
    logits = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, jnp.zeros((1, 28, 28, 1)), train=False
    )[0]
    assert jnp.isfinite(logits).all()
    assert main(["summary", "--checkpoint", str(out)]) == 0
    narrow = capsys.readouterr().out
    assert main(["summary", "resnet8", "--input-size", "28", "28", "1"]) == 0
    assert "28x28x1" in narrow and millions_of_params(narrow) < millions_of_params(capsys.readouterr().out)
    assert main([*args[:-2], "--out", str(tmp_path / "x"), "--fraction", "1.0"]) == 2
    assert "in [0, 1)" in capsys.readouterr().err


def millions_of_params(summary: str) -> float:
    return float(summary.split("M params")[0].split()[-1])
