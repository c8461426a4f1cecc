"""Inference on image files: torchvision's preprocessing, top-k classes with ImageNet names and feature maps that
match the torchvision model, one compilation for every batch, and `resnet-jax predict` / `features`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision_models import random_torchvision, relative_error, to_nchw, torchvision, transforms

from resnet_jax.cli import main
from resnet_jax.inference import (
    CLASS_FILE,
    Inference,
    checkpoint_inference,
    imagenet_class_names,
    load_images,
    preprocess,
    read_image,
)

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three files: a landscape PNG, a portrait JPEG smaller than the resize, a greyscale PNG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (height, width), mode in (
        ("wide.png", (180, 300), "RGB"),
        ("tall.jpg", (150, 100), "RGB"),
        ("grey.png", (90, 90), "L"),
    ):
        ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        image.convert(mode).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A random torchvision resnet18 and its `convert` output (1,000 ImageNet classes)."""
    folder = tmp_path_factory.mktemp("converted")
    module = random_torchvision("resnet18")
    torch.save(module.state_dict(), folder / "resnet18.pth")
    weights, config = str(folder / "resnet18.pth"), str(REPO / "configs" / "default.py")
    args = ["convert", "--from-torch", weights, "--model", "resnet18", "--config", config, "--out", str(folder / "run")]
    assert main(args) == 0  # a run on imagenet2012
    return module, folder / "run"


def test_preprocessing_is_torchvisions_evaluation_transform(images):
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    for path in images:
        image = read_image(path)
        ours = preprocess(image)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, reference(image).numpy().transpose(1, 2, 0), atol=1e-5)


def test_imagenet_class_names_ship_with_the_package():
    names = imagenet_class_names()
    assert names == tuple(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert CLASS_FILE in package_data["resnet_jax.data"]  # installed packages carry the file too


def test_predictions_and_features_match_the_torchvision_model_and_compile_once(converted, images):
    module, run = converted
    inference, config = checkpoint_inference(run, batch_size=2)
    batch = load_images(images, config, channels=3, size=64, resize=72)
    with torch.no_grad():
        logits = module(to_nchw(batch))
        maps = {}
        stages = {f"c{i + 1}": getattr(module, f"layer{i}") for i in range(1, 5)}
        hooks = [
            stage.register_forward_hook(lambda _, __, output, n=name: maps.__setitem__(n, output.numpy()))
            for name, stage in stages.items()
        ]
        module(to_nchw(batch))
        for hook in hooks:
            hook.remove()
    classes, probabilities = inference.predict(batch, top_k=5)
    expected = torch.softmax(logits.double(), -1).topk(5)
    np.testing.assert_array_equal(classes, expected.indices.numpy())
    np.testing.assert_allclose(probabilities, expected.values.numpy(), rtol=1e-4)

    features = inference.features(batch)
    assert list(features) == ["c2", "c3", "c4", "c5", "pre_logits"]
    for name, value in maps.items():
        assert relative_error(features[name], value.transpose(0, 2, 3, 1)) <= 1e-4, name
    pooled = maps["c5"].mean(axis=(2, 3))
    assert relative_error(features["pre_logits"], pooled) <= 1e-4
    assert (
        inference.forward._cache_size() == 2
    )  # 3 images in batches of 2: one compilation each for logits and features


def test_predict_prints_the_top_classes_by_name(converted, images, capsys):
    module, run = converted
    args = ["predict", "--checkpoint", str(run), *map(str, images), "--size", "64", "--resize", "72", "--top-k", "3"]
    assert main([*args, "--batch-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::4] == [str(p) for p in images]
    names = imagenet_class_names()
    _, config = checkpoint_inference(run)
    with torch.no_grad():
        top = torch.softmax(module(to_nchw(load_images(images, config, 3, 64, 72))), -1).topk(3)
    for i in range(len(images)):
        for rank in range(3):
            index, chance = int(top.indices[i, rank]), float(top.values[i, rank])
            assert lines[4 * i + 1 + rank] == f"  {rank + 1}. {chance:.4f}  {names[index]} ({index})"


def test_features_writes_the_maps_of_every_image(converted, images, tmp_path, capsys):
    module, run = converted
    out = tmp_path / "features.npz"
    args = ["features", "--checkpoint", str(run), *map(str, images), "--size", "64", "--resize", "64"]
    assert main([*args, "--out", str(out), "--feature", "c4", "--feature", "pre_logits"]) == 0
    assert f"3 image(s) -> {out}: c4 (3, 4, 4, 256), pre_logits (3, 512)" in capsys.readouterr().out
    saved = np.load(out)
    assert list(saved["paths"]) == [str(p) for p in images]
    _, config = checkpoint_inference(run)
    with torch.no_grad():  # torchvision's layer3 output and pooled layer4 output
        x = to_nchw(load_images(images, config, 3, 64, 64))
        c4 = module.layer3(module.layer2(module.layer1(module.maxpool(module.relu(module.bn1(module.conv1(x)))))))
        pooled = module.layer4(c4).mean(dim=(2, 3))
    assert relative_error(saved["c4"], c4.numpy().transpose(0, 2, 3, 1)) <= 1e-4
    assert relative_error(saved["pre_logits"], pooled.numpy()) <= 1e-4


def test_bad_images_and_settings_are_explained(converted, tmp_path, capsys):
    _, run = converted
    assert main(["predict", "--checkpoint", str(run), str(tmp_path / "absent.png")]) == 2
    assert "No such image file(s)" in capsys.readouterr().err
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image that PIL can read"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match="the crop must fit"):
        preprocess(Image.new("RGB", (10, 10)), size=64, resize=32)
    inference, _ = checkpoint_inference(run)
    with pytest.raises(ValueError, match=r"No features \['c6'\]"):
        inference.features(np.zeros((1, 32, 32, 3), np.float32), ["c6"])
    with pytest.raises(ValueError, match="batch_size=0"):
        Inference(inference.model, inference.variables, batch_size=0)
