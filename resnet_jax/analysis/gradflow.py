"""Gradient flow: norms of the loss gradient block by block and layer by layer, plain against residual nets,
at initialisation and along training.

The loss is the mean cross-entropy of a real batch with BN in training mode (batch statistics), i.e.
the gradient that the optimiser gets; the running statistics are left as they are. Gradients with
respect to activations come from zero perturbations added (by intercepting their calls) to the
output of every residual block and of every conv and dense layer: dL/d(perturbation) = dL/d(output).
Norms are Frobenius norms over the whole batch. Nothing is asserted about them: with BN, plain-net
gradients need not vanish (He et al. 2016).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.common import ModelSnapshot, line_styles, pyplot, save_figure, write_json
from resnet_jax.analysis.interception import Call, Target, intercept
from resnet_jax.models.blocks import ResidualBlock
from resnet_jax.train.steps import cross_entropy

# The outputs whose gradients are measured: every residual block, and per layer every conv and the head.
TAPPED = Target((ResidualBlock, nn.Conv, nn.Dense))


def gradient_norms(model: nn.Module, variables: dict[str, Any], images: jax.Array, labels: jax.Array) -> dict[str, Any]:
    """The loss and, in forward order, per block and per layer: ||dL/d output|| and ||dL/d parameters||
    (and per layer ||kernel||, for the relative size of an update). A model trained with stochastic depth is
    measured whole: the gradients of the function its weights compute, not of one random draw of its blocks."""
    if getattr(model, "drop_path_rate", 0.0):
        model = model.clone(drop_path_rate=0.0)
    paths = _tapped_outputs(model, variables, images)
    zeros = {path: jnp.zeros(shape, dtype) for path, (shape, dtype, _) in paths.items()}
    loss, (param_grads, output_grads) = _loss_and_grads(model, variables, images, labels, zeros)
    params = variables["params"]
    blocks, layers = [], []
    for path, (_, _, is_block) in paths.items():
        names = path.split("/")
        row = {
            "name": path,
            "output_grad": _norm(output_grads[path]),
            "param_grad": _norm(_subtree(param_grads, names)),
        }
        if is_block:
            blocks.append({"depth": len(blocks), **row})
        else:
            layers.append({"index": len(layers), **row, "kernel": _norm(_subtree(params, names)["kernel"])})
    return {"loss": float(loss), "blocks": blocks, "layers": layers}


@partial(jax.jit, static_argnums=0)
def _loss_and_grads(
    model: nn.Module, variables: dict[str, Any], images: jax.Array, labels: jax.Array, perturbations: dict[str, Any]
) -> tuple[jax.Array, tuple[Any, Any]]:
    def loss_fn(params: Any, perturbations: dict[str, jax.Array]) -> jax.Array:
        def perturb(call: Call) -> jax.Array:
            out = call.run()
            return out + perturbations[call.path] if call.path in perturbations else out

        with intercept({TAPPED: perturb}):
            (logits, _), _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean()

    return jax.value_and_grad(loss_fn, argnums=(0, 1))(variables["params"], perturbations)


def _tapped_outputs(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> dict[str, tuple]:
    """Path -> (output shape, dtype, is a block) of every residual block and layer, in forward order."""
    found: dict[str, tuple] = {}

    def record(call: Call) -> jax.Array:
        out = call.run()
        found[call.path] = (out.shape, out.dtype, isinstance(call.module, ResidualBlock))
        return out

    with intercept({TAPPED: record}):
        jax.eval_shape(partial(model.apply, train=True, mutable=["batch_stats"]), variables, images)
    return found


def _subtree(tree: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        tree = tree[name]
    return tree


def _norm(tree: Any) -> float:
    return float(np.sqrt(sum(float(jnp.sum(jnp.square(leaf))) for leaf in jax.tree.leaves(tree))))


def analyze_gradflow(
    snapshots: Sequence[ModelSnapshot], images: jax.Array, labels: jax.Array, out: str | Path
) -> dict[str, Any]:
    """`gradient_norms` of every snapshot on one batch; writes gradflow.json and gradflow.png to ``out``."""
    out = Path(out)
    runs = []
    for snapshot in snapshots:
        norms = gradient_norms(snapshot.model, snapshot.variables, images, labels)
        blocks = norms["blocks"]
        runs.append(
            {
                **snapshot.report_fields(),
                # < 1: the gradient shrinks from the last block back to the first
                "first_to_last_block_ratio": blocks[0]["output_grad"] / blocks[-1]["output_grad"],
                **norms,
            }
        )
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "loss": "mean cross-entropy, BN in training mode",
            "norms": "Frobenius over the whole batch",
        },
        "runs": runs,
    }
    write_json(out / "gradflow.json", report)
    plot_gradflow(runs, out / "gradflow.png")
    return report


def plot_gradflow(runs: list[dict[str, Any]], path: Path) -> Path:
    """||dL/d block output|| against block depth (left) and ||dL/d kernel|| against layer (right), log scale;
    one colour per model, darker for later checkpoints."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for run, style in zip(runs, line_styles(runs), strict=True):
        axes[0].plot([b["depth"] + 1 for b in run["blocks"]], [b["output_grad"] for b in run["blocks"]], ".-", **style)
        axes[1].plot([la["index"] + 1 for la in run["layers"]], [la["param_grad"] for la in run["layers"]], **style)
    labels = (("block (input to output)", "||dL/d block output||"), ("conv/dense layer (input to output)", "||dL/dW||"))
    for ax, (xlabel, ylabel) in zip(axes, labels, strict=True):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path, "Gradient of the loss (BN in training mode) through depth")
