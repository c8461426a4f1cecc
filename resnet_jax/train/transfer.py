"""Transfer learning: runs that start from other weights, and PyTorch weights in and out of run folders.

Config keys (configs/default.py; their defaults train from scratch):

- ``init_from``: a folder holding checkpoints (the ``--out`` of ``resnet-jax convert`` or a training workdir).
  At step 0 its latest ``params`` and ``batch_stats`` replace the fresh ones; a run that resumes restores its own
  checkpoint instead. The model must be the same. The head is re-initialised where its class count differs (or
  always, with ``reinit_head``). A 3-channel stem meets 1-channel images with its kernel summed over the input
  channels: exactly the pretrained net applied to the grey image copied into three channels, so a run on
  Fashion-MNIST needs no 3-channel copy of its data (and evaluation and analysis see the data as stored).
- ``freeze_backbone`` / ``stage_lr_multipliers``: see `resnet_jax.train.optim.create_optimizer`.
- ``bn_update=False``: BN layers normalise with their running statistics in training too and keep them
  (torchvision's FrozenBatchNorm2d). Otherwise the batch statistics of the new data replace the pretrained ones,
  and train and eval mode normalise differently while they do.

`convert_torch_checkpoint` writes a torchvision-layout state_dict as step 0 of a run, the folder that
``resnet-jax eval``, ``predict``, ``analyze`` and ``init_from`` read; `convert_keras_checkpoint` does the same for
the weights of Keras' ResNets; `export_torch_checkpoint` writes a run's weights back out as a state_dict.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from resnet_jax.models import ResNet
from resnet_jax.models.keras_weights import keras_run_input, load_keras_weights
from resnet_jax.models.torch_weights import load_torch_weights, save_torch_weights
from resnet_jax.train.checkpoint import Checkpoints
from resnet_jax.train.optim import create_optimizer, learning_rate_schedule
from resnet_jax.train.precision import DynamicLossScale
from resnet_jax.train.runs import build_model, run_meta
from resnet_jax.train.steps import TrainState, create_train_state

STEM_KERNEL = ("stem", "conv", "kernel")


def read_variables(workdir: str | Path, step: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``params`` and ``batch_stats`` of the checkpoint at ``step`` (default: the latest) in ``workdir``, and its
    meta (model, dataset, config, step). Reads any checkpoint whatever its optimizer or number of devices."""
    checkpoints = Checkpoints(workdir, every_steps=1, keep_latest=1, async_save=False, read_only=True)

    def read(at: int) -> tuple[dict, dict]:
        return checkpoints.read_state(at), checkpoints.read_meta(at)

    try:
        if not checkpoints.steps():
            raise FileNotFoundError(f"No checkpoint in {checkpoints.directory}.")
        state, meta = read(step) if step is not None else checkpoints.newest_readable(read, set_aside=False)[1]
    finally:
        checkpoints.close()
    return {"params": state["params"], "batch_stats": state["batch_stats"]}, meta


def init_from_checkpoint(state: TrainState, config: ml_collections.ConfigDict) -> tuple[TrainState, str]:
    """``state`` with the weights of ``config.init_from`` (see the module docstring), and a line saying what changed."""
    source = config.init_from
    variables, meta = read_variables(source)
    if meta["model"] != config.model:
        raise ValueError(
            f"init_from {source} holds {meta['model']} weights, not {config.model}; set model={meta['model']} "
            f"or start from a {config.model} checkpoint."
        )
    notes: list[str] = []
    params = _transfer(state.params, variables["params"], source, config.get("reinit_head", False), notes)
    batch_stats = _transfer(state.batch_stats, variables["batch_stats"], source, False, notes)
    done = f"initialised from {source} (step {meta['step']} of {meta['model']} on {meta['dataset']})"
    return state.replace(params=params, batch_stats=batch_stats), "; ".join([done, *notes])


def frozen_bn(model: ResNet) -> Callable[..., Any]:
    """``model.apply`` with BN on its running statistics in training too: the ``apply_fn`` of ``bn_update=False``.

    The train step still asks for ``mutable=["batch_stats"]`` and gets the statistics back unchanged.
    """

    def apply(variables: Any, images: Any, *, train: bool, **kwargs: Any) -> Any:
        del train  # always inference-mode BN
        return model.apply(variables, images, train=False, **kwargs)

    return apply


def convert_torch_checkpoint(
    weights: str | Path, name: str, out: str | Path, config: ml_collections.ConfigDict, force: bool = False
) -> dict[str, Any]:
    """Write the torchvision-layout ``weights`` file as step 0 of a run of model ``name`` in ``out``; return its meta.

    ``config`` is recorded as the run's config (with ``model`` set to ``name``): its dataset, eval_split and
    data_dir are what ``resnet-jax eval`` measures on, and its optimizer fixes the structure of the saved train
    state, as `resnet_jax.train.runs.load_run` rebuilds it. The meta also records the class count and image
    shape, so that reading the checkpoint needs no data set. An existing ``out`` is replaced only with ``force``
    (`write_converted_run`).
    """
    check_converted_destination(Path(out), force)
    loaded, variables = load_torch_weights(weights, name)
    return write_converted_run(loaded, variables, name, Path(out), config, str(weights))


