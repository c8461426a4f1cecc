"""Lesion studies (Veit, Wilber & Belongie 2016, Sect. 4): the test error of a trained net after blocks are
deleted or reordered at test time, with BN in inference mode (running statistics, as the net predicts).

- Deleting block l replaces its output by its skip's value, y = shortcut(x): the input for an identity skip,
  the pad (shortcut "A") or the projection for a downsampling block. A plain net has no skip: there, deleting a
  layer (block) means y = x, which only its shape-preserving blocks allow.
- Reordering swaps blocks of one stage whose input and output shapes are equal (the downsampling ones stay put)
  and is reported against Kendall's tau between the original and the new order.

Deletion intercepts the blocks (`interception`): the output of ``ResidualBlock.__call__`` is replaced by the
skip's value (what the block's ``_shortcut`` returns) where a mask says so. The mask is data, so one compiled
program serves every deletion pattern. A reordered net is the same net with the variables of the swapped blocks
traded: the blocks of a swap group have the same configuration, so block j at position i computes exactly what
block j computes, and the reordered nets share that one program too. The model is not changed.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.blocks import BlockInfo, capture_blocks
from resnet_jax.analysis.common import (
    ModelSnapshot,
    ProgressLine,
    line_styles,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)
from resnet_jax.analysis.interception import BLOCK, SKIP, Call, intercept

# --- deleting blocks -----------------------------------------------------------------------------------------


def block_infos(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> list[BlockInfo]:
    """Where every block sits, its shortcut and its shapes, in forward order (one image is enough)."""
    return [block.info for block in capture_blocks(model, variables, images[:1])]


def deletable(info: BlockInfo) -> bool:
    """A residual block can always be replaced by its skip; a plain block by its input only if that has the
    block's output shape."""
    return info.kind != "plain" or info.input_shape == info.output_shape


def lesioned_logits(model: nn.Module, variables: dict[str, Any], images: jax.Array, delete: jax.Array) -> jax.Array:
    """The model's logits (BN in inference mode) with every block l where ``delete[l]`` replaced by its skip:
    y = shortcut(x), or y = x for a plain block (see `deletable`; the mask of other blocks is ignored)."""
    skips: dict[int, jax.Array] = {}  # depth -> the skip's value; a plain block has none

    def record_skip(call: Call) -> jax.Array:
        skips[call.depth] = call.run()
        return skips[call.depth]

    def delete_block(call: Call) -> jax.Array:
        y = call.run()
        replacement = skips.get(call.depth, call.inputs)
        return jnp.where(delete[call.depth], replacement, y) if replacement.shape == y.shape else y

    with intercept({BLOCK: delete_block, SKIP: record_skip}) as count:
        logits, _ = model.apply(variables, images, train=False)
    if count.blocks != delete.shape[0]:
        raise ValueError(f"A mask of {delete.shape[0]} for a model of {count.blocks} blocks; give one per block.")
    return logits


class LesionEval:
    """Predictions of one model under any deletion mask and any variables of its shapes, ``batch_size`` images a
    call: one program per model and input shape (the last batch is padded with repeats). ``traces`` counts the
    compilations."""

    def __init__(self, model: nn.Module, batch_size: int = 250) -> None:
        self.model, self.batch_size = model, batch_size
        self.traces = 0
        self._program = jax.jit(self._predict)

    def _predict(self, variables: dict[str, Any], images: jax.Array, delete: jax.Array) -> jax.Array:
        self.traces += 1
        return jnp.argmax(lesioned_logits(self.model, variables, images, delete), axis=-1)

    def predictions(self, variables: dict[str, Any], images: jax.Array, delete: Sequence[bool]) -> np.ndarray:
        """The predicted class of every image."""
        size, mask = min(self.batch_size, len(images)), jnp.asarray(delete, bool)
        predicted = []
        for start in range(0, len(images), size):
            part = images[start : start + size]
            padded = jnp.concatenate([part, jnp.repeat(part[-1:], size - len(part), axis=0)])
            predicted.append(np.asarray(self._program(variables, padded, mask))[: len(part)])
        return np.concatenate(predicted)

    def error(self, variables: dict[str, Any], images: jax.Array, labels: jax.Array, delete: Sequence[bool]) -> float:
        """The fraction of ``images`` misclassified."""
        return float(np.mean(self.predictions(variables, images, delete) != np.asarray(labels)))


