"""Degradation (He et al. 2015, Fig. 6): plain and residual nets of several depths trained with one recipe.

The signal is the training error ordered by depth: deeper plain nets train to a HIGHER error (an
optimisation failure, not overfitting), deeper residual nets to a lower one. Every net is an ordinary
`train_and_evaluate` run in OUT/runs/<model>, so a rerun resumes an unfinished run and leaves a
finished one alone; the curves are read back from each run's metrics.jsonl. Training error is that of
the training batches over each logging window (augmented, BN in training mode), as He et al. plot it;
test error is over the whole test split.

The verdict compares the LATE training error: the mean of the windows in the second half of training.
The last window alone is a few thousand images (about +-0.5% on Fashion-MNIST), as large as the effect
in a short run; the average follows the curves that He et al. compare rather than one point of them.
Degradation is shown when that error rises with every added depth for plain nets; He et al.'s finding
reproduces when, besides, it falls with every added depth for residual nets (REFERENCE.md, "Degradation").
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.analysis.common import pyplot, save_figure, write_json
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.reporting import read_metrics
from resnet_jax.train.runs import check_config

FAMILIES = ("plain", "resnet")  # left and right panel


def check_depths(config: ml_collections.ConfigDict) -> list[int]:
    """The config's depths, sorted; each must be a depth of He et al.'s CIFAR nets (6n+2) and two at least."""
    if "depths" not in config:
        raise ValueError(
            "The config has no `depths`; start from configs/degradation_fashion_mnist.py (or add "
            "config.depths = (8, 20) to yours)."
        )
    depths = sorted({int(depth) for depth in config.depths})
    bad = [depth for depth in depths if depth < 8 or (depth - 2) % 6]
    if bad:
        raise ValueError(
            f"depths={tuple(config.depths)}: {bad} not of the form 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, ...); "
            "fix --config.depths."
        )
    if len(depths) < 2:
        raise ValueError(f"depths={tuple(config.depths)}: compare at least two depths, e.g. --config.depths=(8,20).")
    return depths


def run_configs(
    config: ml_collections.ConfigDict, depths: list[int]
) -> list[tuple[str, int, ml_collections.ConfigDict]]:
    """(family, depth, training config) of every net: the one recipe with the model swapped in, plain nets first."""
    runs = []
    for family in FAMILIES:
        for depth in depths:
            run = config.copy_and_resolve_references()
            run.model = f"{family}{depth}"
            runs.append((family, depth, run))
    return runs


def finished_run(run: ml_collections.ConfigDict, workdir: Path) -> bool:
    """Whether ``workdir`` holds the finished run of ``run``; raises if it holds a run of another recipe, whose
    curves would be mixed with this one's. The depths are no part of a recipe: a run is reused when depths are
    added (and a `resnet-jax train` run of the same config, moved into OUT/runs, counts too)."""
    if not (workdir / "checkpoints").is_dir():
        return False
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False, read_only=True)
    step = checkpoints.latest_step()
    saved = checkpoints.read_meta(step)["config"] if step is not None else None
    checkpoints.close()
    if saved is None:
        return False
    wanted = json.loads(json.dumps(run.to_dict()))  # tuples as lists, as the checkpoint stores them
    changed = sorted(k for k in (wanted.keys() | saved.keys()) - {"depths"} if wanted.get(k) != saved.get(k))
    if changed:
        raise ValueError(
            f"{workdir} holds a run of another recipe (it differs in {changed}); choose another --out, or delete "
            "that folder to train it again."
        )
    return step >= run.num_train_steps


def error_curves(workdir: Path) -> dict[str, list[list[float]]]:
    """(step, error in %) of the training windows and of the test evaluations; a step logged twice (a run
    resumed from an earlier checkpoint) counts once, at its latest value."""
    latest = {(record["split"], record["step"]): record["accuracy"] for record in read_metrics(workdir)}
    return {
        split: [[step, 100 * (1 - accuracy)] for (kind, step), accuracy in sorted(latest.items()) if kind == split]
        for split in ("train", "test")
    }


def late_error(curve: list[list[float]], num_train_steps: int) -> float:
    """Mean error of the points of ``curve`` in the second half of training (the last point if none other is)."""
    late = [error for step, error in curve if step > num_train_steps / 2] or [curve[-1][1]]
    return sum(late) / len(late)


def analyze_degradation(config: ml_collections.ConfigDict, out: str | Path) -> dict[str, Any]:
    """Train (or resume) plain and residual nets at every depth of ``config.depths`` with ``config``'s recipe;
    writes degradation.json and degradation.png to ``out`` and returns the JSON's content with the files written."""
    depths = check_depths(config)
    check_config(config)
    out = Path(out)
    configs = run_configs(config, depths)
    finished = [finished_run(run, out / "runs" / run.model) for _, _, run in configs]  # all checked before training
    for (_, _, run), done in zip(configs, finished, strict=True):
        if not done:
            train_and_evaluate(run, out / "runs" / run.model)
    runs = []
    for family, depth, run in configs:
        curves = error_curves(out / "runs" / run.model)
        runs.append(
            {
                "model": run.model,
                "family": family,
                "depth": depth,
                "workdir": str(out / "runs" / run.model),
                "final_train_error": curves["train"][-1][1],
                "final_test_error": curves["test"][-1][1],
                "late_train_error": late_error(curves["train"], run.num_train_steps),
                **curves,
            }
        )
    report = {
        "settings": {
            "depths": depths,
            "dataset": config.dataset,
            "num_train_steps": config.num_train_steps,
            "batch_size": config.batch_size,
            "train_error": "training batches over each logging window (augmented, BN in training mode), %",
            "late_train_error": "mean training error of the windows in the second half of training, %",
            "test_error": "whole test split, %",
        },
        "summary": summarize(runs),
        "runs": runs,
    }
    files = [write_json(out / "degradation.json", report), plot_degradation(runs, out / "degradation.png")]
    return {**report, "files": [str(path) for path in files]}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Errors per model, how each family's late training error moves with depth, the two halves of He et al.'s
    finding, and one sentence.

    The halves are told apart because they can part ways: on a short schedule plain nets degrade with depth while
    deeper residual nets are not yet better (both halves are needed for "reproduces"). ``skip_gain`` is plain minus
    residual late training error at each depth: what the skips are worth, growing with depth where they cure the
    degradation.
    """
    trends, phrases = {}, []
    for family in FAMILIES:
        errors = [run["late_train_error"] for run in runs if run["family"] == family]
        steps = list(itertools.pairwise(errors))
        trend = "worse" if all(b > a for a, b in steps) else "better" if all(b < a for a, b in steps) else "mixed"
        trends[family] = trend
        values = ", ".join(f"{r['depth']}: {r['late_train_error']:.2f}%" for r in runs if r["family"] == family)
        phrases.append(f"{family} late training error {values} ({trend} with depth)")
    late = {(run["family"], run["depth"]): run["late_train_error"] for run in runs}
    gain = {depth: late["plain", depth] - late["resnet", depth] for family, depth in late if family == "plain"}
    degrades, improves = trends["plain"] == "worse", trends["resnet"] == "better"  # REFERENCE.md: the two orders
    if not degrades:
        verdict = "plain nets do not degrade with depth: no degradation shown"
    elif improves:
        verdict = "plain nets degrade with depth and deeper residual nets are better: He et al.'s Fig. 6 reproduces"
    else:
        verdict = "plain nets degrade with depth, but deeper residual nets are not better"
    return {
        "final": [
            {key: run[key] for key in ("model", "depth", "late_train_error", "final_train_error", "final_test_error")}
            for run in runs
        ],
        "plain_with_depth": trends["plain"],
        "resnet_with_depth": trends["resnet"],
        "skip_gain": {str(depth): value for depth, value in sorted(gain.items())},
        "degradation_shown": degrades,
        "deeper_residual_better": improves,
        "reproduces": degrades and improves,
        "statement": f"{'; '.join(phrases)}: {verdict}.",
    }


def plot_degradation(runs: list[dict[str, Any]], path: Path) -> Path:
    """Error against step, plain nets left and residual nets right: thin lines training error, bold test error,
    one colour per depth in both panels (He et al. 2015, Fig. 6). The error axis is logarithmic, so that a plain
    net stuck near chance and residual nets a point apart are both readable on one figure."""
    from matplotlib import colormaps
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt = pyplot()
    depths = sorted({run["depth"] for run in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, family in zip(axes, FAMILIES, strict=True):
        for run in (r for r in runs if r["family"] == family):
            colour = colormaps["tab10"](depths.index(run["depth"]) % 10)
            ax.plot(*zip(*run["train"], strict=True), color=colour, linewidth=0.8, label=f"{run['depth']} layers train")
            test = f"{run['depth']} layers test"
            ax.plot(*zip(*run["test"], strict=True), "o-", color=colour, linewidth=2.2, markersize=4, label=test)
        ax.set_title("plain nets" if family == "plain" else "residual nets")
        ax.set_xlabel("training step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 5, 10, 20, 50 (%): readable without a key
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes[0].set_ylabel("error (%)")
    return save_figure(fig, path, "Training (thin) and test (bold) error by depth")
