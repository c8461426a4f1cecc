"""Post-training int8 quantization: the numerics, the int8 conv, calibration and a quantized run read back."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from idx_files import idx_folder_fixture
from test_train import small_config

from resnet_jax.cli import main
from resnet_jax.compress.layers import FakeQuantConv, QuantizedConv
from resnet_jax.compress.numerics import calibrated_absmax, channel_scales, dequantize, fake_quant, quantize
from resnet_jax.compress.quantize import (
    calibration_batches,
    input_scales,
    quantization_settings,
    quantize_run,
    quantized_params,
)
from resnet_jax.data import load_source
from resnet_jax.models import create_model
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, load_run, run_meta
from resnet_jax.train.steps import create_train_state

idx_dir = idx_folder_fixture(num_train=64, num_test=17, compressed=True)


def test_weights_dequantize_to_within_half_a_step_of_the_originals():
    kernel = jax.random.normal(jax.random.key(0), (3, 3, 8, 16)) * jnp.linspace(0.01, 3.0, 16)
    scale = channel_scales(kernel)
    q = quantize(kernel, scale)
    assert q.dtype == jnp.int8
    assert jnp.all(jnp.abs(dequantize(q, scale) - kernel) <= scale / 2 * (1 + 1e-6))
    # Each channel's largest magnitude is on the grid's end: the whole int8 range is used.
    chex.assert_trees_all_equal(jnp.max(jnp.abs(q), axis=(0, 1, 2)), jnp.full(16, 127, jnp.int8))


def test_fake_quant_rounds_forward_and_passes_gradients_straight_through():
    x = jnp.array([0.04, -1.26, 0.5])
    chex.assert_trees_all_close(fake_quant(x, jnp.float32(0.1)), jnp.array([0.0, -1.3, 0.5]), atol=1e-6)
    chex.assert_trees_all_close(
        jax.grad(lambda v: jnp.sum(fake_quant(v, jnp.float32(0.1)) * 2.0))(x), 2.0 * jnp.ones(3)
    )


@pytest.mark.parametrize("strides", [1, 2])
def test_the_int8_conv_equals_the_fake_quant_conv(strides):
    layout = dict(features=8, kernel_size=(3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)))
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 8))
    scale = channel_scales(kernel)
    params = {"kernel": quantize(kernel, scale), "kernel_scale": scale, "input_scale": jnp.float32(0.02)}
    int8 = QuantizedConv(**layout, arithmetic="int8").apply({"params": params}, x)
    in_float = QuantizedConv(**layout, arithmetic="float").apply({"params": params}, x)
    fake_quant_conv = FakeQuantConv(**layout, input_scales=(("", 0.02),))  # a top-level module's path is ""
    fake = fake_quant_conv.apply({"params": {"kernel": kernel}}, x)
    chex.assert_trees_all_equal(int8, in_float)  # integer sums below 2**24 are exact in float32
    chex.assert_trees_all_close(int8, fake, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(QuantizedConv(**layout).apply).lower({"params": params}, x).as_text(dialect="hlo")
    assert "s32" in hlo and "s8" in hlo
    # Straight-through: the kernel's gradient is the float conv's, as if the rounding were not there.
    gradient = jax.grad(lambda k: jnp.sum(fake_quant_conv.apply({"params": {"kernel": k}}, x) ** 2))(kernel)
    assert jnp.all(jnp.isfinite(gradient)) and float(jnp.abs(gradient).max()) > 0


def test_calibration_methods_order_their_ranges_and_are_deterministic():
    magnitudes = np.abs(np.random.default_rng(0).standard_normal(1_000_000))
    magnitudes[0] = 40.0  # one outlier in a million
    ranges = {m: calibrated_absmax(magnitudes, m, percentile=99.9) for m in ("minmax", "percentile", "mse")}
    assert ranges["minmax"] == 40.0
    assert 3.0 < ranges["percentile"] < 4.0  # the 99.9th percentile of |N(0, 1)| is 3.29
    assert ranges["mse"] < 10.0  # rounding everything to steps of 40 / 127 costs more than clipping one outlier
    assert calibrated_absmax(magnitudes, "mse") == ranges["mse"]
    model = create_model("resnet8", num_classes=10)
    images = np.asarray(jax.random.normal(jax.random.key(0), (8, 28, 28, 1)))
    variables = model.init(jax.random.key(1), images, train=False)
    settings = quantization_settings(calibration="percentile")
    first, second = (input_scales(model, variables, iter([images[:4], images[4:]]), settings) for _ in range(2))
    assert first == second and len(first) == 7  # the stem and both convs of each of 3 blocks
    with pytest.raises(ValueError, match="choose one of"):
        quantization_settings(calibration="entropy")


def save_run(workdir: Path, config, state, step: int = 0) -> None:
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    checkpoints.save(step, state, run_meta(config, step) | {"num_classes": 10, "image_shape": [28, 28, 1]}, force=True)
    checkpoints.close()


@pytest.fixture(scope="module")
def trained(idx_dir, tmp_path_factory) -> Path:
    """A run folder holding an initialised resnet8 as its step 0 (what is quantized needs no training)."""
    workdir = tmp_path_factory.mktemp("float")
    config = small_config(idx_dir)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))
    save_run(workdir, config, create_train_state(build_model(config, 10), tx, (28, 28, 1), config.seed))
    return workdir


def test_a_quantized_run_is_a_run_folder_that_eval_reads(trained, tmp_path, capsys):
    out = tmp_path / "int8"
    args = ["quantize", "--checkpoint", str(trained), "--out", str(out), "--calibration-images", "20"]
    assert main(args) == 0
    assert "quantized step 0" in capsys.readouterr().out
    model, state, config = load_run(out)
    assert config.quantize.calibration == "percentile" and config.quantize.calibration_images == 20
    assert state.params["stage1"]["block0"]["branch"]["conv1"]["kernel"].dtype == jnp.int8
    assert state.params["head"]["kernel"].dtype == jnp.float32
    float_model, float_state, _ = load_run(trained)
    images = next(calibration_batches(load_source("fashion_mnist", "train", config.data_dir), config, 8))
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, train=False)[0]
    reference = float_model.apply(
        {"params": float_state.params, "batch_stats": float_state.batch_stats}, images, train=False
    )[0]
    chex.assert_trees_all_close(logits, reference, atol=0.1 * float(jnp.abs(reference).max()))
    runs = ["--run", f"fp32={trained}", "--run", f"int8={out}"]
    assert main(["compare", *runs, "--out", str(tmp_path), "--batch-size", "8"]) == 0
    table = (tmp_path / "compression.md").read_text()
    assert "| fp32 |" in table and "| int8 |" in table and (tmp_path / "compression.png").is_file()
    float_bytes, int8_bytes = (int(row.split("|")[5].split()[0].replace(",", "")) for row in table.splitlines()[2:4])
    kernels = [x for x in jax.tree.leaves(float_state.params) if x.ndim == 4]
    # Each conv weight loses 3 of its 4 bytes and gains a float32 scale per output channel and one for its input.
    assert float_bytes - int8_bytes == sum(3 * k.size - 4 * k.shape[-1] - 4 for k in kernels)


@pytest.mark.slow  # a training run
def test_quantization_aware_fine_tuning_trains_in_its_folder_then_quantizes(trained, tmp_path):
    out = tmp_path / "qat"
    assert main(["quantize", "--checkpoint", str(trained), "--out", str(out), "--qat-steps", "2"]) == 0
    _, state, config = load_run(out)
    _, tuned, tuned_config = load_run(out / "qat")
    assert int(state.step) == int(tuned.step) == 2 and config.quantize.qat_steps == 2
    assert tuned_config.quantize.arithmetic == "fake"
    scales = {tuple(p.split("/")): s for p, s in tuned_config.quantize.input_scales}
    chex.assert_trees_all_equal(state.params, quantized_params(tuned.params, scales))


def test_a_diverged_run_is_not_quantized(trained, tmp_path):
    _, state, config = load_run(trained)
    diverged = tmp_path / "diverged"
    save_run(diverged, config, state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params)))
    with pytest.raises(ValueError, match="diverged"):
        quantize_run(diverged, tmp_path / "out", quantization_settings())


def test_quantized_params_keep_every_other_leaf(trained):
    _, state, _ = load_run(trained)
    scales = {("stem", "conv"): 0.1}
    params = quantized_params(state.params, scales)
    assert params["stem"]["conv"]["kernel"].dtype == np.int8
    chex.assert_trees_all_equal(params["head"], jax.device_get(state.params["head"]))
