"""A compressed model written as a step of a new run folder, then fine-tuned there: what ``resnet-jax lowrank`` and
``resnet-jax prune-channels`` share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.loop import train_and_evaluate
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.runs import build_model, load_run, run_meta
from resnet_jax.train.steps import TrainState


def check_new_folder(out: str | Path, fine_tune_steps: int) -> Path:
    out = Path(out)
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} already holds checkpoints; choose a new --out folder.")
    if fine_tune_steps < 0:
        raise ValueError(f"fine_tune_steps={fine_tune_steps}; give 0 or more steps.")
    return out


def load_float_run(checkpoint: str | Path) -> tuple[Any, TrainState, ml_collections.ConfigDict]:
    """The model, state and config of ``checkpoint``'s latest step, refused if it is compressed already."""
    model, state, config = load_run(checkpoint)
    if any(config.get(key) is not None for key in ("lowrank", "quantize")):
        raise ValueError(f"{checkpoint} is already compressed; start from the float run it was made from.")
    return model, state, config


def write_derived_run(
    out: Path,
    config: ml_collections.ConfigDict,
    num_classes: int,
    variables: dict[str, Any],
    step: int,
    fine_tune_steps: int,
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write ``variables`` (of the model ``config`` builds) as step ``step`` of a run in ``out`` with a new optimizer
    state, then train it ``fine_tune_steps`` more steps there, on the tail of the run's own learning-rate schedule
    stretched by that many steps. ``meta`` joins the checkpoint's meta (`run_meta`), which is returned."""
    config.num_train_steps = step + fine_tune_steps
    model = build_model(config, num_classes)
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))
    state = TrainState.create(
        apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )
    meta = run_meta(config, step) | meta
    checkpoints = Checkpoints(out, every_steps=1, keep_latest=1, async_save=False)
    checkpoints.save(step, state.replace(step=step), meta, force=True)
    checkpoints.close()
    if fine_tune_steps:
        train_and_evaluate(config, out)
    return meta


def source_meta(workdir: str | Path) -> dict[str, Any]:
    """What the run in ``workdir`` recorded of its data (class count, image shape), so that the derived run needs
    no data set to be read back; empty for a training run, whose data set says."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False)
    meta = checkpoints.read_meta()
    checkpoints.close()
    return {key: meta[key] for key in ("num_classes", "image_shape") if key in meta}
