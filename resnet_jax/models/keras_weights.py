"""Keras weights in: the ResNets of ``keras.applications`` (ResNet50/101/152 and ResNet50V2/101V2/152V2) as
Flax ``params`` and ``batch_stats`` of the registry's ``resnet<D>_keras`` and ``resnet<D>v2_keras`` models.

Those models reproduce Keras' architectures exactly (`KERAS_MODELS` says which settings do it), so the name map
is structural, as for torchvision's: ``stem/conv`` is ``conv1_conv`` (``conv1_bn``), ``stageS/blockB/branch/convK``
is ``conv{S+1}_block{B+1}_{K}_conv`` (and ``_bn``), the projection shortcut is ``_0_conv`` (``_0_bn``), a
pre-activation block's norm ``_preact_bn``, the final norm of a V2 net ``post_bn`` and ``head`` is
``predictions``. Keras stores conv kernels HWIO and dense kernels (in, out), as Flax does: no transposes. Batch
norm ``scale``/``bias``/``mean``/``var`` are Keras' ``gamma``/``beta``/``moving_mean``/``moving_variance``.

Keras reads the file (so every format it saves reads: ``.keras``, whole-model ``.h5``, and weights-only ``.h5``
such as the ImageNet weights Keras downloads, which are loaded into the ``keras.applications`` model of the
name, with 1000 classes). Keras is imported only here, through `resnet_jax.extras.require`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.extras import require
from resnet_jax.faults import CorruptDataError
from resnet_jax.models.registry import create_model
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.torch_weights import listed_keys, variable_shapes

# Registry name -> the keras.applications constructor whose architecture it reproduces.
KERAS_MODELS = {
    **{f"resnet{d}_keras": f"ResNet{d}" for d in (50, 101, 152)},
    **{f"resnet{d}v2_keras": f"ResNet{d}V2" for d in (50, 101, 152)},
}
KERAS_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}  # blocks per stage -> depth
LEAF_NAMES = {"kernel": "kernel", "scale": "gamma", "mean": "moving_mean", "var": "moving_variance"}
KERAS_SUFFIXES = (".keras", ".h5")
# keras.applications' ``preprocess_input`` of each family as (mean, std) per RGB channel in [0, 1] pixel units,
# the form every run normalises with. ResNet (v1) is Keras' "caffe" mode: BGR channels minus ImageNet's mean pixel
# in 0-255 units, unscaled (std 1/255); ResNetV2 is its "tf" mode: pixels / 127.5 - 1.
KERAS_INPUTS = {
    "caffe": ((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255,) * 3),
    "tf": ((0.5,) * 3, (0.5,) * 3),
}


def keras_layer(path: tuple[str, ...]) -> str:
    """The Keras layer name of the Flax module at ``path``, e.g. stage1/block0/branch/conv1 -> conv2_block1_1_conv."""
    match path:
        case ("stem", layer) if layer in ("conv", "bn"):
            return f"conv1_{layer}"
        case ("head",):
            return "predictions"
        case ("final_bn",):
            return "post_bn"
        case (stage, block, *rest) if _indexed(stage, "stage") and _indexed(block, "block"):
            prefix = f"conv{int(stage[5:]) + 1}_block{int(block[5:]) + 1}"
            match rest:
                case ["preact_bn"]:
                    return f"{prefix}_preact_bn"
                case ["branch", layer] if re.fullmatch(r"(conv|bn)\d", layer):
                    return f"{prefix}_{layer[-1]}_{layer[:-1]}"
                case ["shortcut", layer] if layer in ("conv", "bn"):
                    return f"{prefix}_0_{layer}"
    raise ValueError(
        f"Flax module {'/'.join(path)} has no counterpart in Keras' ResNets; convert to one of "
        f"{', '.join(KERAS_MODELS)}."
    )


def keras_key(path: tuple[str, ...]) -> str:
    """The ``layer/weight`` name of the Flax variable at ``path`` (params or batch_stats), e.g. head/kernel ->
    predictions/kernel; a norm's ``bias`` is Keras' ``beta``, a conv's or dense layer's its ``bias``."""
    module, leaf = path[:-1], path[-1]
    is_norm = re.fullmatch(r"(\w+_)?bn\d*", module[-1]) is not None
    name = ("beta" if is_norm else "bias") if leaf == "bias" else LEAF_NAMES.get(leaf)
    if name is None:
        raise ValueError(f"Flax variable {'/'.join(path)} has no counterpart in a Keras ResNet.")
    return f"{keras_layer(module)}/{name}"


def variables_from_keras(
    weights: Mapping[str, np.ndarray], model: ResNet, name: str = "the model", source: str = "the file"
) -> dict[str, Any]:
    """The Flax variables of ``model`` from Keras weights named ``layer/weight`` (as `read_keras_weights` gives).

    Every variable must be there with its shape and every weight of the file must be used; anything else raises
    a ValueError that names the keys and, where the file holds another of Keras' ResNets, the model to use.
    """
    expected = {}  # Keras key -> (Flax path, shape, dtype)
    for path, spec in traverse_util.flatten_dict(variable_shapes(model)).items():
        expected[keras_key(path[1:])] = (path, spec.shape, spec.dtype)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [
        f"{key} is {np.shape(weights[key])} where {name} has {expected[key][1]}"
        for key in weights
        if key in expected and tuple(np.shape(weights[key])) != tuple(expected[key][1])
    ]
    parts = [f"missing weights ({len(missing)}): {listed_keys(missing)}"] if missing else []
    parts += [f"unexpected weights ({len(unexpected)}): {listed_keys(unexpected)}"] if unexpected else []
    parts += [f"shapes differ ({len(wrong)}): {listed_keys(wrong)}"] if wrong else []
    if parts:
        raise ValueError(f"{source} does not fit {name}: {'; '.join(parts)}. {_hint(weights, name)}")
    flat = {path: jnp.asarray(weights[key], dtype) for key, (path, _, dtype) in expected.items()}
    return traverse_util.unflatten_dict(flat)


def keras_model_name(weights: Mapping[str, np.ndarray]) -> str | None:
    """The registry name of the Keras ResNet whose weights these are (by their layer names), or None."""
    blocks = {}
    for key in weights:
        match = re.match(r"conv([2-5])_block(\d+)_", key)
        if match:
            blocks[match[1]] = max(blocks.get(match[1], 0), int(match[2]))
    depth = KERAS_DEPTHS.get(tuple(blocks.get(str(s), 0) for s in range(2, 6)))
    if depth is None:
        return None
    preact = any(key.startswith("post_bn/") for key in weights)
    return f"resnet{depth}{'v2' if preact else ''}_keras"


def read_keras_weights(path: str | Path, name: str) -> dict[str, np.ndarray]:
    """The weights of a Keras file as ``layer/weight`` -> array: a whole model (``.keras``, ``.h5``), or weights
    alone (``.h5``, ``.weights.h5``) loaded into ``keras.applications``' model of the registry ``name``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No Keras file {path}.")
    if path.suffix not in KERAS_SUFFIXES:
        raise ValueError(f"{path} is not a Keras file; give a .keras or .h5 file (model.save or model.save_weights).")
    keras = require("keras")
    try:
        model = _load_keras_model(keras, path, name)
    except (OSError, ValueError, KeyError, TypeError) as error:  # no HDF5 or zip file, or not a model's
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptDataError(f"{path} does not read as a Keras model or its weights ({first}).") from None
    return {
        f"{layer.name}/{weight.name.split('/')[-1].split(':')[0]}": np.asarray(weight.numpy())
        for layer in model.layers
        for weight in layer.weights
    }