# --- reordering blocks ---------------------------------------------------------------------------------------


def swap_groups(infos: Sequence[BlockInfo]) -> list[list[int]]:
    """The blocks (by depth) that can trade places: per stage, those of equal input and output shapes, where a
    stage has two or more."""
    groups: dict[int, list[int]] = {}
    for info in infos:
        if info.input_shape == info.output_shape:
            groups.setdefault(info.stage, []).append(info.depth)
    return [group for group in groups.values() if len(group) > 1]


def reordered_variables(variables: dict[str, Any], infos: Sequence[BlockInfo], order: Sequence[int]) -> dict[str, Any]:
    """The variables of the net that runs, at position i, the block ``order[i]`` (depths): each moved block's
    parameters and statistics put in the place of the block it replaces. Blocks move only within a swap group."""
    order = list(order)
    if sorted(order) != list(range(len(infos))):
        raise ValueError(f"order={order} is not a permutation of the {len(infos)} blocks' depths 0..{len(infos) - 1}.")
    group_of = {depth: i for i, group in enumerate(swap_groups(infos)) for depth in group}
    moved = [(i, j) for i, j in enumerate(order) if i != j]
    for i, j in moved:
        if i not in group_of or group_of.get(j) != group_of[i]:
            raise ValueError(
                f"Block {infos[j].name} cannot run in place of {infos[i].name}: only shape-preserving blocks of one "
                "stage can trade places."
            )
    new = flax.core.unfreeze(variables)
    for collection, tree in variables.items():
        for i, j in moved:
            stage, source = f"stage{infos[j].stage}", f"block{infos[j].index}"
            if source in tree.get(stage, {}):
                new[collection][stage][f"block{infos[i].index}"] = tree[stage][source]
    return new


def kendall_tau(order: Sequence[int]) -> float:
    """Kendall's tau between the original order 0..n-1 and ``order``: 1 unchanged, -1 reversed."""
    order = np.asarray(order)
    if len(order) < 2:
        return 1.0
    i, j = np.triu_indices(len(order), 1)
    return float(np.mean(np.sign(order[j] - order[i])))


def random_order(groups: Sequence[Sequence[int]], n: int, swaps: int, rng: np.random.Generator) -> list[int]:
    """The order of n blocks after ``swaps`` swaps, each of a pair drawn uniformly from the pairs of one group."""
    pairs = [pair for group in groups for pair in itertools.combinations(group, 2)]
    order = list(range(n))
    for _ in range(swaps):
        a, b = pairs[rng.integers(len(pairs))]
        order[a], order[b] = order[b], order[a]
    return order


