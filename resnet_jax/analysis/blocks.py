"""Every residual block of a model as a function of its own input: y(x), F(x) and shortcut(x).

`capture_blocks` runs the model once (BN in inference mode), intercepting its blocks, and
records, for each `ResidualBlock`, an unbound copy of the module, its variables, the input it
received and which shortcut submodule it called. `block_parts` then runs one block alone on any
input and reads what the block sows: its ``branch_output`` F and its shortcut's value
``skip``. Nothing of the model is re-implemented here, so the analysis measures exactly the
network that trains.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from resnet_jax.analysis.interception import BLOCK, SHORTCUT_MODULE, Call, intercept
from resnet_jax.models.blocks import PadShortcut, ProjectionShortcut, ResidualBlock

# The identity of the block Jacobian J = dy/dx, by (kind, preact). D is the ReLU mask 1[s + F > 0] of a
# post-activation block, P the subsample-and-zero-pad map of shortcut "A", W_s the (affine) projection
# conv + BN. A pre-activation projection reads relu(bn(x)), so its Jacobian J_s is not a fixed matrix.
FORMS = {
    ("identity", False): "J = D(I + J_F)",
    ("pad", False): "J = D(P + J_F)",
    ("projection", False): "J = D(W_s + J_F)",
    ("plain", False): "J = D J_F",
    ("identity", True): "J = I + J_F",
    ("pad", True): "J = P + J_F",
    ("projection", True): "J = J_s + J_F",
    ("plain", True): "J = J_F",
}


@dataclasses.dataclass(frozen=True)
class BlockInfo:
    """Where a block sits and what joins its branch to its input."""

    stage: int  # 1-based, as in the parameter names stage1, stage2, ...
    index: int  # 0-based within the stage (block0 is the one that downsamples)
    depth: int  # 0-based position among all blocks of the model
    kind: str  # the shortcut: "identity", "pad" (shortcut "A": subsample and pad), "projection", or "plain" (none)
    preact: bool  # pre-activation: y = s + F; post-activation: y = relu(s + F)
    input_shape: tuple[int, ...]  # of one example (H, W, C)
    output_shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"stage{self.stage}/block{self.index}"

    @property
    def form(self) -> str:
        """The Jacobian identity this block obeys (see FORMS)."""
        return FORMS[self.kind, self.preact]


@dataclasses.dataclass(frozen=True)
class Block:
    """One captured block: an unbound module, its variables and the input it received in the forward pass."""

    info: BlockInfo
    module: ResidualBlock
    variables: dict[str, Any]
    inputs: jax.Array  # (batch, H, W, C)

    @property
    def structure(self) -> tuple:
        """Blocks with equal structure compute the same function of (variables, x): one compiled program serves all."""
        shapes = str(jax.tree.map(np.shape, self.variables))
        return (self.info.kind, self.info.preact, self.info.output_shape, self.inputs.shape, self.inputs.dtype, shapes)


def capture_blocks(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> list[Block]:
    """Run ``model`` on ``images`` with BN in inference mode and capture every residual block, in order."""
    blocks: list[Block] = []
    shortcuts: dict[int, type] = {}  # depth -> the class of the block's shortcut submodule, where it has one

    def record_shortcut(call: Call) -> jax.Array:
        shortcuts[call.depth] = type(call.module)
        return call.run()

    def capture(call: Call) -> jax.Array:
        module, x = call.module, call.inputs
        y = call.run()
        kind = _kind(module.skip_connection, shortcuts.get(call.depth))
        stage, index = _position(module.path)
        info = BlockInfo(stage, index, call.depth, kind, module.preact, tuple(x.shape[1:]), tuple(y.shape[1:]))
        blocks.append(Block(info, module.clone(parent=None), module.variables, x))
        return y

    with intercept({BLOCK: capture, SHORTCUT_MODULE: record_shortcut}):
        model.apply(variables, images, train=False)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no ResidualBlock; the block analyses need a ResNet of the zoo.")
    return blocks


def block_parts(block: Block, variables: dict[str, Any], x: jax.Array) -> dict[str, jax.Array]:
    """The block on input ``x``: its ``output`` y, its ``branch`` F and (blocks with a skip connection) its
    ``shortcut``.

    For pre-activation blocks F includes the block's leading BN-ReLU, so y = shortcut + F exactly.
    """
    y, state = block.module.apply(variables, x, mutable=["intermediates"])
    sown = state["intermediates"]
    parts = {"output": y, "branch": sown["branch_output"][0]}
    if "skip" in sown:
        parts["shortcut"] = sown["skip"][0]
    return parts


def _kind(skip_connection: bool, shortcut: type | None) -> str:
    if not skip_connection:
        return "plain"
    return {None: "identity", PadShortcut: "pad", ProjectionShortcut: "projection"}[shortcut]


def _position(path: tuple[str, ...]) -> tuple[int, int]:
    """(stage, index) from a module path such as ("stage2", "block0")."""
    stage, block = path[-2:]
    return int(stage.removeprefix("stage")), int(block.removeprefix("block"))
