"""Feature reuse: how similar the block outputs of a net are to each other and to another net's (linear CKA).

Centred kernel alignment (Kornblith et al. 2019) compares two representations of the same examples,
X (n, p) and Y (n, q), through their Gram matrices K = X X^T and L = Y Y^T:
CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)). It is invariant to orthogonal transforms and isotropic
scaling of either side, and does not need p = q, so it compares blocks of different widths and nets of
different architectures. High CKA between block l and the blocks after it is what "later blocks refine
what earlier ones computed" predicts for residual nets; plain nets should lose similarity faster.

The biased HSIC of the full-data formula needs every example's Gram entry at once: memory n^2 in the
number of examples. Minibatch CKA (Nguyen, Raghu & Kornblith 2021) averages the unbiased HSIC estimator
(Song et al. 2012) over minibatches of a fixed size and takes the ratio of the averages, in memory that does
not grow with the data. Each average is an unbiased estimate of its HSIC term whatever the minibatch size;
the biased estimator's expectation grows as the batch shrinks (on small batches, two independent
representations score well above 0).

The representations are what every `ResidualBlock` sows (``mutable=["intermediates"]``) with BN in
inference mode: its ``output`` for CKA; its branch output F(x) and its shortcut's value s(x) for the size
of the branch against the skip, ||F(x)|| / ||s(x)|| per example (see `branch_to_skip`).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.analysis.common import (
    ModelSnapshot,
    ProgressLine,
    line_styles,
    pyplot,
    save_figure,
    write_csv,
    write_json,
)

# The names under which `ResidualBlock` sows its values (models/blocks.py): its output y, its branch F(x)
# and its shortcut's value s(x) (blocks with a skip connection only). Read only through these.
SOWN_OUTPUT = "output"
SOWN_BRANCH = "branch_output"
SOWN_SKIP = "skip"

MIN_BATCH = 4  # the unbiased HSIC estimator divides by n (n - 3)


# --- CKA of arrays -------------------------------------------------------------------------------------------


def gram(features: jax.Array) -> jax.Array:
    """The linear Gram matrix X X^T of the examples (rows) of ``features`` (n, ...), flattened and centred.

    Centring changes neither CKA nor the unbiased HSIC (both see only covariances) but keeps float32 accurate:
    ReLU outputs are all positive, and the uncentred Gram entries would cancel in the estimators.
    """
    flat = features.reshape(features.shape[0], -1).astype(jnp.float32)
    flat = flat - jnp.mean(flat, axis=0)
    return flat @ flat.T


def linear_cka(x: jax.Array, y: jax.Array) -> float:
    """Linear CKA of two representations of the same examples, from the biased HSIC on all of them at once
    (Kornblith et al. 2019, Eq. 5): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with centred X and Y."""
    k, l_ = gram(x), gram(y)
    return float(jnp.sum(k * l_) / jnp.sqrt(jnp.sum(k * k) * jnp.sum(l_ * l_)))


@jax.jit
def unbiased_hsic(grams: jax.Array) -> jax.Array:
    """The unbiased HSIC estimator (Song et al. 2012, Eq. 3) of every pair of the Gram matrices ``grams``
    (R, n, n), all on the same n >= 4 examples: an (R, R) matrix.

    HSIC_1(K, L) = [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3)), where K~ is K
    with its diagonal set to zero.
    """
    n = grams.shape[-1]
    hollow = grams * (1.0 - jnp.eye(n, dtype=grams.dtype))
    rows = jnp.sum(hollow, axis=-1)  # (R, n): K~ 1
    totals = jnp.sum(rows, axis=-1)  # (R,): 1^T K~ 1
    traces = jnp.einsum("aij,bij->ab", hollow, hollow)
    return (traces + jnp.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows @ rows.T) / (n * (n - 3))


@dataclasses.dataclass
class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) of R representations against each other: `add` the
    Gram matrices of every minibatch, read `value`. Holds one (R, R) sum, whatever the number of examples."""

    hsic_sum: np.ndarray | None = None
    batches: int = 0

    def add(self, grams: jax.Array) -> None:
        """One minibatch: the Gram matrices (R, n, n) of the R representations on the same n >= 4 examples."""
        if grams.shape[-1] < MIN_BATCH:
            raise ValueError(f"A minibatch of {grams.shape[-1]} examples: the unbiased HSIC needs at least 4.")
        hsic = np.asarray(unbiased_hsic(grams), np.float64)
        self.hsic_sum = hsic if self.hsic_sum is None else self.hsic_sum + hsic
        self.batches += 1

    def value(self) -> np.ndarray:
        """The (R, R) CKA matrix: mean HSIC_1 of each pair over the mean HSIC_1 of each side with itself."""
        if self.hsic_sum is None:
            raise ValueError("No minibatch added yet: add the Gram matrices of at least one.")
        scale = np.sqrt(np.maximum(np.diag(self.hsic_sum), np.finfo(np.float64).tiny))
        return self.hsic_sum / np.outer(scale, scale)


