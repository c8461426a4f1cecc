"""PyTorch weights in and out: torchvision's ResNets give the same logits after conversion and come back equal, a
file that does not fit is refused with the keys named, and `resnet-jax convert` writes a run that `load_run` and
`eval` accept (`analyze` and ``init_from``: tests/test_transfer.py; `predict`, `features`: tests/test_inference.py).

torchvision models are built with random weights (no download is possible here): see tests/torchvision_models.py.
Logits are compared in fp32 eval mode on a batch of 2 at 64x64, by max|flax - torch| / max|torch| <= 1e-4.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from torchvision_models import random_torchvision, relative_error, sample_images, to_nchw, torchvision

from resnet_jax.cli import main
from resnet_jax.data import load_source, normalize
from resnet_jax.extras import MissingExtraError
from resnet_jax.models import create_model
from resnet_jax.models.torch_weights import (
    TORCHVISION_MODELS,
    load_torch_weights,
    read_state_dict,
    save_torch_weights,
    to_tensors,
    torch_state_dict,
    variables_from_torch,
)
from resnet_jax.train.loop import evaluate
from resnet_jax.train.runs import load_run

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-4
FAST = ("resnet18", "resnet50", "resnext50_32x4d")  # the others: `pytest -m slow`


def convert_file(module: torch.nn.Module, path: Path, name: str) -> tuple:
    torch.save(module.state_dict(), path)
    return load_torch_weights(path, name)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in TORCHVISION_MODELS]
)
def test_converted_torchvision_weights_give_its_logits_and_export_back_equal(name, tmp_path):
    module = random_torchvision(name)
    model, variables = convert_file(module, tmp_path / f"{name}.pth", name)
    x = sample_images()
    with torch.no_grad():
        expected = module(to_nchw(x)).numpy()
    assert relative_error(expected[0], expected[1]) > 1e-2, "the logits barely depend on the input"
    logits, _ = jax.jit(partial(model.apply, train=False))(variables, x)
    error = relative_error(logits, expected)
    print(f"{name}: max relative logit error {error:.2e} (max |logit| {np.abs(expected).max():.3g})")
    assert error <= RTOL

    original = module.state_dict()
    back = getattr(torchvision.models, name)(weights=None)
    back.load_state_dict(to_tensors(torch_state_dict(variables)), strict=True)
    exported = back.state_dict()
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


def test_safetensors_files_in_and_out(tmp_path):
    module = random_torchvision("resnet18", num_classes=7)
    state = module.state_dict()
    safetensors.torch.save_file(state, tmp_path / "in.safetensors")
    model, variables = load_torch_weights(tmp_path / "in.safetensors", "resnet18")
    assert model.num_classes == 7
    _, from_pth = convert_file(module, tmp_path / "in.pth", "resnet18")
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, from_pth))

    for suffix in (".safetensors", ".pth"):
        written = save_torch_weights(variables, tmp_path / f"out{suffix}")
        back = read_state_dict(written)
        assert back.keys() == state.keys()
        assert all(np.array_equal(back[k], v.numpy()) for k, v in state.items())


def test_a_file_missing_an_entry_is_refused_with_its_key(tmp_path):
    state = random_torchvision("resnet18").state_dict()
    del state["layer2.1.bn2.running_var"]
    torch.save(state, tmp_path / "cut.pth")
    with pytest.raises(
        ValueError, match=r"cut\.pth does not fit resnet18: missing entries \(1\): layer2\.1\.bn2\.running_var"
    ):
        load_torch_weights(tmp_path / "cut.pth", "resnet18")


def test_unexpected_entries_and_shape_mismatches_name_the_keys():
    resnet34 = {k: v.numpy() for k, v in torchvision.models.resnet34(weights=None).state_dict().items()}
    with pytest.raises(
        ValueError, match=r"unexpected entries \(\d+\): layer1\.2\.bn1\.bias.*torchvision's ResNets are"
    ):
        variables_from_torch(resnet34, create_model("resnet18"), "resnet18")
    resnet50 = {k: v.numpy() for k, v in random_torchvision("resnet50").state_dict().items()}
    with pytest.raises(ValueError, match=r"shapes differ .*layer1\.0\.conv1\.weight is \(64, 64, 1, 1\) where "):
        variables_from_torch(resnet50, create_model("resnext50_32x4d"), "resnext50_32x4d")


def test_unreadable_files_and_layers_without_torch_counterpart_are_explained(tmp_path, monkeypatch):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a model, not its state_dict
    with pytest.raises(ValueError, match=r"torch.save\(model.state_dict\(\), FILE\)"):
        read_state_dict(tmp_path / "module.pth")
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match="not a state_dict of tensors"):
        read_state_dict(tmp_path / "wrapped.pth")
    with pytest.raises(FileNotFoundError, match="No weights file"):
        read_state_dict(tmp_path / "absent.pth")
    preact = partial(create_model("preact_resnet8").init, train=False)
    variables = jax.eval_shape(preact, jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))  # names suffice
    with pytest.raises(ValueError, match="no counterpart in torchvision's ResNet layout"):
        torch_state_dict(variables)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(MissingExtraError, match=r"pip install 'resnet-jax\[torch\]'"):
        read_state_dict(tmp_path / "module.pth")


def test_convert_writes_a_run_that_load_run_and_eval_accept_and_that_exports_back(tmp_path, capsys):
    module = random_torchvision("resnet18", num_classes=10)
    torch.save(module.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "converted"
    settings = ["--config.dataset=synthetic", "--config.eval_split=test[:8]", "--config.eval_batch_size=8"]
    args = ["convert", "--from-torch", str(tmp_path / "resnet18.pth"), "--model", "resnet18", "--out", str(out)]
    assert main([*args, "--config", str(REPO / "configs" / "default.py"), *settings]) == 0
    assert "resnet18 with 10 classes as step 0 of a run on synthetic" in capsys.readouterr().out
    assert main([*args, "--config", str(REPO / "configs" / "default.py")]) == 2  # never over a run
    assert f"--out {out} exists; choose a new folder, or add --force" in capsys.readouterr().err

    # load_run rebuilds the train state of a training run: the converted weights at step 0
    model, state, config = load_run(out)
    _, variables = load_torch_weights(tmp_path / "resnet18.pth", "resnet18")
    assert int(state.step) == 0 and (config.model, config.dataset, model.num_classes) == ("resnet18", "synthetic", 10)
    assert jax.tree.all(
        jax.tree.map(np.array_equal, {"params": state.params, "batch_stats": state.batch_stats}, variables)
    )

    # eval measures the torch model's loss and accuracy on the same images
    metrics = evaluate(out)
    source = load_source("synthetic", "test[:8]")
    with torch.no_grad():
        logits = module(to_nchw(normalize(source.images, source.mean, source.std)))
    labels = torch.from_numpy(source.labels).long()
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-4)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))

    # and the run's weights go back out as torchvision's state_dict
    assert main(["convert", "--checkpoint", str(out), "--to-torch", str(tmp_path / "back.safetensors")]) == 0
    back = torchvision.models.resnet18(weights=None, num_classes=10)
    back.load_state_dict(safetensors.torch.load_file(tmp_path / "back.safetensors"), strict=True)
    for key, value in module.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
