"""PyTorch weights in and out: torchvision-layout ResNet state_dicts <-> Flax ``params`` and ``batch_stats``.

The name map is structural: ``stem/conv`` is ``conv1``, ``stem/bn`` is ``bn1``, ``stageS/blockB/branch/convK``
is ``layerS.B.convK`` (and ``bnK``), ``stageS/blockB/shortcut/conv`` and ``/bn`` are ``layerS.B.downsample.0``
and ``.1``, ``head`` is ``fc``. So it fits every post-activation model of the registry without squeeze-and-
excitation, whose layout is torchvision's: the nine torchvision ResNets (`TORCHVISION_MODELS`, same names),
the v1 variants and the CIFAR family. Layouts: conv kernels are HWIO here and OIHW in torch, dense kernels
(in, out) here and (out, in) there; BN ``scale``/``bias``/``mean``/``var`` are ``weight``/``bias``/
``running_mean``/``running_var``. torch's ``num_batches_tracked`` has no Flax counterpart (it only matters for
BN with momentum=None): it is ignored on import and exported as 0.

torch and safetensors (the ``[torch]`` extra) are imported only when a file of theirs is read or written.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax.extras import require
from resnet_jax.faults import CorruptDataError
from resnet_jax.models.registry import create_model
from resnet_jax.models.resnet import ResNet

# torchvision.models constructors that this package's registry builds under the same name.
TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
)
LEAF_NAMES = {
    "params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
    "batch_stats": {"mean": "running_mean", "var": "running_var"},
}
SHOWN = 6  # keys listed in an error message


def torch_module(path: tuple[str, ...]) -> str:
    """The torchvision name of the Flax module at ``path``, e.g. stage1/block0/branch/conv1 -> layer1.0.conv1."""
    match path:
        case ("stem", "conv"):
            return "conv1"
        case ("stem", "bn"):
            return "bn1"
        case ("head",):
            return "fc"
        case (stage, block, part, layer) if _indexed(stage, "stage") and _indexed(block, "block"):
            prefix = f"layer{stage[5:]}.{block[5:]}"
            if part == "branch" and (_indexed(layer, "conv") or _indexed(layer, "bn")):
                return f"{prefix}.{layer}"
            if part == "shortcut" and layer in ("conv", "bn"):
                return f"{prefix}.downsample.{0 if layer == 'conv' else 1}"
    raise ValueError(
        f"Flax module {'/'.join(path)} has no counterpart in torchvision's ResNet layout (pre-activation and "
        "squeeze-and-excitation layers have none); convert a post-activation model such as "
        f"{', '.join(TORCHVISION_MODELS[:3])}."
    )


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The state_dict key of the Flax variable ``collection``/``path`` (e.g. params, (head, kernel) -> fc.weight)."""
    names = LEAF_NAMES.get(collection)
    if names is None or path[-1] not in names:
        raise ValueError(f"Flax variable {collection}/{'/'.join(path)} has no counterpart in a torch state_dict.")
    return f"{torch_module(path[:-1])}.{names[path[-1]]}"


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    """HWIO conv kernels -> OIHW, (in, out) dense kernels -> (out, in); vectors as they are."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def to_flax_layout(value: np.ndarray) -> np.ndarray:
    """OIHW conv kernels -> HWIO, (out, in) dense kernels -> (in, out); vectors as they are."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax ``params`` and/or ``batch_stats`` as a torchvision-layout state_dict of numpy arrays.

    `to_tensors` makes it what ``torch.nn.Module.load_state_dict`` takes.
    """
    unknown = sorted(set(variables) - set(LEAF_NAMES))
    if unknown:
        raise ValueError(f"Only params and batch_stats have torch counterparts; got the collections {unknown}.")
    state: dict[str, np.ndarray] = {}
    for collection in LEAF_NAMES:
        for path, value in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
            key = torch_key(collection, path)
            state[key] = np.ascontiguousarray(to_torch_layout(np.asarray(value, np.float32)))
            if path[-1] == "mean":
                state[f"{torch_module(path[:-1])}.num_batches_tracked"] = np.array(0, np.int64)
    return state


def variables_from_torch(
    state_dict: Mapping[str, np.ndarray], model: ResNet, name: str = "the model", source: str = "the state_dict"
) -> dict[str, Any]:
    """The Flax variables of ``model`` from a torchvision-layout ``state_dict``.

    Every variable of the model must be there with its shape, and every entry of the state_dict must be used:
    anything else raises a ValueError naming the keys (``name`` is the model's, ``source`` the file's).
    """
    channels = int(np.shape(state_dict["conv1.weight"])[1]) if "conv1.weight" in state_dict else 3
    expected = {}  # torch key -> (Flax path, shape, dtype)
    for (collection, *path), spec in traverse_util.flatten_dict(variable_shapes(model, channels)).items():
        expected[torch_key(collection, tuple(path))] = ((collection, *path), spec.shape, spec.dtype)
    counters = {f"{key.rsplit('.', 1)[0]}.num_batches_tracked" for key in expected if key.endswith(".running_mean")}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected) - counters)
    if missing or unexpected:
        parts = [f"missing entries ({len(missing)}): {listed_keys(missing)}"] if missing else []
        parts += [f"unexpected entries ({len(unexpected)}): {listed_keys(unexpected)}"] if unexpected else []
        raise ValueError(f"{source} does not fit {name}: {'; '.join(parts)}. {_hint()}")
    flat, wrong = {}, []
    for key in (k for k in state_dict if k in expected):  # in the file's order
        path, shape, dtype = expected[key]
        value, wanted = np.asarray(state_dict[key]), _torch_shape(shape)
        if value.shape != wanted:
            wrong.append(f"{key} is {tuple(value.shape)} where {name} has {wanted}")
            continue
        flat[path] = jnp.asarray(to_flax_layout(value), dtype)
    if wrong:
        raise ValueError(f"{source} does not fit {name}: shapes differ ({len(wrong)}): {listed_keys(wrong)}. {_hint()}")
    return traverse_util.unflatten_dict(flat)


def variable_shapes(model: ResNet, channels: int = 3) -> dict[str, Any]:
    """The shapes and dtypes of ``model``'s variables for ``channels``-channel images; nothing is computed."""
    init = partial(model.init, train=False)
    size = 224 if model.stem == "imagenet" else 32  # any size gives the same shapes
    return jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32))


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state_dict file as numpy arrays: ``.safetensors``, or anything ``torch.save`` wrote (.pth, .pt, .bin)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No weights file {path}.")
    damaged = f"{path} is damaged or not a weights file (it does not read as one); fetch or save it again"
    if path.suffix == ".safetensors":
        safetensors_numpy = require("safetensors.numpy")  # a missing extra is no damaged file
        try:
            return dict(safetensors_numpy.load_file(path))
        except Exception as error:  # safetensors' SafetensorError and the OSErrors of a truncated file
            raise CorruptDataError(f"{damaged} ({error}).") from None
    torch = require("torch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # bytes that are no pickle at all
            raise CorruptDataError(f"{damaged}.") from None
        raise ValueError(
            f"{path} holds more than tensors, so torch.load(weights_only=True) refuses it (it may be a whole pickled "
            "model). Save the weights alone: torch.save(model.state_dict(), FILE)."
        ) from error
    except (RuntimeError, EOFError, ValueError) as error:  # a truncated zip archive, an empty file
        raise CorruptDataError(f"{damaged} ({str(error).split('.')[0]}).") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        entries = sorted(state)[:SHOWN] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(
            f"{path} is not a state_dict of tensors (it holds {entries}); save model.state_dict(), or the "
            "state_dict entry of a training checkpoint, to a file of its own."
        )
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}


def load_torch_weights(path: str | Path, name: str) -> tuple[ResNet, dict[str, Any]]:
    """The model ``name`` (with the file's class count) and its variables from a torchvision-layout weights file."""
    state = read_state_dict(path)
    num_classes = int(np.shape(state["fc.weight"])[0]) if "fc.weight" in state else None
    model = create_model(name, num_classes=num_classes)
    return model, variables_from_torch(state, model, name=name, source=str(path))


def to_tensors(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """numpy state_dict -> torch tensors (for ``load_state_dict``)."""
    torch = require("torch")
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}  # writable copies, as torch wants


def save_torch_weights(variables: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``variables`` as a torchvision-layout state_dict: ``.safetensors``, else with ``torch.save``."""
    path = Path(path)
    state = torch_state_dict(variables)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        require("safetensors.numpy").save_file(state, path)
    else:
        require("torch").save(to_tensors(state), path)
    return path


def _indexed(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def listed_keys(items: list[str]) -> str:
    """The first `SHOWN` of ``items`` and how many more: the keys an error message names."""
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _hint() -> str:
    return f"Is it a checkpoint of another model? torchvision's ResNets are {', '.join(TORCHVISION_MODELS)}."
