"""The Flax ResNets compute the same function as an independent PyTorch implementation.

Flax variables are filled with random values (including non-trivial BatchNorm scales, offsets and
running statistics, so that eval mode is a real test), copied into the reference modules by the package's
torch name map (`resnet_jax.models.torch_weights`, strict: every entry set and used, every shape checked),
and both sides run the same fp32 batch in eval mode (running statistics) and train mode (batch
statistics, plus the running-statistics update).

Error metric, used throughout: ``max|flax - torch| / max|torch|`` over the whole tensor (the
reference's largest magnitude sets the scale, so entries near zero do not blow it up). Both sides
compute in float32; the tolerance is 1e-4.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convs import CONVS
from flax import traverse_util

from resnet_jax import create_model
from resnet_jax.bench import torch_models as ref
from resnet_jax.models.torch_weights import to_tensors, torch_state_dict

RTOL = 1e-4
BATCH = 2
FLAX_MOMENTUM = 0.9  # flax keeps `momentum` of the old statistics: torch's momentum 0.1

# name -> (torch reference constructor, input height = width). ImageNet models at their real
# 224x224 resolution; the CIFAR model at 32x32.
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "resnet18": (ref.resnet18, 224),
    "resnet50": (ref.resnet50, 224),
    "resnet20": (lambda: ref.cifar_resnet(20), 32),
    "resnet50_v1": (ref.resnet50_v1, 224),
}


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max|actual - reference| / max|reference|."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


# --- random variables, built once per model -----------------------------------------------------


def random_variables(model: Any, size: int, seed: int = 0) -> dict[str, Any]:
    """Variables with the structure ``model.init`` gives, filled with seeded random values.

    ``jax.eval_shape`` traces ``init`` without running it (running it costs seconds per model).
    Conv kernels are He-normal (fan in) so activations keep their scale with depth; BN scales are
    positive U(0.5, 1.5), BN biases N(0, 0.2^2); the head has N(0, 1/in) weights and N(0, 0.1^2)
    biases. Running means N(0, 0.2^2) and variances U(0.5, 2) are placeholders that
    `calibrate_running_stats` replaces. All distinct, so a swapped or misrouted tensor changes the
    output.
    """
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)

    def fill(path: tuple[str, ...], spec: jax.ShapeDtypeStruct) -> np.ndarray:
        leaf, shape = path[-1], spec.shape
        if leaf == "kernel" and len(shape) == 4:
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif leaf == "kernel":
            value = rng.normal(0.0, np.sqrt(1.0 / shape[0]), shape)
        elif leaf == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "bias":
            value = rng.normal(0.0, 0.1 if path[-2] == "head" else 0.2, shape)
        elif leaf == "mean":
            value = rng.normal(0.0, 0.2, shape)
        elif leaf == "var":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            raise KeyError(f"Unexpected variable {'/'.join(path)}")
        assert spec.dtype == jnp.float32, (path, spec.dtype)
        return value.astype(np.float32)

    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict({path: fill(path, spec) for path, spec in flat.items()})


def calibrate_running_stats(model: Any, variables: dict[str, Any], x: np.ndarray, seed: int = 2) -> dict[str, Any]:
    """Running statistics near, but not equal to, the batch statistics of ``x`` at every BN layer.

    With arbitrary running statistics the un-normalised activations grow with depth (logits in
    the thousands for ResNet-50), and then a wrong BN bias or mean deep in the network changes
    the logits by less than the tolerance. So take each layer's batch mean and (biased) variance
    from one train-mode step, recovered from ``new = 0.9 * old + 0.1 * batch``, and perturb them:
    mean + N(0, 0.5^2) * std, variance * U(0.5, 2). Eval mode then keeps activations of order one
    while still differing clearly from train mode.
    """
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    rng = np.random.default_rng(seed)
    old = traverse_util.flatten_dict(variables["batch_stats"])
    new = traverse_util.flatten_dict(jax.device_get(updates["batch_stats"]))
    momentum = FLAX_MOMENTUM
    stats = {path: (np.asarray(new[path], np.float64) - momentum * old[path]) / (1 - momentum) for path in old}
    calibrated = {}
    for path, batch in stats.items():
        if path[-1] == "mean":
            std = np.sqrt(np.maximum(stats[(*path[:-1], "var")], 1e-6))
            value = batch + rng.normal(0.0, 0.5, batch.shape) * std
        else:
            value = np.maximum(batch, 1e-6) * rng.uniform(0.5, 2.0, batch.shape)
        calibrated[path] = value.astype(np.float32)
    return {**variables, "batch_stats": traverse_util.unflatten_dict(calibrated)}


@functools.cache
def setup(name: str, conv: str) -> tuple[Any, dict[str, Any], np.ndarray]:
    """(flax model computing with the ``conv`` of `CONVS`, its random variables, an NHWC fp32 input batch) for a
    model name."""
    _, size = MODELS[name]
    model = create_model(name, conv=CONVS[conv])
    x = np.random.default_rng(1).normal(size=(BATCH, size, size, 3)).astype(np.float32)
    variables = calibrate_running_stats(model, random_variables(model, size), x)
    return model, variables, x


def torch_model(name: str, variables: dict[str, Any]) -> torch.nn.Module:
    module = MODELS[name][0]()
    module.load_state_dict(to_tensors(torch_state_dict(variables)), strict=True)
    return module


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def check_logits(flax_logits: Any, torch_logits: torch.Tensor, label: str) -> None:
    actual, reference = np.asarray(flax_logits), torch_logits.numpy()
    assert actual.dtype == reference.dtype == np.float32
    # The output must depend on the input, else equal logits would prove little.
    assert relative_error(reference[0], reference[1]) > 1e-2, f"{label}: logits barely depend on the input"
    error = relative_error(actual, reference)
    print(f"{label}: max relative logit error {error:.2e} (max |logit| {np.abs(reference).max():.3g})")
    assert error <= RTOL, f"{label}: relative logit error {error:.2e} > {RTOL}"


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("name", list(MODELS))
def test_eval_mode_matches_torch(name: str, conv: str) -> None:
    model, variables, x = setup(name, conv)
    module = torch_model(name, variables).eval()
    with torch.no_grad():
        expected = module(to_nchw(x))
    logits, _ = model.apply(variables, x, train=False)
    check_logits(logits, expected, f"{name} eval, {conv}")


@pytest.mark.parametrize("conv", list(CONVS))
@pytest.mark.parametrize("name", list(MODELS))
def test_train_mode_matches_torch(name: str, conv: str) -> None:
    model, variables, x = setup(name, conv)
    module = torch_model(name, variables).train()

    # Count the values each BN layer normalises over (batch * height * width) for the variance check.
    counts: dict[str, int] = {}
    for layer_name, layer in module.named_modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.register_forward_pre_hook(
                lambda _, inputs, n=layer_name: counts.__setitem__(n, inputs[0].numel() // inputs[0].shape[1])
            )
    with torch.no_grad():
        expected = module(to_nchw(x))
    (logits, _), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    check_logits(logits, expected, f"{name} train, {conv}")

    # Running statistics after one step. Both use new = 0.9 * old + 0.1 * batch_statistic, but torch
    # updates running_var with the unbiased batch variance (n / (n - 1) times the biased one) while
    # Flax uses the biased one, so rescale Flax's batch-variance term by n / (n - 1) first.
    old = torch_state_dict({"batch_stats": variables["batch_stats"]})
    new = torch_state_dict({"batch_stats": updates["batch_stats"]})
    torch_state = module.state_dict()
    assert {k.removesuffix(".running_mean") for k in new if k.endswith(".running_mean")} == set(counts)
    worst_mean = worst_var = 0.0
    for bn, n in counts.items():
        mean_error = relative_error(new[f"{bn}.running_mean"], torch_state[f"{bn}.running_mean"].numpy())
        old_var, new_var = old[f"{bn}.running_var"], new[f"{bn}.running_var"]
        unbiased_new_var = FLAX_MOMENTUM * old_var + (new_var - FLAX_MOMENTUM * old_var) * n / (n - 1)
        var_error = relative_error(unbiased_new_var, torch_state[f"{bn}.running_var"].numpy())
        assert mean_error <= RTOL, f"{name} {bn}.running_mean: relative error {mean_error:.2e}"
        assert var_error <= RTOL, f"{name} {bn}.running_var: relative error {var_error:.2e}"
        worst_mean, worst_var = max(worst_mean, mean_error), max(worst_var, var_error)
    print(f"{name} train, {conv}: max relative error running_mean {worst_mean:.2e}, running_var {worst_var:.2e}")
