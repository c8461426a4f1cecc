"""Accuracy, size and CPU latency of runs side by side (``resnet-jax compare``): one table and one plot of what
each compression of a model costs and saves.

Per run: the test accuracy; the conv weights and how many are not zero (pruning zeroes weights but keeps the dense
arrays, so its saving is in what a sparse format would store); the bytes of its parameters and of its checkpoint's
state on disk; multiply-adds per image (`resnet_jax.models.complexity`); and the median wall time of the compiled
forward pass on a batch, on this process's default device.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax import data
from resnet_jax.compress.prune import prunable
from resnet_jax.models.complexity import model_cost
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.loop import evaluate
from resnet_jax.train.runs import load_run

LATENCY_REPEATS = 10


@dataclasses.dataclass(frozen=True)
class RunSize:
    label: str
    accuracy: float
    conv_weights: int
    nonzero_conv_weights: int
    param_bytes: int
    checkpoint_bytes: int
    macs: int
    latency_ms: float  # median forward pass of one batch
    conv_weight_bytes: int  # 4 (float32) or 1 (int8)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_conv_weights / self.conv_weights

    @property
    def stored_bytes(self) -> int:
        """The parameter bytes without the zeros of pruned kernels (what a sparse format stores, less its index)."""
        return self.param_bytes - (self.conv_weights - self.nonzero_conv_weights) * self.conv_weight_bytes


def checkpoint_bytes(workdir: str | Path) -> int:
    """The bytes on disk of the latest checkpoint's train state."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    folder = checkpoints.directory / str(checkpoints.latest_step()) / "state"
    checkpoints.close()
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def forward_latency_ms(model: Any, variables: dict[str, Any], images: jax.Array) -> float:
    """The median wall time of the compiled eval forward pass on ``images`` (after one warm-up call)."""
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    jax.block_until_ready(forward(variables, images))
    times = []
    for _ in range(LATENCY_REPEATS):
        began = time.perf_counter()
        jax.block_until_ready(forward(variables, images))
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def measure_run(label: str, workdir: str | Path, batch_size: int = 256) -> RunSize:
    """`RunSize` of the latest checkpoint of the run in ``workdir``."""
    model, state, config = load_run(workdir)
    params = jax.device_get(state.params)
    flat = traverse_util.flatten_dict(params, sep="/")
    conv = [np.asarray(flat[name]) for name in prunable(params)]
    source = data.load_run_source(config, config.eval_split)
    images = jnp.zeros((batch_size, *source.image_shape), jnp.float32)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return RunSize(
        label=label,
        accuracy=evaluate(workdir)["accuracy"],
        conv_weights=sum(k.size for k in conv),
        nonzero_conv_weights=int(sum(np.count_nonzero(k) for k in conv)),
        param_bytes=sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)),
        checkpoint_bytes=checkpoint_bytes(workdir),
        macs=model_cost(model, source.image_shape).macs,
        latency_ms=forward_latency_ms(model, variables, images),
        conv_weight_bytes=conv[0].itemsize,
    )


def format_table(rows: list[RunSize], batch_size: int) -> str:
    """A markdown table of ``rows``, the first the reference that the others' ratios are against."""
    reference = rows[0]
    header = (
        "| run | test accuracy | conv sparsity | nonzero conv weights | parameter bytes | checkpoint state bytes "
        f"| MMACs/image | CPU forward, batch {batch_size} (ms) |\n|" + " --- |" * 8
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.accuracy:.4f} ({100 * (r.accuracy - reference.accuracy):+.2f}) | {r.sparsity:.1%} "
            f"| {r.nonzero_conv_weights:,} | {r.param_bytes:,} (x{reference.param_bytes / r.param_bytes:.2f} smaller) "
            f"| {r.checkpoint_bytes:,} | {r.macs / 1e6:.1f} | {r.latency_ms:.1f} "
            f"(x{reference.latency_ms / r.latency_ms:.2f}) |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[RunSize], path: Path) -> Path:
    """Test accuracy against stored size (nonzero weights at their bytes each) and against CPU latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in rows:
        for axis, x in ((by_size, r.stored_bytes / 1e6), (by_time, r.latency_ms)):
            axis.scatter(x, 100 * r.accuracy)
            axis.annotate(r.label, (x, 100 * r.accuracy), fontsize=8, xytext=(4, 2), textcoords="offset points")
    by_size.set(xlabel="parameters stored (MB; zeros of pruned kernels not counted)", ylabel="test accuracy (%)")
    by_time.set(xlabel="CPU forward pass of one batch (ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def compare_runs(runs: list[tuple[str, str]], out: str | Path, batch_size: int = 256) -> list[RunSize]:
    """Measure ``runs`` ((label, workdir) pairs, the first the reference) into OUT/compression.md and .png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [measure_run(label, workdir, batch_size) for label, workdir in runs]
    table = format_table(rows, batch_size)
    (out / "compression.md").write_text(table + "\n")
    plot_rows(rows, out / "compression.png")
    print(table)
    return rows