def minibatch_cka(representations: Sequence[jax.Array], batch_size: int) -> np.ndarray:
    """Minibatch CKA of every pair of ``representations`` (each (N, ...), the same N examples in the same order),
    over the whole minibatches of ``batch_size`` (a remainder is left out)."""
    count = check_batching(len(representations[0]), batch_size)
    accumulator = MinibatchCKA()
    for start in range(0, count, batch_size):
        accumulator.add(jnp.stack([gram(r[start : start + batch_size]) for r in representations]))
    return accumulator.value()


def check_batching(examples: int, batch_size: int) -> int:
    """The number of examples that whole minibatches use; refuses a batch size the estimator cannot take."""
    if not MIN_BATCH <= batch_size <= examples:
        raise ValueError(
            f"batch_size={batch_size} for {examples} examples: choose between {MIN_BATCH} (the unbiased HSIC needs "
            f"n >= {MIN_BATCH}) and the number of examples, and give more examples for more minibatches."
        )
    return examples - examples % batch_size


# --- the blocks of a model -----------------------------------------------------------------------------------


def sown_blocks(intermediates: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(path, {name: value}) of every block that sowed an output, in forward order: by stage, then by block
    number (numerically, so that block10 follows block9)."""
    found: list[tuple[str, dict[str, Any]]] = []

    def visit(tree: dict[str, Any], path: tuple[str, ...]) -> None:
        if SOWN_OUTPUT in tree:
            found.append(("/".join(path), {name: value[0] for name, value in tree.items() if isinstance(value, tuple)}))
            return
        for name, subtree in tree.items():
            visit(subtree, (*path, name))

    visit(intermediates, ())
    return sorted(found, key=lambda item: tuple(int(number) for number in re.findall(r"\d+", item[0])))


def block_names(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> list[str]:
    """The paths of the model's blocks in forward order ("stage1/block0", ...), without computing anything."""
    apply = partial(model.apply, train=False, mutable=["intermediates"])
    _, state = jax.eval_shape(apply, variables, images[:1])
    return [path for path, _ in sown_blocks(state["intermediates"])]


def branch_to_skip(values: dict[str, jax.Array]) -> jax.Array:
    """||F(x)|| / ||s(x)|| per example for one block's sown values: NaN for a plain block, which has no skip.

    Against the skip rather than the block input: y = s(x) + F(x) (before the ReLU of post-activation blocks),
    so the ratio is the share of the block's output that its branch changes, and it is defined where x and F
    differ in shape (the downsampling blocks' pad or projection). For identity shortcuts s(x) = x: it is
    ||F(x)|| / ||x||.
    """
    branch = values[SOWN_BRANCH]
    if SOWN_SKIP not in values:
        return jnp.full(branch.shape[:1], jnp.nan, jnp.float32)
    return _example_norms(branch) / _example_norms(values[SOWN_SKIP])


def _example_norms(values: jax.Array) -> jax.Array:
    return jnp.linalg.norm(values.reshape(values.shape[0], -1).astype(jnp.float32), axis=1)


@partial(jax.jit, static_argnums=0)
def block_statistics(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For one minibatch, BN in inference mode: the Gram matrix of every block's output, (L, n, n), and every
    block's `branch_to_skip` per example, (L, n). One compiled program per model and minibatch shape."""
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    blocks = [values for _, values in sown_blocks(state["intermediates"])]
    return jnp.stack([gram(values[SOWN_OUTPUT]) for values in blocks]), jnp.stack(
        [branch_to_skip(values) for values in blocks]
    )


def block_cka(
    snapshots: Sequence[ModelSnapshot], images: jax.Array, batch_size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Minibatch CKA between every pair of block outputs of all ``snapshots`` together, (L, L) with L the sum of
    their blocks in the order of ``snapshots``, and each snapshot's mean `branch_to_skip` per block; every model
    sees the same minibatches of ``images``, so any two of them compare."""
    count = check_batching(len(images), batch_size)
    accumulator = MinibatchCKA()
    ratio_sums: list[Any] = [0.0] * len(snapshots)
    line = ProgressLine(f"cka {len(snapshots)} nets", count // batch_size, "minibatches")  # 110 layers: minutes
    for start in range(0, count, batch_size):
        batch = images[start : start + batch_size]
        statistics = [block_statistics(s.model, s.variables, batch) for s in snapshots]
        accumulator.add(jnp.concatenate([grams for grams, _ in statistics]))
        ratios = [np.asarray(r, np.float64).sum(1) for _, r in statistics]
        ratio_sums = [total + part for total, part in zip(ratio_sums, ratios, strict=True)]
        line.update(start // batch_size + 1)
    return accumulator.value(), [sums / count for sums in ratio_sums]


# --- the analysis --------------------------------------------------------------------------------------------


def cka_report(snapshots: Sequence[ModelSnapshot], images: jax.Array, batch_size: int = 256) -> dict[str, Any]:
    """`block_cka` of ``snapshots`` split into one CKA matrix per snapshot (its blocks against each other) and one
    per pair of snapshots (the first one's blocks as rows), with the numbers that sum them up."""
    names = [block_names(s.model, s.variables, images) for s in snapshots]
    matrix, ratios = block_cka(snapshots, images, batch_size)
    bounds = np.cumsum([0, *map(len, names)])

    def part(i: int, j: int) -> np.ndarray:
        return matrix[bounds[i] : bounds[i + 1], bounds[j] : bounds[j + 1]]

    runs = []
    for index, (snapshot, blocks) in enumerate(zip(snapshots, names, strict=True)):
        own = part(index, index)
        runs.append(
            {
                **snapshot.report_fields(),
                "blocks": blocks,
                # CKA of each block with the next: near 1 where later blocks refine what earlier ones computed
                "adjacent_cka": float(np.mean(np.diag(own, 1))) if len(blocks) > 1 else None,
                "first_last_cka": float(own[0, -1]),
                "branch_to_skip": [None if np.isnan(r) else float(r) for r in ratios[index]],
                "cka": own,
            }
        )
    pairs = []
    for i, j in itertools.combinations(range(len(snapshots)), 2):
        cross = part(i, j)
        matched = float(np.mean(np.diag(cross))) if cross.shape[0] == cross.shape[1] else None
        pairs.append({"labels": [runs[i]["label"], runs[j]["label"]], "matched_block_cka": matched, "cka": cross})
    return {"runs": runs, "pairs": pairs}


def analyze_cka(
    snapshots: Sequence[ModelSnapshot], images: jax.Array, out: str | Path, *, batch_size: int = 256
) -> dict[str, Any]:
    """`cka_report` of ``snapshots`` on ``images`` (in minibatches of ``batch_size``); writes cka.json,
    cka_branch.csv, cka.png (the heatmaps) and cka_branch.png (||F|| / ||s|| per block) to ``out``."""
    used = check_batching(len(images), batch_size)  # a bad batch size fails before anything compiles
    out = Path(out)
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": used,
            "batch_size": batch_size,
            "cka": "linear, minibatch (Nguyen et al. 2021): mean unbiased HSIC over minibatches; BN in inference mode",
            "representations": "every block's output, flattened",
            "branch_to_skip": "||F(x)|| / ||s(x)|| per example, mean over examples (none for plain blocks)",
        },
        **cka_report(snapshots, images, batch_size),
    }
    rows = [
        {"label": run["label"], "depth": depth + 1, "block": block, "branch_to_skip": ratio}
        for run in report["runs"]
        for depth, (block, ratio) in enumerate(zip(run["blocks"], run["branch_to_skip"], strict=True))
    ]
    files = [
        write_json(out / "cka.json", report),
        write_csv(out / "cka_branch.csv", rows),
        plot_cka(report, out / "cka.png"),
        plot_branch_to_skip(report["runs"], out / "cka_branch.png"),
    ]
    return {**report, "files": [str(path) for path in files]}


def plot_cka(report: dict[str, Any], path: Path) -> Path:
    """One heatmap per snapshot (its blocks against each other) and per pair of snapshots, on one colour scale."""
    plt = pyplot()
    panels = [(run["label"], run["label"], run["cka"]) for run in report["runs"]]
    panels += [(*pair["labels"], pair["cka"]) for pair in report["pairs"]]
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.4 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.45, hspace=0.4)  # room for each panel's own axis labels (two models' names)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    for ax, (first, second, cka) in zip(axes.ravel(), panels, strict=False):
        image = ax.imshow(cka, origin="lower", vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
        extent = (0.5, cka.shape[1] + 0.5, 0.5, cka.shape[0] + 0.5)
        image.set_extent(extent)
        ax.set_xlabel(f"{second}: block")
        ax.set_ylabel(f"{first}: block")
        ax.set_title(first if first == second else f"{first} vs {second}", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="linear CKA")
    fig.suptitle("Linear CKA between block outputs (minibatch, BN in inference mode)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_branch_to_skip(runs: list[dict[str, Any]], path: Path) -> Path:
    """||F(x)|| / ||s(x)|| against block depth, log scale, one curve per snapshot with skips."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown = [run for run in runs if any(r is not None for r in run["branch_to_skip"])]
    for run, style in zip(shown, line_styles(shown), strict=True):
        depths = np.arange(1, len(run["blocks"]) + 1)
        ax.plot(depths, [np.nan if r is None else r for r in run["branch_to_skip"]], ".-", **style)
    ax.set_yscale("log")
    ax.set_xlabel("block (input to output)")
    ax.set_ylabel("||F(x)|| / ||s(x)||")
    ax.grid(alpha=0.3, which="both")
    if not shown:
        ax.text(0.5, 0.5, "no block with a skip (plain nets only)", ha="center", transform=ax.transAxes)
        ax.plot([], [], label="plain nets: no skip")
    return save_figure(fig, path, "Residual branch against skip, per block (mean over examples)")