def deletion_sets(candidates: Sequence[int], k: int, draws: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """``draws`` random sets of k of the ``candidates``, or every such set where there are no more than that."""
    if math.comb(len(candidates), k) <= draws:
        return list(itertools.combinations(candidates, k))
    return [tuple(sorted(rng.choice(candidates, k, replace=False).tolist())) for _ in range(draws)]


# --- the whole analysis and its files ------------------------------------------------------------------------


def check_lesion_settings(draws: int, batch_size: int) -> None:
    """Reject impossible settings, naming the option to change, before any data is loaded or compiled."""
    if draws < 1:
        raise ValueError(f"draws={draws} (--draws): draw at least one deletion set and one order per step.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} (--batch-size): evaluate at least one image per call.")


def lesion_snapshot(
    snapshot: ModelSnapshot,
    images: jax.Array,
    labels: jax.Array,
    evaluate: LesionEval,
    draws: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Baseline, single deletions, and for residual nets random deletions of k shape-preserving blocks and
    random reorderings (1 to as many swaps as there are swappable blocks), ``draws`` per k and per swap count.

    Every deletion set and order is drawn first, so that the progress line knows the number of evaluations (a
    110-layer net takes hundreds)."""
    began = time.perf_counter()
    infos = block_infos(snapshot.model, snapshot.variables, images)
    n = len(infos)
    residual = infos[0].kind != "plain"
    singles = [info.depth for info in infos if deletable(info)]
    deletions, orders = _random_lesions(infos, draws, rng) if residual else ([], [])
    line = ProgressLine(f"lesion {snapshot.label}", 1 + len(singles) + len(deletions) + len(orders), "evaluations")
    done = 0

    def error(deleted: Sequence[int], variables: dict[str, Any] = snapshot.variables) -> float:
        nonlocal done
        value = evaluate.error(variables, images, labels, [d in deleted for d in range(n)])
        done += 1
        line.update(done)
        return value

    report = {
        **snapshot.report_fields(),
        "residual": residual,
        "chance_error": 1 - 1 / snapshot.model.num_classes,
        "baseline_error": error(()),
    }
    single_errors = {depth: error((depth,)) for depth in singles}
    report["single"] = [
        {
            "name": info.name,
            "depth": info.depth,
            "kind": info.kind,
            "downsampling": info.input_shape != info.output_shape,
            "error": single_errors.get(info.depth),
        }
        for info in infos
    ]
    if residual:
        report["random"] = [{"deleted": len(s), "blocks": list(s), "error": error(s)} for s in deletions]
        report["reorder"] = [
            {
                "order": order,
                "kendall_tau": kendall_tau(order),
                "error": error((), reordered_variables(snapshot.variables, infos, order)),
            }
            for order in orders
        ]
    report["seconds"] = time.perf_counter() - began
    return report


def _random_lesions(
    infos: Sequence[BlockInfo], draws: int, rng: np.random.Generator
) -> tuple[list[tuple[int, ...]], list[list[int]]]:
    """A residual net's random lesions: ``draws`` deletion sets of each size k of its shape-preserving blocks, and
    ``draws`` orders after each number of swaps from 1 to the number of blocks that can swap."""
    candidates = [info.depth for info in infos if info.input_shape == info.output_shape]
    deletions = [s for k in range(1, len(candidates) + 1) for s in deletion_sets(candidates, k, draws, rng)]
    groups = swap_groups(infos)
    swaps = range(1, sum(map(len, groups)) + 1)
    return deletions, [random_order(groups, len(infos), k, rng) for k in swaps for _ in range(draws)]


def analyze_lesions(
    snapshots: Sequence[ModelSnapshot],
    images: jax.Array,
    labels: jax.Array,
    out: str | Path,
    *,
    draws: int = 5,
    batch_size: int = 250,
    seed: int = 0,
) -> dict[str, Any]:
    """`lesion_snapshot` for every snapshot on the same test images. Writes lesion.json and, for each study that
    has results (single; random and reorder need a residual snapshot), lesion_<study>.csv and .png to ``out``;
    returns the JSON's content."""
    check_lesion_settings(draws, batch_size)
    out = Path(out)
    programs: dict[nn.Module, LesionEval] = {}
    reports = []
    for index, snapshot in enumerate(snapshots):
        if snapshot.model not in programs:  # checkpoints of one model share its program
            programs[snapshot.model] = LesionEval(snapshot.model, batch_size)
        rng = np.random.default_rng([seed, index])
        reports.append(lesion_snapshot(snapshot, images, labels, programs[snapshot.model], draws, rng))
    residual = [r for r in reports if r["residual"]]
    studies = {"single": (reports, plot_single), "random": (residual, plot_random), "reorder": (residual, plot_reorder)}
    tables = {study: _rows(studied, study) for study, (studied, _) in studies.items()}
    tables = {study: rows for study, rows in tables.items() if rows}  # e.g. no reordering with one block per stage
    files = [out / "lesion.json"] + [out / f"lesion_{study}.{ext}" for study in tables for ext in ("csv", "png")]
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": len(images),
            "draws": draws,
            "seed": seed,
            "forward": "BN in inference mode (running statistics)",
            "deletion": "y = shortcut(x) (residual blocks), y = x (shape-preserving plain blocks)",
        },
        "summary": {r["label"]: _summary(r) for r in reports},
        "models": reports,
        "files": [str(path) for path in files],
    }
    write_json(out / "lesion.json", report)
    for study, rows in tables.items():
        studied, plot = studies[study]
        write_csv(out / f"lesion_{study}.csv", rows)
        plot(studied, out / f"lesion_{study}.png")
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Baseline error; mean and worst error after deleting one shape-preserving block; each downsampling block's."""
    kept = [row["error"] for row in report["single"] if not row["downsampling"] and row["error"] is not None]
    summary = {
        "baseline_error": report["baseline_error"],
        "single_mean_error": float(np.mean(kept)) if kept else None,
        "single_max_error": max(kept, default=None),
        "downsampling_errors": {row["name"]: row["error"] for row in report["single"] if row["downsampling"]},
    }
    if report["residual"]:
        by_k = _random_by_k(report)
        summary["random_mean_error"] = {k: mean for k, (mean, _) in by_k.items()}
    return summary