def convert_keras_checkpoint(
    weights: str | Path, name: str, out: str | Path, config: ml_collections.ConfigDict, force: bool = False
) -> dict[str, Any]:
    """Write the weights of a Keras ResNet file (``.keras``, ``.h5``) as step 0 of a run of model ``name`` (one of
    `resnet_jax.models.keras_weights.KERAS_MODELS`) in ``out``, as `convert_torch_checkpoint` does; return its
    meta. The run takes RGB images normalised as Keras' ``preprocess_input`` did (`keras_run_input`)."""
    check_converted_destination(Path(out), force)
    loaded, variables = load_keras_weights(weights, name)
    variables, mean, std = keras_run_input(variables, name)
    config = config.copy_and_resolve_references()
    config.input_mean, config.input_std = mean, std  # what Keras' preprocess_input did to its training images
    return write_converted_run(loaded, variables, name, Path(out), config, str(weights))


def check_converted_destination(out: Path, force: bool) -> None:
    """Refuse an ``out`` that exists unless ``force``, before any weights are read."""
    if out.exists() and not force:
        raise ValueError(f"--out {out} exists; choose a new folder, or add --force to replace it.")


def write_converted_run(
    loaded: ResNet,
    variables: dict[str, Any],
    name: str,
    out: Path,
    config: ml_collections.ConfigDict,
    source: str,
) -> dict[str, Any]:
    """Write ``variables`` of the converted model ``loaded`` (registry ``name``) as step 0 of a run in ``out``,
    whose destination the caller checked (`check_converted_destination`, before reading any weights).

    The run is written complete beside ``out`` first; an existing ``out`` is replaced whole after that, so a
    conversion that fails leaves it as it was."""
    staging, replaced = out.with_name(f".{out.name}.converting"), out.with_name(f".{out.name}.replaced")
    shutil.rmtree(staging, ignore_errors=True)
    meta = save_converted_state(loaded, variables, name, staging, config, source)
    if out.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        out.rename(replaced)
        staging.rename(out)
        shutil.rmtree(replaced)
    else:
        staging.rename(out)
    return meta


def save_converted_state(
    loaded: ResNet, variables: dict[str, Any], name: str, out: Path, config: ml_collections.ConfigDict, source: str
) -> dict[str, Any]:
    """Save ``variables`` as the step-0 train state that `load_run` rebuilds for ``config`` with model ``name``."""
    config = config.copy_and_resolve_references()
    config.model = name
    model = build_model(config, loaded.num_classes)  # with the config's dtype and overrides, as load_run builds it
    channels = variables["params"]["stem"]["conv"]["kernel"].shape[2]
    image_shape = (224, 224, channels) if model.stem == "imagenet" else (32, 32, channels)  # as the data would be
    tx = create_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1))
    # The train state that load_run rebuilds, holding the converted weights. Nothing is initialised: an eager init
    # would compile every layer on its own.
    shapes = jax.eval_shape(lambda: create_train_state(model, tx, image_shape, config.seed))
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
        loss_scale=None if shapes.loss_scale is None else DynamicLossScale.create(),
    )
    meta = run_meta(config, 0) | {
        "num_classes": model.num_classes,
        "image_shape": list(image_shape),
        "converted_from": source,
    }
    checkpoints = Checkpoints(out, every_steps=1, keep_latest=1, async_save=False)
    checkpoints.save(0, state, meta, force=True)
    checkpoints.close()
    return meta


def export_torch_checkpoint(workdir: str | Path, path: str | Path, step: int | None = None) -> Path:
    """Write the weights of a run's checkpoint as a torchvision-layout state_dict (``.safetensors`` or ``.pth``)."""
    variables, _ = read_variables(workdir, step)
    return save_torch_weights(variables, path)


def _transfer(target: Any, loaded: Any, source: str, reinit_head: bool, notes: list[str]) -> Any:
    """``loaded`` in the structure of ``target``; the fresh head where asked or where the class count differs."""
    fresh, given = traverse_util.flatten_dict(dict(target)), traverse_util.flatten_dict(dict(loaded))
    lacking, extra = sorted(set(fresh) - set(given)), sorted(set(given) - set(fresh))
    if lacking or extra:
        names = ", ".join("/".join(p) for p in [*lacking, *extra][:6])
        raise ValueError(
            f"init_from {source} has another structure than this model ({len(lacking)} variables missing, "
            f"{len(extra)} extra: {names}); start from a checkpoint of the same model and model_overrides."
        )
    out, wrong = {}, []
    for path, value in fresh.items():
        old = np.asarray(given[path])
        if path[0] == "head" and (reinit_head or old.shape != value.shape):
            out[path] = value
            if path[-1] == "kernel":
                notes.append(f"new head for {value.shape[-1]} classes (was {old.shape[-1]})")
        elif old.shape == value.shape:
            out[path] = jnp.asarray(old, value.dtype)
        elif path == STEM_KERNEL and old.shape[2] == 3 and value.shape[2] == 1 and old.shape[3] == value.shape[3]:
            out[path] = jnp.asarray(old.sum(axis=2, keepdims=True), value.dtype)
            notes.append("stem kernel summed over its 3 input channels for 1-channel images")
        else:
            wrong.append(f"{'/'.join(path)} {old.shape} for {value.shape}")
    if wrong:
        raise ValueError(
            f"init_from {source} does not fit: {', '.join(wrong[:6])}. Only the head may change shape (a new class "
            "count), and a 3-channel stem may meet 1-channel images."
        )
    return traverse_util.unflatten_dict(out)
