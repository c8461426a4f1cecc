"""Transfer learning: ``init_from`` (new head, grey stem), frozen or per-stage learning rates, frozen BN statistics,
the image resize of the input pipeline, and the fine-tuning config on a converted torchvision checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from idx_files import idx_folder_fixture
from torchvision_models import random_torchvision

from resnet_jax.cli import main
from resnet_jax.data import BatchSettings, load_source
from resnet_jax.data.augment import resize
from resnet_jax.models import create_model
from resnet_jax.models.torch_weights import load_torch_weights, save_torch_weights
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.config import load_config
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, load_run
from resnet_jax.train.steps import TrainState, create_train_state, cross_entropy, train_step
from resnet_jax.train.transfer import STEM_KERNEL, convert_torch_checkpoint, frozen_bn, init_from_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "default.py"


def small_config(data_dir: Path, **changes):
    config = load_config(DEFAULT)
    config.update(
        model="resnet8",
        data_dir=str(data_dir),
        batch_size=8,
        eval_batch_size=8,
        num_train_steps=2,
        log_every_steps=1,
        eval_every_steps=2,
        checkpoint_every_steps=2,
    )
    config.update(changes)
    return config


# Fashion-MNIST-shaped (28x28, 1 channel, 10 classes): 32 training and 8 test images.
idx_dir = idx_folder_fixture(num_train=32, num_test=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict]:
    """A converted 3-channel, 100-class resnet8 (random weights, BN statistics away from their initial 0 and 1)."""
    folder = tmp_path_factory.mktemp("pretrained")
    model = create_model("resnet8", num_classes=100)
    variables = model.init(jax.random.key(7), jnp.zeros((1, 16, 16, 3)), train=False)
    rng = np.random.default_rng(0)
    stats = jax.tree.map(
        lambda v: np.asarray(v) + rng.uniform(0.1, 0.5, v.shape).astype(np.float32), variables["batch_stats"]
    )
    variables = {"params": jax.device_get(variables["params"]), "batch_stats": stats}
    weights = save_torch_weights(variables, folder / "resnet8.safetensors")
    config = load_config(DEFAULT)
    config.update(dataset="synthetic", eval_split="test[:8]", eval_batch_size=8)  # 3-channel images to analyse
    convert_torch_checkpoint(weights, "resnet8", folder / "run", config)
    return folder / "run", variables


def flat(tree) -> dict:
    return traverse_util.flatten_dict(jax.device_get(dict(tree)))


def saved_state(workdir: Path) -> dict:
    return Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False).read_state()


def test_a_frozen_backbone_keeps_the_pretrained_weights_and_trains_a_new_head(pretrained, idx_dir, tmp_path, capsys):
    run, source = pretrained
    config = small_config(idx_dir, init_from=str(run), freeze_backbone=True, bn_update=False, image_size=16)
    metrics = train_and_evaluate(config, tmp_path / "tuned").metrics
    out = capsys.readouterr().out
    assert f"initialised from {run} (step 0 of resnet8" in out
    assert "new head for 10 classes (was 100)" in out and "stem kernel summed over its 3 input channels" in out

    tuned = saved_state(tmp_path / "tuned")
    weights, pretrained_weights = flat(tuned["params"]), flat(source["params"])
    for path, value in weights.items():
        if path[0] != "head":  # frozen: exactly the pretrained values, the stem folded for 1-channel images
            given = pretrained_weights[path]
            np.testing.assert_array_equal(value, given.sum(2, keepdims=True) if path == STEM_KERNEL else given)
    for path, value in flat(tuned["batch_stats"]).items():  # bn_update=False: the statistics stay
        np.testing.assert_array_equal(value, flat(source["batch_stats"])[path])
    fresh = create_train_state(build_model(config, 10), optax.identity(), (16, 16, 1), config.seed).params["head"]
    assert weights[("head", "kernel")].shape == (64, 10)
    assert not np.allclose(weights[("head", "kernel")], fresh["kernel"])  # the new head trained
    _, state, _ = load_run(tmp_path / "tuned")  # the run reads back: its optimizer state has the per-part structure
    assert int(state.step) == 2 and 0 <= metrics["accuracy"] <= 1


@functools.cache
def parameters_and_gradients() -> tuple:
    params = create_model("resnet8").init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    rng = np.random.default_rng(0)
    return params, jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)


def test_analyze_reads_a_converted_checkpoint_as_a_run_at_step_0(pretrained, tmp_path, capsys):
    run, _ = pretrained
    assert main(["analyze", "gradflow", "--checkpoint", str(run), "--examples", "4", "--out", str(tmp_path)]) == 0
    assert "1 curve(s)" in capsys.readouterr().out
    report = json.loads((tmp_path / "gradflow.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["resnet8 step 0"]


def first_update(**changes):
    """The first optimizer update of resnet8's parameters under the default recipe with ``changes``."""
    params, grads = parameters_and_gradients()
    config = load_config(DEFAULT)
    config.update(lr_schedule="constant", **changes)
    tx = create_optimizer(config, learning_rate_schedule(config, 1))
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_stage_multipliers_scale_each_stage_and_zero_freezes():
    full = first_update()
    scaled = first_update(stage_lr_multipliers=(0.0, 1.0, 0.5, 2.0))
    for module, factor in {"stem": 0.0, "stage1": 1.0, "stage2": 0.5, "stage3": 2.0, "head": 1.0}.items():
        for ours, reference in zip(jax.tree.leaves(scaled[module]), jax.tree.leaves(full[module]), strict=True):
            np.testing.assert_allclose(ours, factor * reference, rtol=1e-6, atol=1e-12)
    frozen = first_update(freeze_backbone=True)
    assert all(not np.any(u) for m, tree in frozen.items() if m != "head" for u in jax.tree.leaves(tree))
    jax.tree.map(np.testing.assert_array_equal, frozen["head"], full["head"])


