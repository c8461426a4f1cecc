"""Parameter counts and multiply-adds, per stage and in total, from shapes alone (nothing runs).

Multiply-adds count convolutions and dense layers, as torchvision's model table does: a conv
costs H_out * W_out * k_h * k_w * C_in / groups * C_out per image, a dense layer C_in * C_out.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class StageCost:
    """One row of the summary: a top-level submodule (stem, stageN, final_bn, head)."""

    name: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclasses.dataclass(frozen=True)
class ModelCost:
    stages: list[StageCost]

    @property
    def params(self) -> int:
        return sum(s.params for s in self.stages)

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.stages)


def count_params(variables: Any) -> int:
    """Number of scalars in ``variables["params"]`` (batch statistics are not parameters)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables["params"]))


def model_cost(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelCost:
    """Per-stage output shape, parameters and multiply-adds for one image of ``input_shape`` (H, W, C)."""
    macs: dict[str, int] = defaultdict(int)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module, path = context.module, context.module.path
        if context.method_name != "__call__" or not path:
            return out
        top = path[0]
        if len(path) == 1:
            shapes[top] = tuple(jax.tree.leaves(out)[0].shape[1:])
        if isinstance(module, nn.Conv):
            kernel = math.prod(module.kernel_size)
            in_channels = args[0].shape[-1] // module.feature_group_count
            macs[top] += math.prod(out.shape[1:-1]) * kernel * in_channels * out.shape[-1]
        elif isinstance(module, nn.Dense):
            macs[top] += math.prod(out.shape[1:-1]) * args[0].shape[-1] * out.shape[-1]
        return out

    def init() -> Any:
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)

    params = jax.eval_shape(init)["params"]
    stages = [  # in the order the forward pass reaches them
        StageCost(name, shape, sum(math.prod(x.shape) for x in jax.tree.leaves(params.get(name, {}))), macs[name])
        for name, shape in shapes.items()
    ]
    return ModelCost(stages)


def format_summary(name: str, cost: ModelCost, input_shape: tuple[int, int, int]) -> str:
    """A table like torchvision's model card: one row per stage, then totals."""
    rows = [(s.name, "x".join(map(str, s.output_shape)), f"{s.params:,}", f"{s.macs / 1e6:,.2f}") for s in cost.stages]
    rows.append(("total", "", f"{cost.params:,}", f"{cost.macs / 1e6:,.2f}"))
    header = ("stage", "output (HxWxC)", "params", "MMACs")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "  ".join([f"{{:<{widths[0]}}}"] + [f"{{:>{w}}}" for w in widths[1:]])
    title = (
        f"{name}  input {'x'.join(map(str, input_shape))}  {cost.params / 1e6:.3f}M params  {cost.macs / 1e9:.3f} GMACs"
    )
    rule = "-" * len(line.format(*header))
    body = [line.format(*r) for r in rows]
    return "\n".join([title, line.format(*header), rule, *body[:-1], rule, body[-1]])