def load_keras_weights(path: str | Path, name: str) -> tuple[ResNet, dict[str, Any]]:
    """The registry model ``name`` (a ``*_keras`` one, with the file's class count) and its variables."""
    if name not in KERAS_MODELS:
        raise ValueError(f"--model {name} is not one of Keras' ResNets; use one of {', '.join(KERAS_MODELS)}.")
    weights = read_keras_weights(path, name)
    kernel = weights.get("predictions/kernel")
    model = create_model(name, num_classes=None if kernel is None else int(np.shape(kernel)[-1]))
    return model, variables_from_keras(weights, model, name=name, source=str(path))


def keras_run_input(variables: dict[str, Any], name: str) -> tuple[dict[str, Any], tuple, tuple]:
    """Keras weights of model ``name`` made to take RGB images as every run does, and the (mean, std) of
    keras.applications' preprocessing that they were trained with (`KERAS_INPUTS`), for the run's config.

    A v1 ResNet was trained on BGR images, so its first conv's input channels are reversed: the converted run then
    reads images like any other, and ``predict``, ``eval`` and ``export`` compute what Keras' ``preprocess_input``
    and model compute."""
    mode = "tf" if name.endswith("v2_keras") else "caffe"
    if mode == "caffe":
        stem = dict(variables["params"]["stem"])
        stem["conv"] = {**stem["conv"], "kernel": jnp.flip(jnp.asarray(stem["conv"]["kernel"]), axis=2)}
        variables = {**variables, "params": {**variables["params"], "stem": stem}}
    mean, std = KERAS_INPUTS[mode]
    return variables, mean, std


def parameter_count(variables: Mapping[str, Any]) -> int:
    """Entries of ``params`` and ``batch_stats``: what Keras' ``count_params()`` counts (its BN statistics are
    weights too), so the two numbers compare."""
    return sum(int(np.size(leaf)) for leaf in traverse_util.flatten_dict(dict(variables)).values())


def _load_keras_model(keras: Any, path: Path, name: str) -> Any:
    """A whole saved model as it is, or weights alone in the ``keras.applications`` architecture of ``name``."""
    if path.suffix == ".keras" or _has_model_config(path):
        return keras.models.load_model(path, compile=False)
    application = getattr(keras.applications, KERAS_MODELS[name])
    model = application(weights=None, classifier_activation=None)
    model.load_weights(path)
    return model


def _has_model_config(path: Path) -> bool:
    """Whether an HDF5 file is a whole model (``model.save``), not weights alone (``save_weights``)."""
    with require("h5py").File(path, "r") as file:
        return "model_config" in file.attrs


def _indexed(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def _hint(weights: Mapping[str, np.ndarray], name: str) -> str:
    held = keras_model_name(weights)
    if held and held != name:
        return f"It holds Keras' {KERAS_MODELS[held]}: convert it with --model {held}."
    if held:
        return "Its layers are Keras' ResNet's but not their shapes; was the model built with other settings?"
    return f"It is not one of Keras' ResNets ({', '.join(KERAS_MODELS.values())})."