def test_bad_fine_tuning_settings_are_explained():
    with pytest.raises(ValueError, match=r"needs 4, one for each of stem, stage1, stage2, stage3"):
        first_update(stage_lr_multipliers=(0.1, 1.0))
    with pytest.raises(ValueError, match="choose one"):
        first_update(stage_lr_multipliers=(0.1, 1.0, 1.0, 1.0), freeze_backbone=True)
    with pytest.raises(ValueError, match=">= 0"):
        first_update(stage_lr_multipliers=(-0.1, 1.0, 1.0, 1.0))


def test_frozen_bn_trains_on_the_running_statistics_and_keeps_them():
    model = create_model("resnet8")
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    labels = jnp.arange(4)
    variables = model.init(jax.random.key(0), images, train=False)
    variables["batch_stats"] = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])  # not the batch's
    state = TrainState.create(
        apply_fn=frozen_bn(model), params=variables["params"], batch_stats=variables["batch_stats"], tx=optax.sgd(0.1)
    )
    step = jax.jit(train_step)
    new_state, metrics = step(state, {"image": images, "label": labels})
    logits, _ = model.apply(variables, images, train=False)
    assert float(metrics["loss"]) == pytest.approx(float(cross_entropy(logits, labels).mean()), rel=1e-6)
    jax.tree.map(np.testing.assert_array_equal, new_state.batch_stats, variables["batch_stats"])


def test_init_from_refuses_another_model_structure_or_folder(pretrained, idx_dir):
    run, _ = pretrained
    config = small_config(idx_dir, init_from=str(run), model="resnet14")
    state = create_train_state(build_model(config, 10), optax.identity(), (28, 28, 1), 0)
    with pytest.raises(ValueError, match="holds resnet8 weights, not resnet14"):
        init_from_checkpoint(state, config)
    config = small_config(idx_dir, init_from=str(run))
    config.model_overrides.shortcut = "B"
    state = create_train_state(build_model(config, 10), optax.identity(), (28, 28, 1), 0)
    with pytest.raises(ValueError, match="another structure than this model"):
        init_from_checkpoint(state, config)
    config = small_config(idx_dir, init_from=str(idx_dir))
    with pytest.raises(FileNotFoundError, match="No checkpoints/ folder in"):
        init_from_checkpoint(state, config)


@pytest.mark.parametrize("size", [12, 28, 64])
def test_resize_is_jax_image_resize_on_the_host(size):
    images = np.random.default_rng(0).normal(size=(3, 28, 28, 2)).astype(np.float32)
    expected = jax.image.resize(images, (3, size, size, 2), "linear", antialias=True)
    np.testing.assert_allclose(resize(images, size), expected, atol=1e-5)


def test_image_size_resizes_training_and_evaluation_batches(idx_dir):
    train, test = (
        load_source("fashion_mnist", "train", str(idx_dir)),
        load_source("fashion_mnist", "test", str(idx_dir)),
    )
    settings = BatchSettings(4, eval_batch_size=5, crop_padding=2)
    resized = next(train.train_batches(dataclasses.replace(settings, image_size=40), start_step=3))
    plain = next(train.train_batches(settings, start_step=3))
    assert resized["image"].shape == (4, 40, 40, 1)
    np.testing.assert_allclose(resized["image"], resize(plain["image"], 40), atol=1e-6)
    np.testing.assert_array_equal(resized["label"], plain["label"])
    batches = list(test.eval_batches(dataclasses.replace(settings, image_size=40)))
    assert [b["image"].shape for b in batches] == [(5, 40, 40, 1)] * 2
    assert not batches[-1]["image"][3:].any()  # 8 images: the padding rows stay zero
    with pytest.raises(ValueError, match="positive number of pixels"):
        dataclasses.replace(settings, image_size=0)


@pytest.mark.slow  # resnet18 train and eval steps compile for about 25 s; the mechanics are tested on resnet8 above
def test_the_fine_tuning_config_starts_from_converted_torchvision_weights(idx_dir, tmp_path, capsys):
    module = random_torchvision("resnet18")  # 1,000 classes, RGB
    torch.save(module.state_dict(), tmp_path / "resnet18.pth")
    convert_torch_checkpoint(tmp_path / "resnet18.pth", "resnet18", tmp_path / "torchvision", load_config(DEFAULT))
    config = load_config(
        REPO / "configs" / "fashion_mnist_finetune_resnet18.py",
        [
            f"--config.init_from={tmp_path / 'torchvision'}",
            f"--config.data_dir={idx_dir}",
            "--config.batch_size=8",
            "--config.eval_batch_size=8",
            "--config.num_train_steps=1",
            "--config.warmup_steps=0",
        ],
    )
    train_and_evaluate(config, tmp_path / "tuned")
    out = capsys.readouterr().out
    assert "new head for 10 classes (was 1000)" in out and "stem kernel summed" in out
    _, converted = load_torch_weights(tmp_path / "resnet18.pth", "resnet18")
    before, after = flat(converted["params"]), flat(saved_state(tmp_path / "tuned")["params"])
    assert after[("head", "kernel")].shape == (512, 10)
    for path, value in after.items():
        if path[0] != "head":  # one step at its stage's rate moved every pretrained weight
            start = before[path].sum(2, keepdims=True) if path == STEM_KERNEL else before[path]
            assert value.shape == start.shape and not np.array_equal(value, start), path
