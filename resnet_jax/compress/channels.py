"""Channel pruning by batch-norm scale (``resnet-jax prune-channels``; Liu et al. 2017, "network slimming"): the
structured variant of pruning, which removes whole channels and so shrinks the convs themselves.

In a basic block's branch, conv1 -> bn1 -> relu -> conv2, channel c between the convs reaches conv2 as
relu(gamma_c * z + beta_c): a small |gamma_c| makes it nearly constant, and conv2 can do without it. The channels
of every branch are ranked together by |gamma| and the smallest ``fraction`` removed, each branch keeping at least
one: conv1 loses those output filters, bn1 those entries, conv2 those input channels. The block's output width (and
so the residual sum) is untouched. The narrower model is a ResNet with ``inner_widths``; it is written as a run
folder (``model_overrides.inner_widths`` in its config) and fine-tuned there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from resnet_jax.compress.derived import check_new_folder, load_float_run, source_meta, write_derived_run

Block = tuple[str, ...]  # the path of a block, e.g. ("stage1", "block0")


def kept_channels(params: Any, fraction: float) -> dict[Block, np.ndarray]:
    """For every basic block (by path), the indices of the channels between its branch's convs that survive
    removing the ``fraction`` of all such channels with the smallest |bn1 scale| (at least one per block)."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    scales = {path[:-3]: np.abs(np.asarray(v)) for path, v in flat.items() if path[-3:] == ("branch", "bn1", "scale")}
    if not scales:
        raise ValueError("This model has no basic blocks (conv1 -> bn1 -> conv2 branches) to prune channels of.")
    everything = np.sort(np.concatenate(list(scales.values())))
    threshold = everything[int(np.floor(fraction * everything.size)) - 1] if fraction > 0 else -np.inf
    kept = {}
    for block, scale in sorted(scales.items()):
        keep = np.flatnonzero(scale > threshold)
        kept[block] = keep if keep.size else np.array([int(np.argmax(scale))])
    return kept


def narrowed_variables(variables: dict[str, Any], kept: dict[Block, np.ndarray]) -> dict[str, Any]:
    """``variables`` (params and batch_stats) with only the ``kept`` channels between each branch's convs."""
    narrowed = {}
    for collection, tree in variables.items():
        flat = traverse_util.flatten_dict(jax.device_get(tree))
        for path, value in flat.items():
            block, rest = path[:2], path[2:]
            if block not in kept or rest[:1] != ("branch",):
                continue
            if rest[1:] == ("conv1", "kernel"):
                flat[path] = np.asarray(value)[..., kept[block]]
            elif rest[1] == "bn1":
                flat[path] = np.asarray(value)[kept[block]]
            elif rest[1:] == ("conv2", "kernel"):
                flat[path] = np.asarray(value)[:, :, kept[block], :]
        narrowed[collection] = traverse_util.unflatten_dict(flat)
    return narrowed


def prune_channels_run(checkpoint: str | Path, out: str | Path, fraction: float, fine_tune_steps: int) -> dict:
    """Write ``checkpoint``'s latest step without the ``fraction`` of branch channels with the smallest BN scales
    as that step of a run in ``out``, then train it ``fine_tune_steps`` more steps there. Returns its meta."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction}; give the fraction of branch channels to remove, in [0, 1).")
    out = check_new_folder(out, fine_tune_steps)
    model, state, config = load_float_run(checkpoint)
    if model.inner_widths is not None:
        raise ValueError(f"{checkpoint} is channel-pruned already; prune the run it was made from.")
    kept = kept_channels(state.params, fraction)
    widths = [[0] * n for n in model.stage_sizes]
    for (stage, block), channels in kept.items():
        widths[int(stage.removeprefix("stage")) - 1][int(block.removeprefix("block"))] = int(channels.size)
    config = config.copy_and_resolve_references()
    config.model_overrides.inner_widths = tuple(tuple(stage) for stage in widths)
    variables = narrowed_variables({"params": state.params, "batch_stats": state.batch_stats}, kept)
    origin = {"channel_pruned_from": str(Path(checkpoint).resolve()), "channel_fraction": fraction}
    return write_derived_run(
        out, config, model.num_classes, variables, int(state.step), fine_tune_steps, origin | source_meta(checkpoint)
    )
