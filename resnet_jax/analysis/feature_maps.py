"""Feature maps: what every stage of a net computes on given images, as images, residual against plain.

For each image and each stage output (the stem's and every stage's, BN in inference mode, as the model
returns them in its ``features``): the mean over channels, which shows where the stage responds at all, and
the most active channels, which show what it responds to. A channel's activity on an image is its mean
absolute value over the map: post-activation stages output ReLUs (|a| = a), pre-activation stages output
the signed sum s + F, where a strongly negative channel carries as much as a strongly positive one. A net
whose deeper maps lose the image's structure, or go flat, shows it here before any number does (the
debugging view of the ResNet guides behind this project).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from resnet_jax.analysis.common import ModelSnapshot, pyplot, write_json

SUMMARY_KEYS = ("shape", "channels", "activity")  # what features.json keeps of each stage (not the maps)


def stage_outputs(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    """The stem's and every stage's output (N, H, W, C) in forward order, by the model's feature names ("stem",
    then "c<l>" at stride 2**l), BN in inference mode; the pooled vector is left out."""
    outputs = _stage_outputs(model, variables, images)  # a compiled program returns its dict with sorted keys
    return {name: outputs[name] for name in sorted(outputs, key=lambda n: -1 if n == "stem" else int(n[1:]))}


@partial(jax.jit, static_argnums=0)
def _stage_outputs(model: nn.Module, variables: dict[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    _, features = model.apply(variables, images, train=False)
    return {name: value for name, value in features.items() if value.ndim == 4}


def channel_activity(maps: np.ndarray) -> np.ndarray:
    """Mean absolute value of every channel of every image's map, (N, C) from (N, H, W, C)."""
    return np.mean(np.abs(maps), axis=(1, 2))


def most_active_channels(maps: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` most active channels of every image, most active first, (N, count)."""
    if not 1 <= count <= maps.shape[-1]:
        raise ValueError(f"count={count}: choose between 1 and the {maps.shape[-1]} channels of the map.")
    return np.argsort(-channel_activity(maps), axis=1, kind="stable")[:, :count]


def feature_maps(model: nn.Module, variables: dict[str, Any], images: jax.Array, top: int = 3) -> dict[str, Any]:
    """Per stage: the channel mean of every image's map (N, H, W), its ``top`` most active channels (N, top),
    their activities and their maps (N, top, H, W)."""
    stages = {}
    for name, value in stage_outputs(model, variables, images).items():
        maps = np.asarray(value, np.float32)
        channels = most_active_channels(maps, min(top, maps.shape[-1]))
        chosen = np.take_along_axis(maps, channels[:, None, None, :], axis=3)  # (N, H, W, top)
        stages[name] = {
            "shape": list(maps.shape[1:]),
            "channel_mean": maps.mean(axis=3),
            "channels": channels,
            "activity": np.take_along_axis(channel_activity(maps), channels, axis=1),
            "maps": np.moveaxis(chosen, 3, 1),
        }
    return stages


def analyze_features(
    snapshots: Sequence[ModelSnapshot], images: jax.Array, out: str | Path, *, top: int = 3
) -> dict[str, Any]:
    """`feature_maps` of every snapshot on the same ``images``; writes features.json (per stage: the shape, the
    most active channels and their activities) and one PNG per snapshot, features_<n>_<label>.png, to ``out``."""
    if top < 1:
        raise ValueError(f"top={top}: show at least one channel per stage.")
    out = Path(out)
    runs, files = [], []
    for index, snapshot in enumerate(snapshots, start=1):
        stages = feature_maps(snapshot.model, snapshot.variables, images, top)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", snapshot.label).strip("_")
        files.append(
            plot_feature_maps(stages, np.asarray(images), out / f"features_{index}_{slug}.png", snapshot.label)
        )
        summary = {name: {key: stage[key] for key in SUMMARY_KEYS} for name, stage in stages.items()}
        runs.append({"label": snapshot.label, "model": snapshot.name, "step": snapshot.step, "stages": summary})
    report = {
        "settings": {
            "input_shape": list(images.shape[1:]),
            "examples": int(images.shape[0]),
            "top": top,
            "activity": "mean |activation| of a channel over the map, BN in inference mode",
        },
        "runs": runs,
    }
    files.insert(0, write_json(out / "features.json", report))
    return {**report, "files": [str(path) for path in files]}


def plot_feature_maps(stages: dict[str, Any], images: np.ndarray, path: Path, title: str) -> Path:
    """One row per image: the image, then per stage its channel mean and its most active channels (each panel
    on its own colour scale: the maps' shapes matter here, not their sizes)."""
    plt = pyplot()
    columns: list[tuple[str, int | None]] = [("input", None)]
    for name, stage in stages.items():
        columns += [(name, None)] + [(name, k) for k in range(stage["maps"].shape[1])]
    fig, axes = plt.subplots(len(images), len(columns), figsize=(1.1 * len(columns), 1.25 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        for ax, (name, k) in zip(axes[row], columns, strict=True):
            picture, caption = _panel(stages, image, row, name, k)
            ax.imshow(picture, cmap="gray" if name == "input" else "viridis", interpolation="nearest")
            ax.set_title(caption, fontsize=6)
            ax.axis("off")
    fig.suptitle(f"{title}: feature maps per stage (channel mean, most active channels)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _panel(stages: dict[str, Any], image: np.ndarray, row: int, name: str, k: int | None) -> tuple[np.ndarray, str]:
    """What one panel shows and its caption: the input, a stage's channel mean (k None) or its k-th channel."""
    if name == "input":
        return image.mean(axis=-1), "input"
    stage = stages[name]
    if k is None:
        return stage["channel_mean"][row], f"{name} mean"
    return stage["maps"][row, k], f"{name} ch {stage['channels'][row, k]}"