def _random_by_k(report: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """Mean and standard deviation of the error over the draws of each number of deleted blocks."""
    by_k: dict[int, list[float]] = {}
    for row in report["random"]:
        by_k.setdefault(row["deleted"], []).append(row["error"])
    return {k: (float(np.mean(errors)), float(np.std(errors))) for k, errors in by_k.items()}


def _rows(reports: list[dict[str, Any]], study: str) -> list[dict[str, Any]]:
    """CSV rows of one study, each with its model and (so that every table has it) the baseline error."""
    rows = []
    for report in reports:
        for row in report[study]:
            flat = {key: " ".join(map(str, value)) if isinstance(value, list) else value for key, value in row.items()}
            rows.append({"model": report["label"], "baseline_error": report["baseline_error"], **flat})
    return rows


def plot_single(reports: list[dict[str, Any]], path: Path) -> Path:
    """Error after deleting each single block, residual nets (left) beside plain nets (right), with each net's
    baseline (dashed), downsampling blocks marked, and chance (dotted) (Veit et al. Fig. 3)."""
    plt = pyplot()
    kinds = [kind for kind in (True, False) if any(r["residual"] == kind for r in reports)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for report, style in zip(reports, line_styles(reports), strict=True):
        ax = axes[0, kinds.index(report["residual"])]
        if ax is not axes[0, 0]:  # an empty line in the first panel: the one legend (`save_figure`) names it
            axes[0, 0].plot([], [], "o-", markersize=3, **style)
        rows = report["single"]
        errors = [np.nan if row["error"] is None else row["error"] for row in rows]  # gaps: blocks kept
        ax.plot([row["depth"] + 1 for row in rows], errors, "o-", markersize=3, **style)
        down = [row for row in rows if row["downsampling"] and row["error"] is not None]
        marks = {"color": style["color"], "alpha": style["alpha"], "markersize": 9}
        ax.plot([row["depth"] + 1 for row in down], [row["error"] for row in down], "X", **marks)
        ax.axhline(report["baseline_error"], linestyle="--", color=style["color"], alpha=style["alpha"])
        ax.axhline(report["chance_error"], linestyle=":", color="grey")
    for ax, kind in zip(axes[0], kinds, strict=True):
        ax.set_title("residual nets (X: downsampling block)" if kind else "plain nets (shape-preserving blocks)")
        ax.set_xlabel("deleted block (input to output)")
        ax.set_ylabel("test error")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "Test error after deleting one block (dashed: nothing deleted; dotted: chance)")


def plot_random(reports: list[dict[str, Any]], path: Path) -> Path:
    """Error against the number of deleted shape-preserving blocks, mean +/- std over draws (Veit et al. Fig. 4)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report, style in zip(reports, line_styles(reports), strict=True):
        by_k = _random_by_k(report)
        k = [0, *by_k]
        means = np.array([report["baseline_error"], *(mean for mean, _ in by_k.values())])
        stds = np.array([0.0, *(std for _, std in by_k.values())])
        ax.errorbar(k, means, yerr=stds, fmt="o-", markersize=3, capsize=3, **style)
    ax.set_xlabel("blocks deleted (shape-preserving ones, drawn at random)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, "Test error after deleting random blocks (mean +/- std over draws)")


def plot_reorder(reports: list[dict[str, Any]], path: Path) -> Path:
    """Error against Kendall's tau of the block order, one point per reordered net (Veit et al. Fig. 5)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for report, style in zip(reports, line_styles(reports), strict=True):
        taus = [1.0, *(row["kendall_tau"] for row in report["reorder"])]
        errors = [report["baseline_error"], *(row["error"] for row in report["reorder"])]
        ax.plot(taus, errors, "o", markersize=4, **style)
    ax.invert_xaxis()  # from the original order to ever more shuffled ones
    ax.set_xlabel("Kendall tau between original and new block order")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, "Test error after swapping blocks within stages")
