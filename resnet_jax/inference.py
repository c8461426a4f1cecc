"""Inference on image files: torchvision's evaluation preprocessing, top-k classes and feature maps.

`preprocess` is the transform of torchvision's ImageNet weights (shorter side resized to 256 by PIL's antialiased
bilinear filter, central 224x224 crop, per-channel normalisation), done with PIL as torchvision does, so an image
reaches a converted checkpoint as it reaches the torchvision model. `Inference` runs a model in eval mode over
batches of one fixed size (the last one padded), so its forward pass compiles once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np

from resnet_jax import data
from resnet_jax.data.augment import CHANNEL_STATS
from resnet_jax.train.runs import load_run

if TYPE_CHECKING:
    from PIL import Image

    from resnet_jax.models import ResNet

IMAGE_SIZE, RESIZE_SIZE = 224, 256
CLASS_FILE = "imagenet_classes.txt"  # package data of resnet_jax.data: the 1,000 names in class-index order


class Inference:
    """A model and its variables applied in eval mode, ``batch_size`` images at a time (one compiled shape)."""

    def __init__(self, model: ResNet, variables: dict[str, Any], batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: run at least one image at a time.")
        self.model, self.variables, self.batch_size = model, variables, batch_size
        self.forward = jax.jit(self._outputs, static_argnames="names")

    def _outputs(self, variables: dict[str, Any], images: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
        logits, features = self.model.apply(variables, images, train=False)
        return {name: logits if name == "logits" else features[name] for name in names}

    def run(self, images: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The outputs ``names`` ("logits" or keys of the model's features) of NHWC ``images``, as numpy arrays."""
        if len(images) == 0:
            raise ValueError("No images to run.")
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *batch.shape[1:]), np.float32)
            padded[: len(batch)] = batch
            outputs = jax.device_get(self.forward(self.variables, padded, names=tuple(names)))
            chunks.append({name: value[: len(batch)] for name, value in outputs.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in names}

    def predict(self, images: np.ndarray, top_k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """The ``top_k`` classes of each image, most probable first, and their softmax probabilities: (N, k) each."""
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: ask for at least one class.")
        logits = self.run(images, ["logits"])["logits"].astype(np.float64)
        probabilities = np.exp(logits - logits.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        classes = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
        return classes, np.take_along_axis(probabilities, classes, axis=-1)

    def features(self, images: np.ndarray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Feature maps (NHWC) and pooled pre-logits vectors of NHWC ``images``.

        ``names`` default to every stage output and "pre_logits": c2..c5 for ImageNet models, c0..c2 for CIFAR ones.
        """
        names = [n for n in feature_names(self.model) if n != "stem"] if names is None else names
        unknown = sorted(set(names) - set(feature_names(self.model)))
        if unknown:
            raise ValueError(f"No features {unknown}; this model has {', '.join(feature_names(self.model))}.")
        return self.run(images, names)


def feature_names(model: ResNet) -> list[str]:
    """What the model's ``features`` hold: "stem", one "c<l>" per stage (stride 2**l) and "pre_logits"."""
    return ["stem", *model.stage_features, "pre_logits"]


def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in torchvision's class-index order."""
    return tuple(resources.files("resnet_jax.data").joinpath(CLASS_FILE).read_text().splitlines())


def class_names(config: ml_collections.ConfigDict, num_classes: int) -> tuple[str, ...]:
    """The class names of a run: ImageNet's, or its data set's where that is at hand, else the class numbers."""
    names: tuple[str, ...] = ()
    if config.dataset == "imagenet2012":
        names = imagenet_class_names()
    else:
        with contextlib.suppress(FileNotFoundError):  # names are a nicety: no data set here, class numbers
            names = data.load_source(config.dataset, config.eval_split, config.data_dir, download=False).class_names
    return names if len(names) == num_classes else tuple(map(str, range(num_classes)))


def read_image(path: str | Path, channels: int = 3) -> Image.Image:
    """An image file (JPEG, PNG, anything PIL reads) as RGB, or greyscale for 1-channel models."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"Images have 1 (greyscale) or 3 (RGB) channels; this model takes {channels}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No image file {path}.")
    try:
        with Image.open(path) as image:
            return to_8_bits(image, path).convert("RGB" if channels == 3 else "L")
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path} is too large to decode safely ({error}); downscale it first.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as error:  # what PIL's decoders raise
        raise ValueError(f"{path} is not an image that PIL can read (JPEG, PNG, ...): {error}") from None


def to_8_bits(image: Image.Image, path: Path) -> Image.Image:
    """``image`` with 8-bit channels, scaled by its bit depth: PIL's own conversion of a 16-bit greyscale PNG
    ("I;16", or "I" as PNGs open) clips every value above 255, so that a photo becomes nearly white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N") or (image.mode == "I" and image.format in ("PNG", "TIFF")):
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(
                f"{path} has values outside 16 bits ({pixels.min():g}..{pixels.max():g}); save it as 8 or 16 bits."
            )
        return Image.fromarray(np.round(pixels / 257).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"{path} holds {image.mode!r} pixels (32-bit), whose range is unknown; save it as 8 or 16 bits."
        )
    return image


def preprocess(
    image: Image.Image,
    mean: Sequence[float] = CHANNEL_STATS["imagenet2012"][0],
    std: Sequence[float] = CHANNEL_STATS["imagenet2012"][1],
    size: int = IMAGE_SIZE,
    resize: int = RESIZE_SIZE,
) -> np.ndarray:
    """torchvision's evaluation transform: shorter side to ``resize`` (bilinear, antialiased), central ``size`` x
    ``size`` crop, values in [0, 1] normalised by ``mean`` and ``std``. float32 (size, size, channels)."""
    from PIL import Image

    if not 1 <= size <= resize:
        raise ValueError(f"size={size}, resize={resize}: the crop must fit the resized image (1 <= size <= resize).")
    width, height = image.size
    scale = resize / min(width, height)
    new_width, new_height = (resize, int(height * scale)) if width <= height else (int(width * scale), resize)
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    left, top = round((new_width - size) / 2.0), round((new_height - size) / 2.0)
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    pixels = pixels.reshape(size, size, -1)
    return ((pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def load_images(
    paths: Sequence[str | Path],
    config: ml_collections.ConfigDict,
    channels: int,
    size: int = IMAGE_SIZE,
    resize: int = RESIZE_SIZE,
) -> np.ndarray:
    """Image files preprocessed for a run of ``config``: normalised as its model takes images (its own
    normalisation, e.g. a Keras conversion's, else its data set's statistics, ImageNet's for data sets without
    published ones). (N, size, size, channels) float32."""
    mean, std = data.run_normalisation(config) or CHANNEL_STATS.get(config.dataset, CHANNEL_STATS["imagenet2012"])
    if len(mean) != channels:  # e.g. RGB photos for a model fine-tuned on greyscale images
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return np.stack([preprocess(read_image(p, channels), mean, std, size, resize) for p in paths])


def checkpoint_inference(
    workdir: str | Path, step: int | None = None, batch_size: int = 32
) -> tuple[Inference, ml_collections.ConfigDict]:
    """An `Inference` of the checkpoint at ``step`` (default: the latest) of a run or `convert` output, and its
    config."""
    model, state, config = load_run(workdir, step)
    return Inference(model, {"params": state.params, "batch_stats": state.batch_stats}, batch_size), config


def input_channels(inference: Inference) -> int:
    """The channels the model's stem takes."""
    return int(inference.variables["params"]["stem"]["conv"]["kernel"].shape[2])
